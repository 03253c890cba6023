"""The trainer in-process: exact resume, NaN handling, evaluation protocol, atomic checkpoints."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from metarun.trainers import supervised as sup
from metarun.trainers.results import mean_ci
from metarun.utils import checkpoint
from metarun.utils.errors import CheckpointError, DivergedError
from tests.conftest import compose_config

pytestmark = pytest.mark.smoke


def small_cfg(*overrides):
    return compose_config("debug=smoke", "device=cpu", *overrides)


def params_of(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["model"]


# every algorithm with what it carries across a resume: learned rates and norm weights (Meta-SGD,
# MAML++), schedules of the outer rate (MAML++, Reptile: set for 12 iterations in both runs) and of
# MAML++'s loss weights and derivative order, Reptile's carried inner Adam
RESUMED = {
    "maml-vmap": ("algorithm=maml", "algorithm.batching=vmap"),
    "maml-loop": ("algorithm=maml", "algorithm.batching=loop"),
    "metasgd": ("algorithm=metasgd", "algorithm.rate_init=uniform"),
    "mamlpp": ("algorithm=mamlpp", "algorithm.learned_rates=true", "algorithm.inner_steps=2", "algorithm.outer_schedule.T_max=12",
               "algorithm.iterations_per_epoch=2", "algorithm.multi_step_loss_epochs=3", "algorithm.first_order_epochs=2"),
    "reptile": ("algorithm=reptile", "algorithm.inner_steps=3", "algorithm.outer_schedule.total_iters=12"),
    # the reference's protocol: minibatches of the training episode, one inner Adam carried through the run
    "reptile-carried-adam": ("algorithm=reptile", "algorithm.inner_optimizer=adam", "algorithm.carry_adam_state=true",
                             "algorithm.train_shots=6", "algorithm.inner_batch=4", "algorithm.inner_steps=3",
                             "algorithm.outer_schedule.total_iters=12"),
    "imaml": ("algorithm=imaml", "algorithm.inner_steps=3", "algorithm.test_inner_steps=10"),
}


@pytest.mark.parametrize("name", sorted(RESUMED))
def test_resume_is_exact(tmp_path, name):
    """2N iterations straight == N iterations, stop, resume, N more: identical parameters, the
    algorithm's own included."""
    n = 6
    common = (*RESUMED[name], "trainer.checkpoint_interval=3", "trainer.val_interval=4")
    straight = tmp_path / "straight"
    sup.run_supervised(small_cfg(f"trainer.iterations={2 * n}", *common), straight)

    split = tmp_path / "split"
    sup.run_supervised(small_cfg(f"trainer.iterations={n}", *common), split)
    state = checkpoint.load(split)
    assert state["iteration"] == n
    resumed_cfg = small_cfg(f"trainer.iterations={2 * n}", *common)
    sup.run_supervised(resumed_cfg, split, state=state)

    first = torch.load(straight / "checkpoints" / "last.pt", weights_only=False)
    second = torch.load(split / "checkpoints" / "last.pt", weights_only=False)
    assert first["iteration"] == second["iteration"] == 2 * n
    for part in ("model", "algorithm"):
        a, b = first[part], second[part]
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (part, k)
    # learned rates and Reptile's carried Adam are checkpointed
    assert (first["algorithm"] != {}) == (name in ("metasgd", "mamlpp", "reptile-carried-adam"))
    a = params_of(straight)
    # and it differs from a run that was not resumed from its own state (the test can fail)
    other = tmp_path / "other"
    sup.run_supervised(small_cfg(f"trainer.iterations={2 * n}", "seed=1", *common), other)
    assert not all(torch.equal(a[k], params_of(other)[k]) for k in a)


def test_nan_loss_stops_names_iteration_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = small_cfg("trainer.iterations=10", "trainer.checkpoint_interval=2", "trainer.log_interval=1")
    original = sup.meta_step
    calls = {"n": 0}

    def poisoned(run, tasks):
        calls["n"] += 1
        if calls["n"] == 5:  # the 5th iteration produces a NaN loss
            tasks = tasks._replace(query_y=tasks.query_y * float("nan"))
        return original(run, tasks)

    monkeypatch.setattr(sup, "meta_step", poisoned)
    with pytest.raises(DivergedError, match="iteration 5") as info:
        sup.run_supervised(cfg, tmp_path)
    assert "iteration 4" in str(info.value)
    state = checkpoint.load(tmp_path)
    assert state["iteration"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (tmp_path / "results.json").exists()


def test_evaluation_follows_the_protocol(tmp_path):
    cfg = small_cfg("trainer.iterations=2", "trainer.test_tasks=30", "trainer.report_steps=[0,1,10]")
    results = sup.run_supervised(cfg, tmp_path)
    assert results["test_tasks"] == 30
    row = results["results"]["5-shot"]
    assert set(row) == {"after_0_steps", "after_1_steps", "after_10_steps"}
    # the same evaluation again gives the same numbers: the test tasks come from a fixed seed
    run = sup.setup(cfg, tmp_path)
    run.model.load_state_dict(checkpoint.load(tmp_path)["model"])
    again = sup.evaluate(run, chunk=7)  # chunking must not change anything
    for key in row:
        assert again["results"]["5-shot"][key]["mean"] == pytest.approx(row[key]["mean"], rel=1e-5)
    # and the mean / CI are computed as documented from per-task values
    tasks = run.task.sample(30, 5, run.task.test_queries, sup.fixed_generator(run, cfg.trainer.test_seed)).tasks
    params = {k: p.detach() for k, p in run.model.named_parameters()}
    pre = torch.stack([((torch.func.functional_call(run.model, params, (qx,)) - qy) ** 2).mean()
                       for qx, qy in zip(tasks.query_x, tasks.query_y)]).double()
    assert row["after_0_steps"]["mean"] == pytest.approx(float(pre.mean()), rel=1e-5)
    assert row["after_0_steps"]["ci95"] == pytest.approx(float(1.96 * pre.std() / math.sqrt(30)), rel=1e-4)


def test_time_budget_validates_checkpoints_and_stops_then_resume_carries_on(tmp_path):
    """trainer.max_minutes: past the budget (here at once) the run validates, checkpoints and
    stops, then evaluates; a resume continues, with the validation history and the clock."""
    results = sup.run_supervised(small_cfg("trainer.iterations=6", "trainer.max_minutes=1e-9"), tmp_path)
    state = checkpoint.load(tmp_path)
    assert state["iteration"] == 1 and results["training"]["iterations"] == 1
    assert results["training"]["train_seconds"] > 0
    assert results["training"]["ms_per_iteration"] == pytest.approx(results["training"]["train_seconds"] * 1e3)
    assert [h["iteration"] for h in results["validation"]] == [1]
    results = sup.run_supervised(small_cfg("trainer.iterations=6"), tmp_path, state=state)
    history = results["validation"]
    assert checkpoint.load(tmp_path)["iteration"] == 6
    assert [h["iteration"] for h in history] == [1, 3, 6]
    assert results["training"]["iterations_reached"] == 6
    assert results["training"]["train_seconds_reached"] == history[-1]["train_seconds"]
    assert history[0]["train_seconds"] < history[1]["train_seconds"] < history[2]["train_seconds"]
    # two sittings, each with its own speed; the evaluated checkpoint's are in results.json
    sittings = checkpoint.load(tmp_path)["sittings"]
    assert [(s["from_iteration"], s["to_iteration"]) for s in sittings] == [(0, 1), (1, 6)]
    assert sum(s["train_seconds"] for s in sittings) == pytest.approx(checkpoint.load(tmp_path)["train_seconds"])
    assert sittings[1]["ms_per_iteration"] == pytest.approx(sittings[1]["train_seconds"] / 5 * 1e3)
    training = results["training"]
    assert training["sittings"][-1]["to_iteration"] == training["iterations"]
    assert training["ms_per_iteration_last_sitting"] == training["sittings"][-1]["ms_per_iteration"]
    assert set(history[0]) == {"iteration", "train_seconds", "mse_after_0_steps", "mse_after_1_steps",
                               "mse_after_5_steps", "mse_after_10_steps"}


def test_peak_memory_is_the_runs_own_not_an_earlier_sweep_jobs(tmp_path):
    """A sweep runs its jobs one after another in one process: a job after a big one reports its
    own peak resident set, not the process's peak so far."""
    from metarun.trainers.results import status_kb

    big = torch.ones(2**27)  # 512 MiB, touched, then freed: the process's peak stays above it
    del big
    before = status_kb("VmHWM") / 1024
    results = sup.run_supervised(small_cfg("trainer.iterations=2"), tmp_path)
    assert 0 < results["training"]["peak_memory_mb"] < before - 256


@pytest.mark.parametrize(("overrides", "expected"), [
    (("algorithm=maml",), "vmap"),  # an MLP on a CPU: vmap
    (("algorithm=reptile",), "loop"),  # Reptile's sinusoid values draw one task per step: nothing to batch
    (("algorithm=maml", "algorithm.meta_batch_size=1"), "loop"),
    (("algorithm=reptile", "algorithm.batching=vmap"), "vmap"),  # asked for, kept
])
def test_auto_batching_takes_the_loop_for_one_task_per_step(overrides, expected):
    cfg = compose_config("device=cpu", *overrides)  # the algorithm's own meta-batch (not debug's)
    run = sup.setup(cfg, Path("/nonexistent"))  # set-up writes nothing to its folder
    assert run.batching == expected


def test_cpu_threads_default_to_the_cores_other_work_leaves_free_and_follow_the_config(monkeypatch):
    """On a machine where another process keeps a core busy, torch's threads on every core spun
    against it (docs/speed.md: 3.7x slower on 2 cores): the default takes the idle cores only."""
    from metarun.utils import runtime

    before = torch.get_num_threads()
    busy = [0.0]
    monkeypatch.setattr(runtime.CoreWatch, "others", lambda self: busy[0])
    monkeypatch.setattr(runtime, "usable_cores", lambda: 4)
    monkeypatch.setattr(runtime, "_BUSY", [])
    try:
        sup.setup(small_cfg(), run_dir=None)
        assert torch.get_num_threads() == 4  # an idle machine: every core
        busy[0] = 1.2
        sup.setup(small_cfg(), run_dir=None)
        assert torch.get_num_threads() == 4  # one reading serves the process for 30 s ...
        runtime._BUSY.clear()
        sup.setup(small_cfg(), run_dir=None)
        assert torch.get_num_threads() == 3  # ... then it looks again
        busy[0] = 7.0
        runtime._BUSY.clear()
        assert runtime.set_threads(None) == 1
        sup.setup(small_cfg("trainer.num_threads=2"), run_dir=None)
        assert torch.get_num_threads() == 2  # given: as given
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        assert runtime.set_threads(None) == 2  # torchrun's ranks on this machine share it out, unmeasured
    finally:
        torch.set_num_threads(before)


def test_the_core_watch_counts_other_processes_work_not_its_own(tmp_path, monkeypatch):
    from metarun.utils import runtime

    stat = tmp_path / "stat"
    monkeypatch.setattr(runtime.CoreWatch, "STAT", stat)
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    hz = os.sysconf("SC_CLK_TCK")
    clock, own = [100.0], [5.0]
    monkeypatch.setattr(runtime.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(runtime.time, "process_time", lambda: own[0])

    def write(busy0: int, busy1: int) -> None:  # user nice system idle iowait irq softirq steal (ticks)
        stat.write_text(f"cpu  0 0 0 0 0 0 0 0 0 0\ncpu0 {busy0} 0 0 777 5 0 0 0 0 0\n"
                        f"cpu1 {busy1 - 2} 0 2 555 9 0 0 0 0 0\ncpu2 999999 0 0 0 0 0 0 0 0 0\nintr 1 2 3\n")

    write(10 * hz, 20 * hz)
    watch = runtime.CoreWatch()
    write(11 * hz + hz // 2, 21 * hz + hz // 2)  # 3 core-seconds of busy time over 2 s on cores 0 and 1 ...
    clock[0], own[0] = 102.0, 6.0  # ... 1 of them this process's
    assert watch.others() == pytest.approx(1.0, abs=0.02)  # cpu2 is not this process's
    assert not watch.due(30)
    clock[0] = 140.0
    assert watch.due(30)


class _FixedWatch:
    def __init__(self, busy: float) -> None:
        self.busy = busy

    def others(self) -> float:
        return self.busy


def test_oversubscription_warns_only_past_the_free_cores(monkeypatch):
    from metarun.utils import runtime

    monkeypatch.setattr(runtime, "usable_cores", lambda: 4)
    monkeypatch.setattr(runtime, "_WARNED", [])
    assert runtime.oversubscribed(3, _FixedWatch(1.2)) is None  # 3 threads + 1.2 busy on 4 cores: fits
    assert runtime.oversubscribed(1, _FixedWatch(3.9)) is None  # one thread cannot spin against anything
    line = runtime.oversubscribed(4, _FixedWatch(1.2))
    assert "about 1.2 of this process's 4 cores busy while torch runs 4 threads" in line
    assert "give trainer.num_threads=3" in line
    assert runtime.oversubscribed(4, _FixedWatch(1.2)) is None  # once per process


def test_the_core_watch_reads_this_machine():
    import time as time_module

    from metarun.utils import runtime

    watch = runtime.CoreWatch()
    time_module.sleep(0.1)
    busy = watch.others()
    assert busy is not None and 0.0 <= busy <= runtime.usable_cores() + 0.5


def test_mean_ci():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    mean, ci = mean_ci(values)
    assert mean == 2.5
    assert ci == pytest.approx(1.96 * math.sqrt(5 / 3) / 2)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save_atomic({"a": 1}, path)

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_atomic({"a": 2}, path)
    monkeypatch.undo()
    assert torch.load(path) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_atomic_files_get_the_mode_of_any_new_file(tmp_path):
    """Not the 0600 of a temp file: 0666 less the umask, so others can read results on a shared machine."""
    before = os.umask(0o027)
    try:
        checkpoint.save_atomic({"a": 1}, tmp_path / "a.pt")
        (tmp_path / "plain").write_text("")
    finally:
        os.umask(before)
    assert (tmp_path / "a.pt").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777 == 0o640


def test_unreadable_or_foreign_checkpoints_raise_one_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable"):
        checkpoint.load(bad)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": 1}, foreign)
    with pytest.raises(CheckpointError, match="not a metarun checkpoint"):
        checkpoint.load(foreign)
    with pytest.raises(CheckpointError, match="no checkpoint in run folder"):
        checkpoint.load(tmp_path)


def test_tensorboard_logs_the_training_rate_without_a_progress_bar(tmp_path):
    """train/iterations_per_s is iterations per second of training (validation and checkpoints
    left out), also with trainer.progress=false (sweeps, CI), where it read 0 before."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sup.run_supervised(small_cfg("trainer.progress=false", "trainer.iterations=8", "trainer.log_interval=4"), tmp_path)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    rates = [e.value for e in events.Scalars("train/iterations_per_s")]
    train_seconds = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)["train_seconds"]
    assert len(rates) == 2 and all(r > 0 for r in rates)
    # 8 iterations in train_seconds: the harmonic mean of the two equal-length intervals' rates
    assert 2 / sum(1 / r for r in rates) == pytest.approx(8 / train_seconds, rel=0.05)


def test_a_stop_signal_outside_training_names_the_phase_and_how_to_carry_on():
    """Outside the training loop (set-up, the final test) a SIGTERM had its default action: the
    process vanished with no line in the log. A phase turns it into one that says where and what next."""
    import signal

    from metarun.trainers.loop import Interrupted, phase

    with pytest.raises(Interrupted) as stopped:
        with phase("the final test", "metarun evaluate=RUN tests it again"):
            signal.raise_signal(signal.SIGTERM)
    assert str(stopped.value) == "stopped by SIGTERM during the final test; metarun evaluate=RUN tests it again"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored


def test_a_phase_hands_sigusr2_on_to_a_schedulers_handler():
    """submitit's SIGUSR2 handler requeues the job: outside training it gets the signal at once,
    through any number of phases (training's own handler finds it the same way after its checkpoint)."""
    import signal

    from metarun.trainers.loop import phase, schedulers_handler

    got = []

    def scheduler(signum, frame):
        got.append(signum)

    before = signal.signal(signal.SIGUSR2, scheduler)
    try:
        with phase("set-up", "run it again"), phase("the final test", "evaluate it"):
            assert schedulers_handler({signal.SIGUSR2: signal.getsignal(signal.SIGUSR2)}, signal.SIGUSR2) is scheduler
            signal.raise_signal(signal.SIGUSR2)
        assert got == [signal.SIGUSR2]
        assert signal.getsignal(signal.SIGUSR2) is scheduler
    finally:
        signal.signal(signal.SIGUSR2, before)


def test_a_lost_rank_is_named_by_the_innermost_phase_with_its_way_to_carry_on(monkeypatch):
    from metarun import distributed
    from metarun.distributed import DistributedError
    from metarun.trainers.loop import phase

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(DistributedError) as lost:
        with phase("set-up", "run the command again"), phase("the final test", "metarun evaluate=RUN tests it again"):
            raise DistributedError("test (1-shot)", "Connection reset by peer", "resume it")
    assert str(lost.value) == ("rank 0 of 2 lost the other ranks during the final test (test (1-shot): Connection "
                               "reset by peer); the job stops. metarun evaluate=RUN tests it again")
