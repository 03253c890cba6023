"""The ``metarun`` command: compose the Hydra config, check it, dispatch to a trainer.

    metarun task=sinusoid                        # train + evaluate, run folder under outputs/
    metarun resume=outputs/runs/<run>            # continue a run exactly where it stopped
    metarun evaluate=outputs/runs/<run>          # evaluate a checkpoint (600 test tasks)
    metarun -m algorithm.inner_lr=0.001,0.01 seed=0,1   # sweep

Errors a user can fix are printed as one line (``metarun: error: ...``) with exit status 2;
set ``HYDRA_FULL_ERROR=1`` for the full traceback.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from datetime import datetime
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from metarun.config import register_configs, typed, validate
from metarun.trainers import TRAINERS
from metarun.utils import checkpoint
from metarun.utils.errors import ConfigError, MetarunError
from metarun.utils.runtime import write_provenance

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
log = logging.getLogger("metarun")
_ABSENT = object()


def _existing_run_dir(resume, evaluate, default):
    """``hydra.run.dir``: resuming or evaluating writes into the original run folder."""
    target = resume or evaluate
    if not target:
        return default
    # fail here, before Hydra makes the folder, if there is nothing to resume / evaluate
    ckpt = checkpoint.find_checkpoint(str(target))
    return str(ckpt.parent.parent)


def _output_subdir(resume, evaluate):
    """Hydra's own files of a resume / evaluate go beside the original ones, not over them."""
    if resume or evaluate:
        return f".hydra/{'resume' if resume else 'evaluate'}-{datetime.now():%Y-%m-%d_%H-%M-%S}"
    return ".hydra"


def _register() -> None:
    register_configs()
    for name, fn in (("metarun_run_dir", _existing_run_dir), ("metarun_output_subdir", _output_subdir)):
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
        if key in ("resume", "evaluate") or (key == "task" and override.value() == saved.task.name):
            continue  # naming the run's own task changes nothing (main() adds it for composing)
        current = OmegaConf.select(schema, key, default=_ABSENT)
        parent = OmegaConf.select(schema, key.rpartition(".")[0]) if "." in key else None
        # '+' only adds an entry to a free-form mapping such as task.env_kwargs, never a group
        free_form = isinstance(parent, DictConfig) and OmegaConf.get_type(parent) is dict
        if override.is_delete() or isinstance(current, DictConfig) or (override.is_add() and not free_form):
            raise ConfigError(f"'{override.input_line}': a resumed or evaluated run keeps its config groups; "
                              "only key=value overrides such as trainer.iterations=N are allowed "
                              "(and +key=value inside a mapping such as task.env_kwargs)")
        if not override.is_add() and current is _ABSENT:
            hint = " (add it with '+')" if free_form else ""
            raise ConfigError(f"'{override.input_line}': key '{key}' is not in the saved config of {target}{hint}")
        OmegaConf.update(saved, key, override.value(), merge=False, force_add=override.is_add())
    return typed(saved), state


def run(cfg: DictConfig) -> float:
    """Train / resume / evaluate as ``cfg`` says; returns the objective for sweepers."""
    if cfg.resume and cfg.evaluate:
        raise ConfigError("give resume=... or evaluate=..., not both")
    state = None
    target, eval_only = cfg.resume or cfg.evaluate, bool(cfg.evaluate)
    if target:
        cfg, state = _saved_config(target, _checkpoint_name(target, eval_only))
    validate(cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    write_provenance(cfg, run_dir) if not target else None
    trainer = TRAINERS.get(cfg.trainer.name)
    if trainer is None:
        raise ConfigError(f"unknown trainer '{cfg.trainer.name}' (known: {', '.join(sorted(TRAINERS))})")
    return trainer(cfg, run_dir, state=state, eval_only=eval_only)


class _UserError(BaseException):
    """Carries a user error out of a Hydra job; Hydra's job runner only catches ``Exception``
    and would print its own lines around it."""


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float:
    try:
        return run(cfg)
    except Exception as exc:
        if not _is_user_error(exc):
            raise
        _log_to_files(f"metarun: error: {_one_line(exc)}")  # the run folder's log records why it stopped
        raise _UserError(exc) from exc


def _is_user_error(exc: BaseException) -> bool:
    """What gets one line instead of a traceback: our own errors, Hydra's and OmegaConf's (bad
    overrides and configs; instantiate wraps ours), and an OSError about a path (a run folder
    that cannot be made, a full disk, no permission). Anything else is a bug: its traceback stays."""
    return (isinstance(exc, (_UserError, MetarunError, HydraException, OmegaConfBaseException))
            or isinstance(exc, OSError) and exc.filename is not None)


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
    parts = [str(exc)]
    if exc.__cause__ is not None and isinstance(exc.__cause__, OmegaConfBaseException):
        parts.append(str(exc.__cause__))
    text = " ".join(parts)
    text = text.split("Config search path:")[0]
    text = re.sub(r"\s*object_type=\S+", "", text)
    text = re.sub(r"\s*\n\s*", " ", text).strip()
    return text.replace("Available options in", "available options in").replace(": \t", ": ")


def _with_the_runs_task(args: list[str]) -> list[str]:
    """``resume=`` / ``evaluate=``: compose with the run's own task, which brings its model, algorithm
    and trainer groups, so that Hydra accepts overrides of their keys (``task.horizon=...`` of an Ant
    run is not a key of the default sinusoid task). run() then applies them to the saved config."""
    targets = [(arg.split("=", 1)[1], arg.startswith("evaluate=")) for arg in args
               if arg.startswith(("resume=", "evaluate="))]
    if len(targets) != 1 or any(arg.lstrip("+~").startswith("task=") for arg in args):
        return args  # nothing to resume, both given, or a task named: run() reports what is wrong
    target, evaluate = targets[0]
    try:
        task = checkpoint.load(target, name=_checkpoint_name(target, evaluate))["config"]["task"]["name"]
    except (MetarunError, KeyError, TypeError):
        return args  # run() loads it again and reports a bad checkpoint in one line
    return [*args, f"task={task}"]


def main() -> None:
    """Console-script entry: Hydra does the work; user errors become one line and exit 2."""
    _register()
    full_trace = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let exceptions reach us instead of Hydra's printer
    sys.argv[1:] = _with_the_runs_task(sys.argv[1:])
    try:
        hydra_main()
    except (_UserError, Exception) as exc:
        if not _is_user_error(exc):
            raise
        if isinstance(exc, _UserError):
            exc = exc.args[0]
        if full_trace:
            raise exc
        print(f"metarun: error: {_one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as exc:
        print(f"metarun: interrupted ({exc or 'SIGINT'}); the last checkpoint is in the run folder", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
