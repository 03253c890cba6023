"""``metarun -m``: after the last job, one table of every job's test result, printed and written
to ``<sweep dir>/summary.csv``. A Hydra callback, registered under ``hydra.callbacks`` in
``configs/config.yaml``; it reads the job folders, so it works with any launcher."""

from __future__ import annotations

import csv
import io
import json
import math
import signal
from pathlib import Path
from typing import NamedTuple

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from metarun.trainers.results import number, objective, objective_cell
from metarun.utils.checkpoint import atomic_file

ERROR_FILE = "error.txt"  # why a sweep job stopped (written by the job; read into the status column)
INTERRUPTED_FILE = "interrupted.txt"  # a job stopped by a signal, to be resumed (removed when it resumes)


class StoppedJobs(NamedTuple):
    """A sweep that ended with jobs that did not finish."""

    stopped: int  # jobs that did not finish
    jobs: int
    interrupted: int  # of the stopped ones, those a signal stopped at a checkpoint
    sweep_dir: str

    def message(self) -> str:
        """The sweep's last line: how many did not finish, and how to resume the interrupted ones."""
        again = (f"; the same command with hydra.sweep.dir={self.sweep_dir} resumes the {self.interrupted} "
                 "interrupted one(s) from their checkpoints" if self.interrupted else "")
        return f"metarun: {self.stopped} of {self.jobs} sweep jobs did not finish (their status is in the summary above){again}"


STOPPED_JOBS: list[StoppedJobs] = []  # holds the sweep's once it has ended with jobs that did not finish; main() exits 1


def sweep_rows(sweep_dir: Path) -> list[dict]:
    """A row per job folder: its objective (mean, ci95), training time and every test number
    (hidden folders are not jobs: submitit's .submitit/ is its own)."""
    rows = []
    for job in sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        path = job / "results.json"
        given = job / ".hydra" / "overrides.yaml"  # a long override list's folder name is shortened
        overrides = " ".join(yaml.safe_load(given.read_text()) or []) if given.is_file() else None
        if not path.is_file():
            error, interrupted = job / ERROR_FILE, job / INTERRUPTED_FILE
            status = (f"stopped: {error.read_text().strip()}" if error.is_file() else
                      f"interrupted: {interrupted.read_text().strip()}" if interrupted.is_file() else
                      "no results.json (failed or stopped)")
            rows.append({"job": job.name, "status": status, "overrides": overrides})
            continue
        results = json.loads(path.read_text())
        name, cell = objective_cell(results)
        training = results.get("training", {})
        row = {"job": job.name, "overrides": overrides, "status": "ok", "objective": name, "value": objective(results),
               "ci95": cell["ci95"], "diverged_tasks": cell.get("diverged_tasks"),
               "lower_is_better": results.get("lower_is_better"),
               # where the run stopped, which can be past the evaluated (best) checkpoint
               "iterations": training.get("iterations_reached"),
               "train_seconds": training.get("train_seconds_reached", training.get("train_seconds")),
               "ms_per_iteration": training.get("ms_per_iteration"), "peak_memory_mb": training.get("peak_memory_mb")}
        for group, cells in results["results"].items():
            for key, c in cells.items():
                row[f"{group} {key}"], row[f"{group} {key} ci95"] = c["mean"], c["ci95"]
        rows.append(row)
    return rows


def best_row(rows: list[dict]) -> dict | None:
    """The job with the best finite objective (lowest where lower is better), or None."""
    scored = [r for r in rows if r["status"] == "ok" and math.isfinite(r["value"])]
    if not scored:
        return None
    sign = 1 if scored[0]["lower_is_better"] else -1
    return min(scored, key=lambda r: sign * r["value"])


def write_summary(rows: list[dict], path: Path) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    with atomic_file(path) as f:
        f.write(text.getvalue().encode())


def summary_table(rows: list[dict]) -> str:
    best = best_row(rows)
    name = next((r["objective"] for r in rows if r["status"] == "ok"), "objective")
    width = max(len(r["job"]) for r in rows)
    lines = [f"  {'job':<{width}}  {name:>38}  {'iterations':>10}  {'train s':>8}  {'ms/iter':>8}  {'peak MB':>8}"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"  {r['job']:<{width}}  {r['status']}")
            continue
        value = f"{number(r['value'])} +- {number(r['ci95'])}" if r["ci95"] is not None else "non-finite"
        if r.get("diverged_tasks"):
            value += f" ({r['diverged_tasks']} diverged)"
        cells = [f"{r[k]:>{w}.{d}f}" if r.get(k) is not None else " " * w
                 for k, w, d in (("iterations", 10, 0), ("train_seconds", 8, 1), ("ms_per_iteration", 8, 2),
                                 ("peak_memory_mb", 8, 0))]
        lines.append(f"{'*' if r is best else ' '} {r['job']:<{width}}  {value:>38}  " + "  ".join(cells))
    if best is not None:
        lines.append(f"* best ({'lowest' if best['lower_is_better'] else 'highest'} {name})")
    return "\n".join(lines)


class SweepSummary(Callback):
    """Prints and writes the sweep's summary when the last job has ended; under submitit's local
    launcher, leaves Ctrl-C to the jobs."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        """submitit's local launcher runs each job under a controller process, all in the terminal's
        process group, so Ctrl-C reaches every job, which checkpoints and stops (a result of the
        sweep, "interrupted"); the controllers, though, printed a KeyboardInterrupt traceback each and
        killed their job a second later. So this process ignores SIGINT while the sweep runs, and the
        controllers it starts inherit that; it waits for the jobs and prints the summary. (The jobs set
        their own handlers; a second Ctrl-C stops them at once.)"""
        if str(config.hydra.launcher.get("_target_", "")).endswith("submitit_launcher.LocalLauncher"):
            signal.signal(signal.SIGINT, signal.SIG_IGN)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # (set above)
            signal.signal(signal.SIGINT, signal.default_int_handler)
        sweep_dir = Path(config.hydra.sweep.dir)
        # submitit makes its folder pattern itself (.submitit/%j) before it knows a job id: left empty
        for empty in (sweep_dir / ".submitit").glob("*"):
            if empty.is_dir() and not any(empty.iterdir()):
                empty.rmdir()
        rows = sweep_rows(sweep_dir) if sweep_dir.is_dir() else []
        if rows:
            path = sweep_dir / "summary.csv"
            write_summary(rows, path)
            print(f"sweep summary ({len(rows)} jobs; also in {path}):\n{summary_table(rows)}")
            stopped = sum(r["status"] != "ok" for r in rows)
            interrupted = sum(r["status"].startswith("interrupted") for r in rows)
            STOPPED_JOBS[:] = [StoppedJobs(stopped, len(rows), interrupted, str(sweep_dir))] if stopped else []
