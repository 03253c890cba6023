"""Pieces every trainer shares: stopping on signals, the training clock and time budget, the
hyperparameter table, confidence intervals, and writing results."""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter

from metarun.utils.checkpoint import atomic_file

log = logging.getLogger(__name__)


class StopRequest:
    """Ctrl-C / SIGTERM: finish the current iteration, checkpoint, stop. A second Ctrl-C aborts."""

    def __init__(self) -> None:
        self.requested: str | None = None

    def __call__(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name


@contextmanager
def stop_on_signals():
    handler, previous = StopRequest(), {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread (e.g. some launchers): no handler, no harm
            pass
    try:
        yield handler
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class TrainClock:
    """Seconds spent training, across resumes (``seconds`` goes into checkpoints), not counting
    what runs inside ``paused()`` (validation, checkpoints); and this invocation's time budget,
    ``trainer.max_minutes`` of wall-clock time (None: no limit). On a GPU the clock waits for the
    queued steps before it is read, so the seconds are the GPU's, not how fast Python queued them."""

    def __init__(self, device: torch.device, seconds: float = 0.0, max_minutes: float | None = None) -> None:
        self.device, self.seconds, self.max_minutes = device, seconds, max_minutes
        self.deadline = None if max_minutes is None else time.monotonic() + 60.0 * max_minutes
        self.start = time.perf_counter()

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def read(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds, self.start = self.seconds + now - self.start, now
        return self.seconds

    def log_stop(self, iteration: int, run_dir: Path) -> None:
        """Say that the budget ended training early, and how to continue."""
        log.info("trainer.max_minutes=%g reached at iteration %d: stopped early (checkpoint written; "
                 "metarun resume=%s continues the run)", self.max_minutes, iteration, run_dir)

    @contextmanager
    def paused(self):
        self.read()
        try:
            yield self
        finally:
            self.start = time.perf_counter()


def training_summary(iterations: int, seconds: float | None) -> dict:
    """The ``training`` entry of results.json: how long the evaluated run trained."""
    per = seconds / iterations * 1e3 if seconds is not None and iterations > 0 else None
    return {"iterations": iterations, "train_seconds": seconds, "ms_per_iteration": per}


def open_writer(run_dir: Path, cfg: DictConfig, iteration: int) -> SummaryWriter:
    """The run's TensorBoard writer (events past ``iteration`` from an earlier try are dropped);
    a fresh run also gets its hyperparameter table, once."""
    writer = SummaryWriter(run_dir / "tb", purge_step=iteration or None)
    if iteration == 0:
        writer.add_text("hparams", hparams_markdown(cfg), 0)
    return writer


def hparams_markdown(cfg: DictConfig) -> str:
    flat = OmegaConf.to_container(cfg, resolve=True)
    rows = []

    def walk(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                rows.append(f"|{prefix}{key}|{value}|")

    walk(flat)
    return "|key|value|\n|-|-|\n" + "\n".join(rows)


def mean_ci(values: torch.Tensor) -> tuple[float, float]:
    """Mean and the 95 % confidence half-width 1.96 sigma / sqrt(n) (paper protocol)."""
    values = values.double()
    return float(values.mean()), float(1.96 * values.std(unbiased=True) / math.sqrt(values.numel()))


def summarize(values: torch.Tensor) -> dict:
    """``mean`` and ``ci95`` over the tasks; where adaptation diverged on some task (a non-finite
    metric) both are null and ``nonfinite_tasks`` says on how many: no number hides it."""
    bad = int((~torch.isfinite(values)).sum())
    mean, ci = mean_ci(values) if bad == 0 else (None, None)
    return {"mean": mean, "ci95": ci, "nonfinite_tasks": bad}


def write_results(run_dir: Path, results: dict) -> Path:
    """``results.json`` in the run folder, written atomically."""
    path = run_dir / "results.json"
    with atomic_file(path) as f:
        f.write((json.dumps(results, indent=2) + "\n").encode())
    return path


def objective_cell(results: dict) -> tuple[str, dict]:
    """The result a sweep compares: the metric after the most inner steps reported, for the first
    entry of ``results["results"]`` (the first test K). Returns its name, e.g. ``"1-shot accuracy
    after 3 steps"``, and its cell (``mean``, ``ci95``, ``nonfinite_tasks``)."""
    group, row = next(iter(results["results"].items()))
    key = max(row, key=lambda k: int(k.split("_")[1]))  # after_<n>_steps
    label = f"{results['metric']} {key.replace('_', ' ')}"
    return (label if group == results["metric"] else f"{group} {label}"), row[key]


def objective(results: dict) -> float:
    """The objective cell's mean, what ``metarun`` returns to sweepers; NaN if adaptation diverged."""
    value = objective_cell(results)[1]["mean"]
    return float("nan") if value is None else value


def results_table(results: dict) -> str:
    """The printed table: a row per entry of ``results["results"]``, a column per inner-step count."""
    steps = list(next(iter(results["results"].values())))
    head = f"{results['task']} test {results['metric']} ({results['test_tasks']} tasks, mean +- 95% CI)"
    lines = [head, f"{'shots' if results['metric'] != 'return' else '':<7}" + "  ".join(f"{s.replace('after_', '').replace('_steps', ' steps'):>17}" for s in steps)]
    for shots, row in results["results"].items():
        cells = "  ".join(f"{v['mean']:>9.4f} +- {v['ci95']:.3f}" if v["mean"] is not None
                          else f"{'diverged on ' + str(v['nonfinite_tasks']):>17}" for v in row.values())
        lines.append(f"{shots:<6} {cells}")
    return "\n".join(lines)
