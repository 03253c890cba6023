"""The correctness harness: every meta-gradient path against independent references, in float64.

Generic over models: add a model factory and a task factory to ``CASES`` and every check runs
on it. Tolerances: vmap vs loop is the same maths in another order (<= 1e-10); finite
differences carry O(eps^2) truncation and rounding error (<= 1e-6 at eps = 1e-5).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metarun.meta import TaskBatch, hvp, meta_loss
from metarun.meta import gradcheck as gc
from metarun.models import MLP
from metarun.tasks.sinusoid import SinusoidTasks

pytestmark = pytest.mark.unit


def sinusoid_tasks(num_tasks=4, shots=5, queries=7, seed=0) -> TaskBatch:
    gen = torch.Generator().manual_seed(seed)
    return SinusoidTasks(dtype=torch.float64).sample(num_tasks, shots, queries, gen).tasks


def mlp(activation="tanh", hidden=(16, 16)):
    torch.manual_seed(0)
    return MLP(1, 1, hidden, activation).double()


# name -> (model factory, task factory, loss, inner lr). The next issue adds conv4 here.
CASES = {
    "mlp_relu": (lambda: mlp("relu"), sinusoid_tasks, F.mse_loss, 0.01),
    "mlp_tanh": (lambda: mlp("tanh"), sinusoid_tasks, F.mse_loss, 0.05),
}


@pytest.fixture(params=sorted(CASES))
def case(request):
    make_model, make_tasks, loss_fn, inner_lr = CASES[request.param]
    model = make_model()
    return model, dict(model.named_parameters()), make_tasks(), loss_fn, inner_lr


@pytest.mark.parametrize("inner_steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True])
def test_vmap_matches_loop(case, inner_steps, first_order):
    model, params, tasks, loss_fn, lr = case
    assert gc.vmap_vs_loop(model, params, tasks, loss_fn, lr, inner_steps, first_order) <= 1e-10


@pytest.mark.parametrize("inner_steps", [1, 2])
def test_loop_matches_finite_differences(case, inner_steps):
    model, params, tasks, loss_fn, lr = case
    assert gc.loop_vs_finite_differences(model, params, tasks, loss_fn, lr, inner_steps) <= 1e-6


@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_first_order_is_query_gradient_at_adapted_params(case, batching):
    model, params, tasks, loss_fn, lr = case
    assert gc.first_order_vs_cut_graph(model, params, tasks, loss_fn, lr, 2, batching) <= 1e-12


@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_zero_inner_steps_is_plain_gradient(case, batching):
    model, params, tasks, loss_fn, _ = case
    assert gc.zero_steps_vs_plain_gradient(model, params, tasks, loss_fn, batching) <= 1e-12


def test_second_order_term_is_present(case):
    """Second and first order must differ: a silently dropped Hessian term would pass the others
    only if the references dropped it too, so make sure it is there and not negligible."""
    model, params, tasks, loss_fn, lr = case
    assert gc.second_order_contribution(model, params, tasks, loss_fn, lr, 2) > 1e-4


def test_finite_difference_check_catches_a_wrong_gradient():
    """The harness itself must fail on a wrong meta-gradient: first order passed off as second."""
    model, tasks = mlp("tanh"), sinusoid_tasks()
    params = dict(model.named_parameters())
    exact = gc.meta_gradient(model, params, tasks, F.mse_loss, 0.05, 2, False, "loop")
    wrong = gc.meta_gradient(model, params, tasks, F.mse_loss, 0.05, 2, True, "loop")
    assert gc.relative_error(wrong, exact) > 1e-4
    assert gc.relative_error(exact, exact) == 0.0


def test_meta_loss_values_agree_between_batchings():
    model, tasks = mlp("relu"), sinusoid_tasks()
    params = dict(model.named_parameters())
    a = meta_loss(model, params, tasks, F.mse_loss, 0.01, 2, batching="vmap")
    b = meta_loss(model, params, tasks, F.mse_loss, 0.01, 2, batching="loop")
    torch.testing.assert_close(a.task_losses, b.task_losses, rtol=1e-12, atol=0)
    torch.testing.assert_close(a.query_outputs, b.query_outputs, rtol=1e-12, atol=0)


def test_unknown_batching_is_rejected():
    model, tasks = mlp(), sinusoid_tasks()
    with pytest.raises(ValueError, match="batching"):
        meta_loss(model, dict(model.named_parameters()), tasks, F.mse_loss, 0.01, 1, batching="pmap")


def test_hvp_matches_dense_hessian():
    model, tasks = mlp("tanh", hidden=(5,)), sinusoid_tasks(num_tasks=1)
    params = {k: p.detach() for k, p in model.named_parameters()}

    def f(p):
        return meta_loss(model, p, tasks, F.mse_loss, 0.05, 1, batching="vmap").loss

    gen = torch.Generator().manual_seed(1)
    v = {k: torch.randn(p.shape, generator=gen, dtype=p.dtype) for k, p in params.items()}
    got = torch.cat([t.reshape(-1) for t in hvp(f, params, v).values()])
    dense = gc.dense_hessian(f, params)
    expected = dense @ torch.cat([v[k].reshape(-1) for k in params])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert torch.allclose(dense, dense.T, atol=1e-10)  # a real Hessian, not something else


def test_hvp_rejects_mismatched_direction():
    with pytest.raises(ValueError, match="keys"):
        hvp(lambda p: (p["w"] ** 2).sum(), {"w": torch.ones(2)}, {"b": torch.ones(2)})
