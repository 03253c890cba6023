"""``metarun report``: tables and plots from run folders and sweep folders.

    metarun report outputs/multirun/2026-12-05_10-00-00          # a sweep
    metarun report outputs/runs outputs/multirun --out report/   # any mix of folders, any depth
    metarun report SWEEP --published published.yaml              # with the papers' numbers beside

Every folder that holds a ``results.json`` is a run (found at any depth; ``.hydra/``, ``tb/`` and
``checkpoints/`` are not looked into). Runs are grouped first by what they measured (the task and
the trained shots: a table each, so mixed tasks give several tables), then by configuration: runs
whose resolved configs differ only in the seed (and in where data and caches live) are one
configuration, and their numbers are pooled over the seeds. The table's columns are the settings
that differ between the configurations of a table: the command-line overrides where the runs
recorded them, else the keys of the resolved config.

Written to ``--out`` (default ``<folder>/report`` for one folder, else ``./report``):

* ``report.md`` the tables in Markdown, headed by the command that made them; ``report.csv`` one
  row per configuration with the raw numbers; the same tables are printed;
* per table, PNG and SVG: the validation score against training time and against iterations (a
  line per configuration, a band of one standard deviation over seeds), and the adaptation curve
  (the test metric after 0..k inner steps; for meta-RL, the return against the number of gradient
  steps, the MAML paper's Figure 5).

In a cell, ``m ± s (n)`` is the mean over ``n`` seeds of each run's test mean and the standard
deviation over the seeds; the ``per-run 95 % CI`` column gives each run's own interval (1.96
sigma / sqrt(tasks), the paper protocol) for the table's headline cell.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import statistics
import sys
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from metarun.data.cache import one_line
from metarun.utils.errors import MetarunError


class ReportError(MetarunError):
    """A folder or file the report cannot use; the message names it."""


# keys that say where things are or how they are shown, never what is measured: not a difference.
# (task.root is: an image folder's root is its dataset; data_dir and splits_dir only locate the
# built-in datasets, whose content is fixed)
IGNORED = re.compile(r"^(seed|resume|evaluate|hydra\..*|task\.(data_dir|cache_dir|splits_dir|progress)"
                     r"|trainer\.progress|debug)$")
RUN_FILE = "results.json"
NOT_RUNS = {".hydra", "tb", "checkpoints", ".submitit", "report"}


@dataclass
class Run:
    """One run folder, as the report reads it."""

    path: Path
    results: dict
    config: dict  # the resolved config, flattened (algorithm.inner_lr -> 0.01)
    overrides: dict  # the command line's key=value overrides (.hydra/overrides.yaml), flattened likewise
    info: dict  # run_info.json (versions, seed, argv); {} where there is none

    @property
    def seed(self):
        return self.config.get("seed", self.info.get("seed"))

    @property
    def commit(self) -> str:
        source = self.info.get("versions", {}).get("source")
        if not source:
            return "n/a"
        return source["commit"][:7] + ("+dirty" if source.get("dirty") else "")

    @property
    def version(self) -> str:
        return str(self.info.get("versions", {}).get("metarun", "n/a"))


@dataclass
class Configuration:
    """Runs that differ only in the seed."""

    settings: dict  # the table's columns: key -> value
    runs: list[Run] = field(default_factory=list)


@dataclass
class Table:
    """The configurations of one task and one trained setting, compared in one table."""

    title: str
    slug: str
    metric: str
    group: str  # the results.json entry shown (the trained K: "10-shot", "5-way 1-shot", "return")
    lower_is_better: bool
    columns: list[str]
    configurations: list[Configuration]


# --- reading run folders --------------------------------------------------------------------------


def find_runs(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """Every run folder under ``paths`` (any depth), and the folders that look like runs that did
    not finish (a config.yaml or checkpoint but no results.json)."""
    found, unfinished = [], []
    for root in paths:
        if not root.exists():
            raise ReportError(f"{root}: no such folder")
        if root.is_file():
            if root.name == RUN_FILE:
                found.append(root.parent)
                continue
            raise ReportError(f"{root} is a file; give run folders or sweep folders (folders holding {RUN_FILE})")
        for folder, subfolders, files in os.walk(root):
            subfolders[:] = sorted(d for d in subfolders if d not in NOT_RUNS and not d.startswith("."))
            here = Path(folder)
            if RUN_FILE in files:
                found.append(here)
                subfolders[:] = []  # a run holds no runs
            elif "run_info.json" in files or (here / "checkpoints").is_dir():
                unfinished.append(here)
    return sorted(dict.fromkeys(found)), unfinished


def _flatten(node, prefix: str = "") -> dict:
    flat = {}
    for key, value in (node or {}).items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _overrides(path: Path) -> dict:
    """The run's command-line overrides: ``algorithm=anil`` -> {"algorithm": "anil"}."""
    from omegaconf import OmegaConf

    file = path / ".hydra" / "overrides.yaml"
    if not file.is_file():
        return {}
    out = {}
    for line in OmegaConf.to_container(OmegaConf.load(file)) or []:
        key, sep, value = str(line).partition("=")
        if sep:
            out[key.lstrip("+~")] = value
    return out


REQUIRED = ("task", "metric", "results")


def read_run(path: Path) -> Run:
    """A run folder's results.json, config and provenance; a :class:`ReportError` naming the file
    where one cannot be read or was written by a metarun too old to report."""
    from omegaconf import OmegaConf

    file = path / RUN_FILE
    try:
        results = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ReportError(f"{file} cannot be read ({one_line(exc)})") from exc
    missing = [key for key in REQUIRED if key not in results] if isinstance(results, dict) else list(REQUIRED)
    shape_ok = not missing and all(isinstance(row, dict) and all(isinstance(c, dict) and "mean" in c
                                                                  for c in row.values())
                                   for row in results["results"].values())
    if missing or not shape_ok:
        what = f"no {', '.join(repr(k) for k in missing)}" if missing else "results in an older layout"
        raise ReportError(f"{file} was written by an older metarun ({what}); evaluate the run again with this "
                          f"version (metarun evaluate={path}) to report it")
    config_file = path / "config.yaml"
    config = _flatten(OmegaConf.to_container(OmegaConf.load(config_file))) if config_file.is_file() else {}
    info_file = path / "run_info.json"
    try:
        info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    except ValueError:
        info = {}
    return Run(path, results, config, _overrides(path), info)


# --- grouping -------------------------------------------------------------------------------------


def _headline(results: dict) -> str:
    return results.get("headline") or next(iter(results["results"]))


def _differing(runs: list[Run], keys_of) -> list[str]:
    keys = sorted({key for run in runs for key in keys_of(run) if not IGNORED.match(key)})
    return [key for key in keys if len({json.dumps(keys_of(run).get(key), sort_keys=True) for run in runs}) > 1]


def group_runs(runs: list[Run], by: list[str] | None = None) -> list[Table]:
    """A table per (task, trained setting); in each, a configuration per set of runs whose configs
    differ only in the seed. Columns: the overrides that differ between the table's runs, then any
    config key that still tells configurations apart (runs made with other command lines). ``by``
    names the columns instead: runs that agree on those keys are one row, whatever else differs
    (``implementation``: metarun, or the reference code a parity driver ran)."""
    by_table: dict[tuple, list[Run]] = defaultdict(list)
    for run in runs:
        by_table[(run.results["task"], _headline(run.results), run.results["metric"])].append(run)
    tables = []
    for (task, group, metric), members in sorted(by_table.items()):
        columns = list(by) if by else _differing(members, lambda r: r.overrides)
        configs: dict[str, list[Run]] = defaultdict(list)
        for run in members:  # the resolved config, minus seed and paths, identifies a configuration
            key = (json.dumps([str(setting(run, c)) for c in columns]) if by else
                   json.dumps({k: v for k, v in run.config.items() if not IGNORED.match(k)}, sort_keys=True, default=str))
            configs[key].append(run)
        groups = list(configs.values())
        if not by and len({tuple(str(setting(g[0], c)) for c in columns) for g in groups}) < len(groups):
            # configurations the overrides do not tell apart: the config keys that do, as columns too
            extra = _differing([g[0] for g in groups], lambda r: r.config)
            columns += [k for k in extra if k not in columns and not any(k.startswith(c + ".") for c in columns)]
            if len({tuple(str(setting(g[0], c)) for c in columns) for g in groups}) < len(groups):
                columns += [k for k in extra if k not in columns]
        configurations = [Configuration({c: setting(g[0], c) for c in columns},
                                        sorted(g, key=lambda r: (str(r.seed), str(r.path)))) for g in groups]
        configurations.sort(key=lambda c: [_sort_key(c.settings[k]) for k in columns])
        title = task if group in (metric, task) else f"{task}, {group}"
        slug = re.sub(r"[^A-Za-z0-9]+", "_", title).strip("_").lower()
        tables.append(Table(title, slug, metric, group, bool(members[0].results.get("lower_is_better")),
                            columns, configurations))
    return tables


def seeds_cell(conf: Configuration) -> str:
    """The seeds a row pools, saying so when one seed appears more than once (the same run twice, or
    runs that differ only in what the report does not compare)."""
    seeds = [str(r.seed) for r in conf.runs]
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    return ",".join(seeds) + (f" (seed {', '.join(twice)} more than once)" if twice else "")


def setting(run: Run, key: str):
    """What a run set ``key`` to: its override, else its config's value (a group's chosen name for a
    group override such as ``algorithm=anil``), else ``default`` (``implementation``: ``metarun``, the
    key a parity driver's run folder names its reference code with)."""
    for value in (run.overrides.get(key), run.config.get(key), run.config.get(f"{key}.name")):
        if value is not None:
            return value
    return "metarun" if key == "implementation" else "default"


def _sort_key(value):
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


# --- numbers --------------------------------------------------------------------------------------


def _steps(row: dict) -> list[int]:
    return sorted(int(key.split("_")[1]) for key in row)  # after_<n>_steps


@dataclass
class Pooled:
    mean: float | None
    sd: float | None  # over seeds; None for a single run
    n: int  # runs with a finite mean
    runs: int  # runs in all
    ci95: list  # each run's own 95 % half-width (None where not finite)
    diverged: list  # each run's number of diverged test tasks (None where results.json has no count)
    without: float | None = None  # the mean over seeds of each run's mean without its diverged tasks
    without_sd: float | None = None


def pooled(configuration: Configuration, group: str, step: int) -> Pooled:
    """The test metric after ``step`` inner steps, pooled over the configuration's seeds."""
    cells = [run.results["results"].get(group, {}).get(f"after_{step}_steps") for run in configuration.runs]
    cells = [c for c in cells if c]  # (a run that does not report this step: not counted)
    means = [c["mean"] for c in cells if c.get("mean") is not None and math.isfinite(c["mean"])]
    sd = statistics.stdev(means) if len(means) >= 2 else None
    kept = [c.get("mean_without_diverged") for c in cells]
    kept = [k for k in kept if k is not None and math.isfinite(k)]
    return Pooled(statistics.fmean(means) if means else None, sd, len(means), len(cells),
                  [c.get("ci95") for c in cells], [c.get("diverged_tasks") for c in cells],
                  statistics.fmean(kept) if kept else None, statistics.stdev(kept) if len(kept) >= 2 else None)


def _mean_of(configuration: Configuration, getter) -> float | None:
    values = []
    for run in configuration.runs:
        try:
            value = getter(run.results)
        except (KeyError, TypeError):
            value = None
        if value is not None:
            values.append(float(value))
    return statistics.fmean(values) if values else None


def _iterations(results: dict):
    training = results["training"]
    return training.get("iterations_reached", training.get("iterations"))


def _train_seconds(results: dict):
    training = results["training"]
    return training.get("train_seconds_reached", training.get("train_seconds"))


def _ms(results: dict):
    training = results["training"]
    return training.get("ms_per_iteration_last_sitting", training.get("ms_per_iteration"))


# --- text -----------------------------------------------------------------------------------------


def display_scale(metric: str) -> tuple[float, str]:
    """Accuracy is shown in percent."""
    return (100.0, " %") if metric == "accuracy" else (1.0, "")


def _fmt(value: float | None, metric: str) -> str:
    if value is None:
        return "n/a"
    factor, _ = display_scale(metric)
    value *= factor
    if metric == "accuracy":
        return f"{value:.2f}"
    if value == 0 or 1e-2 <= abs(value) < 1e4:
        return f"{value:.3f}"
    return f"{value:.2e}"


def _pooled_text(p: Pooled, metric: str) -> str:
    if p.runs == 0:
        return "–"  # no run of the configuration reports it
    if p.mean is None:
        return "non-finite"
    text = _fmt(p.mean, metric)
    if p.sd is not None:
        spread = _fmt(p.sd, metric)
        if "e" not in text and "e" in spread:  # a spread far below the mean: in the mean's decimals
            spread = f"{p.sd * display_scale(metric)[0]:.{len(text.split('.')[-1])}f}"
        text += f" ± {spread}"
    text += f" ({p.n})"
    return text + (f" [{p.runs - p.n} non-finite]" if p.n < p.runs else "")


def _ci_text(p: Pooled, metric: str) -> str:
    return ", ".join("n/a" if c is None else "±" + _fmt(c, metric) for c in p.ci95)


def _short(value) -> str:
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _own_steps(conf: Configuration, group: str) -> int:
    """The most inner steps the configuration's results report: its headline (an algorithm's own
    number of test steps: Reptile's 50, Meta-SGD's 1)."""
    return max(_steps(conf.runs[0].results["results"].get(group) or {"after_0_steps": None}))


def _other_mode(conf: Configuration, group: str) -> str | None:
    """The results entry of the other query mode (``1-shot, non-transductive``), where the runs have one."""
    for mode in ("non-transductive", "transductive"):
        if f"{group}, {mode}" in conf.runs[0].results["results"]:
            return f"{group}, {mode}"
    return None


def table_rows(table: Table, published: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The header and rows of a table as text cells. The step columns are every step any
    configuration reports ("–" where one does not); where the configurations' own numbers of test
    steps differ (each algorithm's protocol), a column gives each one's headline after its own."""
    steps = sorted({s for conf in table.configurations for r in conf.runs
                    for s in _steps(r.results["results"].get(table.group) or {})})
    own = {id(conf): _own_steps(conf, table.group) for conf in table.configurations}
    mixed = len(set(own.values())) > 1
    last_label = "its test steps" if mixed else str(steps[-1])
    factor, unit = display_scale(table.metric)
    other = any(_other_mode(conf, table.group) for conf in table.configurations)
    header = [*table.columns, "seeds",
              *[f"{table.metric}{unit} after {s} step{'s' * (s != 1)}" for s in steps],
              *([f"{table.metric}{unit} after its test steps"] if mixed else []),
              *([f"the other query mode, after {last_label}"] if other else []),
              f"per-run 95 % CI (after {last_label})", "iterations", "train s", "ms/iter", "commit", "metarun"]
    diverging = any(d for conf in table.configurations
                    for d in pooled(conf, table.group, own[id(conf)]).diverged)
    if diverging:  # a few diverged test tasks can dominate a mean: how many, and the mean without them
        at = header.index(f"per-run 95 % CI (after {last_label})")
        header[at:at] = [f"diverged tasks per run (after {last_label})", f"after {last_label}, without diverged tasks"]
    if published:
        header.append("published")
    rows = []
    for conf in table.configurations:
        cells = [_short(conf.settings[c]) for c in table.columns]
        cells.append(seeds_cell(conf))
        cells += [_pooled_text(pooled(conf, table.group, s), table.metric) for s in steps]
        last = pooled(conf, table.group, own[id(conf)])
        if mixed:
            cells.append(f"{_pooled_text(last, table.metric)} after {own[id(conf)]}")
        if other:
            mode = _other_mode(conf, table.group)
            cells.append("–" if mode is None else
                         f"{_pooled_text(pooled(conf, mode, own[id(conf)]), table.metric)} ({mode.split(', ')[1]})")
        if diverging:
            cells.append(",".join("n/a" if d is None else str(d) for d in last.diverged))
            cells.append(_pooled_text(Pooled(last.without, last.without_sd, len(last.ci95), len(last.ci95), [], []),
                                      table.metric))
        cells.append(_ci_text(last, table.metric))
        iterations, seconds, ms = (_mean_of(conf, f) for f in (_iterations, _train_seconds, _ms))
        cells += [f"{iterations:,.0f}" if iterations is not None else "n/a",
                  f"{seconds:,.1f}" if seconds is not None else "n/a",
                  f"{ms:,.2f}" if ms is not None else "n/a",
                  ",".join(dict.fromkeys(r.commit for r in conf.runs)),
                  ",".join(dict.fromkeys(r.version for r in conf.runs))]
        if published:
            match = published_for(conf, table, published)
            cells.append("" if match is None else str(match["value"]) + (f" ({match['source']})"
                                                                          if match.get("source") else ""))
        rows.append(cells)
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    def esc(cell: str) -> str:
        return cell.replace("|", "\\|")

    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(esc, row)) + " |" for row in rows]
    return "\n".join(lines)


def plain(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows])


def csv_rows(tables: list[Table], published: list[dict]) -> list[dict]:
    """One row per configuration with the raw numbers (metric as stored: accuracy as a fraction)."""
    out = []
    for table in tables:
        steps = _steps(table.configurations[0].runs[0].results["results"][table.group])
        for conf in table.configurations:
            row = {"table": table.title, "task": conf.runs[0].results["task"], "group": table.group,
                   "metric": table.metric, **conf.settings, "seeds": " ".join(str(r.seed) for r in conf.runs),
                   "runs": " ".join(str(r.path) for r in conf.runs)}
            for s in steps:
                p = pooled(conf, table.group, s)
                row[f"after_{s}_steps_mean"], row[f"after_{s}_steps_sd"] = p.mean, p.sd
                row[f"after_{s}_steps_n"] = p.n
                row[f"after_{s}_steps_ci95_per_run"] = " ".join("" if c is None else repr(c) for c in p.ci95)
                row[f"after_{s}_steps_diverged_per_run"] = " ".join("" if d is None else str(d) for d in p.diverged)
                row[f"after_{s}_steps_mean_without_diverged"] = p.without
            row.update(iterations=_mean_of(conf, _iterations), train_seconds=_mean_of(conf, _train_seconds),
                       ms_per_iteration=_mean_of(conf, _ms),
                       commit=" ".join(dict.fromkeys(r.commit for r in conf.runs)),
                       metarun=" ".join(dict.fromkeys(r.version for r in conf.runs)))
            if published:
                match = published_for(conf, table, published)
                row["published"] = None if match is None else match["value"]
            out.append(row)
    return out


# --- published numbers ----------------------------------------------------------------------------


def read_published(path: Path | None) -> list[dict]:
    """``--published FILE``: a YAML list of entries ``{task, where: {config key: value}, value,
    source}``; a configuration gets the first entry whose task and ``where`` keys match its
    resolved config (``where`` may be left out)."""
    if path is None:
        return []
    from omegaconf import OmegaConf

    try:
        entries = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as exc:  # (yaml's and OmegaConf's errors, a missing file)
        raise ReportError(f"--published {path} cannot be read ({one_line(exc)})") from exc
    if not isinstance(entries, list):
        raise ReportError(f"--published {path}: expected a YAML list of entries with task, value and optional where, "
                          "source")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "task" not in entry or "value" not in entry:
            raise ReportError(f"--published {path}: entry {i + 1} needs a task and a value (got {entry!r})")
        if not isinstance(entry.get("where", {}), dict):
            raise ReportError(f"--published {path}: entry {i + 1}'s where must map config keys to values")
    return entries


def published_for(conf: Configuration, table: Table, entries: list[dict]) -> dict | None:
    config = conf.runs[0].config
    for entry in entries:
        if entry["task"] != conf.runs[0].results["task"]:
            continue
        if all(str(config.get(k)) == str(v) for k, v in (entry.get("where") or {}).items()):
            return entry
    return None


# --- plots ----------------------------------------------------------------------------------------


def _label(conf: Configuration, columns: list[str]) -> str:
    return ", ".join(f"{c.rsplit('.', 1)[-1]}={_short(conf.settings[c])}" for c in columns) or "runs"


def _legend(ax) -> None:
    """The legend under the axes (below the x label), where no label, however long, covers a curve."""
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.16), frameon=False)


def _band(ax, x, runs_y: list[list[float]], label: str, color) -> None:
    """The mean over seeds as a line, one standard deviation as a band."""
    import numpy as np

    y = np.array(runs_y, dtype=float)
    y[~np.isfinite(y)] = np.nan  # (a diverged run: a gap in its line, not a warning)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column is a gap
        mean = np.nanmean(y, axis=0)
        sd = np.nanstd(y, axis=0, ddof=1) if len(runs_y) > 1 else None
    ax.plot(x, mean, marker="o", markersize=3, label=label, color=color)
    if sd is not None:
        ax.fill_between(x, mean - sd, mean + sd, alpha=0.2, color=color)


def _history(run: Run) -> tuple[list[dict], str | None, str]:
    """The run's score during training: its validations (the score after the most inner steps),
    or for meta-RL, which does not validate, the meta-batch's return after adapting at each logged
    iteration. Returns the entries, the key of the score in them and the axis label."""
    history = run.results.get("validation") or []
    keys = [k for k in (history[0] if history else {}) if re.fullmatch(r".+_after_\d+_steps", k)]
    if keys:
        key = max(keys, key=lambda k: int(k.rsplit("_", 2)[1]))
        return history, key, f"validation {key.replace('_', ' ')}"
    log = run.results.get("training_log") or []
    if log and "return_post_update" in log[0]:
        return log, "return_post_update", "training return after adapting (meta-batch)"
    return [], None, ""


def _test_curve(run: Run) -> tuple[list[dict], str | None, int]:
    """A run's ``test_curve`` (the test protocol at points of training), the key of its metric after
    the most inner steps it reports, and that number of steps."""
    curve = run.results.get("test_curve") or []
    keys = [k for k in (curve[0] if curve else {}) if re.fullmatch(r".+_after_\d+_steps", k) and not k.startswith("ci95")]
    if not keys:
        return [], None, 0
    key = max(keys, key=lambda k: int(k.rsplit("_", 2)[1]))
    return curve, key, int(key.rsplit("_", 2)[1])


def plot_table(table: Table, out: Path, notes: list[str] | None = None) -> list[Path]:
    """The table's figures, as PNG and SVG; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.get_cmap("tab10").colors
    factor, unit = display_scale(table.metric)
    written = []

    def save(fig, name: str) -> None:
        ax = fig.axes[0]
        values = [v for line in ax.get_lines() for v in line.get_ydata() if math.isfinite(v)]
        if values and min(values) > 0 and max(values) / min(values) > 100:  # diverged tasks dwarf the rest
            ax.set_yscale("log")
            ax.set_ylabel(ax.get_ylabel() + " (log scale)")
        fig.tight_layout()
        for ext in ("png", "svg"):
            path = out / f"{table.slug}_{name}.{ext}"
            fig.savefig(path, dpi=120, bbox_inches="tight")  # (a long label or title stays whole)
            written.append(path)
        plt.close(fig)

    # the validation score against training time and against iterations: a curve needs two points
    _, key, ylabel = _history(table.configurations[0].runs[0])
    points = max(min(len(_history(r)[0]) for r in conf.runs) for conf in table.configurations)
    if key is not None and points < 2:
        if notes is not None:
            notes.append(f"{table.title}: no {ylabel.split(' ')[0]} plots: every configuration has {points} "
                         "point(s) (a run validates every trainer.val_interval iterations)")
        key = None
    if key is not None:
        prefix = "validation" if ylabel.startswith("validation") else "training_return"
        for axis, name, xlabel in (("train_seconds", f"{prefix}_vs_time", "training time (s)"),
                                   ("iteration", f"{prefix}_vs_iterations", "iterations")):
            fig, ax = plt.subplots(figsize=(6, 4))
            for i, conf in enumerate(table.configurations):
                histories = [_history(r)[0] for r in conf.runs]
                length = min(len(h) for h in histories)
                if length == 0:
                    continue
                # seeds validate at the same iterations; against time, each validation is placed at
                # its mean time over the seeds
                x = [statistics.fmean(float(h[j][axis]) for h in histories) for j in range(length)]
                ys = [[math.nan if h[j].get(key) is None else h[j][key] * factor for j in range(length)]
                      for h in histories]
                _band(ax, x, ys, _label(conf, table.columns), colors[i % len(colors)])
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel + unit)
            ax.set_title(f"{table.title}: {ylabel.split(' ')[0]} (mean, band: ±1 sd over seeds)", fontsize=9)
            _legend(ax)
            ax.grid(alpha=0.3)
            save(fig, name)

    # the test metric during training (trainer.test_interval, parity drivers), after each run's most test steps
    if any(r.results.get("test_curve") for conf in table.configurations for r in conf.runs):
        for axis, name, xlabel in (("iteration", "test_vs_iterations", "outer steps"),
                                   ("train_seconds", "test_vs_time", "training time (s)")):
            fig, ax = plt.subplots(figsize=(6, 4))
            for i, conf in enumerate(table.configurations):
                curves = [_test_curve(r) for r in conf.runs]
                curves = [c for c in curves if c[0]]
                if not curves:
                    continue
                length = min(len(c[0]) for c in curves)
                x = [statistics.fmean(float(c[0][j][axis]) for c in curves) for j in range(length)]
                ys = [[math.nan if c[0][j].get(c[1]) is None else c[0][j][c[1]] * factor for j in range(length)]
                      for c in curves]
                steps = sorted({c[2] for c in curves})
                _band(ax, x, ys, f"{_label(conf, table.columns)} ({'/'.join(map(str, steps))} steps)",
                      colors[i % len(colors)])
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"test {table.metric}{unit}")
            ax.set_title(f"{table.title}: test {table.metric} during training (band: ±1 sd over seeds)", fontsize=9)
            _legend(ax)
            ax.grid(alpha=0.3)
            save(fig, name)

    # the adaptation curve: the test metric after 0..k inner steps (meta-RL: return vs gradient steps)
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, conf in enumerate(table.configurations):
        curves = [r.results.get("curve", {}).get(table.group) for r in conf.runs]
        curves = [c for c in curves if c]
        if not curves:  # an older results.json without curves: the reported steps
            row = conf.runs[0].results["results"][table.group]
            steps = _steps(row)
            ys = [[(r.results["results"][table.group][f"after_{s}_steps"]["mean"] or math.nan) * factor
                   for s in steps] for r in conf.runs]
        else:
            length = min(len(c) for c in curves)
            steps = list(range(length))
            ys = [[math.nan if v is None else v * factor for v in c[:length]] for c in curves]
        _band(ax, steps, ys, _label(conf, table.columns), colors[i % len(colors)])
    rl = table.metric == "return"
    ax.set_xlabel("number of gradient steps" if rl else "inner steps at test time")
    ax.set_ylabel("average return" if rl else f"test {table.metric}{unit}")
    ax.set_title(f"{table.title}: after adapting (mean over test tasks; band: ±1 sd over seeds)", fontsize=9)
    _legend(ax)
    ax.grid(alpha=0.3)
    save(fig, "return_vs_gradient_steps" if rl else "adaptation")
    return written


# --- the command ----------------------------------------------------------------------------------


def build(paths: list[Path], published_file: Path | None = None,
          by: list[str] | None = None) -> tuple[list[Table], list[dict], list[str]]:
    """The report's tables, the published entries and notes (runs that did not finish)."""
    folders, unfinished = find_runs(paths)
    if not folders:
        where = ", ".join(map(str, paths))
        hint = f" ({len(unfinished)} run folder(s) without one: not finished or stopped)" if unfinished else ""
        raise ReportError(f"{where}: no run folder found (a folder holding {RUN_FILE}){hint}")
    runs = [read_run(folder) for folder in folders]
    notes = [f"{path}: no {RUN_FILE} (not finished, or stopped: see its metarun.log); left out" for path in unfinished]
    return group_runs(runs, by), read_published(published_file), notes


def render(tables: list[Table], published: list[dict], command: str) -> tuple[str, str]:
    """The Markdown report and the printed one."""
    md = [f"Made by `{command}`.", ""]
    text = []
    for table in tables:
        header, rows = table_rows(table, published)
        best = "lowest" if table.lower_is_better else "highest"
        caption = (f"{table.title}: test {table.metric}, {table.configurations[0].runs[0].results.get('test_tasks')} "
                   f"tasks per run; mean ± sd over seeds (number of seeds); {best} is best")
        md += [f"### {table.title}", "", caption.split(": ", 1)[1].capitalize() + ".", "", markdown(header, rows), ""]
        text += [caption, plain(header, rows), ""]
        during = test_curve_rows(table)
        if during:
            caption = (f"{table.title}: test {table.metric} during training (trainer.test_interval), after each "
                       f"configuration's test steps; mean ± sd over seeds (number of seeds)")
            md += [caption.split(": ", 1)[1].capitalize() + ".", "", markdown(*during), ""]
            text += [caption, plain(*during), ""]
    return "\n".join(md), "\n".join(text)


def test_curve_rows(table: Table) -> tuple[list[str], list[list[str]]] | None:
    """The test protocol's means at each point of training where runs recorded them (``test_curve``):
    a row per configuration, a column per number of outer steps ("–" where none of its runs has one)."""
    curves = {id(conf): [_test_curve(r) for r in conf.runs] for conf in table.configurations}
    points = sorted({p["iteration"] for cs in curves.values() for c, _, _ in cs for p in c})
    if not points:
        return None
    header = [*table.columns, "seeds", "test steps", *[f"after {n:,} outer steps" for n in points]]
    rows = []
    for conf in table.configurations:
        cs = [c for c in curves[id(conf)] if c[0]]
        cells = [_short(conf.settings[c]) for c in table.columns]
        cells += [seeds_cell(conf), "/".join(sorted({str(c[2]) for c in cs})) or "–"]
        for n in points:
            values = [p[key] for curve, key, _ in cs for p in curve if p["iteration"] == n and p.get(key) is not None]
            sd = statistics.stdev(values) if len(values) >= 2 else None
            cells.append(_pooled_text(Pooled(statistics.fmean(values), sd, len(values), len(values), [], []),
                                      table.metric) if values else "–")
        rows.append(cells)
    return header, rows


def write(out: Path, md: str, rows: list[dict]) -> list[Path]:
    from metarun.utils.checkpoint import atomic_file

    out.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    written = []
    for name, text in (("report.md", md + "\n"), ("report.csv", buffer.getvalue())):
        with atomic_file(out / name) as f:
            f.write(text.encode())
        written.append(out / name)
    return written


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, as every metarun error (argparse adds its usage)
        self.exit(2, f"metarun report: error: {message} (metarun report --help)\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="metarun report", description=(
        "Tables and plots from run folders and sweep folders (any mix, any depth): a table per task, a row per "
        "configuration, seeds pooled; validation and adaptation plots as PNG and SVG."))
    p.add_argument("folders", nargs="*", type=Path, help="run folders or folders holding them (a sweep, outputs/)")
    p.add_argument("--out", type=Path, help="where report.md, report.csv and the plots go "
                   "(default: FOLDER/report for one sweep or run folder, else ./report)")
    p.add_argument("--published", type=Path, help="a YAML list of published numbers: - {task: omniglot, where: "
                   "{task.ways: 5, task.shots: 1}, value: 98.7, source: Finn et al. 2017}")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.add_argument("--by", type=lambda text: [k for k in text.split(",") if k], metavar="KEY[,KEY]",
                   help="one row per value of these keys, whatever else differs (e.g. implementation,algorithm: "
                   "metarun beside the reference runs of parity/)")
    p.add_argument("--update", type=Path, nargs="+", metavar="MARKDOWN", help="remake the tables in these Markdown "
                   "files: each between '<!-- metarun report FOLDER ... -->' and '<!-- end of report -->', from the "
                   "folders that line names (relative to the current folder); a block whose folders are not here is kept "
                   "as it is and named")
    return p


BLOCK = re.compile(r"(<!-- metarun report (?P<args>.+?) -->\n)(?P<body>.*?)(<!-- end of report -->)", re.DOTALL)


def _remade(match: re.Match, file: Path) -> str:
    """A marked block with its tables made again from the folders its first line names."""
    import shlex

    args = parser().parse_args(shlex.split(match["args"]))
    if not args.folders:
        raise ReportError(f"{file}: '<!-- metarun report {match['args']} -->' names no folder")
    tables, published, _ = build(args.folders, args.published, args.by)
    parts = []
    for table in tables:
        header, rows = table_rows(table, published)
        parts += ([f"*{table.title}*", ""] if len(tables) > 1 else []) + [markdown(header, rows), ""]
        during = test_curve_rows(table)
        if during:
            parts += [f"Test {table.metric} during training, after each configuration's test steps:", "",
                      markdown(*during), ""]
    return match[1] + "\n".join(parts) + match[4]


def _missing_folders(match: re.Match) -> list[str]:
    """The folders a block's first line names that are not here (run folders are not kept in a repository)."""
    import shlex

    args = parser().parse_args(shlex.split(match["args"]))
    return [str(folder) for folder in args.folders if not folder.exists()]


def update(files: list[Path]) -> list[str]:
    """Remake every marked table of ``files`` from its run folders (see ``--update``); returns a line
    per file. A block naming a folder that is not here is kept as it is and named in that line, so
    that one table can be remade in a page whose other tables came from runs that are gone; a file
    none of whose blocks can be remade is an error. A file is rewritten only when all the rest could
    be made."""
    from metarun.utils.checkpoint import atomic_file

    done = []
    for file in files:
        text = file.read_text()
        blocks = list(BLOCK.finditer(text))
        if not blocks:
            raise ReportError(f"{file} has no '<!-- metarun report FOLDER ... -->' ... '<!-- end of report -->' block")
        missing = {match.start(): _missing_folders(match) for match in blocks}
        if all(missing.values()):
            gone = sorted({folder for folders in missing.values() for folder in folders})
            raise ReportError(f"{', '.join(gone)}: no such folder")

        new = BLOCK.sub(lambda match, file=file, missing=missing: match[0] if missing[match.start()] else _remade(match, file),
                        text)
        with atomic_file(file) as f:
            f.write(new.encode())
        kept = [folder for folders in missing.values() for folder in folders]
        remade = sum(not folders for folders in missing.values())
        done.append(f"updated {file}: {remade} table block(s)" + ("" if new != text else " (unchanged)")
                    + (f"; kept {len(blocks) - remade} whose folders are not here ({', '.join(kept)})" if kept else ""))
    return done


def default_out(folders: list[Path]) -> Path:
    """Where the report goes without ``--out``: beside a sweep (a folder with Hydra's multirun.yaml) or
    in a single run's folder; anywhere else (``outputs/runs``, several folders) ``./report``, so that
    a folder of runs does not get a ``report`` folder among them."""
    if len(folders) == 1 and ((folders[0] / "multirun.yaml").is_file() or (folders[0] / RUN_FILE).is_file()):
        return folders[0] / "report"
    return Path("report")


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if not args.folders and not args.update:
        parser().error("the following arguments are required: folders")
    try:
        if args.update:
            print("\n".join(update(args.update)))
            return 0
        out = args.out or default_out(args.folders)
        tables, published, notes = build(args.folders, args.published, args.by)
        command = "metarun report " + " ".join(argv)
        md, text = render(tables, published, command)
        written = write(out, md, csv_rows(tables, published))
        if not args.no_plots:
            for table in tables:
                written += plot_table(table, out, notes)
    except (MetarunError, OSError) as exc:
        detail = f"{exc.filename}: {exc.strerror}" if isinstance(exc, OSError) and exc.filename else str(exc)
        print(f"metarun report: error: {detail}", file=sys.stderr)
        return 2
    print(text)
    for note in notes:
        print(f"note: {note}")
    print(f"written: {out}/ ({', '.join(sorted({p.name for p in written}))})")
    return 0
