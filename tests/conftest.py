"""Shared fixtures: config composition, the data folder, running the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metarun.cli import compose

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("METARUN_DATA_DIR") or ROOT.parent / "shared" / "data")


def require_data(path: Path) -> None:
    """Skip where the shared data is absent on a developer's machine; in CI its absence fails."""
    if not path.exists():
        message = f"{path} not found (set METARUN_DATA_DIR to the shared data folder)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


compose_config = compose  # the real config exactly as ``metarun`` composes it


@pytest.fixture(scope="session")
def omniglot_cache(tmp_path_factory) -> Path:
    """A cache folder holding the real Omniglot preprocessed once for the whole test session."""
    from metarun.data.omniglot import load_omniglot

    require_data(DATA_DIR / "omniglot" / "images_background.zip")
    cache_dir = tmp_path_factory.mktemp("omniglot_cache")
    load_omniglot(DATA_DIR, cache_dir, download=False, progress=False)
    return cache_dir


def run_cli(args: list[str], cwd: Path, timeout: float = 300, env: dict | None = None,
            **kwargs) -> subprocess.CompletedProcess:
    """Run ``python -m metarun ARGS`` in ``cwd`` (so outputs/ lands there); ``env`` adds variables."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "metarun", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, **kwargs)


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test (small decodes and models: threads only add overhead), then
    the number there was before."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cli(tmp_path):
    def _run(*args: str, **kwargs) -> subprocess.CompletedProcess:
        return run_cli(list(args), tmp_path, **kwargs)

    _run.cwd = tmp_path
    return _run


@pytest.fixture(autouse=True)
def _cuda_marked_tests_need_cuda(request):
    """A test marked ``cuda`` fails (it is never skipped) where there is no GPU: it was asked for."""
    if request.node.get_closest_marker("cuda") and not torch.cuda.is_available():
        pytest.fail("this test needs a CUDA GPU (make test-cuda runs on a machine with one)", pytrace=False)
