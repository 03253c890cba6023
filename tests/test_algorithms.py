"""Every algorithm behind the seam, in float64: vmap against the per-task loop, the outer gradient
against finite differences, and the identities that pin each one down (ANIL is MAML with a frozen
body, Meta-SGD with equal rates is MAML, MAML++ with every feature off is MAML, Reptile's update
equals a hand computation, iMAML's meta-gradient equals the exact implicit gradient of a problem
whose inner optimum has a closed form)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metarun.algorithms import ALGORITHMS
from metarun.algorithms.anil import head_parameters
from metarun.algorithms.base import PREFIX
from metarun.meta import gradcheck as gc
from metarun.models import MLP
from metarun.types import TaskBatch
from tests.test_meta_gradients import CASES, algorithm, sinusoid_tasks

pytestmark = pytest.mark.unit

SUPERVISED = sorted(ALGORITHMS)
GRADIENT_BASED = ["maml", "fomaml", "anil", "metasgd", "mamlpp"]  # the outer direction is a gradient


def settings(name: str, model_case: str, lr: float) -> dict:
    """Small, fast values of each algorithm for the harness (two inner steps where it has any)."""
    values = {"inner_lr": lr, "inner_steps": 2}
    if name == "mamlpp":  # every feature on (the sinusoid paper file, which the harness composes, fixes the rates)
        values["learned_rates"] = "true"
        values["per_step_norm"] = str(model_case in ("mlp_bn_images", "conv4_omniglot", "conv4_maxpool",
                                                        "resnet12")).lower()
    if name == "imaml":
        values.update(inner_steps=3, cg_iterations=3)
    if name == "reptile":
        values["inner_lr"] = lr / 10  # the Adam inner steps move every weight by about the rate
    return values


@pytest.fixture(params=sorted(CASES))
def case(request):
    make_model, make_tasks, loss_fn, lr = CASES[request.param]
    model = make_model()
    return request.param, model, dict(model.named_parameters()), make_tasks(), loss_fn, lr


@pytest.mark.parametrize("name", SUPERVISED)
def test_vmap_matches_the_loop_for_every_algorithm(case, name):
    model_case, model, params, tasks, loss_fn, lr = case
    tolerance = 1e-9 if name == "imaml" else 1e-10  # conjugate gradient magnifies the rounding a little
    assert gc.vmap_vs_loop(algorithm(name, model, loss_fn, **settings(name, model_case, lr)), params, tasks) <= tolerance


@pytest.mark.parametrize("name", ["anil", "metasgd", "mamlpp"])
def test_the_loop_matches_finite_differences(case, name):
    """In every meta-parameter, the algorithm's own (Meta-SGD's rates, MAML++'s rates and norm weights)
    included."""
    model_case, model, params, tasks, loss_fn, lr = case
    alg = algorithm(name, model, loss_fn, **settings(name, model_case, lr))
    if name != "anil":
        with torch.no_grad():  # move the learned rates off their common start, so that each matters
            for p in alg.parameters():
                p.mul_(1 + 0.1 * torch.rand(p.shape, generator=torch.Generator().manual_seed(1), dtype=p.dtype))
        assert any(k.startswith(PREFIX) for k in gc.outer_gradient(alg, params, tasks, "loop"))
    assert gc.loop_vs_finite_differences(alg, params, tasks) <= 1e-6


def rated_maml(model, loss_fn, rates):
    """MAML whose inner rate is a given dict per parameter (the one inner step takes that too)."""
    maml = algorithm("maml", model, loss_fn, inner_steps=2)
    maml.inner_rate = lambda step: rates
    return maml


def test_anil_is_maml_with_the_bodys_rate_at_zero(case):
    _, model, params, tasks, loss_fn, lr = case
    head = head_parameters(model)
    anil = algorithm("anil", model, loss_fn, inner_lr=lr, inner_steps=2)
    frozen = rated_maml(model, loss_fn, {k: (lr if k in head else 0.0) for k in params})
    assert anil.adapted == frozenset(head) and len(head) < len(params)
    assert gc.relative_error(gc.outer_gradient(anil, params, tasks, "vmap"),
                             gc.outer_gradient(frozen, params, tasks, "vmap")) <= 1e-12
    # and the body does learn, through the head's adaptation
    body = [k for k in params if k not in head]
    assert max(float(gc.outer_gradient(anil, params, tasks, "vmap")[k].abs().max()) for k in body) > 0


def test_metasgd_with_every_rate_at_alpha_is_maml(case):
    _, model, params, tasks, loss_fn, lr = case
    metasgd = algorithm("metasgd", model, loss_fn, inner_lr=lr, inner_steps=2)
    maml = algorithm("maml", model, loss_fn, inner_lr=lr, inner_steps=2)
    got, want = gc.outer_gradient(metasgd, params, tasks, "vmap"), gc.outer_gradient(maml, params, tasks, "vmap")
    assert gc.relative_error({k: got[k] for k in want}, want) <= 1e-12
    assert {k for k in got if k.startswith(PREFIX)} == {f"{PREFIX}rates.{k.replace('.', '-')}" for k in params}


def test_mamlpp_with_every_feature_off_is_maml(case):
    _, model, params, tasks, loss_fn, lr = case
    off = dict(multi_step_loss="false", learned_rates="false", per_step_norm="false", first_order_epochs=0)
    mamlpp = algorithm("mamlpp", model, loss_fn, inner_lr=lr, inner_steps=2, **off)
    maml = algorithm("maml", model, loss_fn, inner_lr=lr, inner_steps=2)
    assert list(mamlpp.parameters()) == []
    assert gc.relative_error(gc.outer_gradient(mamlpp, params, tasks, "vmap"),
                             gc.outer_gradient(maml, params, tasks, "vmap")) == 0.0


def test_mamlpp_multi_step_loss_weights_follow_the_reference_schedule():
    from metarun.algorithms.mamlpp import step_loss_weights

    assert step_loss_weights(5, 0, 10) == pytest.approx([0.2] * 5)
    assert step_loss_weights(5, 5, 10) == pytest.approx([0.1] * 4 + [0.6])
    assert step_loss_weights(5, 9, 10) == pytest.approx([0.02] * 4 + [0.92])
    assert step_loss_weights(5, 10, 10) == [0.0] * 4 + [1.0]  # after the MSL epochs: the last step only
    assert all(sum(step_loss_weights(5, e, 15)) == pytest.approx(1.0) for e in range(16))


def test_mamlpp_step_weights_are_exact_in_the_parameters_dtype_from_the_start():
    from metarun.algorithms.mamlpp import step_loss_weights

    model = MLP(1, 1, (8,)).double()
    mamlpp = algorithm("mamlpp", model, F.mse_loss, inner_steps=3, per_step_norm="false", multi_step_loss_epochs=7)
    assert mamlpp.loss_weights.dtype == torch.float64
    assert mamlpp.loss_weights.tolist() == step_loss_weights(3, 0, 7)  # exactly: 1/3 each, not float32's 1/3


def test_mamlpp_follows_its_schedules_per_iteration():
    model = MLP(1, 1, (8,)).double()
    mamlpp = algorithm("mamlpp", model, F.mse_loss, inner_steps=5, per_step_norm="false", multi_step_loss_epochs=2,
                       first_order_epochs=1, iterations_per_epoch=10)
    assert mamlpp.first_order and mamlpp.msl_active  # epoch 0: first order, multi-step loss
    mamlpp.on_iteration(10)
    assert not mamlpp.first_order and mamlpp.msl_active
    assert mamlpp.loss_weights.tolist() == pytest.approx([0.1] * 4 + [0.6])
    mamlpp.on_iteration(20)
    assert not mamlpp.msl_active and mamlpp.graph_key() == (False, False)


def test_reptile_update_equals_a_hand_computation():
    """A linear model y = w x + b with plain SGD inner steps: each step and the average by hand."""
    torch.manual_seed(0)
    model = MLP(1, 1, ()).double()  # one linear layer
    params = dict(model.named_parameters())
    tasks = sinusoid_tasks(num_tasks=3, shots=4, queries=3)
    reptile = algorithm("reptile", model, F.mse_loss, inner_optimizer="sgd", inner_lr=0.05, inner_steps=3,
                        inner_loss="mean", inner_batch="null")
    got, _ = reptile.outer_gradient(params, tasks, "loop")
    fast = []
    for sx, sy, qx, qy in zip(*tasks):
        x, y = torch.cat([sx, qx])[:, 0], torch.cat([sy, qy])[:, 0]
        w, b = params["net.0.weight"].detach().item(), params["net.0.bias"].detach().item()
        for _ in range(3):
            residual = w * x + b - y  # d/dw mean(r^2) = 2 mean(r x), d/db = 2 mean(r)
            w, b = w - 0.05 * float(2 * (residual * x).mean()), b - 0.05 * float(2 * residual.mean())
        fast.append((w, b))
    mean_w, mean_b = (sum(f[i] for f in fast) / 3 for i in (0, 1))
    assert float(got["net.0.weight"]) == pytest.approx(params["net.0.weight"].item() - mean_w, rel=1e-12)
    assert float(got["net.0.bias"]) == pytest.approx(params["net.0.bias"].item() - mean_b, rel=1e-12)


def test_reptile_adam_inner_loop_is_torch_adam_with_beta1_zero():
    # (on an MLP: a conv bias before batch norm has a gradient of pure rounding noise, which Adam's
    # normalisation magnifies, so two correct implementations differ there by 1e-9)
    make_model, make_tasks, loss_fn, _ = CASES["mlp_tanh"]
    model, tasks = make_model(), make_tasks()
    reptile = algorithm("reptile", model, loss_fn, inner_optimizer="adam", inner_lr=0.01, inner_steps=4,
                        inner_loss="mean", inner_batch="null", carry_adam_state="false")
    sx, sy, qx, qy = (t[0] for t in tasks)
    x, y = torch.cat([sx, qx]), torch.cat([sy, qy])
    reference = {k: p.detach().clone().requires_grad_(True) for k, p in model.named_parameters()}
    adam = torch.optim.Adam(reference.values(), lr=0.01, betas=(0.0, 0.999), eps=1e-8)
    for _ in range(4):
        adam.zero_grad()
        loss_fn(torch.func.functional_call(model, reference, (x,)), y).backward()
        adam.step()
    direction, _ = reptile.outer_gradient(dict(model.named_parameters()), TaskBatch(*(t[:1] for t in tasks)), "loop")
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.detach() - direction[k], reference[k].detach(), rtol=1e-10, atol=1e-12)


def ridge_problem(dim=4, n=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(dim, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, dim, generator=gen, dtype=torch.float64))
    sx, qx = (torch.randn(1, n, dim, generator=gen, dtype=torch.float64) for _ in range(2))
    sy, qy = (torch.randn(1, n, 1, generator=gen, dtype=torch.float64) for _ in range(2))
    return model, TaskBatch(sx, sy, qx, qy)


def exact_implicit_gradient(model, tasks, lam):
    """For L(phi) = mean((X phi - y)^2): phi* = (2 X'X / n + lam I)^-1 (2 X'y / n + lam theta), and
    the meta-gradient is (d phi* / d theta)' grad L_query(phi*) = lam (H + lam I)^-1 g, H = 2 X'X / n."""
    theta = model.weight.detach()[0]
    x, y, qx, qy = tasks.support_x[0], tasks.support_y[0, :, 0], tasks.query_x[0], tasks.query_y[0, :, 0]
    n, eye = len(y), torch.eye(len(theta), dtype=theta.dtype)
    h = 2 * x.T @ x / n
    phi = torch.linalg.solve(h + lam * eye, 2 * x.T @ y / n + lam * theta)
    g = 2 * qx.T @ (qx @ phi - qy) / len(qy)
    return lam * torch.linalg.solve(h + lam * eye, g)


@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_imaml_meta_gradient_is_the_exact_implicit_gradient_on_ridge_regression(batching):
    """The paper's solver and system."""
    model, tasks = ridge_problem()
    exact = exact_implicit_gradient(model, tasks, lam=2.0)
    errors = []
    for cg in (1, 2, 4):
        imaml = algorithm("imaml", model, F.mse_loss, inner_lr=0.1, inner_steps=400, lam=2.0, cg_iterations=cg,
                          inner_solver="proximal_gd", system="paper", backtracking=0)
        got = gc.outer_gradient(imaml, dict(model.named_parameters()), tasks, batching)["weight"][0]
        errors.append(float((got - exact).abs().max() / exact.abs().max()))
    assert errors[-1] <= 1e-10  # conjugate gradient is exact in `dim` = 4 steps
    assert errors[0] > errors[1] > errors[2]  # and approaches it as its steps grow


def test_imaml_backtracking_reaches_the_exact_implicit_gradient_where_plain_steps_diverge():
    """``backtracking``: on a task whose curvature is too high for inner_lr, plain gradient steps on
    the proximal objective diverge; the safeguarded steps (the longest of lr, lr/2, ... that does not
    raise it) converge to its minimum, so the meta-gradient is the exact implicit one, the same under
    vmap and the loop; where lr is safe they are the plain steps, bit for bit."""
    lam = 2.0
    model, one = ridge_problem()
    tasks = TaskBatch(*(torch.cat([t, t.flip(1) * 1.5]) for t in one))  # two tasks, two curvatures
    x = tasks.support_x[1]
    top = float(torch.linalg.eigvalsh(2 * x.T @ x / len(x)).max()) + lam  # the proximal objective's largest curvature
    values = dict(inner_steps=300, lam=lam, cg_iterations=4, inner_solver="proximal_gd", system="paper")
    params = dict(model.named_parameters())
    plain = gc.outer_gradient(algorithm("imaml", model, F.mse_loss, inner_lr=3.0 / top, backtracking=0, **values),
                              params, tasks, "loop")
    assert not (plain["weight"].abs() < 1e30).all()  # 3 / L: every step multiplies the top direction by -2
    safe = algorithm("imaml", model, F.mse_loss, inner_lr=3.0 / top, backtracking=4, **values)
    exact = torch.stack([exact_implicit_gradient(model, TaskBatch(*(t[i:i + 1] for t in tasks)), lam) for i in (0, 1)])
    for batching in ("vmap", "loop"):
        got = gc.outer_gradient(safe, params, tasks, batching)["weight"][0]
        # to the precision a test on the objective's values allows: near the minimum a step changes it
        # by less than its rounding, so phi stops within about sqrt(float64 eps) (plain steps: 1e-10 above)
        assert float((got - exact.mean(0)).abs().max() / exact.abs().max()) <= 1e-8, batching
    state = safe.start(params, lam)  # and each step lowers the objective (or stays)
    objective = []
    for i in range(8):
        phi = {k: v.detach() for k, v in state["params"].items()}
        objective.append(float(F.mse_loss(phi["weight"] @ x.T, tasks.support_y[1, :, 0][None])
                               + lam / 2 * ((phi["weight"] - params["weight"].detach()) ** 2).sum()))
        state = safe.adapt_step(state, x, tasks.support_y[1], i)
    assert all(b <= a for a, b in zip(objective, objective[1:])) and objective[-1] < objective[0]
    small = dict(values, inner_steps=20)
    for solver in ("proximal_gd", "sgd_pullback"):
        a = gc.outer_gradient(algorithm("imaml", model, F.mse_loss, inner_lr=0.05, backtracking=0,
                                        **dict(small, inner_solver=solver)), params, tasks, "vmap")
        b = gc.outer_gradient(algorithm("imaml", model, F.mse_loss, inner_lr=0.05, backtracking=4,
                                        **dict(small, inner_solver=solver)), params, tasks, "vmap")
        assert torch.equal(a["weight"], b["weight"]), solver


def test_every_algorithms_evaluation_adapts_as_its_training_does(case):
    """The evaluation path (the curve) and the training path (the outer loss) share the inner step:
    the query loss after the training steps is the same number on both."""
    model_case, model, params, tasks, loss_fn, lr = case
    for name in ("maml", "anil", "metasgd", "mamlpp"):
        values = {**settings(name, model_case, lr), "first_order": "true"}
        if name == "mamlpp":
            values["multi_step_loss"] = "false"
        alg = algorithm(name, model, loss_fn, **values)
        trained = alg.outer_loss(params, tasks, "vmap").task_losses
        evaluated = alg.curve(params, tasks, lambda out, y: out.sum(), alg.inner_steps).loss[alg.inner_steps]
        torch.testing.assert_close(evaluated, trained.detach(), rtol=1e-10, atol=1e-12, msg=name)
