"""``make bench``: milliseconds per meta-iteration and peak memory, vmap vs the per-task loop.

``sampling`` is the share of the iteration spent drawing the meta-batch (tasks generated or
episodes gathered on the device): it should stay a small fraction.

Both batchings run the real training step (``trainers.supervised.meta_step``) of a composed
config, in this one process, in alternating rounds, so their ratio is measured side by side.
Peak memory is the CUDA allocator's peak on a GPU. On a CPU it is measured in a fresh child
process per batching (a process reuses freed memory, so in-process numbers would hide the
second one): the growth of the peak resident set (Linux ``VmHWM``) over two training steps,
above the resident set after set-up (model and dataset loaded).

    python -m metarun.bench                       # every benchmark config, CPU and CUDA if present
    python -m metarun.bench --configs sinusoid --algorithms maml reptile --iterations 100 --rounds 3
    python -m metarun.bench --threads 1           # one torch thread (default: every core)
    python -m metarun.bench --configs omniglot_5w1s --algorithms maml --processes 2 --rl

``--rl`` measures each meta-RL config along the ``RL_PATHS`` side by side (the gymnasium sampler with
the double-backward Fisher products, metarun's path before issue 41; the batched sampler with the
factored products by autograd; and with them in closed form, the default), the TRPO step on each of
``--devices``, and MuJoCo's own speed for each robot on one core (the floor under any sampler).

``--processes N`` (default 2; 0 skips it) adds a row per config: MAML on N torchrun processes of
one thread each (gloo on a CPU) against one process with N threads, the same global meta-batch,
launched alternately round by round; the ratio is the one to quote.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from queue import Empty

import torch

from metarun.algorithms import ALGORITHMS

ALL = list(ALGORITHMS)  # every supervised algorithm of the registry

# name -> (Hydra overrides, timed iterations per round by default, algorithms benchmarked by default);
# each algorithm runs with its own values for the setting (configs/paper/<setting>/<algorithm>.yaml)
CONFIGS = {
    "sinusoid": (["experiment=sinusoid_k10"], 100, ALL),
    "omniglot_5w1s": (["experiment=omniglot_5w1s", "task.progress=false"], 5, ALL),
    "omniglot_20w1s": (["experiment=omniglot_20w1s", "task.progress=false"], 2, ["maml"]),
    # the preset with the 12.4 M-parameter ResNet-12 (model=resnet12) in place of conv4
    "omniglot_5w1s_resnet12": (["experiment=omniglot_5w1s", "model=resnet12", "task.progress=false"], 2, ["maml"]),
}
# rows that run by default only where there is a GPU: on the 2-core CPU one ResNet-12 meta-step takes
# about half a minute, and the row about 20 minutes (name it with --configs to run it there)
GPU_ROWS = {"omniglot_5w1s_resnet12"}


def _cpu_peak_child(overrides: list[str], queue) -> None:
    """In a fresh process: peak resident-set growth over two training steps, in bytes."""
    from metarun.cli import compose
    from metarun.trainers import supervised as sup
    from metarun.trainers.results import status_kb

    cfg = compose(*overrides)
    run = sup.setup(cfg, Path("/nonexistent"))
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        base = status_kb("VmRSS")
    except OSError:
        queue.put(float("nan"))
        return
    for _ in range(2):
        sup.meta_step(run, sup.sample_meta_batch(run))
    queue.put((status_kb("VmHWM") - base) * 1024.0)


def cpu_peak_bytes(overrides: list[str]) -> float:
    """:func:`_cpu_peak_child` in a spawned process; NaN if it dies without an answer."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_cpu_peak_child, args=(overrides, queue))
    child.start()
    value = float("nan")
    while True:
        try:
            value = queue.get(timeout=1.0)
            break
        except Empty:
            if not child.is_alive():
                break
    child.join()
    return value


def _graphable(cfg) -> bool:
    """Whether the algorithm's step can be captured (Reptile's SGD outer step cannot)."""
    from metarun.config import validate
    from metarun.utils.errors import ConfigError

    try:
        validate(cfg)
    except ConfigError:
        return False
    return True


def bench_config(name: str, overrides: list[str], device: str, iterations: int, rounds: int,
                 warmup: int, memory: bool = True) -> list[dict]:
    """Time vmap and loop on one config and device; returns one row per batching."""
    from metarun.cli import compose
    from metarun.trainers import supervised as sup
    from metarun.trainers.graphed import GraphedMetaStep

    cfg = compose(*overrides, f"device={device}")
    auto = sup.setup(compose(*overrides, f"device={device}", "algorithm.batching=auto"), Path("/nonexistent")).batching
    # setup writes nothing to its run folder; each batching gets its own identically seeded run
    runs = {b: sup.setup(compose(*overrides, f"device={device}", f"algorithm.batching={b}"), Path("/nonexistent"))
            for b in ("loop", "vmap")}
    steps = {"loop": sup.meta_step, "vmap": sup.meta_step}
    graph_cfg = compose(*overrides, f"device={device}", "algorithm.batching=vmap", "trainer.cuda_graph=true")
    if device.startswith("cuda") and _graphable(graph_cfg):  # and the whole step captured in a CUDA graph
        runs["vmap+graph"] = sup.setup(graph_cfg, Path("/nonexistent"))
        steps["vmap+graph"] = GraphedMetaStep(sup.meta_step)
    times = {b: [] for b in runs}
    sampling = dict.fromkeys(runs, 0.0)  # seconds spent drawing meta-batches (inside the timed loop)
    peaks = {}
    for r in range(rounds):
        for batching, run in runs.items():
            for _ in range(warmup if r == 0 else 0):
                steps[batching](run, sup.sample_meta_batch(run))
            if run.device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(run.device)
                base = torch.cuda.memory_allocated(run.device)
            start = time.perf_counter()
            for _ in range(iterations):
                tick = time.perf_counter()
                tasks = sup.sample_meta_batch(run)
                sampling[batching] += time.perf_counter() - tick
                steps[batching](run, tasks)
            if run.device.type == "cuda":
                torch.cuda.synchronize()
            times[batching].append((time.perf_counter() - start) / iterations * 1e3)
            if run.device.type == "cuda":
                peaks[batching] = max(peaks.get(batching, 0), torch.cuda.max_memory_allocated(run.device) - base)
    if device == "cpu" and memory:
        for batching in ("loop", "vmap"):
            peaks[batching] = cpu_peak_bytes([*overrides, "device=cpu", f"algorithm.batching={batching}"])
    loop_ms = statistics.median(times["loop"])
    rows = []
    for batching in runs:
        ms = statistics.median(times[batching])
        rows.append({"config": name, "algorithm": cfg.algorithm.name, "device": str(runs[batching].device),
                     "batching": batching, "inner_steps": cfg.algorithm.inner_steps,
                     "auto_picks": auto, "ms_per_iteration": ms, "peak_mb": peaks.get(batching, float("nan")) / 2**20,
                     "speedup_vs_loop": loop_ms / ms,
                     "sampling_share": sampling[batching] / (sum(times[batching]) * iterations / 1e3), "meta_batch_size": cfg.algorithm.meta_batch_size,
                     "first_order": cfg.algorithm.first_order, "threads": torch.get_num_threads()})
    return rows


def _processes_worker(spec: str) -> None:
    """Run by torchrun (``python -m metarun.bench --processes-worker JSON``): time ``iterations``
    training steps (sampling this rank's share of the meta-batch included) after ``warmup``; rank
    0 writes the milliseconds per step to ``out``."""
    from metarun import distributed
    from metarun.cli import compose
    from metarun.trainers import supervised as sup

    args = json.loads(spec)
    distributed.init()
    run = sup.setup(compose(*args["overrides"]), Path("/nonexistent"))
    for _ in range(args["warmup"]):
        sup.meta_step(run, sup.sample_meta_batch(run))
    distributed.all_gather_object(None, "the benchmark")  # start together
    start = time.perf_counter()
    for _ in range(args["iterations"]):
        sup.meta_step(run, sup.sample_meta_batch(run))
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - start) / args["iterations"] * 1e3
    ms = max(distributed.all_gather_object(ms, "the benchmark"))  # the step is as slow as its slowest rank
    if distributed.is_main():
        Path(args["out"]).write_text(json.dumps({"ms": ms, "batching": run.batching}))
    distributed.finish()


def bench_processes(name: str, overrides: list[str], processes: int, iterations: int, rounds: int,
                    warmup: int) -> dict:
    """``processes`` torchrun processes x 1 thread against 1 process x ``processes`` threads, the
    same global meta-batch (the config's, rounded down to a multiple of ``processes``: sinusoid's
    25 becomes 24 for 2), alternating rounds; the medians and their ratio."""
    from metarun.cli import compose

    meta_batch = compose(*overrides).algorithm.meta_batch_size // processes * processes
    overrides = [*overrides, f"algorithm.meta_batch_size={meta_batch}"]
    times: dict[str, list[float]] = {"processes": [], "threads": []}
    batching = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(rounds):
            for kind, (nproc, threads) in {"processes": (processes, 1), "threads": (1, processes)}.items():
                out = Path(tmp) / f"{kind}.json"
                spec = json.dumps({"overrides": [*overrides, "device=cpu", f"trainer.num_threads={threads}"],
                                   "iterations": iterations, "warmup": warmup, "out": str(out)})
                env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
                command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           "-m", "metarun.bench", "--processes-worker", spec]
                proc = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"{' '.join(command[:6])} ... failed:\n{proc.stdout[-3000:]}")
                result = json.loads(out.read_text())
                times[kind].append(result["ms"])
                batching[kind] = result["batching"]
    ms = {kind: statistics.median(values) for kind, values in times.items()}
    return {"config": name, "processes": processes, "meta_batch_size": meta_batch, "ms_processes": ms["processes"], "ms_threads": ms["threads"],
            "batching": batching, "speedup": ms["threads"] / ms["processes"], "iterations": iterations,
            "rounds": rounds}


def _config_width(rows: list[dict]) -> int:
    """The config column: 16 wide, or wider for a longer name (omniglot_5w1s_resnet12)."""
    return max([16] + [len(r["config"]) + 1 for r in rows])


def processes_table(rows: list[dict]) -> str:
    w = _config_width(rows)
    return _ruled(f"{'config':<{w}}{'N':>3}{'meta-batch':>11}{'N proc x 1 thread':>20}{'1 proc x N threads':>20}"
                  f"{'speed-up':>10}  (ms/iteration, MAML)", [
        f"{r['config']:<{w}}{r['processes']:>3}{r['meta_batch_size']:>11}{r['ms_processes']:>20.2f}{r['ms_threads']:>20.2f}"
        f"{r['speedup']:>9.2f}x" for r in rows])


# meta-RL: name -> (Hydra overrides, meta-iterations timed)
RL_CONFIGS = {
    "navigation2d": (["task=navigation2d"], 3),
    "halfcheetah_dir": (["task=halfcheetah_dir"], 1),
}
# the meta-RL paths measured side by side: the episodes' sampler (locomotion only) and the Fisher-vector
# products of the TRPO step; "gymnasium + autograd" is the path of metarun before both existed
RL_PATHS = {
    "gymnasium + autograd": {"task.sampler": "gymnasium", "algorithm.fisher": "autograd"},
    "batched + factored (autograd)": {"task.sampler": "batched", "algorithm.fisher": "factored_autograd"},
    "batched + factored": {"task.sampler": "batched", "algorithm.fisher": "factored"},
}


def bench_rl(name: str, overrides: list[str], iterations: int, path: str = "batched + factored",
             device: str = "cpu") -> dict:
    """Environment steps/s (one meta-batch of episodes) and seconds per MAML-TRPO meta-iteration,
    split into sampling (both rollouts) and the rest (baselines, inner step, the TRPO step on
    ``device``), with the process's peak memory over the timed iterations, for one of ``RL_PATHS``."""
    from metarun.cli import compose
    from metarun.meta import policy_gradient as pg
    from metarun.trainers import rl
    from metarun.trainers.results import peak_memory_mb, reset_peak_memory

    choices = [f"{key}={value}" for key, value in RL_PATHS[path].items()
               if key != "task.sampler" or name != "navigation2d"]
    cfg = compose(*overrides, *choices, f"device={device}", "trainer.progress=false")
    run = rl.setup(cfg, Path("/nonexistent"))
    alg, envs = cfg.algorithm, run.envs
    params = {k: p.detach() for k, p in run.policy.named_parameters()}
    tasks = envs.sample_tasks(alg.meta_batch_size, run.generators["tasks"])
    act = pg.make_act(run.policy, params, run.generators["actions"], False)
    envs.rollout(act, tasks, alg.trajectories, 0)  # makes the envs, which later rollouts reuse
    start = time.perf_counter()
    rollouts = envs.rollout(act, tasks, alg.trajectories, 1)
    steps_per_s = rollouts.mask.numel() / (time.perf_counter() - start)
    sampling = 0.0
    rollout = envs.rollout

    def timed_rollout(*args, **kwargs):
        nonlocal sampling
        tick = time.perf_counter()
        out = rollout(*args, **kwargs)
        sampling += time.perf_counter() - tick
        return out

    envs.rollout = timed_rollout
    reset_peak_memory()
    start = time.perf_counter()
    for _ in range(iterations):
        rl.meta_iteration(run)
        run.iteration += 1
    seconds = (time.perf_counter() - start) / iterations
    trpo_device = run.algorithm.device
    envs.close()
    return {"config": name, "path": path, "device": str(trpo_device), "env_steps_per_s": steps_per_s,
            "s_per_meta_iteration": seconds, "sampling_s": sampling / iterations,
            "rest_s": seconds - sampling / iterations, "sampling_share": sampling / iterations / seconds,
            "peak_mb": peak_memory_mb(trpo_device), "meta_batch_size": alg.meta_batch_size,
            "trajectories": alg.trajectories, "horizon": cfg.task.horizon, "threads": torch.get_num_threads(),
            "sampler_threads": getattr(envs, "threads", None)}


def physics_floor(names=("halfcheetah_dir", "ant_dir"), steps: int = 2000) -> list[dict]:
    """Raw MuJoCo speed, the floor under any sampler: control steps per second (``frame_skip`` physics
    steps each, uniform random controls) of one model stepped by ``mj_step`` in a loop on one core."""
    import mujoco
    import numpy as np

    from metarun.envs.locomotion import ENVIRONMENTS, make_env

    rows = []
    for name in names:
        env = make_env(name, {"direction": 1})
        env.reset(seed=0)
        model, data = env.model, env.data
        controls = np.random.default_rng(0).uniform(-1, 1, (steps, model.nu))
        start = time.perf_counter()
        for control in controls:
            data.ctrl[:] = control
            mujoco.mj_step(model, data, nstep=env.frame_skip)
        rows.append({"robot": ENVIRONMENTS[name].robot, "steps_per_s": steps / (time.perf_counter() - start),
                     "frame_skip": env.frame_skip})
        env.close()
    return rows


def rl_table(rows: list[dict]) -> str:
    return _ruled(f"{'config':<18}{'path':<32}{'device':<8}{'env steps/s':>12}{'s/meta-iter':>13}{'sampling s':>12}"
                  f"{'rest s':>9}{'peak MB':>9}{'threads':>9}", [
        f"{r['config']:<18}{r['path']:<32}{r['device']:<8}{r['env_steps_per_s']:>12.0f}{r['s_per_meta_iteration']:>13.2f}"
        f"{r['sampling_s']:>12.2f}{r['rest_s']:>9.2f}{r['peak_mb']:>9.0f}{r['threads']:>9}" for r in rows])


def floor_table(rows: list[dict]) -> str:
    return _ruled(f"{'robot':<16}{'mj_step control steps/s (1 core)':>34}", [
        f"{r['robot']:<16}{r['steps_per_s']:>34.0f}" for r in rows])


def table(rows: list[dict]) -> str:
    w = _config_width(rows)
    return _ruled(f"{'config':<{w}}{'algorithm':<10}{'device':<8}{'batching':<12}{'ms/iter':>10}{'peak MB':>10}"
                  f"{'vs loop':>9}{'sampling':>10}{'threads':>9}  auto picks", [
        f"{r['config']:<{w}}{r['algorithm']:<10}{r['device']:<8}{r['batching']:<12}{r['ms_per_iteration']:>10.2f}"
        f"{r['peak_mb']:>10.1f}{r['speedup_vs_loop']:>8.2f}x{r['sampling_share']:>9.1%}{r['threads']:>9}"
        f"  {r['auto_picks']}" for r in rows])


def _ruled(head: str, lines: list[str]) -> str:
    """A printed table: the header, a rule as wide, the rows."""
    return "\n".join([head, "-" * len(head), *lines])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="*", choices=list(CONFIGS),
                        default=[c for c in CONFIGS if c not in GPU_ROWS or torch.cuda.is_available()],
                        help=f"default: all ({', '.join(sorted(GPU_ROWS))} only where there is a GPU)")
    parser.add_argument("--algorithms", nargs="*", default=None, choices=ALL,
                        help="default: every algorithm on sinusoid and omniglot_5w1s, MAML on omniglot_20w1s")
    parser.add_argument("--rl", nargs="*", default=list(RL_CONFIGS), choices=list(RL_CONFIGS),
                        help="meta-RL configs (environment steps/s, seconds per meta-iteration)")
    parser.add_argument("--rl-paths", nargs="*", default=list(RL_PATHS), choices=list(RL_PATHS),
                        help="meta-RL paths measured side by side (default: both)")
    parser.add_argument("--devices", nargs="*", default=None, help="default: cpu, and cuda when present")
    parser.add_argument("--iterations", type=int, default=None, help="timed iterations per round "
                        "(default: 100 for sinusoid, fewer for the conv nets)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is reported")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations before the first round")
    parser.add_argument("--out", default="outputs/bench", help="folder for the JSON record")
    parser.add_argument("--no-memory", action="store_true", help="skip the CPU peak-memory child processes")
    parser.add_argument("--processes", type=int, default=2, help="also MAML on N torchrun processes x 1 thread "
                        "against 1 process x N threads, per config (0: skip)")
    parser.add_argument("--processes-worker", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (trainer.num_threads; "
                        "default: the config's, every core), and the batched sampler's (task.threads)")
    args = parser.parse_args(argv)
    if args.processes_worker:
        _processes_worker(args.processes_worker)
        return []
    threads = [] if args.threads is None else [f"trainer.num_threads={args.threads}"]
    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        for name in args.configs:
            overrides, iterations, algorithms = CONFIGS[name]
            for algorithm in args.algorithms or algorithms:
                print(f"benchmarking {name} with {algorithm} on {device} ...", flush=True)
                rows += bench_config(name, [*overrides, f"algorithm={algorithm}", *threads], device,
                                     args.iterations or iterations, args.rounds, args.warmup, memory=not args.no_memory)
    print(table(rows))
    process_rows = []
    for name in args.configs if args.processes > 1 else []:
        overrides, iterations, _ = CONFIGS[name]
        print(f"benchmarking {name} with MAML on {args.processes} processes against {args.processes} threads ...",
              flush=True)
        process_rows.append(bench_processes(name, [*overrides, "algorithm=maml"], args.processes,
                                            args.iterations or iterations, args.rounds, args.warmup))
    if process_rows:
        print(processes_table(process_rows))
    rl_rows, floor_rows = [], []
    for name in args.rl:
        overrides, iterations = RL_CONFIGS[name]
        for device in devices:
            for path in args.rl_paths:
                print(f"benchmarking {name} (meta-RL, {path}, TRPO on {device}) ...", flush=True)
                sampler = [f"task.threads={args.threads}"] if args.threads and name != "navigation2d" else []
                rl_rows.append(bench_rl(name, [*overrides, *threads, *sampler], args.iterations or iterations, path,
                                        device))
    if rl_rows:
        print(rl_table(rl_rows))
    if any(name != "navigation2d" for name in args.rl):
        floor_rows = physics_floor()
        print(floor_table(floor_rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from metarun.utils.runtime import versions

    path = out / f"bench_{datetime.now():%Y-%m-%d_%H-%M-%S}.json"
    path.write_text(json.dumps({"versions": versions(), "rows": rows, "processes": process_rows, "rl": rl_rows,
                                "physics_floor": floor_rows}, indent=2) + "\n")
    print(f"\nwritten to {path}")
    return rows


if __name__ == "__main__":
    main()
