"""Atomic checkpoints that carry everything a run needs to continue exactly.

A checkpoint is one ``torch.save`` file holding the model and optimizer state, the iteration,
every RNG state the run draws from, and the resolved config. It is written to a temporary
file in the same folder, flushed to disk, then renamed over the old one, so a crash or a full
disk never leaves a half-written ``last.pt`` behind.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from metarun.utils.errors import CheckpointError

CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"  # written every trainer.checkpoint_interval iterations, at the end and on Ctrl-C
BEST = "best.pt"  # the best validation score so far


@contextmanager
def atomic_file(path: str | Path, suffix: str = ".tmp") -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through: a temp file in the same folder, synced to disk
    and renamed over ``path`` when the block ends, removed if the block raises. Readers never
    see half a file. The file gets the mode any new file gets (0666 less the umask, e.g. 0644),
    not the 0600 of a temp file, so collaborators can read results on a shared machine."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's umask (reading it means setting it; it is put back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_atomic(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically (:func:`atomic_file`)."""
    with atomic_file(path) as f:
        torch.save(state, f)
    return Path(path)


def find_checkpoint(path: str | Path, name: str = LAST) -> Path:
    """Resolve a run folder (its ``checkpoints/<name>``) or a checkpoint file to the file to load."""
    path = Path(path)
    if path.is_dir():
        candidate = path / CHECKPOINT_DIR / name
        if not candidate.is_file():
            raise CheckpointError(f"no checkpoint in run folder {path} (expected {candidate})")
        return candidate
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def load(path: str | Path, map_location: str | torch.device = "cpu", name: str = LAST) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_atomic`; a bad file raises one clear error."""
    path = find_checkpoint(path, name)
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # truncated zip, pickle garbage, wrong format: all the same to a user
        raise CheckpointError(
            f"checkpoint {path} is unreadable (truncated or corrupt?): {type(exc).__name__}"
        ) from exc
    missing = {"model", "optimizer", "iteration", "rng", "config"} - set(state) if isinstance(state, dict) else {"everything"}
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a metarun checkpoint (missing {sorted(missing)})")
    return state


def rng_state(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """Every RNG state a run uses: python, numpy, torch (CPU and CUDA) and named generators."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in generators.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in generators.items():
        g.set_state(state["generators"][name])
