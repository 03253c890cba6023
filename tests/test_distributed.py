"""One run on several processes: ``torchrun --nproc_per_node=2`` with the gloo backend on the CPU
(the GPU path is the same code with NCCL)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from metarun import distributed
from metarun.utils import checkpoint
from metarun.utils.errors import ConfigError
from tests.conftest import ROOT, compose_config

pytestmark = pytest.mark.smoke
SMOKE = ["debug=smoke", "trainer.num_threads=1"]


def torchrun(args: list[str], cwd: Path, nproc: int = 2, timeout: float = 240, script: str | None = None,
             **kwargs) -> subprocess.Popen | subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=N -m metarun ARGS`` (or a script) in ``cwd``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    target = [script] if script else ["-m", "metarun"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               *target, *args]
    if kwargs.pop("background", False):
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, **kwargs)


def metarun_lines(stderr: str) -> list[str]:
    """metarun's own lines in a torchrun job's stderr (torchrun adds its failure report after them)."""
    return [line for line in stderr.splitlines() if line.startswith("metarun:")]


def only_run(cwd: Path) -> Path:
    runs = list((cwd / "outputs" / "runs").iterdir())
    assert len(runs) == 1, runs  # one folder for the whole job, not one per rank
    return runs[0]


def numbers(results: dict) -> dict:
    return {k: v for k, v in results["results"].items()}


def test_one_meta_step_on_two_ranks_equals_one_process_for_every_algorithm(tmp_path):
    """Meta-batch 2 x 8 on two ranks against 16 tasks in one process, float64: the averaged
    meta-gradient (or Reptile's / iMAML's outer direction) and the parameters after the step agree to
    rounding, and both ranks hold identical parameters (the algorithms' own included). The same for
    MAML-TRPO's step on 2 x 4 navigation tasks against 8."""
    out = tmp_path / "out.json"
    proc = torchrun([str(out)], tmp_path, script=str(ROOT / "tests" / "distributed_step.py"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result.pop("world_size") == 2
    trpo = result.pop("maml_trpo")  # MAML-TRPO: the gradient and every Fisher-vector product averaged
    assert trpo["ranks_equal"] and trpo["largest_update"] > 1e-3, trpo
    assert trpo["max_difference"] <= 1e-10 and trpo["step_fraction"][0] == trpo["step_fraction"][1], trpo
    assert abs(trpo["kl"][0] - trpo["kl"][1]) <= 1e-10, trpo
    assert set(result) == {"maml", "fomaml", "anil", "metasgd", "mamlpp", "reptile", "imaml"}
    for name, r in result.items():
        assert r["ranks_equal"], name
        assert r["largest_grad"] > 1e-3 and r["largest_update"] > 1e-5, name  # a real step was taken
        assert r["grad_difference"] <= 1e-12 * r["largest_grad"], (name, r)
        assert r["max_difference"] <= 1e-12, (name, r)
        assert r["loss_difference"] <= 1e-12, (name, r)
    assert result["metasgd"]["own_parameters"] > 0 and result["mamlpp"]["own_parameters"] > 0


def test_two_rank_run_owns_one_folder_evaluates_as_one_process_and_resumes_on_one(tmp_path, cli):
    proc = torchrun([*SMOKE, "algorithm.meta_batch_size=4"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = only_run(tmp_path)
    info = json.loads((run_dir / "run_info.json").read_text())
    assert (info["world_size"], info["backend"], info["devices"]) == (2, "gloo", ["cpu", "cpu"])
    # how to start it again: torchrun's own command line and the layout it gave
    launcher = info["launcher"]
    assert (launcher["name"], launcher["nproc_per_node"], launcher["nnodes"]) == ("torchrun", 2, 1)
    assert "--nproc_per_node=2" in launcher["command"] and "--standalone" in launcher["command"]
    assert launcher["command"][-len(SMOKE) - 1:] == [*SMOKE, "algorithm.meta_batch_size=4"]
    log = (run_dir / "metarun.log").read_text()
    assert log.count("validation mse_after_0_steps") == 2  # rank 0's log only (two validations)
    assert "torchrun: 2 processes, backend gloo" in log
    assert proc.stdout.count("sinusoid test mse") == 1
    state = checkpoint.load(run_dir)
    assert len(state["rng_ranks"]) == 2 and state["iteration"] == 6
    # each rank drew its own tasks: the two streams differ
    assert not torch.equal(state["rng_ranks"][0]["generators"]["train"], state["rng_ranks"][1]["generators"]["train"])
    two_ranks = json.loads((run_dir / "results.json").read_text())

    # the sharded test gives what one process gives on the same checkpoint, bit for bit
    one = cli(f"evaluate={run_dir}", "trainer.num_threads=1")
    assert one.returncode == 0, one.stderr[-2000:]
    assert numbers(json.loads((run_dir / "results.json").read_text())) == numbers(two_ranks)
    assert "continuation differs" not in (run_dir / "metarun.log").read_text()  # an evaluation continues nothing

    # resumed on one process: it continues from the 2-rank checkpoint with rank 0's task stream and
    # the whole meta-batch; its first step is exactly that step taken here by hand
    from metarun.trainers import supervised

    cfg = compose_config(*SMOKE, "algorithm.meta_batch_size=4")
    run = supervised.setup(cfg, tmp_path / "by_hand", batching=state["batching"])
    supervised.restore(run, state)
    run.algorithm.on_iteration(run.iteration)
    supervised.meta_step(run, supervised.sample_meta_batch(run))
    resumed = cli(f"resume={run_dir}", "trainer.iterations=7", "trainer.checkpoint_interval=1")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    after = checkpoint.load(run_dir)
    assert after["iteration"] == 7 and "rng_ranks" not in after
    for key, value in run.model.state_dict().items():
        assert torch.equal(after["model"][key], value), key
    assert [h["iteration"] for h in after["history"]] == [3, 6, 7]
    assert "written by 2 process(es), this run has 1" in (run_dir / "metarun.log").read_text()


@pytest.mark.parametrize("phase", ["training", "the final test"])
def test_a_killed_rank_ends_the_job_with_one_line_naming_the_phase_and_the_run_carries_on(tmp_path, cli, phase):
    """kill -9 of rank 1: in training the other rank notices at its next collective; in the final
    test (outside the training loop, no collective until the end) torchrun's SIGTERM used to end
    rank 0 silently. Either way: one line naming the phase and what to run next, also in the log."""
    if phase == "training":
        args = ["trainer.iterations=1000000", "trainer.checkpoint_interval=20", "trainer.val_interval=1000000"]
    else:  # a test long enough to be killed in
        args = ["trainer.test_tasks=1000000"]
    job = torchrun([*SMOKE, *args], tmp_path, background=True)
    try:
        deadline = time.monotonic() + 120
        while not (list(tmp_path.glob("outputs/runs/*/checkpoints/last.pt")) if phase == "training" else
                   any("testing on" in log.read_text() for log in tmp_path.glob("outputs/runs/*/metarun.log"))):
            assert job.poll() is None and time.monotonic() < deadline, f"the job ended or never reached {phase}"
            time.sleep(0.2)
        victim = next(pid for pid in child_pids(job.pid) if environ(pid).get("RANK") == "1")
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = job.communicate(timeout=60)  # no hang: the other rank notices and stops
    finally:
        if job.poll() is None:
            job.kill()
    assert time.monotonic() - killed < 60
    assert job.returncode != 0
    lines = metarun_lines(stderr)
    assert len(lines) == 1, stderr[-3000:]
    run_dir = only_run(tmp_path)
    def message(line: str) -> str:  # (the console's line names the rank; the log is rank 0's)
        return re.sub(r"^.*?metarun: (error( \(rank \d\))?: )?", "", line)

    assert message((run_dir / "metarun.log").read_text().splitlines()[-1]) == message(lines[0])  # the log says why
    if phase == "training":
        assert "lost the other ranks during training" in lines[0] and f"metarun resume={run_dir}" in lines[0], lines
        resumed = cli(f"resume={run_dir}", "trainer.iterations=40")
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert checkpoint.load(run_dir)["iteration"] == 40
    else:  # torchrun's SIGTERM, or the lost rank if rank 0 reached the test's collective first
        assert "during the final test" in lines[0] and f"metarun evaluate={run_dir} tests it again" in lines[0], lines
        assert not (run_dir / "results.json").exists()
        again = cli(f"evaluate={run_dir}", "trainer.test_tasks=20")
        assert again.returncode == 0, again.stderr[-2000:]
        assert json.loads((run_dir / "results.json").read_text())["test_tasks"] == 20


def test_a_signal_to_one_rank_stops_every_rank_which_all_know_which_signal_and_rank(tmp_path):
    """SIGUSR2 (a scheduler's) sent to rank 1 alone: every rank stops at the same iteration with a
    checkpoint, and rank 0's log names the signal and the rank (it said "SIGTERM (on another rank)")."""
    job = torchrun([*SMOKE, "trainer.iterations=1000000", "trainer.checkpoint_interval=1000000",
                    "trainer.val_interval=1000000"], tmp_path, background=True)
    try:
        deadline = time.monotonic() + 120
        while not any("parameters=" in log.read_text() for log in tmp_path.glob("outputs/runs/*/metarun.log")):
            assert job.poll() is None and time.monotonic() < deadline, "the job ended or never started training"
            time.sleep(0.2)
        time.sleep(1.0)
        os.kill(next(pid for pid in child_pids(job.pid) if environ(pid).get("RANK") == "1"), signal.SIGUSR2)
        _, stderr = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0
    assert metarun_lines(stderr) == ["metarun: interrupted (SIGUSR2 (on rank 1)); the last checkpoint is in the run folder"]
    run_dir = only_run(tmp_path)
    assert "SIGUSR2 (on rank 1) received: saved" in (run_dir / "metarun.log").read_text()
    assert checkpoint.load(run_dir)["iteration"] > 0


def test_every_rank_agrees_on_the_signal_and_hands_a_schedulers_sigusr2_on(monkeypatch):
    """Rank 0's side of a SIGUSR2 that reached rank 1 only (submitit's requeue is rank 0's to do)."""
    from metarun.trainers import loop

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    sent = []
    monkeypatch.setattr(distributed, "max_over_ranks", lambda *values, what="": sent.append(values) or [3 * 2 + 1, 0])
    got = []
    before = signal.signal(signal.SIGUSR2, lambda signum, frame: got.append(signum))
    try:
        with loop.stop_on_signals() as stop:
            assert loop.agreed_stop(stop, out_of_time=False) is False
            assert sent == [(0, 0)]  # nothing received here, in time
            assert stop.now() == "SIGUSR2 (on rank 1)"
            stop.hand_on()
        assert got == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, before)


def child_pids(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


@pytest.mark.parametrize("args, message", [
    (["algorithm.meta_batch_size=3"], "algorithm.meta_batch_size=3 does not split evenly over 2 processes"),
    (["algorithm.meta_batch_size=1"], "2 processes but algorithm.meta_batch_size=1"),
    (["-m", "seed=0,1"], "torchrun starts one run on several processes"),
])
def test_bad_input_under_torchrun_is_one_line_and_writes_nothing(tmp_path, args, message):
    proc = torchrun([*SMOKE, *args], tmp_path)
    assert proc.returncode != 0
    lines = metarun_lines(proc.stderr)
    assert len(lines) == 1 and message in lines[0], proc.stderr[-3000:]
    assert "(rank 0)" in lines[0]
    assert not (tmp_path / "outputs").exists()


def test_more_gpu_ranks_than_gpus_is_refused_alike_on_every_rank(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    for local in range(4):
        monkeypatch.setenv("LOCAL_RANK", str(local))
        with pytest.raises(ConfigError, match=r"4 processes on this node but only 2 GPU\(s\).*--nproc_per_node=2"):
            distributed.device_for("auto")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.device_for("auto") == "cuda:1" and distributed.device_for("cpu") == "cpu"


def test_cuda_ranks_on_a_node_without_gpus_are_told_to_use_the_cpu(monkeypatch):
    """Not `--nproc_per_node=0`, which the GPU-count check would suggest."""
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="^device=cuda under torchrun but no GPU is visible on this node: give "
                       r"device=cpu \(or auto\)") as error:
        distributed.device_for("cuda")
    assert "nproc_per_node" not in str(error.value)


def test_one_process_is_untouched():
    """Without torchrun every helper is the single process's identity: nothing is communicated."""
    assert not distributed.launched() and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.check_meta_batch(5) == 5 and distributed.rank_seed(3) == 3
    assert distributed.shard(250, 100) == [0, 100, 200]
    t = [torch.ones(2)]
    assert distributed.average(t)[0] is t[0]


def test_meta_rl_on_two_ranks_splits_the_tasks_and_resumes_on_one(tmp_path, cli):
    tiny = ["task=navigation2d", "trainer.iterations=2", "algorithm.meta_batch_size=4", "algorithm.trajectories=3",
            "task.horizon=8", "trainer.test_tasks=4", "trainer.checkpoint_interval=1", "trainer.progress=false",
            "trainer.num_threads=1"]
    proc = torchrun(tiny, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = only_run(tmp_path)
    state = checkpoint.load(run_dir)
    assert state["iteration"] == 2 and len(state["rng_ranks"]) == 2
    assert (run_dir / "results.json").is_file() and proc.stdout.count("navigation2d test return") == 1
    resumed = cli(f"resume={run_dir}", "trainer.iterations=3")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert checkpoint.load(run_dir)["iteration"] == 3
