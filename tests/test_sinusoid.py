"""The sinusoid task family: distributions, shapes, seeding, device."""

from __future__ import annotations

import math

import pytest
import torch

from metarun.tasks.sinusoid import SinusoidTasks

pytestmark = pytest.mark.unit


def test_batch_shapes_and_ranges():
    family = SinusoidTasks()
    batch = family.sample(1000, 5, 7, torch.Generator().manual_seed(0))
    t = batch.tasks
    assert t.support_x.shape == t.support_y.shape == (1000, 5, 1)
    assert t.query_x.shape == t.query_y.shape == (1000, 7, 1)
    assert 0.1 <= batch.amplitude.min() and batch.amplitude.max() <= 5.0
    assert 0.0 <= batch.phase.min() and batch.phase.max() <= math.pi
    for x in (t.support_x, t.query_x):
        assert -5.0 <= x.min() and x.max() <= 5.0
    # the spread covers the ranges (uniform draws, 1000 tasks)
    assert batch.amplitude.min() < 0.3 and batch.amplitude.max() > 4.8
    assert batch.phase.max() > 3.0


def test_targets_lie_on_the_task_curve():
    family = SinusoidTasks()
    batch = family.sample(16, 10, 10, torch.Generator().manual_seed(1))
    a, p = batch.amplitude[:, None, None], batch.phase[:, None, None]
    torch.testing.assert_close(batch.tasks.support_y, a * torch.sin(batch.tasks.support_x - p))
    torch.testing.assert_close(batch.tasks.query_y, a * torch.sin(batch.tasks.query_x - p))
    grid = torch.linspace(-5, 5, 9)[:, None]
    curve = family.curve(batch.amplitude, batch.phase, grid)
    torch.testing.assert_close(curve, a * torch.sin(grid[None] - p))


def test_same_seed_same_tasks_other_seed_other_tasks():
    family = SinusoidTasks()
    a = family.sample(4, 5, 5, torch.Generator().manual_seed(3)).tasks
    b = family.sample(4, 5, 5, torch.Generator().manual_seed(3)).tasks
    c = family.sample(4, 5, 5, torch.Generator().manual_seed(4)).tasks
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a.support_x, c.support_x)


def test_dtype_and_device_follow_the_family():
    batch = SinusoidTasks(dtype=torch.float64, device="cpu").sample(2, 3, 3, torch.Generator().manual_seed(0))
    assert all(t.dtype == torch.float64 and t.device.type == "cpu" for t in batch.tasks)


def test_figure_has_the_paper_curves_adapted_by_the_running_algorithm():
    from metarun.algorithms import build
    from metarun.models import MLP
    from tests.conftest import compose_config

    family, model = SinusoidTasks(), MLP()
    algorithm = build(compose_config().algorithm, model, family.loss_fn)
    steps = []

    def adapt(params, x, y, n):
        steps.append(n)
        return algorithm.adapt_to(params, x, y, n)

    fig = family.figure(model, dict(model.named_parameters()), torch.Generator().manual_seed(0), 5, adapt)
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert labels == ["ground truth", "5 points used for gradient", "pre-update", "1 grad step", "10 grad steps"]
    assert steps == [1, 10]


def test_every_adapted_curve_has_its_own_colour_and_a_legend_entry():
    from metarun.models import MLP

    family, model = SinusoidTasks(), MLP()
    params = dict(model.named_parameters())
    fig = family.figure(model, params, torch.Generator().manual_seed(0), 5, lambda p, x, y, n: p, steps=(1, 2, 5, 10))
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert [line.get_label() for line in lines][3:] == ["1 grad step", "2 grad steps", "5 grad steps", "10 grad steps"]
    assert len({line.get_color() for line in lines}) == len(lines)  # (it had drawn 3 steps at most, in greens)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [line.get_label() for line in lines]
