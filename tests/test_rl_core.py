"""MAML-TRPO maths against independent references (float64), and the 2D-navigation task."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch.func import functional_call

from metarun.envs.navigation2d import Navigation2DTasks
from metarun.meta import gradcheck as gc
from metarun.meta import hvp, hvp_operator
from metarun.meta import policy_gradient as pg
from metarun.meta.trpo import conjugate_gradient, flatten, trpo_step, unflatten
from metarun.models import GaussianPolicy
from metarun.utils.errors import MetarunError

pytestmark = pytest.mark.unit


def tiny_policy(hidden=(6,), seed=0):
    torch.manual_seed(seed)
    return GaussianPolicy(3, 2, hidden, "tanh", init_std=0.7).double()


def fixed_rollouts(tasks=3, trajectories=4, horizon=5, seed=0) -> pg.Rollouts:
    """Deterministic 'trajectories' (the maths does not care where they came from)."""
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(tasks, trajectories, horizon, 3, generator=g, dtype=torch.float64)
    actions = torch.randn(tasks, trajectories, horizon, 2, generator=g, dtype=torch.float64)
    rewards = torch.randn(tasks, trajectories, horizon, generator=g, dtype=torch.float64)
    mask = torch.ones(tasks, trajectories, horizon, dtype=torch.float64)
    mask[:, 0, 3:] = 0  # one episode ends early
    return pg.Rollouts(obs, actions, rewards, mask)


def meta_batch(policy, params, inner_lr=0.1):
    pre, post = fixed_rollouts(seed=0), fixed_rollouts(seed=1)
    pre_adv, post_adv = pg.advantages(pre), pg.advantages(post)
    fast = pg.adapt_tasks(policy, params, pre, pre_adv, inner_lr)
    fast = {k: v.detach() for k, v in fast.items()}
    return pg.MetaBatch(pre, pre_adv, post, post_adv, *pg.old_policy_stats(policy, fast, post))


def test_discounted_sum_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    out = pg.discounted_sum(values, mask, 0.5)
    assert out.tolist() == [[1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3.0, 0.0]]


def test_log_prob_matches_torch_distributions():
    policy = tiny_policy()
    params = dict(policy.named_parameters())
    obs, actions = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)
    mean = functional_call(policy, params, (obs,))
    ref = torch.distributions.Normal(mean, params["log_std"].exp()).log_prob(actions).sum(-1)
    torch.testing.assert_close(pg.log_prob(policy, params, obs, actions), ref)


def test_gaussian_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2, s1, s2 = (torch.randn(5, 2, generator=g, dtype=torch.float64) for _ in range(4))
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, s1.exp()),
                                            torch.distributions.Normal(m2, s2.exp())).sum(-1)
    torch.testing.assert_close(pg.gaussian_kl(m1, s1, m2, s2), ref)


def test_baseline_fits_what_is_linear_in_its_features():
    rollouts = fixed_rollouts()
    features = pg.baseline_features(rollouts.observations, rollouts.mask)
    w = torch.randn(features.shape[-1], dtype=torch.float64)
    target = (features @ w) * rollouts.mask
    fitted = pg.fit_baseline(features[0], target[0], rollouts.mask[0], reg=1e-10)
    torch.testing.assert_close(fitted, target[0], rtol=1e-6, atol=1e-6)


def test_advantages_are_normalized_per_task_within_the_mask():
    rollouts = fixed_rollouts()
    adv = pg.advantages(rollouts)
    m = rollouts.mask
    mean = (adv * m).sum(dim=(1, 2)) / m.sum(dim=(1, 2))
    torch.testing.assert_close(mean, torch.zeros(3, dtype=torch.float64), atol=1e-10, rtol=0)
    assert (adv[m == 0] == 0).all()


def test_conjugate_gradient_solves_an_spd_system():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 8, generator=g, dtype=torch.float64)
    spd = a @ a.T + 8 * torch.eye(8, dtype=torch.float64)
    b = torch.randn(8, generator=g, dtype=torch.float64)
    x = conjugate_gradient(lambda v: spd @ v, b, iterations=8)
    torch.testing.assert_close(x, torch.linalg.solve(spd, b), rtol=1e-8, atol=1e-10)


def test_fisher_vector_product_matches_dense_fisher_of_a_linear_policy():
    """For a linear Gaussian policy, the Hessian of the mean KL at the old parameters is the
    Fisher matrix, known in closed form: for the mean weights E[s s^T] / sigma^2 per action
    dimension, for the log-stds 2 on the diagonal."""
    torch.manual_seed(0)
    policy = GaussianPolicy(3, 2, (), init_std=0.5).double()
    params = {k: p.detach() for k, p in policy.named_parameters()}
    obs = torch.randn(50, 3, dtype=torch.float64)
    old_mean = functional_call(policy, params, (obs,)).detach()

    def mean_kl(p):
        return pg.gaussian_kl(old_mean, params["log_std"], functional_call(policy, p, (obs,)), p["log_std"]).mean()

    names = list(params)
    dense = gc.dense_hessian(mean_kl, params)
    # closed form, in the flattened order of `params`
    x = torch.cat([obs, torch.ones(50, 1, dtype=torch.float64)], dim=1)
    second_moment = x.T @ x / 50
    inv_var = torch.exp(-2 * params["log_std"])
    blocks = {}
    for i in range(2):  # action dim i: weight row i and bias i
        blocks[i] = second_moment * inv_var[i]
    sizes = [params[k].numel() for k in names]
    expected = torch.zeros(sum(sizes), sum(sizes), dtype=torch.float64)
    offsets = dict(zip(names, torch.cumsum(torch.tensor([0] + sizes[:-1]), 0).tolist()))
    w0, b0, s0 = offsets["mean.net.0.weight"], offsets["mean.net.0.bias"], offsets["log_std"]
    for i in range(2):
        idx = [w0 + 3 * i + j for j in range(3)] + [b0 + i]
        expected[torch.tensor(idx)[:, None], torch.tensor(idx)[None, :]] = blocks[i]
        expected[s0 + i, s0 + i] = 2.0
    torch.testing.assert_close(dense, expected, rtol=1e-10, atol=1e-12)
    v = {k: torch.randn_like(p) for k, p in params.items()}
    flat_v = flatten(v)
    torch.testing.assert_close(flatten(hvp(mean_kl, params, v)), expected @ flat_v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(flatten(hvp_operator(mean_kl, params)(v)), expected @ flat_v, rtol=1e-10, atol=1e-12)


def test_meta_fisher_vector_products_agree_with_dense_hessian():
    """Through the inner step: both hvp flavours == the dense Hessian of the MAML-TRPO mean KL."""
    policy = tiny_policy(hidden=(3,))
    params = {k: p.detach() for k, p in policy.named_parameters()}
    batch = meta_batch(policy, params)

    def kl(p):
        return pg.meta_objective(policy, p, batch, 0.1)[1]

    dense = gc.dense_hessian(kl, params)
    v = {k: torch.randn_like(p) for k, p in params.items()}
    expected = dense @ flatten(v)
    torch.testing.assert_close(flatten(hvp(kl, params, v)), expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(flatten(hvp_operator(kl, params)(v)), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize(("closed_form", "activation", "hidden"), [
    (True, "tanh", (3, 4)), (True, "relu", (4, 3)), (True, "tanh", ()), (False, "tanh", (3,))])
def test_factored_meta_fisher_equals_the_dense_hessian_of_the_kl(first_order, closed_form, activation, hidden):
    """meta_curvature's mean_i J_i K_i J_i, in closed form layer by layer or by autograd, against the
    dense Hessian of the mean KL through the inner step (second order) or past it (first order), and
    against the double-backward path."""
    torch.manual_seed(1)
    policy = GaussianPolicy(3, 2, hidden, activation, init_std=0.7).double()
    params = {k: p.detach() for k, p in policy.named_parameters()}
    batch = meta_batch(policy, params)
    assert batch.pre.mask.min() == 0  # episodes that end early: the mask's weights are covered

    def kl(p):
        return pg.meta_objective(policy, p, batch, 0.1, 1, first_order)[1]

    dense = gc.dense_hessian(kl, params)
    product, gradient = pg.meta_curvature(policy, params, batch, 0.1, first_order, closed_form)
    assert (gradient is not None) == closed_form  # the closed form has its own meta-gradient
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        v = {k: torch.randn(p.shape, generator=gen, dtype=p.dtype) for k, p in params.items()}
        expected = dense @ flatten(v)
        torch.testing.assert_close(flatten(product(v)), expected, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(flatten(product(v)), flatten(hvp_operator(kl, params)(v)), rtol=1e-9, atol=1e-12)
    if not first_order:  # the inner step's curvature is in it: the first-order Fisher differs
        first = pg.meta_curvature(policy, params, batch, 0.1, True, closed_form)[0](v)
        assert (flatten(first) - expected).norm() > 1e-3 * expected.norm()


def test_meta_objective_starts_at_ratio_one_and_zero_kl():
    policy = tiny_policy()
    params = {k: p.detach() for k, p in policy.named_parameters()}
    batch = meta_batch(policy, params)
    loss, kl = pg.meta_objective(policy, params, batch, 0.1)
    expected = -torch.stack([(a * m).sum() / m.sum() for a, m in zip(batch.post_adv, batch.post.mask)]).mean()
    torch.testing.assert_close(loss, expected)
    assert abs(float(kl)) < 1e-12


@pytest.mark.parametrize("first_order", [False, True])
def test_meta_gradient_matches_finite_differences(first_order):
    """The gradient of the post-update surrogate through the inner policy-gradient step."""
    policy = tiny_policy()
    params = {k: p.detach() for k, p in policy.named_parameters()}
    batch = meta_batch(policy, params)

    def loss(p):
        return pg.meta_objective(policy, p, batch, 0.1, 1, first_order)[0]

    leaves = {k: p.clone().requires_grad_(True) for k, p in params.items()}
    grads = dict(zip(leaves, torch.autograd.grad(loss(leaves), list(leaves.values()))))
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        d = {k: torch.randn(p.shape, generator=gen, dtype=p.dtype) for k, p in params.items()}
        eps = 1e-6
        plus = loss({k: p + eps * d[k] for k, p in params.items()})
        minus = loss({k: p - eps * d[k] for k, p in params.items()})
        numeric = float((plus - minus) / (2 * eps))
        analytic = float(sum((grads[k] * d[k]).sum() for k in params))
        if first_order:  # FOMAML is not the gradient of this objective: it must differ
            continue
        assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-9)
    if first_order:
        exact = dict(zip(leaves, torch.autograd.grad(
            pg.meta_objective(policy, leaves, batch, 0.1, 1, False)[0], list(leaves.values()))))
        assert gc.relative_error(grads, exact) > 1e-4


def test_trpo_step_improves_and_respects_the_trust_region():
    policy = tiny_policy()
    params = {k: p.detach() for k, p in policy.named_parameters()}
    batch = meta_batch(policy, params)

    def objective(p):
        return pg.meta_objective(policy, p, batch, 0.1)

    new, stats = trpo_step(params, objective, max_kl=0.01)
    loss, kl = objective(new)
    assert stats.step_fraction > 0
    assert float(loss) < stats.loss_before and 0 < float(kl) <= 0.01
    assert float(kl) > 0.001  # it used the trust region, not a negligible step


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize(("activation", "hidden"), [("tanh", (3, 4)), ("relu", (4, 3)), ("tanh", ())])
def test_closed_form_meta_gradient_equals_autograds(first_order, activation, hidden):
    """ClosedFormMetaCurvature.gradient: the surrogate's gradient through the inner step (second order) or
    past it (first order) and its value, against autograd on meta_objective, at parameters that sampled
    the episodes and away from them (ratio not 1)."""
    torch.manual_seed(2)
    policy = GaussianPolicy(3, 2, hidden, activation, init_std=0.7).double()
    params = {k: p.detach() for k, p in policy.named_parameters()}
    batch = meta_batch(policy, params)
    structure = pg.mlp_layers(policy)
    for point in (params, {k: p + 0.05 * torch.randn_like(p) for k, p in params.items()}):
        leaves = {k: p.clone().requires_grad_(True) for k, p in point.items()}
        loss = pg.meta_objective(policy, leaves, batch, 0.1, 1, first_order)[0]
        expected = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
        gradient, value = pg.ClosedFormMetaCurvature(*structure, point, batch, 0.1, first_order).gradient()
        torch.testing.assert_close(value, loss.detach(), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(flatten(gradient), flatten(expected), rtol=1e-10, atol=1e-13)


def test_the_closed_form_products_take_plain_mlp_policies_only():
    """mlp_layers finds the layers of a Gaussian MLP policy; a network it cannot read in closed form (another
    activation) makes meta_curvature use autograd's products (and no gradient of its own), still exact."""
    from metarun.meta.mlp_curvature import mlp_layers

    relu = GaussianPolicy(3, 2, (4, 5), "relu")
    assert mlp_layers(relu) == ([("mean.net.0.weight", "mean.net.0.bias"), ("mean.net.2.weight", "mean.net.2.bias"),
                                 ("mean.net.4.weight", "mean.net.4.bias")], "relu")
    assert mlp_layers(tiny_policy())[1] == "tanh"
    torch.manual_seed(0)
    policy = tiny_policy()
    policy.mean.net[1] = torch.nn.Softplus()
    assert mlp_layers(policy) is None
    params = {k: p.detach() for k, p in policy.named_parameters()}
    batch = meta_batch(policy, params)
    v = {k: torch.randn_like(p) for k, p in params.items()}
    expected = hvp_operator(lambda p: pg.meta_objective(policy, p, batch, 0.1)[1], params)(v)
    product, gradient = pg.meta_curvature(policy, params, batch, 0.1)
    assert gradient is None
    torch.testing.assert_close(flatten(product(v)), flatten(expected), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("fisher", ["factored", "factored_autograd", "autograd"])
def test_maml_trpo_outer_step_with_either_fisher_product(fisher):
    """The algorithm's outer step takes the same TRPO step with the factored Fisher as with the double
    backward (float64), and keeps the parameters where they were."""
    from omegaconf import OmegaConf

    from metarun.algorithms.maml_trpo import MAMLTRPO
    from metarun.config import RLAlgorithmConfig

    policy = tiny_policy()
    params = {k: p.detach() for k, p in policy.named_parameters()}
    batch = meta_batch(policy, params)
    cfg = OmegaConf.structured(RLAlgorithmConfig(fisher=fisher))
    new, stats = MAMLTRPO(cfg, policy).outer_step(params, batch)
    reference, _ = trpo_step(params, lambda p: pg.meta_objective(policy, p, batch, 0.1), max_kl=0.01,
                             cg_damping=cfg.cg_damping)
    assert stats.step_fraction > 0
    for k in params:
        torch.testing.assert_close(new[k], reference[k], rtol=1e-8, atol=1e-10)
    with pytest.raises(MetarunError, match="algorithm.fisher=hessian: must be one of factored, factored_autograd, autograd"):
        MAMLTRPO(OmegaConf.structured(RLAlgorithmConfig(fisher="hessian")), policy)


@pytest.mark.cuda
def test_maml_trpo_outer_step_on_cuda_equals_the_cpu_step():
    """device=cuda: the episodes move to the GPU once, the TRPO step runs there, the new parameters
    come back to the CPU equal to the CPU step's (float64)."""
    from omegaconf import OmegaConf

    from metarun.algorithms.maml_trpo import MAMLTRPO
    from metarun.config import RLAlgorithmConfig

    policy = tiny_policy()
    params = {k: p.detach() for k, p in policy.named_parameters()}
    batch = meta_batch(policy, params)
    cfg = OmegaConf.structured(RLAlgorithmConfig())
    cpu, _ = MAMLTRPO(cfg, policy).outer_step(params, batch)
    gpu, stats = MAMLTRPO(cfg, policy, "cuda").outer_step(params, batch)
    assert stats.step_fraction > 0
    for k in params:
        assert gpu[k].device.type == "cpu"
        torch.testing.assert_close(gpu[k], cpu[k], rtol=1e-7, atol=1e-9)


def test_unflatten_inverts_flatten():
    params = {"a": torch.randn(2, 3), "b": torch.randn(4)}
    back = unflatten(flatten(params), params)
    assert all(torch.equal(back[k], params[k]) for k in params)


# --- 2D navigation ---------------------------------------------------------------------------------


def test_navigation_rewards_and_termination_by_hand():
    envs = Navigation2DTasks(horizon=4)
    tasks = [{"goal": [0.15, 0.0]}]
    # actions are in normalized units: 1.0 is a velocity of 0.1; the 2nd (3.0) is clipped to 1.0
    steps = iter([torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[3.0, 0.0]]]),
                  torch.tensor([[[0.0, 0.0]]]), torch.tensor([[[0.0, 0.0]]])])
    r = envs.rollout(lambda obs: next(steps), tasks, 1)
    # positions after each move: 0.1, 0.2, 0.2, 0.2 -> distances 0.05, 0.05, 0.05, 0.05
    torch.testing.assert_close(r.rewards[0, 0], torch.tensor([-0.05, -0.05, -0.05, -0.05]))
    assert r.observations[0, 0, :, 0].tolist() == pytest.approx([0.0, 0.1, 0.2, 0.2])
    assert r.mask[0, 0].tolist() == [1, 1, 1, 1]
    # an episode that reaches the goal ends there
    envs = Navigation2DTasks(horizon=4)
    r = envs.rollout(lambda obs: torch.full((1, 1, 2), 0.5), [{"goal": [0.1, 0.1]}], 1)
    assert r.mask[0, 0].tolist() == [1, 1, 0, 0]
    assert r.rewards[0, 0, 1] == pytest.approx(0.0, abs=1e-7) and (r.rewards[0, 0, 2:] == 0).all()
    assert r.rewards[0, 0, 0] == pytest.approx(-math.hypot(0.05, 0.05), rel=1e-6)


def test_navigation_tasks_are_seeded_and_in_range():
    envs = Navigation2DTasks()
    a = envs.sample_tasks(200, torch.Generator().manual_seed(0))
    b = envs.sample_tasks(200, torch.Generator().manual_seed(0))
    assert a == b
    goals = torch.tensor([t["goal"] for t in a])
    assert goals.abs().max() <= 0.5 and goals.abs().max() > 0.45


def test_baseline_fit_survives_ant_sized_batches_on_two_threads():
    """Regression: batched linalg.solve on 214x214 systems with 2 threads failed in MKL and hung
    (torch 2.13 CPU). Run in a child process with a timeout, so a hang fails instead of stalling."""
    code = """
import torch
from metarun.meta import policy_gradient as pg
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
obs, mask = torch.randn(4, 3, 8, 105, generator=g), torch.ones(4, 3, 8)
features = pg.baseline_features(obs, mask)  # 214 features, as for Ant-v5
returns = torch.randn(4, 3, 8, generator=g)
fitted = torch.func.vmap(pg.fit_baseline)(features, returns, mask)
x, y = features.double().reshape(4, -1, 214), returns.double().reshape(4, -1, 1)
gram = x.transpose(1, 2) @ x
ridge = 1e-5 * (1 + gram.diagonal(dim1=1, dim2=2).mean(-1))[:, None, None] * torch.eye(214, dtype=torch.float64)
reference = (x @ torch.stack([torch.linalg.pinv(gram[i] + ridge[i]) @ x[i].T @ y[i] for i in range(4)]))
print(float((fitted.double().reshape(4, -1) - reference.reshape(4, -1)).abs().max()))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "MKL ERROR" not in proc.stdout + proc.stderr
    assert float(proc.stdout.split()[-1]) < 1e-4
