"""Run set-up shared by trainers: device, seeds, threads, and the run folder's provenance."""

from __future__ import annotations

import json
import os
import platform
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from metarun.utils.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; an explicit CUDA device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available here (use device=cpu or auto)")
    return device


def set_threads(requested: int | None) -> int:
    """torch's CPU threads: ``requested``, or None for every core this process may use (fastest
    for one run on a machine; use 1 per run when several runs share the cores), shared out among
    the processes torchrun started on this machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = requested or max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(threads)
    return threads


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def source_commit(where: Path | None = None) -> dict | None:
    """The git commit of the metarun source a run was made with, and whether tracked files differed
    from it (``dirty``): None when the code is not a git checkout (installed from a wheel) or git
    is missing."""
    where = where or Path(__file__).resolve().parents[2]
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()

        if Path(git("rev-parse", "--show-toplevel")).resolve() != where.resolve():
            return None  # inside some other repository (a site-packages in someone's project)
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    """Versions that decide a run's numbers (and the source's git commit, where it is a checkout)."""
    import hydra
    import omegaconf

    from metarun import __version__

    out = {
        "metarun": __version__,
        "source": source_commit(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "hydra": hydra.__version__,
        "omegaconf": omegaconf.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cuda": torch.version.cuda or "none",
    }
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out


def write_provenance(cfg: DictConfig, run_dir: Path, extra: dict | None = None) -> None:
    """Save the resolved config and the versions in the run folder (besides Hydra's .hydra/)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    info = {"versions": versions(), "seed": int(cfg.seed), "argv": sys.argv, **(extra or {})}
    (run_dir / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")


def record_sitting(run_dir: Path, kind: str, argv: list[str], extra: dict | None = None) -> None:
    """Append a later sitting of a run (``resume`` or ``evaluate``) to run_info.json's ``sittings``:
    its command line, when, and the versions it ran with, so the folder tells how each part was made
    (the first sitting's command stays at the top)."""
    from datetime import datetime

    path = run_dir / "run_info.json"
    info = json.loads(path.read_text()) if path.is_file() else {}
    info.setdefault("sittings", []).append({"kind": kind, "argv": list(argv), "started": datetime.now().isoformat(
        timespec="seconds"), "versions": versions(), **(extra or {})})
    from metarun.utils.checkpoint import atomic_file

    with atomic_file(path) as f:
        f.write((json.dumps(info, indent=2) + "\n").encode())
