"""The evaluation protocol's numbers and how they are reported: confidence intervals, diverged
tasks, the headline and sweep objective, the printed table and results.json."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from metarun.report import display_scale
from metarun.utils.checkpoint import atomic_file


def training_summary(iterations: int, seconds: float | None, device: torch.device | None = None,
                     sittings: list[dict] | None = None) -> dict:
    """The ``training`` entry of results.json: how long the evaluated run trained, and the run's peak
    memory (``peak_memory_mb``: the CUDA allocator's peak on a GPU, else the peak resident set, which
    includes the dataset), counted from :func:`reset_peak_memory` at the run's start. A resumed run
    trained in several sittings, perhaps at very different speeds (another machine, other threads):
    ``sittings`` lists each one's iterations and speed, and ``ms_per_iteration_last_sitting`` is
    the speed of the latest, beside ``ms_per_iteration`` over all of them."""
    per = seconds / iterations * 1e3 if seconds is not None and iterations > 0 else None
    sittings = list(sittings or [])
    return {"iterations": iterations, "train_seconds": seconds, "ms_per_iteration": per,
            "ms_per_iteration_last_sitting": sittings[-1]["ms_per_iteration"] if sittings else per,
            "sittings": sittings, "peak_memory_mb": peak_memory_mb(device)}


def reset_peak_memory() -> None:
    """Start a run's peak-memory count afresh: the jobs of a sweep run one after another in one
    process, and each reports its own peak, not the largest of the jobs before it."""
    if torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM back to the current resident set
    except OSError:
        pass  # elsewhere the peak counts from the process's start


def peak_memory_mb(device: torch.device | None = None) -> float:
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        return status_kb("VmHWM") / 1024
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def status_kb(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in KiB; OSError where there is none."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def mean_ci(values: torch.Tensor) -> tuple[float, float]:
    """Mean and the 95 % confidence half-width 1.96 sigma / sqrt(n) (paper protocol)."""
    values = values.double()
    return float(values.mean()), float(1.96 * values.std(unbiased=True) / math.sqrt(values.numel()))


def summarize(values: torch.Tensor, diverged: torch.Tensor | None = None) -> dict:
    """One cell of results.json: ``mean`` and ``ci95`` over the tasks, and their ``median``.

    Where a task's metric is not finite, ``mean`` and ``ci95`` are null (no number hides it) and
    ``nonfinite_tasks`` says on how many. ``diverged`` (a bool per task, see :func:`diverged_tasks`)
    adds ``diverged_tasks`` and the mean and interval over the other tasks beside the full ones."""
    bad = int((~torch.isfinite(values)).sum())
    mean, ci = mean_ci(values) if bad == 0 else (None, None)
    cell = {"mean": mean, "ci95": ci, "median": float(values.double().median()) if bad == 0 else None,
            "nonfinite_tasks": bad}
    if diverged is not None:
        kept = values[~diverged]
        cell["diverged_tasks"] = int(diverged.sum())
        cell["mean_without_diverged"], cell["ci95_without_diverged"] = (
            mean_ci(kept) if kept.numel() >= 2 else (None, None))
    return cell


def diverged_tasks(loss: torch.Tensor, ratio: float) -> torch.Tensor:
    """Which tasks diverged after each number of inner steps: the query loss is not finite or ends
    more than ``ratio`` times above the same task's loss before adapting. ``loss`` is
    ``[steps + 1, tasks]``; so is the result (row 0 is all False)."""
    return ~torch.isfinite(loss) | (loss > ratio * loss[:1])


def write_results(run_dir: Path, results: dict, cfg: DictConfig | None = None) -> Path:
    """``results.json`` in the run folder, written atomically; given the run's config, also its
    hyperparameters with the test numbers for TensorBoard's HParams dashboard."""
    path = run_dir / "results.json"
    with atomic_file(path) as f:
        f.write((json.dumps(results, indent=2) + "\n").encode())
    if cfg is not None:
        write_hparams(run_dir, cfg, results)
    return path


def flat_config(cfg: DictConfig) -> dict:
    """The resolved config as one mapping of dotted keys (``algorithm.inner_lr``) to values."""
    flat: dict = {}

    def walk(node: dict, prefix: str = "") -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value

    walk(OmegaConf.to_container(cfg, resolve=True))
    return flat


def write_hparams(run_dir: Path, cfg: DictConfig, results: dict) -> None:
    """The run's hyperparameters (every config key, flattened: ``algorithm.inner_lr``) and its test
    means (``test/<K-shot>/after_<n>_steps``) in the run's own TensorBoard folder, for the HParams
    dashboard, where the runs of a sweep can be sorted and filtered (``tensorboard --logdir
    outputs/multirun/<sweep>``). Written into the run's event files rather than with
    ``SummaryWriter.add_hparams``, which would make a second run of its own."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    flat = {key: value if isinstance(value, (bool, int, float, str)) else str(value)  # (what TensorBoard takes)
            for key, value in flat_config(cfg).items()}
    metrics = {f"test/{group}/{step}": cell["mean"] for group, row in results["results"].items()
               for step, cell in row.items() if cell["mean"] is not None and math.isfinite(cell["mean"])}
    with SummaryWriter(run_dir / "tb") as writer:
        for summary in hparams(flat, metrics):
            writer.file_writer.add_summary(summary)
        for tag, value in metrics.items():
            writer.add_scalar(tag, value, results["iteration"])


def objective_cell(results: dict) -> tuple[str, dict]:
    """The result a sweep compares and the table's headline: the metric after the most inner steps
    reported, for the entry of ``results["results"]`` named by ``results["headline"]`` (the K the
    model was trained with; the first entry in results written before it existed). Returns its name,
    e.g. ``"1-shot accuracy after 3 steps"``, and its cell."""
    group = results.get("headline") or next(iter(results["results"]))
    row = results["results"][group]
    key = max(row, key=lambda k: int(k.split("_")[1]))  # after_<n>_steps
    label = f"{results['metric']} {key.replace('_', ' ')}"
    return (label if group == results["metric"] else f"{group} {label}"), row[key]


def objective(results: dict) -> float:
    """The objective cell's mean (all tasks), what ``metarun`` returns to sweepers; NaN where a
    task's metric is not finite."""
    value = objective_cell(results)[1]["mean"]
    return float("nan") if value is None else value


def number(value: float | None) -> str:
    """A result in at most 10 characters: 4 decimals, or scientific notation where that would
    hide the value (very large or very small)."""
    if value is None:
        return "n/a"
    if value == 0 or (1e-3 <= abs(value) < 1e4):
        return f"{value:.4f}"
    return f"{value:.3e}"


CELL_WIDTH = 24  # a number of at most 10 characters, " +- ", another of at most 10


def _diverged_mark(cell: dict) -> str:
    """`` [3 div]`` after a cell whose mean leaves out diverged tasks; empty otherwise."""
    n = cell.get("diverged_tasks") or 0
    return f" [{n} div]" if n and cell.get("mean_without_diverged") is not None else ""


def cell_text(cell: dict, mark_width: int = 0, factor: float = 1.0) -> str:
    """``mean +- ci95`` in a fixed width, the mean right-aligned at the ``+-``. Where some tasks
    diverged, the mean and interval over the others, marked ``[n div]`` (the mean of all tasks, which
    one diverged task can make 1e20, is in the table's notes and in results.json); ``mark_width``
    pads every cell of a table to the same width; ``factor`` scales the numbers (100: percent)."""
    mark = _diverged_mark(cell)

    def scaled(value):
        return number(value * factor)

    if mark:
        text = f"{scaled(cell['mean_without_diverged']):>10} +- {scaled(cell['ci95_without_diverged']):<10}"
    elif cell["mean"] is None:
        n = cell["nonfinite_tasks"]
        text = f"{f'non-finite on {n} task' + 's' * (n != 1):>{CELL_WIDTH}}"
    else:
        text = f"{scaled(cell['mean']):>10} +- {scaled(cell['ci95']):<10}"
    return text + f"{mark:<{mark_width}}"


def print_results(results: dict) -> None:
    """Print :func:`results_table` in one write; a sweep job's table is headed by the job's number and
    overrides, so that jobs run side by side (hydra/launcher=parallel) print tables one can tell apart."""
    text = results_table(results)
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN:
            text = f"== sweep job {hydra_cfg.job.num}: {hydra_cfg.job.override_dirname or '(no overrides)'}\n{text}"
    except ValueError:  # not inside a Hydra job (a test, metarun.load)
        pass
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def results_table(results: dict) -> str:
    """The printed table: a row per entry of ``results["results"]`` (the headline marked ``*``
    where there are several), a column per inner-step count. A cell where some tasks diverged gives
    the mean over the others, marked ``[n div]``; a note per such cell gives the mean of all tasks."""
    groups, headline = results["results"], results.get("headline")
    steps = [int(key.split("_")[1]) for key in next(iter(groups.values()))]  # after_<n>_steps
    names = [f"{n} step{'' if n == 1 else 's'}" for n in steps]
    marked = headline if len(groups) > 1 and headline in groups else None
    width = max(len(g) for g in groups) + 2
    mark_width = max(len(_diverged_mark(c)) for row in groups.values() for c in row.values())
    # accuracy in percent, as metarun report and the docs give it
    factor, unit = display_scale(results["metric"])
    head = f"{results['task']} test {results['metric']}{unit} ({results['test_tasks']} tasks, mean +- 95% CI)"
    lines = [head, (" " * width + "  ".join(f"{n:^{CELL_WIDTH + mark_width}}" for n in names)).rstrip()]
    notes = [f"* {marked}: the K the model was trained with (the headline and the sweep objective)"] if marked else []
    for group, row in groups.items():
        label = group + ("*" if group == marked else "")
        lines.append((f"{label:<{width}}" + "  ".join(cell_text(c, mark_width, factor) for c in row.values())).rstrip())
        for name, cell in zip(names, row.values()):
            if not _diverged_mark(cell):
                continue
            everything = (f"{number(cell['mean'] * factor)} +- {number(cell['ci95'] * factor)}" if cell["mean"] is not None
                          else f"not finite ({cell['nonfinite_tasks']} tasks)")
            notes.append(f"[{cell['diverged_tasks']} div] {group} after {name}: {cell['diverged_tasks']} of "
                         f"{results['test_tasks']} tasks diverged and are left out of the cell; over all "
                         f"{results['test_tasks']}: {everything}"
                         + (f" (median {number(cell['median'] * factor)})" if cell["median"] is not None else ""))
    if mark_width:
        notes.append(f"(diverged: the task's query loss ended above {results['divergence_ratio']:g}x its value "
                     "before adapting, or was not finite; trainer.divergence_ratio)")
    return "\n".join(lines + notes)
