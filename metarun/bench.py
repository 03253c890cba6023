"""``make bench``: milliseconds per meta-iteration and peak memory, vmap vs the per-task loop.

Both batchings run the real training step (``trainers.supervised.meta_step``) of a composed
config, in this one process, in alternating rounds, so their ratio is measured side by side.
Peak memory is the CUDA allocator's peak on a GPU, and on a CPU the growth of the process's peak
resident set (Linux ``VmHWM``, reset before each measurement).

    python -m metarun.bench                       # every benchmark config, CPU and CUDA if present
    python -m metarun.bench --configs sinusoid --iterations 100 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import datetime
from pathlib import Path

import torch

# name -> Hydra overrides; later issues add their configs here
CONFIGS = {
    "sinusoid": ["experiment=sinusoid_k10"],
}


def _reset_peak(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return _status_kb("VmRSS") * 1024
    except OSError:
        return 0


def _peak(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        return _status_kb("VmHWM") * 1024
    except OSError:
        return 0


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(field)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_config(name: str, overrides: list[str], device: str, iterations: int, rounds: int,
                 warmup: int) -> list[dict]:
    """Time vmap and loop on one config and device; returns one row per batching."""
    from metarun.cli import compose
    from metarun.meta import resolve_batching
    from metarun.trainers import supervised as sup

    cfg = compose(*overrides, f"device={device}")
    runs = {}
    for batching in ("loop", "vmap"):
        run = sup.setup(cfg, Path("/nonexistent"))  # setup writes nothing
        run.batching = batching
        runs[batching] = run
    auto = resolve_batching("auto", runs["vmap"].device, runs["vmap"].model)
    times = {b: [] for b in runs}
    peaks = {}
    for r in range(rounds):
        for batching, run in runs.items():
            for _ in range(warmup if r == 0 else 0):
                sup.meta_step(run, run.task.sample(cfg.algorithm.meta_batch_size, run.task.shots, run.task.queries,
                                                   run.generators["train"]).tasks)
            base = _reset_peak(run.device)
            _sync(run.device)
            start = time.perf_counter()
            for _ in range(iterations):
                batch = run.task.sample(cfg.algorithm.meta_batch_size, run.task.shots, run.task.queries,
                                        run.generators["train"])
                sup.meta_step(run, batch.tasks)
            _sync(run.device)
            times[batching].append((time.perf_counter() - start) / iterations * 1e3)
            peaks[batching] = max(peaks.get(batching, 0), _peak(run.device) - base)
    loop_ms = statistics.median(times["loop"])
    rows = []
    for batching in runs:
        ms = statistics.median(times[batching])
        rows.append({"config": name, "device": str(runs[batching].device), "batching": batching,
                     "auto_picks": auto, "ms_per_iteration": ms, "peak_mb": peaks[batching] / 2**20,
                     "speedup_vs_loop": loop_ms / ms, "meta_batch_size": cfg.algorithm.meta_batch_size,
                     "first_order": cfg.algorithm.first_order, "threads": torch.get_num_threads()})
    return rows


def table(rows: list[dict]) -> str:
    head = f"{'config':<16}{'device':<8}{'batching':<10}{'ms/iter':>10}{'peak MB':>10}{'vs loop':>9}  auto picks"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['config']:<16}{r['device']:<8}{r['batching']:<10}{r['ms_per_iteration']:>10.2f}"
                     f"{r['peak_mb']:>10.1f}{r['speedup_vs_loop']:>8.2f}x  {r['auto_picks']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--devices", nargs="*", default=None, help="default: cpu, and cuda when present")
    parser.add_argument("--iterations", type=int, default=100, help="timed iterations per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is reported")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", default="outputs/bench", help="folder for the JSON record")
    args = parser.parse_args(argv)
    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        for name in args.configs:
            print(f"benchmarking {name} on {device} ...", flush=True)
            rows += bench_config(name, CONFIGS[name], device, args.iterations, args.rounds, args.warmup)
    print(table(rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from metarun.utils.runtime import versions

    path = out / f"bench_{datetime.now():%Y-%m-%d_%H-%M-%S}.json"
    path.write_text(json.dumps({"versions": versions(), "rows": rows}, indent=2) + "\n")
    print(f"\nwritten to {path}")
    return rows


if __name__ == "__main__":
    main()
