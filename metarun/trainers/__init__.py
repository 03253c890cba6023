"""Trainers, one per family of problems, in one table; all share one signature:
``trainer(cfg, run_dir, state=None, eval_only=False) -> objective`` (the number sweeps optimise)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from metarun.trainers.results import objective
from metarun.trainers.supervised import run_supervised


def _supervised(cfg: DictConfig, run_dir: Path, state: dict | None = None, eval_only: bool = False) -> float:
    return objective(run_supervised(cfg, run_dir, state, eval_only))


def _rl(cfg: DictConfig, run_dir: Path, state: dict | None = None, eval_only: bool = False) -> float:
    from metarun.trainers.rl import run_rl  # imports the environments only when an RL task runs

    return objective(run_rl(cfg, run_dir, state, eval_only))


TRAINERS = {"supervised": _supervised, "rl": _rl}
