"""Meta-reinforcement learning with MAML-TRPO (MAML paper, section 5.3): set up, train, evaluate.

Each iteration, in the paper's order:

1. draw ``meta_batch_size`` tasks; sample ``trajectories`` episodes per task with the meta-policy;
2. adapt a copy of the policy to each task with one REINFORCE step (linear baseline, alpha);
3. sample the same number of episodes with each adapted policy;
4. one TRPO step on the meta-parameters, whose surrogate and KL are taken on the post-update
   episodes through the inner step (second order unless ``algorithm.first_order``).

Evaluation: held-out tasks from a fixed seed; the average return after 0, 1, 2, 3 gradient steps.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.func import functional_call, vmap
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from metarun.meta import policy_gradient as pg
from metarun.meta.trpo import trpo_step
from metarun.trainers.common import (
    TrainClock,
    last_good_checkpoint,
    open_writer,
    results_table,
    stop_on_signals,
    summarize,
    training_summary,
    write_results,
)
from metarun.utils import checkpoint
from metarun.utils.errors import DivergedError, MetarunError
from metarun.utils.runtime import seed_everything, set_threads

log = logging.getLogger(__name__)


@dataclass
class RLRun:
    cfg: DictConfig
    run_dir: Path
    envs: object
    policy: torch.nn.Module
    generators: dict[str, torch.Generator]
    iteration: int = 0
    train_seconds: float = 0.0  # wall-clock time of the meta-iterations, across resumes


# --- 1. set-up ------------------------------------------------------------------------------------


def setup(cfg: DictConfig, run_dir: Path) -> RLRun:
    """The task distribution (environments) and the policy; RL runs on the CPU (small policies,
    simulators on the CPU)."""
    if cfg.device not in ("auto", "cpu"):
        log.warning("meta-RL runs on the CPU (small policies, CPU simulators): device=%s is not used", cfg.device)
    log.info("cpu_threads=%d", set_threads(cfg.trainer.num_threads))
    seed_everything(cfg.seed)
    envs = instantiate(cfg.task)
    policy = instantiate(cfg.model, obs_dim=envs.obs_dim, act_dim=envs.act_dim)
    generators = {"tasks": torch.Generator().manual_seed(cfg.seed),
                  "actions": torch.Generator().manual_seed(cfg.seed + 1)}
    return RLRun(cfg, run_dir, envs, policy, generators)


def make_act(policy: torch.nn.Module, params: dict, generator: torch.Generator, per_task: bool):
    """The sampling function the environments call: observations ``[tasks, trajectories, obs]``
    -> Gaussian actions; ``per_task`` params carry a leading task axis (adapted policies)."""

    def act(obs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            obs = obs.to(torch.float32)
            if per_task:
                mean = vmap(lambda p, o: functional_call(policy, p, (o,)))(params, obs)
                std = params["log_std"].exp()[:, None, :]
            else:
                mean, std = functional_call(policy, params, (obs,)), params["log_std"].exp()
            return mean + std * torch.randn(mean.shape, generator=generator)

    return act


def episode_returns(rollouts: pg.Rollouts) -> torch.Tensor:
    """Undiscounted return of every episode, ``[tasks, trajectories]``."""
    return (rollouts.rewards * rollouts.mask).sum(dim=-1)


def check_finite(rollouts: pg.Rollouts, what: str) -> None:
    for name, value in zip(rollouts._fields, rollouts):
        if not torch.isfinite(value).all():
            raise MetarunError(f"non-finite {name} in the {what} episodes")


# --- 2. checkpoints -------------------------------------------------------------------------------


def save(run: RLRun) -> Path:
    state = {"model": run.policy.state_dict(), "optimizer": {}, "iteration": run.iteration,
             "rng": checkpoint.rng_state(run.generators), "config": OmegaConf.to_container(run.cfg, resolve=True),
             "train_seconds": run.train_seconds}
    return checkpoint.save_atomic(state, run.run_dir / checkpoint.CHECKPOINT_DIR / checkpoint.LAST)


def restore(run: RLRun, state: dict) -> None:
    run.policy.load_state_dict(state["model"])
    run.iteration = state["iteration"]
    run.train_seconds = state.get("train_seconds", 0.0)
    checkpoint.set_rng_state(state["rng"], run.generators)


# --- 3. training ----------------------------------------------------------------------------------


def meta_iteration(run: RLRun) -> dict[str, float]:
    """One MAML-TRPO iteration (steps 1-4 of the module docstring); returns its statistics."""
    alg, envs, policy = run.cfg.algorithm, run.envs, run.policy
    params = {k: p.detach() for k, p in policy.named_parameters()}
    seed = run.cfg.seed * 1_000_003 + 2 * run.iteration  # environment resets: a fixed function of the iteration
    tasks = envs.sample_tasks(alg.meta_batch_size, run.generators["tasks"])
    pre = envs.rollout(make_act(policy, params, run.generators["actions"], False), tasks, alg.trajectories, seed)
    check_finite(pre, "pre-update")
    pre_adv = pg.advantages(pre, alg.discount, alg.gae_lambda)
    fast = pg.adapt_tasks(policy, params, pre, pre_adv, alg.inner_lr, alg.inner_steps, first_order=True)
    fast = {k: v.detach() for k, v in fast.items()}
    post = envs.rollout(make_act(policy, fast, run.generators["actions"], True), tasks, alg.trajectories, seed + 1)
    check_finite(post, "post-update")
    post_adv = pg.advantages(post, alg.discount, alg.gae_lambda)
    batch = pg.MetaBatch(pre, pre_adv, post, post_adv, *pg.old_policy_stats(policy, fast, post))

    def objective(p):
        return pg.meta_objective(policy, p, batch, alg.inner_lr, alg.inner_steps, alg.first_order)

    new_params, stats = trpo_step(params, objective, alg.max_kl, alg.cg_iterations, alg.cg_damping,
                                  alg.backtrack_ratio, alg.line_search_steps)
    if not all(torch.isfinite(p).all() for p in new_params.values()):
        raise MetarunError("non-finite policy parameters after the TRPO step")
    with torch.no_grad():
        for k, p in policy.named_parameters():
            p.copy_(new_params[k])
    return {"return_pre_update": float(episode_returns(pre).mean()),
            "return_post_update": float(episode_returns(post).mean()),
            "surrogate_before": stats.loss_before, "surrogate_after": stats.loss_after,
            "kl": stats.kl, "step_fraction": stats.step_fraction}


def train(run: RLRun) -> None:
    """Meta-iterations up to ``trainer.iterations``, or until ``trainer.max_minutes`` have passed."""
    cfg, tr = run.cfg, run.cfg.trainer
    clock = TrainClock(torch.device("cpu"), run.train_seconds, tr.max_minutes)
    writer = open_writer(run.run_dir, cfg, run.iteration)
    bar = tqdm(total=tr.iterations, initial=run.iteration, disable=not tr.progress, desc="meta-train",
               dynamic_ncols=True)
    last_good = run.iteration
    with stop_on_signals() as stop, logging_redirect_tqdm():
        while run.iteration < tr.iterations and not stop.requested:
            try:
                stats = meta_iteration(run)
            except MetarunError as exc:
                raise DivergedError(f"{exc} at iteration {run.iteration + 1}; stopped. "
                                    f"{last_good_checkpoint(run.run_dir, last_good, tr.checkpoint_interval)}") from exc
            run.iteration += 1
            with clock.paused():  # logging and checkpoints do not count as training time
                run.train_seconds = clock.seconds
                bar.update()
                for key, value in stats.items():
                    writer.add_scalar(f"train/{key}", value, run.iteration)
                bar.set_postfix(pre=f"{stats['return_pre_update']:.1f}", post=f"{stats['return_post_update']:.1f}")
                if run.iteration % tr.log_interval == 0:
                    log.info("iteration %d %s", run.iteration, " ".join(f"{k}={v:.4g}" for k, v in stats.items()))
                out_of_time = clock.out_of_time()
                if run.iteration % tr.checkpoint_interval == 0 or run.iteration == tr.iterations or out_of_time:
                    save(run)
                    last_good = run.iteration
            if out_of_time:
                clock.log_stop(run.iteration, run.run_dir)
                break
    bar.close()
    writer.close()
    if stop.requested:
        path = save(run)
        log.info("%s received: saved %s at iteration %d", stop.requested, path, run.iteration)
        raise KeyboardInterrupt(stop.requested)


# --- 4. evaluation --------------------------------------------------------------------------------


def evaluate(run: RLRun) -> dict:
    """Average return on ``trainer.test_tasks`` held-out tasks after 0..len(test_inner_lrs) steps,
    each step a REINFORCE update on the episodes of the policy before it."""
    cfg, alg, tr, envs, policy = run.cfg, run.cfg.algorithm, run.cfg.trainer, run.envs, run.policy
    tasks = envs.sample_tasks(tr.test_tasks, torch.Generator().manual_seed(tr.test_seed))
    actions = torch.Generator().manual_seed(tr.test_seed + 1)
    base = {k: p.detach() for k, p in policy.named_parameters()}
    params = {k: v.expand(len(tasks), *v.shape).clone() for k, v in base.items()}  # one copy per task
    per_step = []
    for step, lr in enumerate([*alg.test_inner_lrs, None]):
        rollouts = envs.rollout(make_act(policy, params, actions, True), tasks, alg.trajectories,
                                tr.test_seed * 7 + step)
        check_finite(rollouts, "evaluation")
        per_step.append(episode_returns(rollouts).mean(dim=1))  # mean over a task's episodes
        if lr is None:
            break
        adv = pg.advantages(rollouts, alg.discount, alg.gae_lambda)
        params = pg.adapt_tasks(policy, params, rollouts, adv, lr, 1, first_order=True, per_task=True)
        params = {k: v.detach() for k, v in params.items()}
    returns = torch.stack(per_step)  # [steps + 1, tasks]
    return {"task": cfg.task.name, "iteration": run.iteration, "test_tasks": tr.test_tasks,
            "test_seed": tr.test_seed, "metric": "return", "lower_is_better": False, "headline": "return",
            "test_inner_lrs": list(alg.test_inner_lrs),
            "results": {"return": {f"after_{s}_steps": summarize(returns[s]) for s in range(len(per_step))}},
            "curve": {"return": [float(v) for v in returns.double().mean(dim=1)]},
            "training": training_summary(run.iteration, run.train_seconds)}


def adaptation_figure(results: dict):
    """Return against the number of gradient steps, like the paper's Figure 5."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    row = results["results"]["return"]
    steps = list(range(len(row)))
    means = [row[f"after_{s}_steps"]["mean"] or math.nan for s in steps]
    cis = [row[f"after_{s}_steps"]["ci95"] or 0.0 for s in steps]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.errorbar(steps, means, yerr=cis, marker="o", capsize=3, label="MAML")
    ax.set_xlabel("number of gradient steps")
    ax.set_ylabel("average return")
    ax.set_title(results["task"])
    ax.set_xticks(steps)
    ax.legend()
    fig.tight_layout()
    return fig


def run_rl(cfg: DictConfig, run_dir: Path, state: dict | None = None, eval_only: bool = False) -> dict:
    """Train (or continue) and evaluate; returns the results dict (also in results.json)."""
    run = setup(cfg, run_dir)
    try:
        if state is not None:
            restore(run, state)
            log.info("%s the checkpoint of iteration %d", "evaluating" if eval_only else "resuming from", run.iteration)
        if not eval_only:
            train(run)
        results = evaluate(run)
    finally:
        run.envs.close()
    write_results(run_dir, results)
    with SummaryWriter(run_dir / "tb") as writer:
        writer.add_figure("test/return_vs_gradient_steps", adaptation_figure(results), run.iteration)
        for key, value in results["results"]["return"].items():
            if value["mean"] is not None:
                writer.add_scalar(f"test/return_{key}", value["mean"], run.iteration)
    print(results_table(results))
    return results
