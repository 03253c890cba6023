"""Supervised meta-training (regression and classification): set up, train, evaluate.

Reads top to bottom like a script, in named stages:

1. ``setup``       device, seeds, the task family, model, optimizer, RNG streams
2. ``resume``      load the last checkpoint of a run and continue it exactly
3. ``train``       the meta-training loop: progress bar, TensorBoard, validation, checkpoints
4. ``evaluate``    the paper protocol on held-out test tasks -> results.json and a table
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from metarun import __version__, distributed
from metarun.algorithms import Algorithm, build
from metarun.meta import refuse_torch_batch_norm, resolve_batching
from metarun.models.norm import BatchStatNorm
from metarun.trainers.graphed import GraphedMetaStep
from metarun.trainers.loop import test_phase, train_loop, training_phase
from metarun.trainers.results import (
    diverged_tasks,
    print_results,
    reset_peak_memory,
    summarize,
    training_summary,
    write_results,
)
from metarun.types import Curve, TaskBatch
from metarun.utils import checkpoint
from metarun.utils.errors import CheckpointError, ConfigError
from metarun.utils.runtime import CoreWatch, oversubscribed, resolve_device, seed_everything, set_threads

log = logging.getLogger(__name__)


@dataclass
class Run:
    """Everything the stages share."""

    cfg: DictConfig
    run_dir: Path
    device: torch.device
    task: object
    model: torch.nn.Module
    algorithm: Algorithm
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    generators: dict[str, torch.Generator]
    batching: str
    tasks_per_rank: int = 0  # this process's share of the meta-batch (all of it without torchrun)
    iteration: int = 0
    best: float | None = None  # best validation score so far (selects checkpoints/best.pt)
    train_seconds: float = 0.0  # time spent in training steps, across resumes
    history: list[dict] = field(default_factory=list)  # every validation: iteration, seconds, scores
    test_curve: list[dict] = field(default_factory=list)  # trainer.test_interval: the test means during training
    sittings: list[dict] = field(default_factory=list)  # each stretch of training between resumes


# --- 1. set-up ------------------------------------------------------------------------------------


def setup(cfg: DictConfig, run_dir: Path, batching: str | None = None) -> Run:
    """Build the task family, model and optimizer, seeded from ``cfg.seed``; ``batching`` fixes
    what ``algorithm.batching=auto`` resolved to before (a resumed run keeps its choice)."""
    device = resolve_device(distributed.device_for(cfg.device))
    dtype = getattr(torch, cfg.dtype)
    threads = set_threads(cfg.trainer.num_threads)
    watch = CoreWatch()  # (whether other work crowds the threads, over the set-up and its batching probe)
    seed_everything(cfg.seed)
    task = instantiate(cfg.task, device=device, dtype=dtype)
    # sizes that follow from the task (e.g. out_features = ways) are passed in, not configured
    model = instantiate(cfg.model, **getattr(task, "model_kwargs", {})).to(device=device, dtype=dtype)
    refuse_torch_batch_norm(model)  # (a user's model: its meta-gradients under vmap would be wrong)
    algorithm = build(cfg.algorithm, model, task.loss_fn).to(device=device, dtype=dtype)
    if cfg.trainer.cuda_graph and device.type != "cuda":
        raise ConfigError(f"trainer.cuda_graph=true needs a CUDA device, but the run is on {device}")
    # a CUDA graph replays the optimizer step too: its state must live on the device (capturable),
    # and a scheduled rate too (a tensor the scheduler fills in place)
    capturable = cfg.trainer.cuda_graph and cfg.algorithm.outer_optimizer._target_ != "metarun.optim.SGD"
    extra = {"capturable": True} if capturable else {}
    if cfg.trainer.cuda_graph and cfg.algorithm.outer_schedule:
        extra["lr"] = torch.tensor(float(cfg.algorithm.outer_optimizer.lr), device=device, dtype=dtype)
    spec = {k: v for k, v in OmegaConf.to_container(cfg.algorithm.outer_optimizer, resolve=True).items()
            if v is not None}  # (a key left null takes the optimizer's own default: Adam's eps)
    optimizer = instantiate(spec, **extra)(algorithm.meta_parameters().values())
    # the outer rate's schedule (MAML++'s cosine annealing, Reptile's linear one), stepped every iteration
    scheduler = instantiate(cfg.algorithm.outer_schedule)(optimizer) if cfg.algorithm.outer_schedule else None
    # Training tasks come from their own generator, on the device, so the stream is
    # checkpointed and resumed exactly and does not depend on anything else drawing numbers.
    # Under torchrun each rank draws its share of the meta-batch from its own stream, seeded from
    # (seed, rank); rank 0's is the one a single process draws.
    train_gen = torch.Generator(device=device).manual_seed(distributed.rank_seed(cfg.seed))
    run = Run(cfg, run_dir, device, task, model, algorithm, optimizer, scheduler, {"train": train_gen}, "",
              distributed.check_meta_batch(cfg.algorithm.meta_batch_size))
    # every rank runs the batching rank 0 chose (auto measures, and measurements differ)
    run.batching = distributed.broadcast_object(
        batching or resolve_batching(cfg.algorithm.batching, device, model, run.tasks_per_rank)
        or measure_batching(run), "choosing the batching")
    crowded = oversubscribed(threads, watch) if device.type == "cpu" else None
    if crowded:  # (the probe's timings, and so its choice, are unreliable then too)
        log.warning("%s", crowded)
    log.info("device=%s batching=%s (%s requested) parameters=%d cpu_threads=%d", device, run.batching,
             cfg.algorithm.batching, sum(p.numel() for p in model.parameters()), threads)
    if distributed.world_size() > 1:
        log.info("distributed: %d processes (%s), meta-batch %d = %d per rank", distributed.world_size(),
                 distributed.backend(), cfg.algorithm.meta_batch_size, run.tasks_per_rank)
    return run


def sample_meta_batch(run: Run, generator: torch.Generator | None = None) -> TaskBatch:
    """This process's tasks of a training meta-batch (all ``algorithm.meta_batch_size`` of them
    without torchrun), drawn from its training stream (or from ``generator``) as the algorithm draws
    them (:meth:`~metarun.algorithms.base.Algorithm.training_tasks`)."""
    return run.algorithm.training_tasks(run.task, run.tasks_per_rank, generator or run.generators["train"])


def fixed_generator(run: Run, seed: int) -> torch.Generator:
    """A generator for a fixed task set (validation, test, the batching probe), apart from the
    training stream."""
    return torch.Generator(device=run.device).manual_seed(seed)


def measure_batching(run: Run, seed: int = 12345) -> str:
    """Time one meta-step of each batching (after a warm-up) on a throwaway copy of the model and
    a meta-batch from a separate generator, so the run itself is untouched; return the faster."""
    tasks = sample_meta_batch(run, fixed_generator(run, seed))
    model = copy.deepcopy(run.model)
    algorithm = build(run.cfg.algorithm, model, run.task.loss_fn).to(device=run.device)
    algorithm.load_state_dict(run.algorithm.state_dict())
    times = {}
    for batching in ("loop", "vmap"):
        for _ in range(2):  # the second call is timed
            start = time.perf_counter()
            algorithm.outer_gradient(dict(model.named_parameters()), tasks, batching)
            if run.device.type == "cuda":
                torch.cuda.synchronize()
            times[batching] = time.perf_counter() - start
    log.info("batching=auto measured ms/step: loop %.1f, vmap %.1f", times["loop"] * 1e3, times["vmap"] * 1e3)
    return min(times, key=times.get)


# --- 2. checkpoints and resume --------------------------------------------------------------------


def save(run: Run, name: str = checkpoint.LAST) -> Path | None:
    """Write checkpoints/<name> (rank 0; under torchrun every rank calls it, and its task stream's
    state goes into the checkpoint beside the others'). Returns the path (None on other ranks)."""
    rng = checkpoint.rng_state(run.generators)
    ranks = distributed.all_gather_object(rng, "a checkpoint") if distributed.world_size() > 1 else None
    if not distributed.is_main():
        return None
    state = {
        "model": run.model.state_dict(),
        "algorithm": run.algorithm.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict() if run.scheduler else None,
        "iteration": run.iteration,
        "rng": rng,
        "config": OmegaConf.to_container(run.cfg, resolve=True),
        # the sizes the task passed to the model (out_features = ways, image shape; none for sinusoid), so
        # metarun.load rebuilds the model from the checkpoint alone, without loading the dataset
        "model_kwargs": dict(getattr(run.task, "model_kwargs", {})),
        "metarun_version": __version__,
        "batching": run.batching,
        "best": run.best,
        "train_seconds": run.train_seconds,
        "history": run.history,
        "test_curve": run.test_curve,
        "sittings": run.sittings,
    }
    if ranks is not None:  # every rank's task stream, to continue each on the same number of ranks
        state["rng_ranks"] = ranks
    return checkpoint.save_atomic(state, run.run_dir / checkpoint.CHECKPOINT_DIR / name)


def restore(run: Run, state: dict, eval_only: bool = False) -> None:
    """Put a run back exactly where ``state`` was saved."""
    run.model.load_state_dict(state["model"])
    run.algorithm.load_state_dict(state.get("algorithm", {}))
    run.optimizer.load_state_dict(state["optimizer"])
    if run.scheduler and state.get("scheduler"):
        run.scheduler.load_state_dict(state["scheduler"])
    run.iteration = state["iteration"]
    run.best = state.get("best")
    run.train_seconds = state.get("train_seconds", 0.0)
    run.history = list(state.get("history", []))
    run.test_curve = list(state.get("test_curve", []))
    run.sittings = [dict(s) for s in state.get("sittings", [])]
    ranks = state.get("rng_ranks") or [state["rng"]]
    if distributed.rank() < len(ranks):
        checkpoint.set_rng_state(ranks[distributed.rank()], run.generators)
    else:  # a rank the saved run did not have: a fresh stream of its own, apart from its first one
        run.generators["train"].manual_seed(distributed.rank_seed(run.cfg.seed) + run.iteration)
    if len(ranks) != distributed.world_size() and not eval_only:  # (an evaluation continues nothing)
        log.info("the checkpoint was written by %d process(es), this run has %d: ranks continue their own task "
                 "streams where they exist, so the continuation differs from an uninterrupted run", len(ranks),
                 distributed.world_size())


# --- 3. training ----------------------------------------------------------------------------------


def meta_step(run: Run, tasks) -> torch.Tensor:
    """One outer step on a meta-batch: the algorithm's outer direction for every meta-parameter,
    then the optimizer's step; returns the mean query loss (detached)."""
    run.optimizer.zero_grad(set_to_none=True)
    grads, loss = run.algorithm.outer_gradient(dict(run.model.named_parameters()), tasks, run.batching)
    # under torchrun: the mean over the ranks (one all-reduce), so every rank takes the same step
    grads, (loss,) = distributed.average_dict(grads, loss)
    for name, p in run.algorithm.meta_parameters().items():
        p.grad = grads[name]
    run.optimizer.step()
    return loss


def fixed_curve(run: Run, tasks: TaskBatch, chunk: int = 100, other_at: tuple[int, ...] = (),
                what: str = "evaluation") -> Curve:
    """The adaptation curve (:meth:`Algorithm.curve`) of a fixed task set, ``chunk`` tasks at a time
    with the run's batching (under vmap, or one task after another where the probe found the loop
    faster), the queries predicted as ``trainer.transductive`` says (and after ``other_at`` steps the
    other way too), with a progress bar of the tasks done (``what`` names it) when ``trainer.progress``
    is on. Under torchrun the chunks are shared out over the ranks and gathered, and are the same
    chunks for every world size, so the numbers are too."""
    params = dict(run.model.named_parameters())
    count = len(tasks[0])
    parts = {}
    shards = list(distributed.shard(count, chunk))
    with tqdm(total=sum(min(chunk, count - s) for s in shards), desc=what, unit="task", leave=False, dynamic_ncols=True,
              disable=not (run.cfg.trainer.progress and distributed.is_main())) as bar:
        for start in shards:
            part = run.algorithm.curve(params, type(tasks)(*(t[start:start + chunk] for t in tasks)),
                                       run.task.metric_fn, run.cfg.algorithm.test_inner_steps,
                                       run.cfg.trainer.transductive, other_at, run.batching)
            parts[start] = part if distributed.world_size() == 1 else Curve(*(None if t is None else t.cpu() for t in part))
            bar.update(min(chunk, count - start))
    parts = distributed.gather_chunks(parts, "evaluation") if distributed.world_size() > 1 else list(parts.values())
    return Curve(*(None if values[0] is None else torch.cat(values, dim=1).to(run.device) for values in zip(*parts)))


def query_modes_differ(model: torch.nn.Module) -> bool:
    """Whether predicting the queries transductively or not can change the outputs: the model
    normalizes with batch statistics."""
    return any(isinstance(m, BatchStatNorm) for m in model.modules())


def mode_name(transductive: bool) -> str:
    return "transductive" if transductive else "non-transductive"


def validate(run: Run, writer: SummaryWriter | None, val_tasks) -> dict[str, float]:
    """Metric on the fixed validation tasks after 0..test_inner_steps inner steps (every rank takes
    part; rank 0 writes)."""
    alg = run.cfg.algorithm
    params = dict(run.model.named_parameters())
    curve = fixed_curve(run, val_tasks, what="validation").metric.mean(dim=1)  # (the queries predicted as trainer.transductive says)
    name = run.task.metric_name
    steps = sorted({0, min(alg.inner_steps, alg.test_inner_steps), alg.test_inner_steps, *run.cfg.trainer.report_steps})
    scores = {f"{name}_after_{s}_steps": float(curve[s]) for s in steps}
    if writer is not None:
        for key, value in scores.items():
            writer.add_scalar(f"val/{key}", value, run.iteration)
        writer.add_scalar("val/train_seconds", run.train_seconds, run.iteration)  # score against training time
    run.history.append({"iteration": run.iteration, "train_seconds": run.train_seconds,
                        **{k: v if math.isfinite(v) else None for k, v in scores.items()}})
    tr = run.cfg.trainer
    if tr.test_interval and (run.iteration % tr.test_interval == 0 or run.iteration == tr.iterations):
        run.test_curve.append(test_point(run))  # (every rank takes part, as in the evaluation)
    # the checkpoint with the best score after test_inner_steps steps is kept as best.pt
    score = float(curve[alg.test_inner_steps])
    sign = 1 if run.task.lower_is_better else -1
    if math.isfinite(score) and (run.best is None or sign * score < sign * run.best):
        run.best = score
        save(run, checkpoint.BEST)
    if writer is not None:
        gen = fixed_generator(run, run.cfg.trainer.val_seed + 1)
        run.task.visualize(writer, run.iteration, run.model, params, gen, run.algorithm.adapt_to)
    return scores


def train(run: Run) -> None:
    """The meta-training loop (:func:`~metarun.trainers.loop.train_loop`) with this trainer's
    iteration (a meta-step on a fresh meta-batch, in a CUDA graph if asked), validation on a fixed
    set of tasks, and checkpoints."""
    tr = run.cfg.trainer
    val_tasks = run.task.sample(tr.val_tasks, run.task.shots, run.task.test_queries,
                                fixed_generator(run, tr.val_seed), split="val").tasks
    step = GraphedMetaStep(meta_step) if tr.cuda_graph else meta_step

    def one_iteration():
        run.algorithm.on_iteration(run.iteration)  # what follows a schedule (MAML++'s loss weights)
        loss = step(run, sample_meta_batch(run))
        if run.scheduler is not None:
            run.scheduler.step()
        return loss, {"query_loss": loss}

    train_loop(run, one_iteration, save=lambda: save(run), validate=lambda writer: validate(run, writer, val_tasks),
               postfix={"loss": "query_loss"})


# --- 4. evaluation --------------------------------------------------------------------------------


def report_steps(cfg: DictConfig) -> list[int]:
    """The inner-step counts results.json reports: the setting's, and the algorithm's own number of
    test steps (Reptile's 50), after which the headline is taken."""
    return sorted({*cfg.trainer.report_steps, cfg.algorithm.test_inner_steps})


def evaluate(run: Run, chunk: int = 100) -> dict:
    """The paper protocol: ``trainer.test_tasks`` held-out tasks from a fixed seed, the metric on
    each task's query set after every report step, mean +- 95 % CI; for the K the model was trained
    with (the headline, first) and every other K of ``task.test_shots``. A task whose query loss
    ends ``trainer.divergence_ratio`` times above its loss before adapting is counted as diverged,
    and each cell also gives the mean without such tasks. The queries are predicted as
    ``trainer.transductive`` says; for a model with batch-statistics norm layers the other way too,
    from the same adaptation (``<K>-shot, <mode>`` entries)."""
    cfg, tr, alg = run.cfg, run.cfg.trainer, run.cfg.algorithm
    name = run.task.metric_name
    headline = f"{run.task.shots}-shot"
    results = {"task": cfg.task.name, "iteration": run.iteration, "test_tasks": tr.test_tasks,
               "test_seed": tr.test_seed, "inner_lr": alg.inner_lr, "metric": name,
               "lower_is_better": run.task.lower_is_better, "headline": headline,
               "transductive": bool(tr.transductive), "divergence_ratio": tr.divergence_ratio,
               "results": {}, "curve": {}}
    results["training"] = training_summary(run.iteration, run.train_seconds, run.device, run.sittings)
    # where the run stopped (its last validation), which can be past the evaluated (best) checkpoint
    last = run.history[-1] if run.history else {"iteration": run.iteration, "train_seconds": run.train_seconds}
    results["training"]["iterations_reached"] = last["iteration"]
    results["training"]["train_seconds_reached"] = last["train_seconds"]
    results["validation"] = run.history
    if run.test_curve:
        results["test_curve"] = run.test_curve
    other = tuple(report_steps(run.cfg)) if query_modes_differ(run.model) else ()
    for shots in dict.fromkeys([run.task.shots, *run.task.test_shots]):  # the trained K first, once
        key = f"{shots}-shot"
        curve = test_curve(run, shots, chunk, other)
        metric = curve.metric  # [steps + 1, tasks]
        diverged = diverged_tasks(curve.loss, tr.divergence_ratio)
        results["results"][key] = {f"after_{s}_steps": summarize(metric[s], diverged[s]) for s in report_steps(run.cfg)}
        results["curve"][key] = [float(v) for v in metric.double().mean(dim=1)]
        if other:  # the same adaptation, the queries predicted the other way
            results["results"][f"{key}, {mode_name(not tr.transductive)}"] = {
                f"after_{s}_steps": summarize(curve.other[s]) for s in report_steps(run.cfg)}
    return results


def test_curve(run: Run, shots: int, chunk: int = 100, other_at: tuple[int, ...] = ()) -> Curve:
    """The adaptation curve of the test protocol's tasks with ``shots`` support examples per class:
    all drawn at once from the fixed test seed, so the set never depends on the chunks."""
    tr = run.cfg.trainer
    tasks = run.task.sample(tr.test_tasks, shots, run.task.test_queries, fixed_generator(run, tr.test_seed),
                            split="test").tasks
    return fixed_curve(run, tasks, chunk, other_at, what=f"test ({shots}-shot)")


def test_point(run: Run) -> dict:
    """``trainer.test_interval``: the test protocol's means at this point of training (the trained K,
    every report step), for a learning curve on the test tasks; never used to choose a checkpoint."""
    curve = test_curve(run, run.task.shots)
    name = run.task.metric_name
    point = {"iteration": run.iteration, "train_seconds": run.train_seconds}
    for s in report_steps(run.cfg):
        cell = summarize(curve.metric[s])
        point[f"{name}_after_{s}_steps"], point[f"ci95_after_{s}_steps"] = cell["mean"], cell["ci95"]
    return point


# --- entry ----------------------------------------------------------------------------------------


def run_supervised(cfg: DictConfig, run_dir: Path, state: dict | None = None, eval_only: bool = False) -> dict:
    """Train (or continue) and evaluate; returns the results dict (also in results.json)."""
    # a resumed run keeps the batching auto chose before, so it stays bitwise exact
    reset_peak_memory()  # this run's peak, not an earlier sweep job's
    kept = state.get("batching") if state is not None and cfg.algorithm.batching == "auto" else None
    run = setup(cfg, run_dir, batching=kept)
    if state is not None:
        restore(run, state, eval_only)
        log.info("%s the checkpoint of iteration %d", "evaluating" if eval_only else "resuming from", run.iteration)
    if eval_only:  # best.pt knows the validations up to itself; last.pt, the run's whole history
        last = run_dir / checkpoint.CHECKPOINT_DIR / checkpoint.LAST
        try:
            saved = checkpoint.load(last) if last.is_file() else {}
        except CheckpointError as exc:
            log.warning("%s; results.json keeps the history up to the evaluated checkpoint", exc)
            saved = {}
        for field_name, kept in (("history", run.history), ("test_curve", run.test_curve)):
            if len(saved.get(field_name, [])) > len(kept):
                setattr(run, field_name, list(saved[field_name]))
    else:
        with training_phase(run_dir):
            train(run)
    with test_phase(cfg, run_dir, eval_only):
        best = run.run_dir / checkpoint.CHECKPOINT_DIR / checkpoint.BEST
        if not eval_only and cfg.trainer.evaluate_best and best.is_file():
            best_state = checkpoint.load(best)
            run.model.load_state_dict(best_state["model"])
            run.algorithm.load_state_dict(best_state.get("algorithm", {}))
            run.iteration, run.train_seconds = best_state["iteration"], best_state.get("train_seconds")
            run.sittings = best_state.get("sittings", [])
            log.info("evaluating the best validation checkpoint (iteration %d)", run.iteration)
        results = evaluate(run)
        if distributed.is_main():
            path = write_results(run.run_dir, results, run.cfg)
            print_results(results)
            log.info("results written to %s", path)
    return results
