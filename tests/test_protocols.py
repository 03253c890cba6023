"""Each algorithm's training protocol as its authors ran it, against hand computations in float64:
Reptile's minibatches, summed losses and carried inner Adam (openai/supervised-reptile), iMAML's
SGD-then-pull-back inner solver and damped system (aravindr93/imaml_dev), and the capturable SGD
that Reptile's outer step uses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from metarun.meta import gradcheck as gc
from metarun.models import MLP
from metarun.optim import SGD
from metarun.tasks.sinusoid import SinusoidTasks
from tests.test_algorithms import ridge_problem
from tests.test_meta_gradients import CASES, algorithm

pytestmark = pytest.mark.unit


class Family:
    """A regression task family with ``shots`` and ``queries``, as the trainer hands one over."""

    shots, queries = 3, 2

    def __init__(self):
        self.sinusoid = SinusoidTasks(dtype=torch.float64)

    def sample(self, num_tasks, shots, queries, generator, split="train"):
        return self.sinusoid.sample(num_tasks, shots, queries, generator)


# --- Reptile --------------------------------------------------------------------------------------

def test_reptile_training_tasks_are_laid_out_as_minibatches_without_replacement():
    model = MLP(1, 1, (8,)).double()
    reptile = algorithm("reptile", model, F.mse_loss, train_shots=7, inner_batch=3, inner_steps=5)
    family = Family()
    tasks = reptile.training_tasks(family, 4, torch.Generator().manual_seed(0))
    raw = family.sample(4, 7, 0, torch.Generator().manual_seed(0)).tasks  # the same draw, before reordering
    assert tasks.support_x.shape == (4, 15, 1) and tasks.query_x.shape == (4, 0, 1)  # 5 steps x 3 examples
    for t in range(4):
        index = [int((raw.support_x[t, :, 0] == v).nonzero()) for v in tasks.support_x[t, :, 0]]
        assert sorted(index[:7]) == list(range(7)) and sorted(index[7:14]) == list(range(7))  # whole passes
        assert torch.equal(tasks.support_y[t], raw.support_y[t, index])  # each example keeps its target
    # null inner_batch and train_shots: the task's support and query examples, every step on all of them
    plain = algorithm("reptile", model, F.mse_loss, train_shots="null", inner_batch="null")
    assert plain.training_tasks(family, 2, torch.Generator().manual_seed(0)).support_x.shape == (2, 5, 1)


def torch_adam_reptile(model, batches, lr, batch, steps):
    """The reference's Reptile by hand: one torch Adam (beta1 = 0) running on through every task of
    every meta-batch in order, the weights put back before each task, summed minibatch losses.
    Returns each meta-batch's direction (all from the same theta), the Adam and its parameters."""
    theta = {k: p.detach().clone() for k, p in model.named_parameters()}
    live = {k: p.clone().requires_grad_(True) for k, p in theta.items()}
    adam = torch.optim.Adam(live.values(), lr=lr, betas=(0.0, 0.999), eps=1e-8)
    directions = []
    for tasks in batches:
        fast = []
        for x, y in zip(tasks.support_x, tasks.support_y):
            with torch.no_grad():
                for k in live:
                    live[k].copy_(theta[k])
            for i in range(steps):
                xb, yb = x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch]
                adam.zero_grad()
                (F.mse_loss(functional_call(model, live, (xb,)), yb) * len(xb)).backward()
                adam.step()
            fast.append({k: p.detach().clone() for k, p in live.items()})
        directions.append({k: theta[k] - sum(f[k] for f in fast) / len(fast) for k in theta})
    return directions, adam, live


def test_reptile_carries_one_adam_state_through_the_tasks_as_the_reference():
    model = MLP(1, 1, (8,), "tanh").double()
    reptile = algorithm("reptile", model, F.mse_loss, inner_optimizer="adam", inner_lr=0.01, train_shots=6,
                        inner_batch=4, inner_steps=3, carry_adam_state="true", inner_loss="sum")
    family = Family()
    batches = [reptile.training_tasks(family, 3, torch.Generator().manual_seed(s)) for s in (1, 2)]
    want, adam, live = torch_adam_reptile(model, batches, lr=0.01, batch=4, steps=3)
    params = dict(model.named_parameters())
    first, _ = reptile.outer_gradient(params, batches[0], "loop")
    # the second meta-batch from the same theta (the reference's, minus the outer move), the state run on
    second, _ = reptile.outer_gradient(params, batches[1], "vmap")
    for k in params:
        torch.testing.assert_close(first[k], want[0][k], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(second[k], want[1][k], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(reptile.carried("v", k), adam.state[live[k]]["exp_avg_sq"], rtol=1e-9, atol=1e-15)
    assert float(reptile.inner_adam.t) == 18  # 2 meta-batches x 3 tasks x 3 steps
    # a fresh state per task differs: the switch matters
    fresh = algorithm("reptile", model, F.mse_loss, inner_optimizer="adam", inner_lr=0.01, train_shots=6,
                      inner_batch=4, inner_steps=3, carry_adam_state="false", inner_loss="sum")
    assert gc.relative_error(gc.outer_gradient(fresh, params, batches[1], "loop"), want[1]) > 1e-3


def test_reptile_evaluation_starts_from_the_carried_state_and_leaves_it():
    model = MLP(1, 1, (8,), "tanh").double()
    reptile = algorithm("reptile", model, F.mse_loss, inner_optimizer="adam", inner_lr=0.01, train_shots=6,
                        inner_batch=4, inner_steps=3, carry_adam_state="true", eval_inner_batch="null", inner_loss="sum")
    params = dict(model.named_parameters())
    reptile.outer_gradient(params, reptile.training_tasks(Family(), 2, torch.Generator().manual_seed(0)), "loop")
    kept = {k: b.clone() for k, b in reptile.named_buffers()}
    assert float(kept["inner_adam.t"]) == 6  # (there is a carried state to start from)
    tasks = Family().sample(3, 5, 4, torch.Generator().manual_seed(9)).tasks
    first = reptile.curve(params, tasks, lambda out, y: F.mse_loss(out, y), 4)
    assert all(torch.equal(b, kept[k]) for k, b in reptile.named_buffers())  # evaluation changed nothing
    torch.testing.assert_close(reptile.curve(params, tasks, lambda out, y: F.mse_loss(out, y), 4).loss, first.loss)
    # by hand: torch Adam whose state is the carried one, full-batch summed steps on the support set
    sx, sy, qx, qy = (t[1] for t in tasks)
    live = {k: p.detach().clone().requires_grad_(True) for k, p in params.items()}
    adam = torch.optim.Adam(live.values(), lr=0.01, betas=(0.0, 0.999), eps=1e-8)
    for k, p in live.items():
        adam.state[p] = {"step": kept["inner_adam.t"].clone(), "exp_avg": kept[f"inner_adam.m_{k.replace('.', '-')}"].clone(),
                         "exp_avg_sq": kept[f"inner_adam.v_{k.replace('.', '-')}"].clone()}
    for _ in range(4):
        adam.zero_grad()
        (F.mse_loss(functional_call(model, live, (sx,)), sy) * len(sx)).backward()
        adam.step()
    want = F.mse_loss(functional_call(model, live, (qx,)), qy)
    torch.testing.assert_close(first.loss[4, 1], want.detach(), rtol=1e-9, atol=1e-12)


def test_reptile_evaluation_minibatches_follow_one_fixed_plan():
    model = MLP(1, 1, (8,), "tanh").double()
    reptile = algorithm("reptile", model, F.mse_loss, inner_optimizer="sgd", inner_lr=0.02, eval_inner_batch=3,
                        inner_loss="mean")
    plan = reptile.eval_plan(5)
    assert plan.shape[1] == 3 and sorted(plan.flatten()[:5].tolist()) == list(range(5))  # passes of the 5
    assert torch.equal(plan, reptile.eval_plan(5))  # fixed: the same for every task and every evaluation
    tasks = Family().sample(2, 5, 4, torch.Generator().manual_seed(3)).tasks
    params = dict(model.named_parameters())
    got = reptile.curve(params, tasks, lambda out, y: F.mse_loss(out, y), 3).loss[3]
    for t in range(2):
        w = {k: p.detach().clone() for k, p in params.items()}
        for i in range(3):
            x, y = tasks.support_x[t][plan[i]], tasks.support_y[t][plan[i]]
            g = torch.func.grad(lambda q, x=x, y=y: F.mse_loss(functional_call(model, q, (x,)), y))(w)
            w = {k: w[k] - 0.02 * g[k] for k in w}
        torch.testing.assert_close(got[t], F.mse_loss(functional_call(model, w, (tasks.query_x[t],)), tasks.query_y[t]))


def test_reptile_summed_loss_scales_an_sgd_step_by_the_minibatch():
    model = MLP(1, 1, (8,)).double()
    tasks = Family().sample(2, 6, 0, torch.Generator().manual_seed(4)).tasks
    params = dict(model.named_parameters())
    kw = dict(inner_optimizer="sgd", inner_steps=1, inner_batch="null", train_shots="null")
    summed = algorithm("reptile", model, F.mse_loss, inner_lr=0.001, inner_loss="sum", **kw)
    mean = algorithm("reptile", model, F.mse_loss, inner_lr=0.006, inner_loss="mean", **kw)
    assert gc.relative_error(gc.outer_gradient(summed, params, tasks, "loop"),
                             gc.outer_gradient(mean, params, tasks, "loop")) <= 1e-12


def test_metarun_sgd_makes_torch_sgds_updates():
    """With a number for its rate, bit for bit; with a tensor rate under a LinearLR schedule (how a
    graphed Reptile runs), the same to rounding."""
    torch.manual_seed(0)
    start = [torch.randn(4, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(5)]

    def run(make, tensor_lr=False):
        params = [p.clone().requires_grad_(True) for p in start]
        lr = torch.tensor(0.5, dtype=torch.float64) if tensor_lr else 0.5
        opt = make(params, lr=lr, weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.0, total_iters=5)
        for g in grads:
            for p, gi in zip(params, g):
                p.grad = gi.clone()
            opt.step()
            schedule.step()
        return [p.detach() for p in params]

    want = run(torch.optim.SGD)
    assert all(torch.equal(a, b) for a, b in zip(run(SGD), want))
    for a, b in zip(run(SGD, tensor_lr=True), want):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-15)


# --- every algorithm: transductive or not ---------------------------------------------------------

@pytest.mark.parametrize("name", ["maml", "anil", "metasgd", "mamlpp", "reptile", "imaml"])
def test_every_algorithm_predicts_the_queries_transductively_or_each_with_the_support_set(name):
    """Non-transductive: each query example in one batch with the support set, by hand; the same
    adaptation gives both modes in one curve; with batch norm the modes differ."""
    make_model, make_tasks, loss_fn, lr = CASES["conv4_omniglot"]
    model, tasks = make_model(), make_tasks()
    params = dict(model.named_parameters())
    alg = algorithm(name, model, loss_fn, inner_lr=lr / 10, inner_steps=2)
    sx, qx = tasks.support_x[0], tasks.query_x[0]
    alone = alg.query_outputs(params, sx, qx, transductive=False)
    for j in range(len(qx)):
        torch.testing.assert_close(alone[j], functional_call(model, params, (torch.cat([sx, qx[j:j + 1]]),))[-1])
    together = alg.query_outputs(params, sx, qx, transductive=True)
    assert not torch.allclose(alone, together)  # batch norm sees other statistics
    metric = lambda out, y: loss_fn(out, y)  # noqa: E731
    both = alg.curve(params, tasks, metric, 2, transductive=True, other_at=(0, 2))
    flipped = alg.curve(params, tasks, metric, 2, transductive=False)
    torch.testing.assert_close(both.other[[0, 2]], flipped.metric[[0, 2]], rtol=1e-10, atol=1e-12)
    assert torch.isnan(both.other[1]).all()  # asked at 0 and 2 steps only


# --- iMAML ----------------------------------------------------------------------------------------

def pulled_back_phi(model, tasks, lr, steps, lam):
    """The authors' inner solver by hand on the ridge problem: plain SGD steps on the support loss,
    then one step on lam / 2 ||phi - theta||^2."""
    theta = model.weight.detach()[0]
    x, y = tasks.support_x[0], tasks.support_y[0, :, 0]
    phi = theta.clone()
    for _ in range(steps):
        phi = phi - lr * 2 * x.T @ (x @ phi - y) / len(y)
    return phi - lr * lam * (phi - theta)


@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_imaml_damped_system_is_the_authors_on_ridge_regression(batching):
    model, tasks = ridge_problem()
    lam, damping, lam_damping, lr, steps = 2.0, 1.0, 10.0, 0.1, 7
    phi = pulled_back_phi(model, tasks, lr, steps, lam)
    x, qx, qy = tasks.support_x[0], tasks.query_x[0], tasks.query_y[0, :, 0]
    h = 2 * x.T @ x / len(x)
    g = 2 * qx.T @ (qx @ phi - qy) / len(qy)
    eye = torch.eye(len(phi), dtype=phi.dtype)
    want = torch.linalg.solve((1 + damping) * eye + h / (lam + lam_damping), g)
    imaml = algorithm("imaml", model, F.mse_loss, inner_lr=lr, inner_steps=steps, lam=lam, cg_iterations=4,
                      inner_solver="sgd_pullback", system="damped", cg_damping=damping, lam_damping=lam_damping)
    got = gc.outer_gradient(imaml, dict(model.named_parameters()), tasks, batching)["weight"][0]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)  # CG is exact in dim = 4 steps
    paper = algorithm("imaml", model, F.mse_loss, inner_lr=lr, inner_steps=steps, lam=lam, cg_iterations=4,
                      inner_solver="sgd_pullback", system="paper")
    other = gc.outer_gradient(paper, dict(model.named_parameters()), tasks, batching)["weight"][0]
    torch.testing.assert_close(other, torch.linalg.solve(eye + h / lam, g), rtol=1e-10, atol=1e-13)


def test_imaml_evaluation_adapts_with_test_lam():
    """The authors adapt test tasks with plain SGD (lambda 0); test_lam=null keeps lam, and then the
    evaluation's weights are the training's (pulled back)."""
    make_model, make_tasks, loss_fn, _ = CASES["mlp_tanh"]
    model, tasks = make_model(), make_tasks()
    params = dict(model.named_parameters())
    plain = algorithm("imaml", model, loss_fn, inner_lr=0.05, inner_steps=3, test_lam=0.0)
    maml = algorithm("maml", model, loss_fn, inner_lr=0.05, inner_steps=3)
    metric = lambda out, y: loss_fn(out, y)  # noqa: E731
    torch.testing.assert_close(plain.curve(params, tasks, metric, 3).loss, maml.curve(params, tasks, metric, 3).loss,
                               rtol=1e-12, atol=1e-14)
    same = algorithm("imaml", model, loss_fn, inner_lr=0.05, inner_steps=3, test_lam="null", lam=2.0)
    evaluated = same.curve(params, tasks, metric, 3).loss[3]
    trained = torch.stack([same.task_direction(params, *task, "autograd")[1] for task in zip(*tasks)])
    torch.testing.assert_close(evaluated, trained, rtol=1e-12, atol=1e-14)
