"""The ``metarun`` command end to end, as a user types it (subprocesses, debug=smoke sizes)."""

from __future__ import annotations

import csv
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import hydra
import pytest
import torch

import metarun
from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.smoke


def only_run_dir(root: Path) -> Path:
    runs = [p for p in (root / "outputs" / "runs").iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("metarun: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


def test_smoke_run_writes_a_complete_run_folder(cli):
    proc = cli("debug=smoke")
    assert proc.returncode == 0, proc.stderr
    run = only_run_dir(cli.cwd)
    for name in ["config.yaml", "run_info.json", "results.json", ".hydra/config.yaml", "checkpoints/last.pt"]:
        assert (run / name).is_file(), name
    assert list((run / "tb").glob("events.out.tfevents.*"))
    info = json.loads((run / "run_info.json").read_text())
    assert info["seed"] == 0 and info["versions"]["torch"] == torch.__version__
    assert info["versions"]["metarun"] == metarun.__version__
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert info["versions"]["source"]["commit"] == head  # the commit the run was made with
    results = json.loads((run / "results.json").read_text())
    assert list(results["results"]) == ["10-shot", "5-shot"]  # the K it was trained with first: the headline
    assert results["headline"] == "10-shot"
    assert set(results["results"]["5-shot"]) == {"after_0_steps", "after_1_steps", "after_5_steps", "after_10_steps"}
    assert results["test_tasks"] == 8 and len(results["curve"]["5-shot"]) == 11
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert state["iteration"] == 6 and state["config"]["trainer"]["iterations"] == 6
    assert "5-shot" in proc.stdout and "+-" in proc.stdout  # the printed table
    assert not list(run.rglob("*.tmp"))


def test_the_source_commit_and_whether_tracked_files_differ_from_it(tmp_path):
    from metarun.utils.runtime import source_commit

    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path), *args],
                              check=True, capture_output=True, text=True).stdout.strip()

    assert source_commit(tmp_path) is None  # not a checkout (a wheel's site-packages)
    git("init", "-q")
    (tmp_path / "code.py").write_text("a = 1\n")
    git("add", "code.py")
    git("commit", "-q", "-m", "first")
    assert source_commit(tmp_path) == {"commit": git("rev-parse", "HEAD"), "dirty": False}
    (tmp_path / "notes.txt").write_text("untracked files do not count\n")
    assert source_commit(tmp_path)["dirty"] is False
    (tmp_path / "code.py").write_text("a = 2\n")
    assert source_commit(tmp_path)["dirty"] is True
    (tmp_path / "sub").mkdir()
    assert source_commit(tmp_path / "sub") is None  # inside another project's repository: not ours


def test_python_dash_m_and_console_script_agree(cli):
    script = Path(sys.executable).with_name("metarun")
    proc = subprocess.run([str(script), "--version"], capture_output=True, text=True, cwd=cli.cwd)
    assert proc.returncode == 0 and proc.stdout.startswith("metarun ")  # (--help is checked on its own, below)
    assert cli("--version").stdout == proc.stdout
    assert_one_line_error(subprocess.run([str(script), "task=nosuchtask"], capture_output=True, text=True,
                                         cwd=cli.cwd), "task=nosuchtask: no such task")


@pytest.mark.parametrize("args,fragments", [
    (["task=nosuchtask"], ["task=nosuchtask: no such task", "sinusoid"]),
    (["model=nosuchmodel"], ["model=nosuchmodel: no such model"]),
    (["algorithm=mamll"], ["algorithm=mamll: no such algorithm", "(did you mean algorithm=maml?)"]),
    (["algorithm.inner_lrr=0.1"], ["algorithm.inner_lrr"]),
    (["algorithm.inner_lr=abc"], ["algorithm.inner_lr=abc: algorithm.inner_lr takes a number, not 'abc'"]),
    (["algorithm.inner_lr=-0.5"], ["algorithm.inner_lr must be > 0"]),
    (["task.shots=0"], ["task.shots must be >= 1"]),
    (["resume=does/not/exist"], ["checkpoint not found: does/not/exist"]),
    (["evaluate=does/not/exist.pt"], ["checkpoint not found"]),
    (["trainer.max_minutes=0"], ["trainer.max_minutes must be > 0 or null"]),
    (["trainer.num_threads=0"], ["trainer.num_threads must be >= 1 or null"]),
    (["device=cuda:3"] if not torch.cuda.is_available() else ["device=tpu"], ["device="]),
    # an algorithm with what it cannot serve
    (["algorithm=anil", "model.hidden_sizes=[]"], ["algorithm=anil needs a model with a body and a head"]),
    (["task=navigation2d", "algorithm=reptile"], ["algorithm must be maml_trpo for an RL task, got 'reptile'"]),
    (["algorithm=imaml", "algorithm.lam=-1"], ["algorithm.lam must be > 0"]),
    (["algorithm=imaml", "algorithm.cg_iterations=0"], ["algorithm.cg_iterations must be >= 1"]),
    (["algorithm=mamlpp", "algorithm.per_step_norm=true"], ["algorithm.per_step_norm=true needs a model with normalization layers"]),
    (["algorithm=reptile", "algorithm.inner_optimizer=rmsprop"], ["algorithm.inner_optimizer must be adam or sgd"]),
    # a key under the basic sweeper's null params (was "internal error (AssertionError)" and a traceback)
    (["-m", "hydra.sweeper.params.seed=0", "debug=smoke"], ["hydra.sweeper.params is null", "metarun -m seed=0,1,2"]),
    (["task=halfcheetah_dir", "algorithm.fisher=hessian"], ["algorithm.fisher=hessian: must be one of factored, factored_autograd, autograd"]),
])
def test_bad_input_is_one_line_and_exit_2(cli, args, fragments):
    assert_one_line_error(cli(*args), *fragments)
    assert not (cli.cwd / "outputs").exists()  # and nothing is left behind, not even an empty outputs/runs/


def runs_in(root: Path) -> list[Path]:
    runs = root / "outputs" / "runs"
    return sorted(runs.iterdir()) if runs.is_dir() else []


@pytest.mark.parametrize("args", [
    ["trainer.iterations=-5"],
    ["algorithm.inner_lr=0"],
    ["+trainer.iteratons=10"],
    ["debug=smoke", "device=cpu", "trainer.cuda_graph=true"],  # found in the trainer's set-up
    ["task=omniglot", "task.data_dir=nowhere", "task.cache_dir=cache", "task.download=false"],  # missing data
])
def test_a_failed_start_leaves_no_run_folder(cli, args):
    """outputs/runs/ lists real runs only: an error before training begins removes what was made,
    and leaves the runs that were there."""
    earlier = cli.cwd / "outputs" / "runs" / "earlier"
    earlier.mkdir(parents=True)
    proc = cli(*args)
    assert_one_line_error(proc)
    assert runs_in(cli.cwd) == [earlier]


def test_a_run_that_diverges_before_its_first_checkpoint_keeps_its_folder_and_names_no_checkpoint(cli):
    proc = cli("algorithm.inner_lr=1e6", "trainer.checkpoint_interval=100", "trainer.iterations=200",
               "trainer.progress=false")
    assert_one_line_error(proc, "non-finite meta-loss at iteration 1", "No checkpoint had been written yet",
                          "the first was due at iteration 100")
    assert "Last good checkpoint" not in proc.stderr
    run = only_run_dir(cli.cwd)
    assert not (run / "checkpoints").exists() and list((run / "tb").glob("events.out.tfevents.*"))
    assert (run / "metarun.log").read_text().splitlines()[-1].endswith(proc.stderr.strip())


@pytest.mark.parametrize("prefix", ["", "+"])
def test_a_misspelt_key_names_the_nearest_key_and_never_suggests_plus(cli, prefix):
    proc = cli(f"{prefix}trainer.iteratons=10")
    assert_one_line_error(proc, "trainer.iteratons is not a key of the config", "did you mean trainer.iterations?")
    assert "To append" not in proc.stderr
    assert runs_in(cli.cwd) == []


def test_help_says_what_metarun_is_and_lists_only_the_users_groups(cli):
    proc = cli("--help")
    assert proc.returncode == 0
    text = proc.stdout
    assert text.startswith("metarun: meta-learning experiments")
    assert "schema" not in text and "Powered by Hydra" not in text
    assert "task: ant_dir, ant_vel, halfcheetah_dir" in text and "experiment: miniimagenet_5w1s" in text
    assert "metarun experiment=omniglot_5w1s_cpu" in text and "outputs/runs/" in text
    assert "METARUN_DATA_DIR" in text and "task.data_dir" in text
    assert "trainer:\n  name: supervised" in text  # the composed config is still shown


def test_version_names_metarun_torch_and_hydra(cli):
    proc = cli("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"metarun {metarun.__version__} (torch {torch.__version__}, hydra-core {hydra.__version__})"


class ExplodingTasks:
    """A task family whose constructor has a bug (used through task._target_ by the test below)."""

    def __init__(self, **kwargs) -> None:
        raise ZeroDivisionError("a bug in a task constructor")


def test_a_bug_inside_a_constructor_keeps_its_traceback(cli):
    """Hydra's instantiate wraps any exception; only metarun's own user errors become one line."""
    proc = cli("task._target_=tests.test_cli.ExplodingTasks", env={"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "ZeroDivisionError: a bug in a task constructor" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("metarun: internal error (InstantiationException)")


def test_a_target_that_does_not_exist_is_one_line(cli):
    assert_one_line_error(cli("model._target_=nosuch.Net"), "model._target_=nosuch.Net cannot be imported",
                          "No module named 'nosuch'", "PYTHONPATH")
    assert_one_line_error(cli("model._target_=metarun.models.NoSuchNet"), "metarun.models.NoSuchNet cannot be imported")


def test_a_users_model_without_its_class_or_with_a_misspelt_argument_is_one_line(cli):
    """model=custom without model._target_, and a model/<name>.yaml without _target_, got OmegaConf's
    raw 'Missing mandatory value' and 'Missing key to'; a misspelt +model.KEY of a user's class got
    no suggestion and was said to come from the model group's file."""
    (cli.cwd / "my_nets.py").write_text(
        "from metarun.models import MLP\n\n\nclass Wide(MLP):\n"
        "    def __init__(self, in_features, out_features, width=8):\n"
        "        super().__init__(in_features=in_features, out_features=out_features, hidden_sizes=[width])\n")
    (cli.cwd / "my_configs" / "model").mkdir(parents=True)
    (cli.cwd / "my_configs" / "model" / "wide.yaml").write_text("width: 8\n")
    no_class = "the model config names no class to build (model._target_): with model=custom give model._target_="
    assert_one_line_error(cli("model=custom", "+model.width=16"), no_class)
    assert_one_line_error(cli("--config-dir", str(cli.cwd / "my_configs"), "model=wide"), no_class, "'_target_: ")
    assert_one_line_error(cli("model=custom", "model._target_=my_nets.Wide", "+model.widht=16"),
                          "'+model.widht=16': model._target_=my_nets.Wide does not take the argument 'widht'; did you "
                          "mean model.width? (it takes width)")
    assert runs_in(cli.cwd) == []


def test_the_console_script_finds_a_users_model_in_the_current_folder(cli):
    (cli.cwd / "my_nets.py").write_text(
        "from metarun.models import MLP\n\n\nclass Wide(MLP):\n"
        "    def __init__(self, **kwargs):\n        super().__init__(**{**kwargs, 'hidden_sizes': [64, 64]})\n")
    script = Path(sys.executable).with_name("metarun")
    proc = subprocess.run([str(script), "debug=smoke", "model._target_=my_nets.Wide"], capture_output=True, text=True,
                          cwd=cli.cwd, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr
    state = torch.load(only_run_dir(cli.cwd) / "checkpoints" / "last.pt", weights_only=False)
    assert [v.shape[0] for k, v in state["model"].items() if k.endswith("weight")] == [64, 64, 1]


def test_evaluate_keeps_the_runs_whole_validation_history(cli):
    assert cli("debug=smoke", "trainer.val_interval=1").returncode == 0
    run = only_run_dir(cli.cwd)
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=False)["iteration"]
    assert best < 6  # so best.pt's own history is shorter than the run's (seed 0)
    trained = json.loads((run / "results.json").read_text())["validation"]
    assert [v["iteration"] for v in trained] == [1, 2, 3, 4, 5, 6]
    assert cli(f"evaluate={run}").returncode == 0
    evaluated = json.loads((run / "results.json").read_text())
    assert evaluated["iteration"] == best and evaluated["validation"] == trained


def test_files_respect_the_umask(cli):
    """results.json, checkpoints, the summary and the data cache are as readable as any other file."""
    proc = cli("-m", "debug=smoke", "trainer.test_tasks=4", "hydra.sweep.dir=sweep", preexec_fn=lambda: os.umask(0o022))
    assert proc.returncode == 0, proc.stderr
    job = next(p for p in (cli.cwd / "sweep").iterdir() if p.is_dir())
    for path in (job / "results.json", job / "checkpoints" / "last.pt", job / "checkpoints" / "best.pt",
                 job / "config.yaml", cli.cwd / "sweep" / "summary.csv"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_a_run_folder_that_cannot_be_made_is_one_line(cli):
    (cli.cwd / "taken").write_text("a file, not a folder")
    assert_one_line_error(cli("debug=smoke", "hydra.run.dir=taken/run"), "Not a directory", "taken/run")


def test_a_new_run_in_a_folder_that_holds_a_run_is_refused_and_touches_nothing(cli):
    """hydra.run.dir pointed at a finished run (a parity script's folder, a typo): one line naming resume=
    and evaluate=, and the run's files, its checkpoints and its TensorBoard events stay as they were."""
    assert cli("debug=smoke", "hydra.run.dir=runs/first").returncode == 0
    run = cli.cwd / "runs" / "first"
    kept = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and ".hydra" not in p.parts and p.name != "metarun.log"}
    assert run / "results.json" in kept and run / "checkpoints" / "last.pt" in kept
    assert_one_line_error(cli("debug=smoke", "seed=5", "hydra.run.dir=runs/first"), "already holds a run",
                          "results.json", "metarun resume=", "another hydra.run.dir")
    assert {p: p.read_bytes() for p in kept} == kept
    assert {p for p in run.rglob("*") if p.is_file() and ".hydra" not in p.parts and p.name != "metarun.log"} == set(kept)


def test_truncated_checkpoint_is_reported_and_left_alone(cli):
    assert cli("debug=smoke").returncode == 0
    run = only_run_dir(cli.cwd)
    before = {}
    for name in ("last.pt", "best.pt"):
        ckpt = run / "checkpoints" / name
        ckpt.write_bytes(ckpt.read_bytes()[:1000])
        before[name] = ckpt.read_bytes()
    assert_one_line_error(cli(f"resume={run}"), "unreadable", "last.pt")  # resume continues last.pt
    assert_one_line_error(cli(f"evaluate={run}"), "unreadable", "best.pt")  # evaluate tests best.pt
    for name, data in before.items():
        assert (run / "checkpoints" / name).read_bytes() == data


def test_resume_continues_in_the_same_folder_and_evaluate_writes_results(cli):
    assert cli("debug=smoke", "seed=3").returncode == 0
    run = only_run_dir(cli.cwd)
    proc = cli(f"resume={run}", "trainer.iterations=9")
    assert proc.returncode == 0, proc.stderr
    assert only_run_dir(cli.cwd) == run
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert state["iteration"] == 9 and state["config"]["seed"] == 3
    (run / "results.json").unlink()
    proc = cli(f"evaluate={run / 'checkpoints' / 'last.pt'}")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run / "results.json").read_text())["iteration"] == 9
    # run_info.json: the first sitting's command, then each later sitting's own
    info = json.loads((run / "run_info.json").read_text())
    assert "seed=3" in info["argv"] and info["seed"] == 3
    assert [(s["kind"], s["argv"][1:]) for s in info["sittings"]] == [
        ("resume", [f"resume={run}", "trainer.iterations=9"]),
        ("evaluate", [f"evaluate={run / 'checkpoints' / 'last.pt'}"])]
    assert all(s["versions"]["torch"] == torch.__version__ for s in info["sittings"])
    assert_one_line_error(cli(f"resume={run}", "task=omniglot"), "task=omniglot", "config groups")
    assert cli(f"resume={run}", "task=sinusoid").returncode == 0  # its own task: nothing changes
    assert_one_line_error(cli(f"resume={run}", f"evaluate={run}"), "not both")


def test_sigterm_saves_a_checkpoint_and_exits_nonzero(cli):
    proc = subprocess.Popen(
        [sys.executable, "-m", "metarun", "trainer.iterations=1000000", "trainer.progress=false",
         "trainer.checkpoint_interval=1000000", "trainer.val_interval=1000000"],
        cwd=cli.cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((cli.cwd / "outputs").rglob("tb/events*")):
        time.sleep(0.2)
    time.sleep(1.0)  # let it train a little
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    state = torch.load(only_run_dir(cli.cwd) / "checkpoints" / "last.pt", weights_only=False)
    assert state["iteration"] > 0
    assert "interrupted (SIGTERM)" in err


def test_multirun_gives_each_job_a_folder_named_by_its_overrides(cli):
    proc = cli("-m", "debug=smoke", "trainer.test_tasks=4", "algorithm.inner_lr=0.001,0.01",
               "hydra.sweep.dir=sweep")
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in (cli.cwd / "sweep").iterdir() if p.is_dir())
    assert names == [
        "algorithm.inner_lr=0.001,debug=smoke,trainer.test_tasks=4",
        "algorithm.inner_lr=0.01,debug=smoke,trainer.test_tasks=4",
    ]
    values = {}
    for name in names:
        results = json.loads((cli.cwd / "sweep" / name / "results.json").read_text())
        assert results["inner_lr"] == float(name.split(",")[0].split("=")[1])
        values[name] = results["results"]["10-shot"]["after_10_steps"]["mean"]
    # the summary: a row per job, the objective = the metric after the most steps reported
    with (cli.cwd / "sweep" / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["job"] for r in rows] == names
    assert all(r["objective"] == "10-shot mse after 10 steps" for r in rows)  # the K it was trained with
    assert [float(r["value"]) for r in rows] == [values[n] for n in names]
    best = min(names, key=values.get)  # mse: lowest is best
    assert f"* {best}" in proc.stdout and "* best (lowest 10-shot mse after 10 steps)" in proc.stdout


def test_a_sweep_job_that_diverges_is_a_row_of_the_summary_and_the_sweep_goes_on(cli):
    proc = cli("-m", "debug=smoke", "trainer.test_tasks=4", "algorithm.inner_lr=1e6,0.01", "hydra.sweep.dir=sweep")
    assert proc.returncode == 1, proc.stderr
    assert "job 0 stopped: non-finite meta-loss at iteration 1" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == ("metarun: 1 of 2 sweep jobs did not finish (their status is in "
                                                    "the summary above)")
    with (cli.cwd / "sweep" / "summary.csv").open() as f:
        rows = {r["job"].split(",")[0]: r for r in csv.DictReader(f)}
    assert rows["algorithm.inner_lr=1000000.0"]["status"].startswith("stopped: non-finite meta-loss at iteration 1")
    assert rows["algorithm.inner_lr=0.01"]["status"] == "ok" and float(rows["algorithm.inner_lr=0.01"]["value"]) > 0
    assert (cli.cwd / "sweep" / "algorithm.inner_lr=0.01,debug=smoke,trainer.test_tasks=4" / "results.json").is_file()


def test_the_summary_times_the_whole_run_when_the_best_checkpoint_came_earlier(tmp_path):
    """A run stopped by its budget at 6,970 iterations after 299 s, whose best validation (evaluated)
    was at 5,000 after 214 s: the summary's iterations and seconds are the run's, 6,970 and 299."""
    from metarun.utils.sweep import sweep_rows

    cell = {"mean": 3.6, "ci95": 0.3, "median": 3.0}
    results = {"metric": "mse", "lower_is_better": True, "headline": "5-shot",
               "results": {"5-shot": {"after_0_steps": cell, "after_10_steps": cell}},
               "training": {"iterations": 5000, "train_seconds": 213.7, "ms_per_iteration": 42.75,
                            "peak_memory_mb": 440.0, "iterations_reached": 6970, "train_seconds_reached": 299.4}}
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "results.json").write_text(json.dumps(results))
    [row] = sweep_rows(tmp_path)
    assert (row["iterations"], row["train_seconds"], row["ms_per_iteration"]) == (6970, 299.4, 42.75)


def test_runs_from_any_directory(tmp_path):
    sub = tmp_path / "deep" / "er"
    sub.mkdir(parents=True)
    assert run_cli(["debug=smoke"], sub).returncode == 0
    assert (sub / "outputs" / "runs").is_dir()


def test_bench_rl_measures_both_paths_and_the_physics_floor(monkeypatch):
    """`make bench --rl`: a small HalfCheetah meta-iteration along each path, its sampling and the rest
    apart, and MuJoCo's own speed per robot."""
    pytest.importorskip("mujoco")
    from metarun import bench

    monkeypatch.setitem(bench.RL_CONFIGS, "halfcheetah_dir", (["task=halfcheetah_dir", "task.horizon=5",
                        "algorithm.meta_batch_size=2", "algorithm.trajectories=2", "task.threads=2"], 1))
    rows = [bench.bench_rl("halfcheetah_dir", bench.RL_CONFIGS["halfcheetah_dir"][0], 1, path)
            for path in bench.RL_PATHS]
    assert [r["path"] for r in rows] == ["gymnasium + autograd", "batched + factored (autograd)", "batched + factored"]
    assert [r["sampler_threads"] for r in rows] == [1, 2, 2]
    for r in rows:
        assert r["env_steps_per_s"] > 0 and r["peak_mb"] > 0 and r["device"] == "cpu"
        assert r["s_per_meta_iteration"] == pytest.approx(r["sampling_s"] + r["rest_s"])
        assert 0 < r["sampling_share"] < 1
    assert "batched + factored" in bench.rl_table(rows)
    floor = bench.physics_floor(steps=50)
    assert [r["robot"] for r in floor] == ["HalfCheetah-v5", "Ant-v5"] and all(r["steps_per_s"] > 0 for r in floor)
    assert "Ant-v5" in bench.floor_table(floor)


def test_bench_measures_both_batchings(tmp_path):
    from metarun import bench

    rows = bench.main(["--configs", "sinusoid", "--algorithms", "maml", "imaml", "--devices", "cpu", "--iterations",
                       "3", "--rounds", "1", "--warmup", "1", "--rl", "--out", str(tmp_path)])
    assert [(r["algorithm"], r["batching"]) for r in rows] == [("maml", "loop"), ("maml", "vmap"),
                                                                ("imaml", "loop"), ("imaml", "vmap")]
    assert all(r["ms_per_iteration"] > 0 and r["auto_picks"] == "vmap" for r in rows)
    assert [r["speedup_vs_loop"] for r in rows if r["batching"] == "loop"] == [1.0, 1.0]
    assert all(r["peak_mb"] > 0 for r in rows)  # measured in child processes
    record = json.loads(next(tmp_path.glob("bench_*.json")).read_text())
    # and MAML on 2 torchrun processes x 1 thread against 1 process x 2 threads, meta-batch 25 -> 24
    (row,) = record["processes"]
    assert (row["config"], row["processes"], row["meta_batch_size"]) == ("sinusoid", 2, 24)
    assert row["ms_processes"] > 0 and row["ms_threads"] > 0
    assert row["speedup"] == pytest.approx(row["ms_threads"] / row["ms_processes"])


def test_an_interrupt_without_a_message_names_sigint(monkeypatch, capsys):
    """Ctrl-C of a hydra/launcher=local sweep reaches main() as a bare KeyboardInterrupt (it printed
    `metarun: interrupted ()`)."""
    from metarun import cli as cli_module

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_module, "hydra_main", interrupted)
    monkeypatch.setattr(sys, "argv", ["metarun", "debug=smoke"])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # main() sets it to 1: restored after the test, as before it
    with pytest.raises(SystemExit) as stop:
        cli_module.main()
    assert stop.value.code == 130
    assert capsys.readouterr().err.strip() == (
        "metarun: interrupted (SIGINT); the last checkpoint is in the run folder")
