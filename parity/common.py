"""What every parity driver shares: the exported episodes, and a run folder that ``metarun report`` reads.

Standard library and numpy only, so that a reference's own environment (TensorFlow 1.x, an older
torch) can import it. A driver trains its reference for ``--steps`` outer steps and, every
``--eval-every`` steps, adapts it on each of the exported test episodes (``parity/export_omniglot.py``:
the very 600 tasks metarun tests on) with the reference's own test-time procedure, then calls
:func:`write_run`. The folder it writes holds

* ``results.json``: metarun's layout (``results`` for the last point, ``test_curve`` for every point),
  so ``metarun report parity/runs/<algorithm>`` puts the reference beside metarun's own runs, a row
  per implementation, seeds pooled, and plots test accuracy against outer steps;
* ``config.yaml``: ``implementation`` (the reference's ``owner/repo@commit``; ``metarun report --by
  implementation`` calls metarun's own runs ``metarun``), the full commit, the seed and every value used;
* ``run_info.json``: the command line and the seed.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE / "data" / "omniglot_paper_5w1s.npz"


def load_episodes(path: str | Path = DEFAULT_DATA, tasks: int | None = None) -> dict[str, np.ndarray]:
    """The exported splits and test episodes; images as float32 in [0, 1] (metarun's input).
    ``tasks`` keeps the first that many test episodes (a quick check); None keeps all."""
    path = Path(path)
    if not path.is_file():
        sys.exit(f"parity: {path} not found: run `python parity/export_omniglot.py` first (in metarun's venv)")
    data = dict(np.load(path))
    for key in [k for k in data if k.startswith("test_") and k.endswith("_x")]:
        data[key] = data[key].astype(np.float32) / 255.0
    for key in ("train", "val", "test", "val_rotated", "test_rotated"):
        data[key] = data[key].astype(np.float32) / 255.0
    if tasks is not None:
        for key in [k for k in data if k.startswith("test_") and "_" in k[5:]]:
            data[key] = data[key][:tasks]
    return data


def cell(values) -> dict:
    """metarun's cell: mean and 95 % half-width 1.96 sigma / sqrt(n) over the tasks."""
    v = np.asarray(values, dtype=np.float64)
    ci = 1.96 * v.std(ddof=1) / math.sqrt(v.size) if v.size > 1 else 0.0
    return {"mean": float(v.mean()), "ci95": float(ci), "median": float(np.median(v)), "nonfinite_tasks": 0,
            "diverged_tasks": 0, "mean_without_diverged": float(v.mean()), "ci95_without_diverged": float(ci)}


def write_run(out: str | Path, *, algorithm: str, reference: str, seed: int, config: dict, shots: int,
              points: list[dict], curve_steps: int | None = None) -> Path:
    """Write one reference run's folder.

    Args:
        out: the run folder (created).
        algorithm: metarun's name for the algorithm (``reptile``, ``imaml``, ...).
        reference: ``owner/repo@commit`` of the code that ran.
        seed: the run's seed.
        config: every value the reference ran with (its command line's, by their own names).
        shots: K of the episodes (the results' group is ``<K>-shot``, as metarun's).
        points: one per evaluation, in order: ``{"iteration": outer steps done, "train_seconds": s,
            "accuracy": {inner steps: [per-task accuracy, ...]}}`` (the steps at which the reference
            reports, e.g. ``{0: [...], 50: [...]}``).
        curve_steps: the number of test steps whose mean goes into ``curve`` (default: the most).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    group = f"{shots}-shot"
    last = points[-1]
    steps = sorted(int(s) for s in last["accuracy"])
    row = {f"after_{s}_steps": cell(last["accuracy"][s]) for s in steps}
    tasks = len(next(iter(last["accuracy"].values())))
    test_curve = [{"iteration": p["iteration"], "train_seconds": p["train_seconds"],
                   **{f"accuracy_after_{s}_steps": cell(v)["mean"] for s, v in sorted(p["accuracy"].items())},
                   **{f"ci95_after_{s}_steps": cell(v)["ci95"] for s, v in sorted(p["accuracy"].items())}}
                  for p in points]
    seconds = last["train_seconds"]
    results = {
        "task": "omniglot", "iteration": last["iteration"], "test_tasks": tasks, "metric": "accuracy",
        "lower_is_better": False, "headline": group, "divergence_ratio": None,
        "results": {group: row},
        "curve": {group: [cell(last["accuracy"][s])["mean"] for s in steps if s <= (curve_steps or steps[-1])]}
        if steps == list(range(len(steps))) else {},
        "training": {"iterations": last["iteration"], "train_seconds": seconds,
                     "ms_per_iteration": seconds / last["iteration"] * 1e3 if last["iteration"] else None,
                     "iterations_reached": last["iteration"], "train_seconds_reached": seconds},
        "validation": [], "test_curve": test_curve,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    repo, _, commit = reference.partition("@")
    flat = {"implementation": f"{repo}@{commit[:7]}", "reference": reference, "seed": seed,
            "algorithm": {"name": algorithm}, "task": {"name": "omniglot", "shots": shots}, "values": config}
    (out / "config.yaml").write_text(json.dumps(flat, indent=2) + "\n")  # (JSON is YAML)
    info = {"seed": seed, "argv": sys.argv, "cwd": os.getcwd(), "versions": {"reference": reference}}
    (out / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return out
