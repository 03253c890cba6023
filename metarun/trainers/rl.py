"""Meta-reinforcement learning (MAML paper, section 5.3): set up, train, evaluate.

Reads top to bottom like a script, in named stages:

1. ``setup``       seeds, threads, the environments (the task distribution), the policy, the
                   algorithm (:class:`~metarun.algorithms.maml_trpo.MAMLTRPO`), RNG streams
2. checkpoints     save and restore a run exactly
3. ``train``       the shared loop (:func:`~metarun.trainers.loop.train_loop`) around the
                   algorithm's meta-iteration
4. ``evaluate``    held-out tasks from a fixed seed; the average return after 0, 1, 2, 3 gradient steps
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter

from metarun import __version__, distributed
from metarun.algorithms.maml_trpo import MAMLTRPO, check_finite
from metarun.meta import policy_gradient as pg
from metarun.trainers.loop import test_phase, train_loop, training_phase
from metarun.trainers.results import (
    print_results,
    reset_peak_memory,
    summarize,
    training_summary,
    write_results,
)
from metarun.utils import checkpoint
from metarun.utils.runtime import resolve_device, seed_everything, set_threads

log = logging.getLogger(__name__)


@dataclass
class RLRun:
    cfg: DictConfig
    run_dir: Path
    envs: object
    policy: torch.nn.Module
    algorithm: MAMLTRPO
    generators: dict[str, torch.Generator]
    iteration: int = 0
    train_seconds: float = 0.0  # wall-clock time of the meta-iterations, across resumes
    sittings: list[dict] = field(default_factory=list)  # each stretch of training between resumes
    tasks_per_rank: int = 0  # this process's share of the meta-batch (all of it without torchrun)
    device: torch.device = torch.device("cpu")  # the statistics' device (the TRPO step: algorithm.device)
    model_kwargs: dict = field(default_factory=dict)  # the policy's sizes, from the environments
    training_log: list[dict] = field(default_factory=list)  # every logged iteration's statistics (the returns)


# --- 1. set-up ------------------------------------------------------------------------------------


def policy_sizes(envs) -> dict[str, int]:
    """What the policy's size follows from: the environments' observation and action sizes."""
    return {"obs_dim": int(envs.obs_dim), "act_dim": int(envs.act_dim)}


def setup(cfg: DictConfig, run_dir: Path) -> RLRun:
    """The task distribution (environments), the policy and the algorithm. The environments and the
    policy that samples them stay on the CPU; the TRPO step runs on ``device`` (a GPU when there is one
    and ``device`` is auto or cuda), which gets the episodes once per meta-iteration."""
    device = resolve_device(distributed.device_for(cfg.device))
    log.info("cpu_threads=%d trpo_device=%s", set_threads(cfg.trainer.num_threads), device)
    seed_everything(cfg.seed)
    envs = instantiate(cfg.task)
    model_kwargs = policy_sizes(envs)
    policy = instantiate(cfg.model, **model_kwargs)
    # under torchrun each rank samples its share of the tasks from streams of its own (rank 0's are
    # a single process's)
    generators = {"tasks": torch.Generator().manual_seed(distributed.rank_seed(cfg.seed)),
                  "actions": torch.Generator().manual_seed(distributed.rank_seed(cfg.seed + 1))}
    run = RLRun(cfg, run_dir, envs, policy, MAMLTRPO(cfg.algorithm, policy, device), generators)
    run.tasks_per_rank = distributed.check_meta_batch(cfg.algorithm.meta_batch_size)
    run.model_kwargs = model_kwargs
    return run


# --- 2. checkpoints -------------------------------------------------------------------------------


def save(run: RLRun) -> Path | None:
    """checkpoints/last.pt, by rank 0 (under torchrun with every rank's task and action streams)."""
    rng = checkpoint.rng_state(run.generators)
    ranks = distributed.all_gather_object(rng, "a checkpoint") if distributed.world_size() > 1 else None
    if not distributed.is_main():
        return None
    state = {"model": run.policy.state_dict(), "algorithm": run.algorithm.state_dict(), "optimizer": {},
             "iteration": run.iteration, "rng": rng,
             "config": OmegaConf.to_container(run.cfg, resolve=True), "train_seconds": run.train_seconds,
             "sittings": run.sittings, "training_log": run.training_log,
             # the policy's sizes (from the environments), so metarun.load rebuilds it from the checkpoint alone
             "model_kwargs": dict(run.model_kwargs), "metarun_version": __version__}
    if ranks is not None:
        state["rng_ranks"] = ranks
    return checkpoint.save_atomic(state, run.run_dir / checkpoint.CHECKPOINT_DIR / checkpoint.LAST)


def restore(run: RLRun, state: dict) -> None:
    run.policy.load_state_dict(state["model"])
    run.algorithm.load_state_dict(state.get("algorithm", {}))
    run.iteration = state["iteration"]
    run.train_seconds = state.get("train_seconds", 0.0)
    run.sittings = [dict(s) for s in state.get("sittings", [])]
    run.training_log = [dict(s) for s in state.get("training_log", [])]
    ranks = state.get("rng_ranks") or [state["rng"]]
    if distributed.rank() < len(ranks):
        checkpoint.set_rng_state(ranks[distributed.rank()], run.generators)
    else:  # a rank the saved run did not have: streams of its own, apart from their start
        for offset, g in enumerate(run.generators.values()):
            g.manual_seed(distributed.rank_seed(run.cfg.seed + offset) + run.iteration)


# --- 3. training ----------------------------------------------------------------------------------


def meta_iteration(run: RLRun) -> dict[str, torch.Tensor]:
    """One meta-iteration of the algorithm; the environments' resets are a fixed function of the
    iteration (and the rank), so a resumed run samples the same episodes. Under torchrun each rank
    samples its share of the tasks, and the TRPO step averages over the ranks."""
    seed = run.cfg.seed * 1_000_003 + 2 * run.iteration + (distributed.rank() << 48)
    reduce = distributed.average if distributed.world_size() > 1 else None
    return run.algorithm.meta_iteration(run.envs, run.generators, seed, run.tasks_per_rank, reduce)


def train(run: RLRun) -> None:
    """Meta-iterations up to ``trainer.iterations``, or until ``trainer.max_minutes`` have passed."""

    def one_iteration():
        stats = meta_iteration(run)
        return stats["surrogate_after"], stats

    train_loop(run, one_iteration, save=lambda: save(run),
               postfix={"pre": "return_pre_update", "post": "return_post_update"}, log_lines=True)


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
        rollouts = envs.rollout(pg.make_act(policy, params, actions, True), tasks, alg.trajectories,
                                tr.test_seed * 7 + step)
        check_finite(rollouts, "evaluation")
        per_step.append(pg.episode_returns(rollouts).mean(dim=1))  # mean over a task's episodes
        if lr is None:
            break
        params = run.algorithm.adapt_step(params, rollouts, lr)
    returns = torch.stack(per_step)  # [steps + 1, tasks]
    return {"task": cfg.task.name, "iteration": run.iteration, "test_tasks": tr.test_tasks,
            "test_seed": tr.test_seed, "metric": "return", "lower_is_better": False, "headline": "return",
            "test_inner_lrs": list(alg.test_inner_lrs),
            "results": {"return": {f"after_{s}_steps": summarize(returns[s]) for s in range(len(per_step))}},
            "curve": {"return": [float(v) for v in returns.double().mean(dim=1)]},
            "training": training_summary(run.iteration, run.train_seconds, sittings=run.sittings),
            # the training curve: the meta-batch's return before and after adapting, every log_interval
            "training_log": run.training_log}


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
    reset_peak_memory()  # this run's peak, not an earlier sweep job's
    run = setup(cfg, run_dir)
    try:
        if state is not None:
            restore(run, state)
            log.info("%s the checkpoint of iteration %d", "evaluating" if eval_only else "resuming from", run.iteration)
        if not eval_only:
            with training_phase(run_dir):
                train(run)
        # the test runs on rank 0 alone (its episodes share one action stream, so a split would
        # change them); the other ranks wait for its numbers
        with test_phase(cfg, run_dir, eval_only):
            results = distributed.broadcast_object(evaluate(run) if distributed.is_main() else None, "the test")
    finally:
        run.envs.close()
    if not distributed.is_main():
        return results
    write_results(run_dir, results, cfg)
    with SummaryWriter(run_dir / "tb") as writer:
        writer.add_figure("test/return_vs_gradient_steps", adaptation_figure(results), run.iteration)
        for key, value in results["results"]["return"].items():
            if value["mean"] is not None:
                writer.add_scalar(f"test/return_{key}", value["mean"], run.iteration)
    print_results(results)
    return results
