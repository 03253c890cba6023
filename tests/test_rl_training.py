"""Meta-RL end to end: a 2-iteration smoke meta-training for every environment, exact resume,
and a NaN stopping the run with the iteration named."""

from __future__ import annotations

import json

import pytest
import torch

from metarun.meta import policy_gradient as pg
from metarun.trainers import rl
from metarun.utils import checkpoint
from metarun.utils.errors import DivergedError
from tests.conftest import compose_config
from tests.test_cli import assert_one_line_error, only_run_dir

TINY = ("trainer.iterations=2", "algorithm.meta_batch_size=2", "algorithm.trajectories=3", "task.horizon=8",
        "trainer.test_tasks=2", "algorithm.test_inner_lrs=[0.1,0.05]", "trainer.progress=false",
        "trainer.checkpoint_interval=1")


@pytest.mark.smoke
@pytest.mark.parametrize("task", ["navigation2d", "halfcheetah_vel", "halfcheetah_dir", "ant_vel", "ant_dir"])
def test_two_iteration_meta_training(cli, task):
    proc = cli(f"task={task}", *TINY)
    assert proc.returncode == 0, proc.stderr
    run = only_run_dir(cli.cwd)
    results = json.loads((run / "results.json").read_text())
    assert results["task"] == task and results["metric"] == "return"
    assert set(results["results"]["return"]) == {"after_0_steps", "after_1_steps", "after_2_steps"}
    assert checkpoint.load(run)["iteration"] == 2
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert not (cli.cwd / "MUJOCO_LOG.TXT").exists()


@pytest.mark.smoke
def test_unknown_environment_is_one_line(cli):
    assert_one_line_error(cli("task=pong"), "task=pong: no such task", "navigation2d", "halfcheetah_dir")
    assert_one_line_error(cli("task=halfcheetah_dir", "task.name=pong", *TINY), "pong", "ant_dir")


@pytest.mark.smoke
def test_resume_and_evaluate_take_overrides_of_the_runs_own_task(cli):
    # Hydra composes before metarun reads the checkpoint: task.horizon is a key of the Ant's task,
    # not of the default sinusoid one, and env_kwargs is a mapping that takes new entries with '+'
    assert cli("task=ant_dir", *TINY).returncode == 0
    run = only_run_dir(cli.cwd)
    proc = cli(f"resume={run}", "trainer.iterations=3", "task.horizon=5", "+task.env_kwargs.terminate_when_unhealthy=false")
    assert proc.returncode == 0, proc.stderr
    state = checkpoint.load(run)
    assert state["iteration"] == 3 and state["config"]["task"]["horizon"] == 5
    assert state["config"]["task"]["env_kwargs"] == {"terminate_when_unhealthy": False}
    proc = cli(f"evaluate={run}", "trainer.test_tasks=3", "+task.env_kwargs.terminate_when_unhealthy=true")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run / "results.json").read_text())["test_tasks"] == 3
    assert_one_line_error(cli(f"resume={run}", "task.horizn=5"), "horizn")
    assert_one_line_error(cli(f"resume={run}", "task=navigation2d"), "task=navigation2d", "config groups")
    assert_one_line_error(cli(f"resume={run}", "+trainer.extra=1"), "+trainer.extra=1", "config groups")


@pytest.mark.smoke
def test_rl_resume_is_exact(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    rl.run_rl(compose_config("task=navigation2d", *TINY, "trainer.iterations=4"), straight)
    rl.run_rl(compose_config("task=navigation2d", *TINY, "trainer.iterations=2"), split)
    rl.run_rl(compose_config("task=navigation2d", *TINY, "trainer.iterations=4"), split, state=checkpoint.load(split))
    a, b = checkpoint.load(straight)["model"], checkpoint.load(split)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.smoke
def test_rl_time_budget_stops_with_a_checkpoint(tmp_path):
    results = rl.run_rl(compose_config("task=navigation2d", *TINY, "trainer.iterations=4", "trainer.max_minutes=1e-9"),
                        tmp_path)
    state = checkpoint.load(tmp_path)
    assert state["iteration"] == 1 and results["training"]["iterations"] == 1
    assert state["train_seconds"] == results["training"]["train_seconds"] > 0
    assert [(s["from_iteration"], s["to_iteration"]) for s in results["training"]["sittings"]] == [(0, 1)]


@pytest.mark.smoke
def test_nan_actions_stop_with_the_iteration_named(tmp_path, monkeypatch):
    original, calls = pg.make_act, {"n": 0}

    def poisoned(policy, params, generator, per_task):
        calls["n"] += 1
        act = original(policy, params, generator, per_task)
        return (lambda obs: act(obs) * float("nan")) if calls["n"] == 3 else act  # iteration 2, pre-update

    monkeypatch.setattr(pg, "make_act", poisoned)
    with pytest.raises(DivergedError, match="at iteration 2"):
        rl.run_rl(compose_config("task=navigation2d", *TINY, "trainer.iterations=3"), tmp_path)
    assert checkpoint.load(tmp_path)["iteration"] == 1
