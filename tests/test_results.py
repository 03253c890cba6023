"""The evaluation protocol's report: the headline K, diverged tasks, and a table that stays aligned."""

from __future__ import annotations

import math

import pytest
import torch

from metarun.meta import task_loss
from metarun.meta.gradcheck import sgd_reference
from metarun.trainers import supervised as sup
from metarun.trainers.results import (
    cell_text,
    diverged_tasks,
    mean_ci,
    number,
    objective,
    objective_cell,
    results_table,
    summarize,
)
from tests.conftest import compose_config

pytestmark = pytest.mark.unit


def test_a_task_diverged_where_its_loss_ends_far_above_its_own_start_or_is_not_finite():
    loss = torch.tensor([[1.0, 2.0, 0.5, 3.0],     # before adapting
                         [9.0, 25.0, 0.4, float("nan")],
                         [10.5, 1.0, float("inf"), 3.0]])
    assert diverged_tasks(loss, 10.0).tolist() == [[False, False, False, False],
                                                  [False, True, False, True],
                                                  [True, False, True, False]]


def test_summarize_gives_the_mean_with_and_without_diverged_tasks():
    values = torch.tensor([1.0, 2.0, 3.0, 1e20])
    cell = summarize(values, torch.tensor([False, False, False, True]))
    assert (cell["mean"], cell["ci95"]) == mean_ci(values)
    assert cell["diverged_tasks"] == 1 and cell["nonfinite_tasks"] == 0
    assert (cell["mean_without_diverged"], cell["ci95_without_diverged"]) == mean_ci(values[:3])
    assert cell["median"] == 2.0  # torch's median of an even count is the lower middle value
    nan = summarize(torch.tensor([1.0, float("nan"), 3.0]), torch.tensor([False, True, False]))
    assert nan["mean"] is None and nan["nonfinite_tasks"] == 1 and nan["mean_without_diverged"] == 2.0


@pytest.mark.parametrize("value,text", [(0.10512, "0.1051"), (70.0502, "70.0502"), (0.0, "0.0000"),
                                        (1.105e20, "1.105e+20"), (-2.5e-5, "-2.500e-05"), (None, "n/a")])
def test_numbers_switch_to_scientific_notation_where_large_or_tiny(value, text):
    assert number(value) == text and len(text) <= 10


def cell(mean, ci, diverged=0):
    return {"mean": mean, "ci95": ci, "median": mean, "nonfinite_tasks": 0 if mean is not None else 2,
            "diverged_tasks": diverged, "mean_without_diverged": 0.146, "ci95_without_diverged": 0.012}


def sinusoid_results():
    """What the issue saw from `make run`: the trained K=10 fine, K=5 blown up on a few tasks."""
    steps = ("after_0_steps", "after_1_steps", "after_5_steps", "after_10_steps")
    return {"task": "sinusoid", "metric": "mse", "test_tasks": 600, "headline": "10-shot", "divergence_ratio": 10.0,
            "lower_is_better": True,
            "results": {"10-shot": dict(zip(steps, [cell(3.0461, 0.213), cell(0.315, 0.029), cell(0.136, 0.013),
                                                    cell(0.105, 0.011)])),
                        "5-shot": dict(zip(steps, [cell(3.0461, 0.213), cell(0.625, 0.061), cell(70.0502, 136.394, 3),
                                                   cell(1.105e20, 2.166e20, 4)]))}}


def test_the_table_stays_aligned_with_huge_numbers_and_a_two_digit_k():
    lines = results_table(sinusoid_results()).splitlines()
    header, row10, row5 = lines[1], lines[2], lines[3]
    assert row10.startswith("10-shot*") and row5.startswith("5-shot ")
    plus10 = [i for i in range(len(row10)) if row10.startswith("+-", i)]
    plus5 = [i for i in range(len(row5)) if row5.startswith("+-", i)]
    assert len(plus10) == 4 and plus10 == plus5  # every +- in the same column on both rows
    # a cell with diverged tasks reads as the mean over the others, marked; the raw mean is in a note
    assert "0.1460 +- 0.0120     [3 div]" in row5 and "0.1460 +- 0.0120     [4 div]" in row5
    assert "1.105e+20" not in row5 and "136.3940" not in row5
    assert len(row10) <= len(row5) and row10.endswith("0.1050 +- 0.0110")
    assert [w for w in header.split("  ") if w.strip()][0].strip() == "0 steps"  # a column before adapting
    assert lines[4] == "* 10-shot: the K the model was trained with (the headline and the sweep objective)"
    assert ("[4 div] 5-shot after 10 steps: 4 of 600 tasks diverged and are left out of the cell; over all 600: "
            "1.105e+20 +- 2.166e+20 (median 1.105e+20)") in lines
    assert ("[3 div] 5-shot after 5 steps: 3 of 600 tasks diverged and are left out of the cell; over all 600: "
            "70.0502 +- 136.3940 (median 70.0502)") in lines
    assert lines[-1].startswith("(diverged: the task's query loss ended above 10x its value before adapting")


def test_a_cell_with_non_finite_tasks_keeps_the_width():
    assert len(cell_text(cell(None, None))) == len(cell_text(cell(0.1, 0.01))) == len(cell_text(cell(1e20, 1e21)))


def test_the_objective_is_the_trained_k_not_the_first_listed():
    results = sinusoid_results()
    results["results"] = dict(reversed(list(results["results"].items())))  # 5-shot first
    name, value = objective_cell(results)
    assert name == "10-shot mse after 10 steps" and value["mean"] == 0.105
    assert objective(results) == 0.105


def test_evaluation_counts_diverged_tasks_as_a_per_task_autograd_loop_does():
    """An inner rate that blows some sinusoid tasks up: the counts and the means without them in
    results.json equal those of an independent per-task reference (torch.autograd, float64)."""
    cfg = compose_config("debug=smoke", "device=cpu", "dtype=float64", "trainer.test_tasks=40",
                         "algorithm.inner_lr=0.3", "trainer.report_steps=[0,1,5,10]", "task.test_shots=[5]")
    run = sup.setup(cfg, run_dir=None)
    results = sup.evaluate(run)
    assert list(results["results"]) == ["10-shot", "5-shot"]  # the trained K although test_shots lists only 5
    seen_divergence = False
    for shots in (10, 5):
        tasks = run.task.sample(40, shots, run.task.test_queries, sup.fixed_generator(run, cfg.trainer.test_seed),
                                split="test").tasks
        losses = torch.empty(40, 11, dtype=torch.float64)
        for t, (sx, sy, qx, qy) in enumerate(zip(*tasks)):
            params = {k: p.detach().requires_grad_(True) for k, p in run.model.named_parameters()}
            for steps in range(11):
                fast = sgd_reference(run.model, params, sx, sy, run.task.loss_fn, 0.3, steps, first_order=True)
                losses[t, steps] = float(task_loss(run.model, fast, qx, qy, run.task.loss_fn).detach())
        for steps in (1, 5, 10):
            got = results["results"][f"{shots}-shot"][f"after_{steps}_steps"]
            bad = ~torch.isfinite(losses[:, steps]) | (losses[:, steps] > 10 * losses[:, 0])
            assert got["diverged_tasks"] == int(bad.sum())
            seen_divergence |= bool(bad.any())
            mean, ci = mean_ci(losses[~bad, steps])  # for the sinusoid the metric is the loss (MSE)
            assert got["mean_without_diverged"] == pytest.approx(mean, rel=1e-9)
            assert got["ci95_without_diverged"] == pytest.approx(ci, rel=1e-9)
            if math.isfinite(losses[:, steps].sum()):
                assert got["mean"] == pytest.approx(float(losses[:, steps].mean()), rel=1e-9)
    assert seen_divergence  # the check can fail: this rate does blow some tasks up


def test_the_hyperparameters_and_test_numbers_reach_tensorboards_hparams_dashboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    cfg = compose_config("debug=smoke", "algorithm.inner_lr=0.02", "trainer.test_tasks=4")
    results = sup.run_supervised(cfg, tmp_path)
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0})
    events.Reload()
    content = events.PluginTagToContent("hparams")
    start = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["algorithm.inner_lr"].number_value == 0.02
    assert start.hparams["algorithm.name"].string_value == "maml"
    assert start.hparams["trainer.test_tasks"].number_value == 4
    experiment = HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    tags = {m.name.tag for m in experiment.metric_infos}
    assert "test/10-shot/after_10_steps" in tags and "test/5-shot/after_0_steps" in tags
    (scalar,) = events.Scalars("test/10-shot/after_10_steps")  # the metric's value, in the same run
    assert scalar.value == pytest.approx(results["results"]["10-shot"]["after_10_steps"]["mean"], rel=1e-6)
    assert scalar.step == results["iteration"]


@pytest.mark.parametrize("algorithm", ["maml", "metasgd"])
def test_evaluation_takes_the_runs_batching_and_shows_its_progress(algorithm, capsys):
    """Validation and test ran under vmap whatever the probe chose (2x the loop's time for a max-pool
    conv4 on a CPU) and said nothing for minutes: they now take the run's batching, with the same
    numbers (float64), and show a bar of the tasks done when trainer.progress is on."""
    curves = {}
    for batching in ("vmap", "loop"):
        cfg = compose_config("debug=smoke", f"algorithm={algorithm}", "device=cpu", "dtype=float64",
                             "trainer.test_tasks=30", f"algorithm.batching={batching}", "trainer.progress=true")
        run = sup.setup(cfg, run_dir=None)
        assert run.batching == batching
        calls = []
        curve = run.algorithm.curve

        def spy(*args, calls=calls, curve=curve, **kwargs):
            calls.append(args[-1] if len(args) > 6 else kwargs.get("batching"))
            return curve(*args, **kwargs)

        run.algorithm.curve = spy
        curves[batching] = sup.test_curve(run, run.task.shots, chunk=20)
        assert calls == [batching, batching]  # two chunks of 20 and 10 tasks, each with the run's batching
    torch.testing.assert_close(curves["loop"].metric, curves["vmap"].metric, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(curves["loop"].loss, curves["vmap"].loss, rtol=1e-10, atol=1e-12)
    assert "test (10-shot)" in capsys.readouterr().err  # tqdm's bar, on stderr


def test_accuracy_is_printed_in_percent_as_the_report_gives_it():
    steps = ("after_0_steps", "after_1_steps")
    results = {"task": "omniglot", "metric": "accuracy", "test_tasks": 600, "headline": "1-shot",
               "divergence_ratio": 10.0, "results": {"1-shot": dict(zip(steps, [cell(0.2, 0.0123), cell(0.95, 0.0071)]))}}
    lines = results_table(results).splitlines()
    assert lines[0] == "omniglot test accuracy % (600 tasks, mean +- 95% CI)"
    assert "20.0000 +- 1.2300" in lines[2] and "95.0000 +- 0.7100" in lines[2]
