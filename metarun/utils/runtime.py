"""Run set-up shared by trainers: device, seeds, threads, and the run folder's provenance."""

from __future__ import annotations

import json
import logging
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from metarun.utils.errors import ConfigError

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; an explicit CUDA device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available here (use device=cpu or auto)")
    return device


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a SLURM allocation, ``taskset``)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class CoreWatch:
    """How many of this process's cores other work keeps busy: from ``/proc/stat``'s busy time of
    those cores minus this process's own CPU time, over the time between two readings. None where
    ``/proc/stat`` cannot be read (not Linux)."""

    STAT = Path("/proc/stat")

    def __init__(self) -> None:
        self.cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self.last = self._read()

    def _read(self) -> tuple[float, float, float] | None:
        try:
            lines = self.STAT.read_text().splitlines()
        except OSError:
            return None
        busy, wanted = 0, {f"cpu{c}" for c in self.cpus}
        for line in lines:
            fields = line.split()
            if fields and fields[0] in wanted:
                ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
                busy += sum(ticks) - ticks[3] - ticks[4]
        return busy / os.sysconf("SC_CLK_TCK"), time.process_time(), time.monotonic()

    def due(self, seconds: float) -> bool:
        """Whether ``seconds`` have passed since the last reading (never, where there is none)."""
        return self.last is not None and time.monotonic() - self.last[2] >= seconds

    def others(self) -> float | None:
        """Cores' worth of other processes' work since the last call (or since this watch began)."""
        now, before = self._read(), self.last
        if now is None or before is None or now[2] - before[2] < 0.05:
            return None
        self.last = now
        return max(0.0, (now[0] - before[0]) - (now[1] - before[1])) / (now[2] - before[2])


_BUSY: list[tuple[float, float]] = []  # (when, cores busy with other work): one reading serves a process's runs
                                       # for 30 s (a sweep's jobs in one process, a test suite's set-ups)


def _busy_cores() -> float:
    """Cores' worth of other work now, over 0.1 s (0 where it cannot be read)."""
    if not _BUSY or time.monotonic() - _BUSY[0][0] > 30.0:
        watch = CoreWatch()
        time.sleep(0.1)
        _BUSY[:] = [(time.monotonic(), watch.others() or 0.0)]
    return _BUSY[0][1]


def idle_cores(busy: float, cores: int) -> int:
    """The threads that fit beside ``busy`` cores' worth of other work (at least one)."""
    return max(1, cores - round(busy))


def set_threads(requested: int | None) -> int:
    """torch's CPU threads: ``requested``, or None for the cores this process may use that other
    work is not keeping busy right now (measured over 0.1 s), shared out among the processes torchrun
    started on this machine. Every core when the machine is idle; fewer beside another busy process,
    where torch's threads would spin against it (docs/speed.md: 2 threads beside one busy process
    ran a sinusoid step many times slower than 1)."""
    cores, local_ranks = usable_cores(), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if requested is None and local_ranks > 1:  # torchrun's ranks on this machine: a share each (the
        requested = max(1, cores // local_ranks)  # others' set-up would read as other work here)
    if requested is None:
        busy = _busy_cores()
        requested = idle_cores(busy, cores)
        if requested < cores:
            log.info("trainer.num_threads=%d: other work keeps about %.1f of this process's %d cores busy",
                     requested, busy, cores)
    torch.set_num_threads(requested)
    return requested


_WARNED: list[bool] = []  # (oversubscribed warns once per process)


def oversubscribed(threads: int, watch: CoreWatch) -> str | None:
    """A warning, once per process, when other work has kept more of the cores busy since ``watch``
    last looked than ``threads`` torch threads leave free (they then spin against it); else None."""
    busy = watch.others()
    cores = usable_cores()
    if _WARNED or busy is None or threads <= 1 or threads + busy <= cores + 0.5:
        return None
    _WARNED.append(True)
    return (f"other work keeps about {busy:.1f} of this process's {cores} cores busy while torch runs {threads} threads, "
            f"which then wait on each other and can run many times slower: give trainer.num_threads="
            f"{idle_cores(busy, cores)} or stop the other work (docs/speed.md)")


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
