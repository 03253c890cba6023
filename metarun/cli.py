"""The ``metarun`` command: compose the Hydra config, check it, dispatch to a trainer.

    metarun task=sinusoid                        # train + evaluate, run folder under outputs/
    metarun resume=outputs/runs/<run>            # continue a run exactly where it stopped
    metarun evaluate=outputs/runs/<run>          # evaluate a checkpoint (600 test tasks)
    metarun -m algorithm.inner_lr=0.001,0.01 seed=0,1   # sweep

Errors a user can fix are printed as one line (``metarun: error: ...``) with exit status 2;
set ``HYDRA_FULL_ERROR=1`` for the full traceback.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import traceback
from datetime import datetime
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, InstantiationException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from metarun import distributed
from metarun.config import (
    check_added_keys,
    flat_keys,
    nearest_key,
    register_configs,
    typed,
    unknown_key_message,
    validate,
)
from metarun.trainers import TRAINERS
from metarun.trainers.loop import Interrupted, phase
from metarun.utils import checkpoint, sweep
from metarun.utils.errors import ConfigError, MetarunError
from metarun.utils.runtime import record_sitting, write_provenance

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
log = logging.getLogger("metarun")
_ABSENT = object()
_STARTED = datetime.now()  # names a new run's folder; under torchrun, rank 0's time on every rank


def _started(fmt: str) -> str:
    """``${metarun_now:...}`` in ``hydra.run.dir``: when the run started (``${now:...}`` is each
    process's own clock, so under torchrun every rank would make its own folder)."""
    return _STARTED.strftime(fmt)


def _existing_run_dir(resume, evaluate, default):
    """``hydra.run.dir``: resuming or evaluating writes into the original run folder."""
    target = resume or evaluate
    if not target:
        return default
    # fail here, before Hydra makes the folder, if there is nothing to resume / evaluate
    ckpt = checkpoint.find_checkpoint(str(target))
    return str(ckpt.parent.parent)


_GIVEN_ARGV: list[str] = []  # the command line as typed, for run_info.json
JOB_DIR_MAX = 160  # characters of a sweep job's folder name; longer override lists are shortened


def job_dir_name(overrides: str) -> str:
    """A sweep job's folder name: its overrides as Hydra joins them (``k=v,k=v``), or, past
    ``JOB_DIR_MAX`` characters, the whole overrides that fit, ``+`` and the first 8 hex digits of the
    full string's SHA-1 (distinct per job, the same in every run). A long override list otherwise
    exceeds what a file system allows in one name (255 bytes); the full overrides stay in the job's
    ``.hydra/overrides.yaml`` and in the sweep's summary."""
    if len(overrides.encode()) <= JOB_DIR_MAX:
        return overrides
    digest = hashlib.sha1(overrides.encode()).hexdigest()[:8]
    kept = ""
    for item in overrides.split(","):
        longer = f"{kept},{item}" if kept else item
        if len(longer.encode()) > JOB_DIR_MAX - 9:
            break
        kept = longer
    if not kept:  # a single override longer than the limit: its start
        kept = overrides.encode()[: JOB_DIR_MAX - 9].decode(errors="ignore")
    return f"{kept}+{digest}"


def _output_subdir(resume, evaluate):
    """Hydra's own files of a resume / evaluate go beside the original ones, not over them."""
    if resume or evaluate:
        return f".hydra/{'resume' if resume else 'evaluate'}-{datetime.now():%Y-%m-%d_%H-%M-%S}"
    return ".hydra"


def _config_groups() -> str:
    """``metarun --help``'s list of config groups: the folders of configs/ and their options (the
    internal ``schema/`` groups, which live in the ConfigStore, Hydra's own, and ``paper/``, which
    follows from the setting and the algorithm, are not listed)."""
    lines = []
    for folder in sorted(p for p in Path(CONFIG_DIR).iterdir() if p.is_dir() and p.name not in ("hydra", "paper")):
        lines.append(f"{folder.name}: {', '.join(sorted(f.stem for f in folder.glob('*.yaml')))}")
    return "\n".join(lines)


def _register() -> None:
    register_configs()
    for name, fn in (("metarun_run_dir", _existing_run_dir), ("metarun_output_subdir", _output_subdir),
                     ("metarun_groups", _config_groups), ("metarun_now", _started),
                     ("metarun_job_dir", job_dir_name)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def compose(*overrides: str) -> DictConfig:
    """The config ``metarun OVERRIDES`` would run, for tests, benchmarks and notebooks."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    _register()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def _checkpoint_name(target: str, evaluate: bool) -> str:
    """resume continues last.pt; evaluate of a run folder tests best.pt when there is one."""
    best = Path(target) / checkpoint.CHECKPOINT_DIR / checkpoint.BEST
    return checkpoint.BEST if evaluate and best.is_file() else checkpoint.LAST


def _saved_config(target: str, name: str) -> tuple[DictConfig, dict]:
    """The checkpointed run's own config, with the command line's ``key=value`` overrides on top."""
    state = checkpoint.load(target, name=name)
    saved = OmegaConf.create(state["config"])
    schema = typed(saved)  # the saved config as this version reads it: newer fields at their defaults
    for override in OverridesParser.create().parse_overrides(HydraConfig.get().overrides.task):
        key = override.key_or_group
        if key in ("resume", "evaluate") or (key in ("task", "algorithm") and override.value() == saved[key].name):
            continue  # naming the run's own task or algorithm changes nothing (main() adds them for composing)
        current = OmegaConf.select(schema, key, default=_ABSENT)
        parent = OmegaConf.select(schema, key.rpartition(".")[0]) if "." in key else None
        # '+' only adds an entry to a free-form mapping such as task.env_kwargs, never a group
        free_form = isinstance(parent, DictConfig) and OmegaConf.get_type(parent) is dict
        if override.is_delete() or isinstance(current, DictConfig) or (override.is_add() and not free_form):
            raise ConfigError(f"'{override.input_line}': a resumed or evaluated run keeps its config groups; "
                              "only key=value overrides such as trainer.iterations=N are allowed "
                              "(and +key=value inside a mapping such as task.env_kwargs)")
        if not override.is_add() and current is _ABSENT:
            near = nearest_key(key, flat_keys(schema))
            hint = " (add it with '+')" if free_form else f" (did you mean {near}?)" if near else ""
            raise ConfigError(f"'{override.input_line}': key '{key}' is not in the saved config of {target}{hint}")
        OmegaConf.update(saved, key, override.value(), merge=False, force_add=override.is_add())
    return typed(saved), state


def run(cfg: DictConfig) -> float:
    """Train / resume / evaluate as ``cfg`` says; returns the objective for sweepers."""
    if cfg.resume and cfg.evaluate:
        raise ConfigError("give resume=... or evaluate=..., not both")
    state = None
    target, eval_only = cfg.resume or cfg.evaluate, bool(cfg.evaluate)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if target:
        cfg, state = _saved_config(target, _checkpoint_name(target, eval_only))
    else:
        check_added_keys(cfg, HydraConfig.get().overrides.task, Path(CONFIG_DIR))
    validate(cfg)
    if not target:
        _refuse_a_finished_run(run_dir)
        _share_the_cores(cfg)
        earlier = _earlier_attempt(cfg, run_dir)
        if isinstance(earlier, float):
            return earlier
        state = earlier
        _say_where_the_values_come_from(cfg)
    placement = _placement(cfg)
    if state is None and distributed.is_main():
        write_provenance(cfg, run_dir, placement)
    elif distributed.is_main():  # a resume or an evaluation: its own command beside the first sitting's
        record_sitting(run_dir, "evaluate" if eval_only else "resume", _GIVEN_ARGV or sys.argv, placement)
    trainer = TRAINERS.get(cfg.trainer.name)
    if trainer is None:
        raise ConfigError(f"unknown trainer '{cfg.trainer.name}' (known: {', '.join(sorted(TRAINERS))})")
    return trainer(cfg, run_dir, state=state, eval_only=eval_only)


def _refuse_a_finished_run(run_dir: Path) -> None:
    """A new run (not a sweep job, which finds its own earlier attempt) whose folder already holds a run
    (``hydra.run.dir`` pointed at one): one line, before anything of that run is written over."""
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        return
    held = [name for name in ("results.json", f"{checkpoint.CHECKPOINT_DIR}/{checkpoint.LAST}")
            if (run_dir / name).is_file()]
    if held:
        raise ConfigError(f"{run_dir} already holds a run ({', '.join(held)}): metarun resume={run_dir} continues it, "
                          f"metarun evaluate={run_dir} tests it again; give a new run another hydra.run.dir")


def _earlier_attempt(cfg: DictConfig, run_dir: Path) -> float | dict | None:
    """A sweep job's folder is a function of the sweep folder and the job's overrides, so a job that
    runs again (requeued after a preemption or its time limit, or the same sweep started again with
    its ``hydra.sweep.dir``) finds its earlier attempt there: finished (results.json: its objective,
    nothing run), stopped (error.txt: NaN, as before), or a checkpoint to resume from (returned)."""
    if HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    from metarun.trainers.results import objective

    if (run_dir / "results.json").is_file():
        log.info("%s already holds this job's results: nothing to do (remove the folder to run it again)", run_dir)
        return objective(json.loads((run_dir / "results.json").read_text()))
    if (run_dir / sweep.ERROR_FILE).is_file():
        log.info("%s: this job stopped before (%s): not run again", run_dir,
                 (run_dir / sweep.ERROR_FILE).read_text().strip())
        return float("nan")
    last = run_dir / checkpoint.CHECKPOINT_DIR / checkpoint.LAST
    if not last.is_file():
        return None
    state = checkpoint.load(last)

    def same(config: dict) -> dict:  # (the threads may differ between attempts; the numbers do not)
        return {**config, "trainer": {k: v for k, v in config["trainer"].items() if k != "num_threads"}}

    if same(state["config"]) != same(OmegaConf.to_container(cfg, resolve=True)):
        raise ConfigError(f"{run_dir} holds a checkpoint of another config than this job's; give the sweep another "
                          "folder (hydra.sweep.dir=...)")
    (run_dir / sweep.INTERRUPTED_FILE).unlink(missing_ok=True)  # (its status until now)
    log.info("resuming this sweep job from its checkpoint of iteration %d in %s", state["iteration"], run_dir)
    return state


def _share_the_cores(cfg: DictConfig) -> None:
    """Sweep jobs that run side by side on this machine share its cores: under Hydra's joblib
    launcher each of its ``n_jobs`` gets its share, under submitit's local launcher its
    ``cpus_per_task`` (on SLURM the job's CPU allocation already limits the cores it sees); unless
    ``trainer.num_threads`` is given."""
    if cfg.trainer.num_threads is not None or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    launcher = HydraConfig.get().launcher
    target = str(launcher.get("_target_", ""))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if target.endswith("JoblibLauncher"):
        n_jobs = int(launcher.get("n_jobs") or -1)
        jobs = min(n_jobs, cores) if n_jobs > 0 else max(1, cores + 1 + n_jobs)  # joblib: -1 = every core
        threads = max(1, cores // jobs)
    elif target.endswith("LocalLauncher") and launcher.get("cpus_per_task"):
        threads = int(launcher.cpus_per_task)
    else:
        return
    cfg.trainer.num_threads = threads
    log.info("trainer.num_threads=%d: this job's share of the %d cores (%s)", threads, cores, target.rsplit(".", 1)[-1])


def _placement(cfg: DictConfig) -> dict:
    """What run_info.json and the log record of the processes: under torchrun the world size, the
    backend and each rank's device (and the checks that all ranks make alike, before anything is
    written: the meta-batch splits evenly, each GPU rank has a GPU)."""
    if distributed.world_size() == 1:
        return {"world_size": 1}
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        raise ConfigError("torchrun starts one run on several processes; run a sweep (-m) without torchrun, or with "
                          "a launcher (hydra/launcher=submitit_slurm) whose jobs are the torchrun runs")
    distributed.check_meta_batch(cfg.algorithm.meta_batch_size)
    devices = distributed.all_gather_object(distributed.device_for(cfg.device), "set-up")
    info = {"world_size": distributed.world_size(), "backend": distributed.backend(), "devices": devices,
            "launcher": distributed.launcher()}
    log.info("torchrun: %d processes, backend %s, devices %s", info["world_size"], info["backend"], " ".join(devices))
    return info


def _say_where_the_values_come_from(cfg: DictConfig) -> None:
    """Log the run folder (TensorBoard can be pointed at it at once), the setting an image folder
    starts from, and which file gave the algorithm its values for the setting, or that none did."""
    log.info("run folder: %s (tensorboard --logdir %s)", HydraConfig.get().runtime.output_dir,
             HydraConfig.get().runtime.output_dir)
    setting = HydraConfig.get().runtime.choices.get("setting")
    if cfg.task.name == "image_folder":
        log.info("task=image_folder runs with setting=%s: %s-way %s-shot, %s queries, %s iterations, model %s, "
                 "meta-batch %s; for small grayscale images like Omniglot's, setting=omniglot_5w1s model=conv4 "
                 "task.queries=1 task.test_queries=1 is the Omniglot protocol (docs/your_data.md)", setting, cfg.task.ways, cfg.task.shots,
                 cfg.task.queries, cfg.trainer.iterations, cfg.model._target_.rsplit(".", 1)[-1],
                 cfg.algorithm.meta_batch_size)
    choice = HydraConfig.get().runtime.choices.get("paper")
    if choice and (Path(CONFIG_DIR) / "paper" / f"{choice}.yaml").is_file():
        log.info("algorithm values for this setting: configs/paper/%s.yaml", choice)
    elif choice:
        setting, algorithm = choice.split("/")
        log.warning("configs/paper/%s.yaml does not exist: algorithm=%s runs with configs/algorithm/%s.yaml's own "
                    "values on the setting %s", choice, algorithm, algorithm, setting)


class _UserError(BaseException):
    """Carries a user error out of a Hydra job; Hydra's job runner only catches ``Exception``
    and would print its own lines around it."""


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float:
    if not distributed.is_main():
        _quiet_rank()
    # under torchrun: every rank has made the run folder (Hydra does, first) before rank 0 may
    # remove it again after bad input, so no rank leaves an empty one behind
    distributed.all_gather_object(None, "set-up")
    recover = (f"metarun resume={cfg.resume} continues from its last checkpoint" if cfg.resume else
               f"metarun evaluate={cfg.evaluate} tests it again" if cfg.evaluate else
               "nothing was trained yet: run the command again")
    try:
        with phase("set-up", recover):  # (the trainers name their own phases: training, the final test)
            return run(cfg)
    except BaseException as exc:
        kept = (cfg.resume or cfg.evaluate or not distributed.is_main()
                or not _remove_if_not_started(Path(HydraConfig.get().runtime.output_dir)))
        if isinstance(exc, Interrupted) and kept:
            _log_to_files(f"metarun: {exc}")  # the run folder's log records why it stopped
        if isinstance(exc, KeyboardInterrupt) and _job_of_its_own():
            return _job_interrupted(exc, Path(HydraConfig.get().runtime.output_dir), kept)
        if not isinstance(exc, Exception) or not _is_user_error(exc):
            raise
        if kept:
            _log_to_files(f"metarun: error: {_one_line(exc)}")  # the run folder's log records why it stopped
        if kept and HydraConfig.get().mode == RunMode.MULTIRUN and not (cfg.resume or cfg.evaluate):
            return _job_stopped(exc, Path(HydraConfig.get().runtime.output_dir))
        raise _UserError(exc) from exc


def _quiet_rank() -> None:
    """Under torchrun only rank 0 writes the run's log: the other ranks log no file and print
    warnings and errors only."""
    root = logging.getLogger()
    root.setLevel(logging.WARNING)
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()


def _job_stopped(exc: Exception, run_dir: Path) -> float:
    """A sweep job that stopped after training began (it diverged, say) is one of the sweep's
    results, not the end of the sweep: its reason goes to ``<job>/error.txt`` (the summary's
    status column), the other jobs run, and ``metarun -m`` exits 1 at the end. Returns NaN, which
    sweepers (Optuna, Nevergrad) record as a failed trial."""
    line = _one_line(exc)
    with checkpoint.atomic_file(run_dir / sweep.ERROR_FILE) as f:
        f.write((line + "\n").encode())
    print(f"metarun: job {HydraConfig.get().job.num} stopped: {line}; the sweep goes on", file=sys.stderr)
    return float("nan")


def _job_of_its_own() -> bool:
    """A sweep job in a process of its own that a launcher waits on (submitit's, locally or on
    SLURM): a Ctrl-C or a kill stops that job, not the process that runs the sweep."""
    return (HydraConfig.get().mode == RunMode.MULTIRUN
            and "submitit" in str(HydraConfig.get().launcher.get("_target_", "")).lower())


def _job_interrupted(exc: KeyboardInterrupt, run_dir: Path, kept: bool) -> float:
    """A submitit job stopped by a signal (its checkpoint written, or stopped outside training):
    one of the sweep's results, as a stopped job is, instead of a traceback that submitit hands
    to the sweep as an error of its own. Its status goes to ``<job>/interrupted.txt``; the sweep
    started again with its ``hydra.sweep.dir`` resumes the job from its checkpoint."""
    line = (str(exc) if isinstance(exc, Interrupted) else f"{exc} received; checkpoint written" if str(exc) else
            "stopped by a second SIGINT, without a checkpoint (the last one written is kept)")
    if kept:
        with checkpoint.atomic_file(run_dir / sweep.INTERRUPTED_FILE) as f:
            f.write((line + "\n").encode())
    print(f"metarun: job {HydraConfig.get().job.num} {line}", file=sys.stderr)
    return float("nan")


# what Hydra and the set-up write into a new run folder before training begins
_WRITTEN_AT_START = (".hydra", "config.yaml", "run_info.json", "metarun.log")


def _remove_if_not_started(run_dir: Path) -> bool:
    """A new run that stopped before training began (a bad value, missing data) is not a run:
    remove what Hydra and the set-up wrote into its folder, and the folder if that empties it, so
    that outputs/runs/ lists real runs only. Training has begun once it has written ``tb/`` (a run
    that diverges or is interrupted later keeps its folder). Returns whether it removed anything."""
    if not run_dir.is_dir() or any((run_dir / name).exists() for name in ("tb", checkpoint.CHECKPOINT_DIR, "results.json")):
        return False
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == run_dir:
            handler.close()
    for name in _WRITTEN_AT_START:
        path = run_dir / name
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    try:
        run_dir.rmdir()
    except OSError:  # it holds something else (a folder given with hydra.run.dir): leave that
        return True
    # and outputs/runs/, outputs/ where they are left empty (this run made them), up to the working folder
    cwd = Path.cwd().resolve()
    for parent in run_dir.resolve().parents:
        if parent == cwd or cwd not in parent.parents:
            break
        try:
            parent.rmdir()
        except OSError:  # not empty: other runs
            break
    return True


def _is_user_error(exc: BaseException) -> bool:
    """What gets one line instead of a traceback: our own errors, Hydra's and OmegaConf's (bad
    overrides and configs), and an OSError about a path (a run folder that cannot be made, a full
    disk, no permission). Hydra's instantiate wraps whatever a task or model constructor raises:
    that is the user's where it is one of these, a ``_target_`` that cannot be found, or arguments
    the target does not take; anything else raised inside a constructor is a bug, and its traceback
    stays."""
    if isinstance(exc, InstantiationException) and exc.__cause__ is not None:
        cause = exc.__cause__
        return (str(exc).startswith("Error locating target") or _is_user_error(cause)
                or isinstance(cause, TypeError) and _raised_by_the_call(cause))
    return (isinstance(exc, (_UserError, MetarunError, HydraException, OmegaConfBaseException))
            or isinstance(exc, OSError) and exc.filename is not None)


def _override_under_null(exc: BaseException) -> str | None:
    """For ``metarun -m hydra.sweeper.params.seed=0``: an override that sets a key under a node that is
    null (the basic sweeper's ``params``) fails inside OmegaConf with a bare AssertionError; the line
    naming the override, and for the sweeper's params how a sweep takes its values."""
    if not isinstance(exc, AssertionError) or "Unexpected type for root: NoneType" not in str(exc):
        return None
    tb, key = exc.__traceback__, None
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "_apply_overrides_to_config":
            key = tb.tb_frame.f_locals.get("key")
        tb = tb.tb_next
    if key is None:
        return None
    parent = key.rsplit(".", 1)[0]
    line = f"{key}: {parent} is null in the composed config, so no key can be set under it"
    if parent == "hydra.sweeper.params":
        line += (" (the default sweeper takes a sweep's values as overrides, e.g. metarun -m seed=0,1,2; "
                 "hydra.sweeper.params is for hydra/sweeper=optuna, see configs/sweep/)")
    return line


def _raised_by_the_call(exc: BaseException) -> bool:
    """A TypeError raised by the call itself (arguments the target does not take), not inside it."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_name == "_call_target"


def _log_to_files(message: str) -> None:
    """An error line for the log files only: the console gets it once, on stderr, from main()."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _one_line(exc: BaseException) -> str:
    """A Hydra / OmegaConf / metarun error as one readable line."""
    inner = exc
    while inner is not None:  # a metarun error raised inside a resolver: report it, not the wrapper
        if isinstance(inner, MetarunError):
            return str(inner)
        inner = inner.__cause__ or inner.__context__
    located = re.match(r"Error locating target '([^']+)'", str(exc))
    if located and exc.__cause__ is not None:  # a user's own model or task whose module is not found
        key = re.search(r"full_key: (\S+)", str(exc))
        lines = str(exc.__cause__).splitlines()
        why = lines[1] if len(lines) > 1 else lines[0] if lines else type(exc.__cause__).__name__
        return (f"{key.group(1) + '.' if key else ''}_target_={located.group(1)} cannot be imported: {why}; install "
                "its package, run metarun from the folder that holds it, or put that folder on PYTHONPATH")
    unexpected = re.search(r"Error in call to target '([^']+)'.*unexpected keyword argument '(\w+)'.*full_key: model\b",
                           str(exc), re.DOTALL)
    if unexpected:
        target, key = unexpected.groups()
        takes = _arguments_of(target)
        near = nearest_key(key, takes)
        given = next((a for a in _GIVEN_ARGV[1:] if a.lstrip("+").startswith(f"model.{key}=")), None)
        if given:  # a typo on the command line: the class's own arguments, and the nearest
            return (f"'{given}': model._target_={target} does not take the argument '{key}'"
                    + (f"; did you mean model.{near}?" if near else "")
                    + (f" (it takes {', '.join(takes)})" if takes else ""))
        # model._target_=my_nets.Net alone: the model group's file (conv4's hidden, ...) still applies
        return (f"model._target_={target} does not take the argument '{key}' (from the model group's file); for a "
                f"model of your own give model=custom model._target_={target} (its arguments as +model.KEY=VALUE), "
                "or a model/<name>.yaml of your own in a --config-dir folder")
    parts = [str(exc)]
    if exc.__cause__ is not None and isinstance(exc.__cause__, OmegaConfBaseException):
        parts.append(str(exc.__cause__))
    text = " ".join(parts)
    text = text.split("Config search path:")[0]
    text = re.sub(r"\s*object_type=\S+", "", text)
    text = re.sub(r"\s*\n\s*", " ", text).strip()
    text = text.replace("Available options in", "available options in").replace(": \t", ": ")
    return _plainer(text)


def _arguments_of(target: str) -> list[str]:
    """The keyword arguments a ``_target_`` class or function takes (beyond those metarun passes in)."""
    import inspect

    from hydra.utils import get_object

    try:
        parameters = inspect.signature(get_object(target)).parameters.values()
    except Exception:  # (it was importable a moment ago; say no more than we know)
        return []
    return [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and p.name not in ("self", "in_features", "out_features", "in_channels", "image_size")]


def _plainer(text: str) -> str:
    """Hydra's and OmegaConf's wording made plainer where a new user meets it: a group choice with a
    typo gets the nearest option, a value of the wrong type says which type the key takes."""
    choice = re.search(r"Could not find '(?P<group>[\w/]+)/(?P<name>[^']+)' available options in '[^']+': (?P<options>.*)",
                       text)
    if choice:
        near = nearest_key(choice["name"], choice["options"].split())  # (the config keys' own typo matcher)
        group = choice["group"]
        return (f"{group}={choice['name']}: no such {group}; the options are {choice['options']}"
                + (f" (did you mean {group}={near}?)" if near else ""))
    wrong = re.search(r"Error merging override (?P<override>\S+) Value '(?P<value>[^']*)' of type '\w+' could not be "
                      r"converted to (?P<type>\w+) full_key: (?P<key>\S+)", text)
    if wrong:
        kinds = {"Float": "a number", "Integer": "a whole number", "Boolean": "true or false"}
        return (f"{wrong['override']}: {wrong['key']} takes {kinds.get(wrong['type'], wrong['type'])}, "
                f"not '{wrong['value']}'")
    return text


_NOT_A_KEY = re.compile(r"Could not override '(?P<key>[^']+)'.*Key '[^']+' (is )?not in", re.DOTALL)


def _unknown_key_line(exc: BaseException, args: list[str]) -> str | None:
    """For ``metarun trainer.iteratons=10``: the line naming the key and the nearest real one
    (Hydra's own message suggests adding it with '+', which would run with the typo)."""
    match = _NOT_A_KEY.search(_one_line(exc))  # Hydra's message, with its cause's
    if match is None:
        return None
    key = match.group("key")
    # the keys of the config the chosen groups compose (key=value overrides and sweeps left out)
    groups = [a for a in args if "=" in a and (Path(CONFIG_DIR) / a.split("=")[0]).is_dir() and "," not in a]
    try:
        from hydra.core.global_hydra import GlobalHydra

        GlobalHydra.instance().clear()
        keys = flat_keys(compose(*groups))
    except Exception:  # the groups themselves do not compose: say what we can without a suggestion
        keys = []
    return str(ConfigError(unknown_key_message(key, keys)))


# the Hydra plugins behind the launcher and sweeper presets: (module, pip package, metarun's extra)
_PLUGINS = {"submitit": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher", "cluster"),
            "joblib": ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher", "cluster"),
            "optuna": ("hydra_plugins.hydra_optuna_sweeper", "hydra-optuna-sweeper", "search")}
_NEEDS = {"hydra/launcher": {"slurm": "submitit", "local": "submitit", "submitit_slurm": "submitit",
                             "submitit_local": "submitit", "parallel": "joblib", "joblib": "joblib"},
          "hydra/sweeper": {"optuna": "optuna"}}


def _missing_plugin(args: list[str]) -> str | None:
    """The line for a launcher or sweeper (on the command line, or chosen by a sweep preset) whose
    Hydra plugin is not installed; Hydra's own message would only say the config was not found."""
    for arg in args:
        group, _, choice = arg.lstrip("+~").partition("=")
        wanted = [(group, choice)]
        preset = Path(CONFIG_DIR) / "sweep" / f"{choice}.yaml"
        if group == "sweep" and preset.is_file():  # override /hydra/sweeper: optuna
            wanted = re.findall(r"override /(hydra/\w+): (\w+)", preset.read_text())
        for g, c in wanted:
            plugin = _NEEDS.get(g, {}).get(c)
            if plugin and importlib.util.find_spec(_PLUGINS[plugin][0]) is None:
                module, package, extra = _PLUGINS[plugin]
                chosen = arg if (g, c) == (group, choice) else f"{arg} (its {g}={c})"
                return (f"{chosen} needs Hydra's {plugin} plugin, which is not installed here: pip install "
                        f"'metarun[{extra}]' (or {package}); make install installs it")
    return None


def _version() -> str:
    import hydra as hydra_module
    import torch

    from metarun import __version__

    return f"metarun {__version__} (torch {torch.__version__}, hydra-core {hydra_module.__version__})"


def _with_the_runs_task(args: list[str]) -> list[str]:
    """``resume=`` / ``evaluate=``: compose with the run's own task (which brings its model and trainer
    groups) and algorithm, so that Hydra accepts overrides of their keys (``task.horizon=...`` of an Ant
    run is not a key of the default sinusoid task). run() then applies them to the saved config."""
    targets = [(arg.split("=", 1)[1], arg.startswith("evaluate=")) for arg in args
               if arg.startswith(("resume=", "evaluate="))]
    if len(targets) != 1 or any(arg.lstrip("+~").startswith(("task=", "algorithm=")) for arg in args):
        return args  # nothing to resume, both given, or a task named: run() reports what is wrong
    target, evaluate = targets[0]
    try:
        saved = checkpoint.load(target, name=_checkpoint_name(target, evaluate))["config"]
        task, algorithm = saved["task"]["name"], saved["algorithm"]["name"]
    except (MetarunError, KeyError, TypeError):
        return args  # run() loads it again and reports a bad checkpoint in one line
    return [*args, f"task={task}", f"algorithm={algorithm}"]


def main() -> None:
    """Console-script entry: Hydra does the work; user errors become one line and exit 2."""
    if sys.argv[1:] == ["--version"]:  # Hydra's own --version would print Hydra's
        print(_version())
        return
    if sys.argv[1:2] == ["report"]:  # tables and plots from run folders: not a run, no Hydra
        from metarun import report

        sys.exit(report.main(sys.argv[2:]))
    _register()
    if os.getcwd() not in sys.path and "" not in sys.path:  # as `python -m metarun` does: a user's own module in
        sys.path.append(os.getcwd())  # the current folder can be a _target_ (last: it shadows no installed package)
    full_trace = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let exceptions reach us instead of Hydra's printer
    _GIVEN_ARGV[:] = sys.argv  # as typed (resume= and evaluate= get the run's task and algorithm added)
    args = sys.argv[1:] = _with_the_runs_task(sys.argv[1:])
    try:
        missing = _missing_plugin(args)
        if missing:
            raise ConfigError(missing)
        _join_torchrun()
        hydra_main()
        if sweep.STOPPED_JOBS:
            print(sweep.STOPPED_JOBS[0].message(), file=sys.stderr)
            sys.exit(1)
        distributed.finish()
    except (_UserError, Exception) as exc:
        null_parent = _override_under_null(exc)
        if null_parent:
            print(f"metarun: error: {null_parent}", file=sys.stderr)
            sys.exit(2)
        if not _is_user_error(exc):
            traceback.print_exc()
            print(f"metarun: internal error ({type(exc).__name__}): not a known problem with the input. If the "
                  "traceback above ends in metarun's code, please report it with the command line and the run's "
                  "config.yaml.", file=sys.stderr)
            sys.exit(1)
        if isinstance(exc, _UserError):
            exc = exc.args[0]
        if full_trace:
            raise exc
        if distributed.is_main() or isinstance(exc, distributed.DistributedError):  # (the others' line is rank 0's)
            where = "" if distributed.world_size() == 1 else f" (rank {distributed.rank()})"
            print(f"metarun: error{where}: {_unknown_key_line(exc, args) or _one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as exc:
        if distributed.is_main() and isinstance(exc, Interrupted):  # outside training: it names the phase
            print(f"metarun: {exc}", file=sys.stderr)
        elif distributed.is_main():
            print(f"metarun: interrupted ({str(exc) or 'SIGINT'}); the last checkpoint is in the run folder",
                  file=sys.stderr)
        sys.exit(130)
    finally:
        distributed.close()


def _join_torchrun() -> None:
    """Under torchrun: join the process group, take rank 0's start time (which names the run
    folder), and keep Hydra's own record (.hydra/) to rank 0."""
    global _STARTED
    _STARTED = datetime.now()
    if not distributed.launched():
        return
    distributed.init()
    if any(arg in ("-m", "--multirun") for arg in sys.argv[1:]):
        raise ConfigError("torchrun starts one run on several processes; run a sweep (-m) without torchrun, or with "
                          "a launcher (hydra/launcher=submitit_slurm) whose jobs are the torchrun runs")
    _STARTED = distributed.broadcast_object(_STARTED)
    if not distributed.is_main():
        sys.argv.append("hydra.output_subdir=null")


if __name__ == "__main__":
    main()
