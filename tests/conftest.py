"""Shared fixtures: config composition, the data folder, running the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from metarun.cli import compose

ROOT = Path(__file__).resolve().parent.parent


compose_config = compose  # the real config exactly as ``metarun`` composes it


@pytest.fixture
def cfg_factory():
    return compose_config


def run_cli(args: list[str], cwd: Path, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run ``python -m metarun ARGS`` in ``cwd`` (so outputs/ lands there)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "metarun", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, **kwargs)


@pytest.fixture
def cli(tmp_path):
    def _run(*args: str, **kwargs) -> subprocess.CompletedProcess:
        return run_cli(list(args), tmp_path, **kwargs)

    _run.cwd = tmp_path
    return _run
