"""Sweeps through Hydra's launcher and sweeper plugins (the ``cluster`` and ``search`` extras):
submitit's local executor standing in for SLURM, joblib side by side, Optuna searching on metarun's
objective."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import DATA_DIR, require_data

pytestmark = pytest.mark.smoke
# long enough to be interrupted mid-training (1,500 iterations, ~5 s, after the first checkpoint), short
# enough for the suite (~7 s a job on one thread)
LONG = ["debug=smoke", "trainer.iterations=2000", "trainer.val_interval=1000", "trainer.checkpoint_interval=500",
        "trainer.log_interval=100", "algorithm.batching=vmap"]
TIMING = {"train_seconds", "ms_per_iteration", "peak_memory_mb"}  # what differs between attempts


def metarun(args: list[str], cwd: Path, background: bool = False, timeout: float = 300):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    command = [sys.executable, "-m", "metarun", *args]
    if background:  # (in a process group of its own, as a terminal's foreground job, for Ctrl-C)
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def summary(sweep_dir: Path) -> list[dict]:
    """summary.csv without the columns that measure time and memory."""
    with open(sweep_dir / "summary.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


def job_pids(sweep_dir: Path) -> list[int]:
    """The processes running the sweep's jobs (submitit's task processes, not their controllers)."""
    out = subprocess.run(["pgrep", "-f", "submitit.core._submit"], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out if str(sweep_dir) in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]


def interrupt_both_jobs(sweep: list[str], sweep_dir: Path, cwd: Path, ctrl_c: bool) -> subprocess.Popen:
    """Start ``sweep`` and, once both jobs are past their first checkpoint, send each job SIGUSR2
    (what SLURM sends before preempting) or the whole sweep SIGINT (Ctrl-C in its terminal)."""
    job = metarun([*sweep, f"hydra.sweep.dir={sweep_dir}"], cwd, background=True)
    try:
        deadline = time.monotonic() + 180
        while len(list(sweep_dir.glob("*seed=*/checkpoints/last.pt"))) < 2:
            assert job.poll() is None and time.monotonic() < deadline, "the sweep ended before both jobs checkpointed"
            time.sleep(0.1)
        pids = job_pids(sweep_dir)
        assert len(pids) == 2
        if ctrl_c:
            os.killpg(job.pid, signal.SIGINT)
        else:
            for pid in pids:
                os.kill(pid, signal.SIGUSR2)
        job.stdout_text, job.stderr_text = job.communicate(timeout=240)
    finally:
        if job.poll() is None:
            job.kill()
    return job


def test_preempted_or_interrupted_sweep_jobs_resume_and_end_as_an_uninterrupted_sweep(tmp_path):
    """Each job of a submitit_local sweep is sent SIGUSR2 (what SLURM sends before preempting or at
    the time limit) mid-training: it checkpoints, is requeued, resumes from its own folder, and the
    sweep's summary.csv is the uninterrupted sweep's, bit for bit. Ctrl-C of the sweep stops every
    job at a checkpoint with one line and no traceback (it printed submitit's and an "internal
    error"), and the same command again resumes them to the same summary."""
    sweep = ["-m", "hydra/launcher=local", "seed=0,1", *LONG]
    interrupted = tmp_path / "interrupted"
    job = interrupt_both_jobs(sweep, interrupted, tmp_path, ctrl_c=False)
    stderr = job.stderr_text
    assert job.returncode == 0, stderr[-3000:]
    # submitit's own job folders stay (its logs); the empty one named by its pattern (.submitit/%j) does not
    assert (interrupted / ".submitit").is_dir() and not [
        d for d in (interrupted / ".submitit").iterdir() if d.is_dir() and not any(d.iterdir())]
    for folder in sorted(interrupted.glob("*seed=*")):
        log = (folder / "metarun.log").read_text()
        assert "SIGUSR2 received: saved" in log and "handing the signal on" in log, folder
        assert "resuming this sweep job from its checkpoint of iteration" in log, folder

    uninterrupted = tmp_path / "uninterrupted"
    proc = metarun([*sweep, f"hydra.sweep.dir={uninterrupted}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary(interrupted) == summary(uninterrupted)
    assert [row["status"] for row in summary(uninterrupted)] == ["ok", "ok"]

    # the same sweep started again finds its jobs finished and runs nothing
    again = metarun([*sweep, f"hydra.sweep.dir={uninterrupted}"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert summary(uninterrupted) == summary(interrupted)
    for folder in uninterrupted.glob("*seed=*"):
        assert "already holds this job's results: nothing to do" in (folder / "metarun.log").read_text()

    stopped = tmp_path / "ctrl_c"
    job = interrupt_both_jobs(sweep, stopped, tmp_path, ctrl_c=True)
    assert job.returncode == 1 and "Traceback" not in job.stderr_text, job.stderr_text[-3000:]
    lines = [line for line in job.stderr_text.splitlines() if line.startswith("metarun:")]
    assert lines == [f"metarun: 2 of 2 sweep jobs did not finish (their status is in the summary above); the same "
                     f"command with hydra.sweep.dir={stopped} resumes the 2 interrupted one(s) from their checkpoints"]
    assert [row["status"] for row in summary(stopped)] == ["interrupted: SIGINT received; checkpoint written"] * 2
    resumed = metarun([*sweep, f"hydra.sweep.dir={stopped}"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert summary(stopped) == summary(uninterrupted)
    assert not list(stopped.glob("*/interrupted.txt"))


def test_parallel_launcher_runs_jobs_side_by_side_with_a_share_of_the_cores(tmp_path):
    sweep_dir = tmp_path / "s"
    proc = metarun(["-m", "hydra/launcher=parallel", "seed=0,1", "debug=smoke", f"hydra.sweep.dir={sweep_dir}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [row["status"] for row in summary(sweep_dir)] == ["ok", "ok"]
    cores = len(os.sched_getaffinity(0))
    for folder in sweep_dir.glob("*seed=*"):
        log = (folder / "metarun.log").read_text()
        assert f"trainer.num_threads={max(1, cores // 2)}: this job's share of the {cores} cores (JoblibLauncher)" in log


def test_optuna_searches_on_the_objective_metarun_returns(tmp_path):
    sweep_dir = tmp_path / "search"
    proc = metarun(["-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.seed=0",
                    "algorithm.inner_lr=interval(0.001,0.05)", "debug=smoke", f"hydra.sweep.dir={sweep_dir}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = summary(sweep_dir)
    assert len(rows) == 3 and all(row["status"] == "ok" for row in rows)
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(min(float(row["value"]) for row in rows), rel=1e-12)


@pytest.mark.slow  # (12 s; the Optuna sweep itself is in the default suite, above)
def test_the_omniglot_search_preset_runs(tmp_path, omniglot_cache):
    require_data(DATA_DIR / "omniglot" / "images_background.zip")
    sweep_dir = tmp_path / "search"
    proc = metarun(["-m", "sweep=search_omniglot", "hydra.sweeper.n_trials=2", "debug=smoke", "task.progress=false",
                    f"task.data_dir={DATA_DIR}", f"task.cache_dir={omniglot_cache}", f"hydra.sweep.dir={sweep_dir}"],
                   tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = summary(sweep_dir)
    assert len(rows) == 2 and all(row["status"] == "ok" for row in rows)
    assert all("accuracy" in row["objective"] for row in rows)
    config = yaml.safe_load(next(sweep_dir.glob("*/config.yaml")).read_text())
    assert config["task"]["name"] == "omniglot" and config["trainer"]["max_minutes"] is not None
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(float(row["value"]) for row in rows), rel=1e-12)  # maximised
    assert set(best["best_params"]) == {"algorithm.inner_lr", "algorithm.meta_batch_size"}


@pytest.mark.parametrize("preset, target, values", [
    ("slurm", "SlurmLauncher", {"signal_delay_s": 120, "max_num_timeout": 20, "gpus_per_node": 1}),
    ("local", "LocalLauncher", {"cpus_per_task": 1, "gpus_per_node": 0}),
    ("parallel", "JoblibLauncher", {"n_jobs": 2}),
])
def test_launcher_presets_extend_the_plugins_configs(preset, target, values):
    from hydra import compose, initialize_config_dir

    from metarun.cli import CONFIG_DIR, _register

    _register()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        launcher = compose("config", overrides=[f"hydra/launcher={preset}"], return_hydra_config=True).hydra.launcher
    assert launcher._target_.endswith(target)
    assert {k: launcher[k] for k in values} == values


@pytest.mark.parametrize("arg, hidden, message", [
    ("hydra/launcher=slurm", "hydra_plugins.hydra_submitit_launcher", "pip install 'metarun[cluster]'"),
    ("hydra/launcher=parallel", "hydra_plugins.hydra_joblib_launcher", "pip install 'metarun[cluster]'"),
    ("sweep=search_omniglot", "hydra_plugins.hydra_optuna_sweeper", "(its hydra/sweeper=optuna)"),
])
def test_a_preset_whose_plugin_is_missing_is_one_line_and_writes_nothing(tmp_path, arg, hidden, message):
    code = (f"import sys; sys.modules[{hidden!r}] = None; from metarun.cli import main; "
            f"sys.argv = ['metarun', '-m', {arg!r}, 'debug=smoke']; main()")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"metarun: error: {arg}") and message in lines[0], proc.stderr
    assert "not installed" in lines[0] and not (tmp_path / "outputs").exists()


def test_job_folder_names_stay_readable_and_fit_the_file_system():
    from metarun.cli import JOB_DIR_MAX, job_dir_name

    short = "algorithm=maml,seed=1"
    assert job_dir_name(short) == short
    long = ",".join(f"trainer.key_{i}=0.0123456789" for i in range(20))
    name = job_dir_name(long)
    assert len(name.encode()) <= JOB_DIR_MAX and name.startswith("trainer.key_0=0.0123456789,trainer.key_1=")
    assert name == job_dir_name(long) and name != job_dir_name(long.replace("key_19=0.0123456789", "key_19=1"))
    assert len(job_dir_name("model.path=" + "x" * 400).encode()) <= JOB_DIR_MAX  # one override alone too long


def test_a_sweep_with_long_overrides_runs_with_shortened_folders(tmp_path):
    """Issue 42's command failed with `[Errno 36] File name too long`: each job's folder is now its first
    overrides and a hash, the full overrides in its .hydra/overrides.yaml and in the summary."""
    given = ["trainer.iterations=5", "trainer.val_tasks=4", "trainer.test_tasks=8", "trainer.log_interval=1",
             "trainer.val_interval=5", "trainer.checkpoint_interval=5", "algorithm.inner_lr=0.0123456789",
             "algorithm.meta_batch_size=4", "algorithm.test_inner_steps=10", "trainer.divergence_ratio=10",
             "trainer.max_minutes=100", "trainer.evaluate_best=true", "model.hidden_sizes=[40,40]"]
    done = metarun(["-m", "seed=0,1", *given, "trainer.num_threads=1", "trainer.progress=false",
                    f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert len(jobs) == 2 and all(len(job.name) <= 160 and "+" in job.name for job in jobs)
    assert all((job / "results.json").is_file() for job in jobs)
    rows = summary(tmp_path / "sweep")
    assert sorted(row["overrides"].split()[0] for row in rows) == ["seed=0", "seed=1"]
    assert all(row["overrides"].lower().split()[1:] == [*given, "trainer.num_threads=1", "trainer.progress=false"]
               for row in rows)  # (Hydra writes true as True)
