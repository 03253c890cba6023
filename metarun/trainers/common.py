"""Pieces every trainer shares: stopping on signals, the hyperparameter table, confidence
intervals, and writing results."""

from __future__ import annotations

import json
import math
import signal
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf


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
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(path)
    return path


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
