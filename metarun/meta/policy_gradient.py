"""MAML for reinforcement learning: pure functions over a policy's parameter dict.

Trajectories are tensors ``[tasks, trajectories, horizon, ...]`` with a ``mask`` that is 1 while
an episode is alive. The pieces, as in the MAML paper's RL experiments (section 5.3):

* :func:`advantages`: discounted returns minus a linear feature baseline fitted per task
  (rllab's ``LinearFeatureBaseline``), through GAE(gamma, lambda), normalized per task;
* :func:`reinforce_loss`: the vanilla policy-gradient surrogate the inner loop descends;
* :func:`adapt_policy`: the inner loop (the one inner step, on that surrogate), second order by default;
* :func:`meta_objective`: the TRPO surrogate and mean KL of the adapted policies on the
  post-update trajectories, as functions of the meta-parameters (the inner step included), so the
  outer TRPO step (``metarun.meta.trpo``) sees the gradient through the inner update.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from metarun.meta.inner import adapt
from metarun.meta.mlp_curvature import MLPCurvature, OutputCurvature, mlp_layers
from metarun.types import Params, Rollouts


def make_act(policy: nn.Module, params: Params, generator: torch.Generator, per_task: bool):
    """The sampling function environments call: observations ``[tasks, trajectories, obs]`` ->
    Gaussian actions; ``per_task`` params carry a leading task axis (adapted policies)."""

    def act(obs: Tensor) -> Tensor:
        with torch.no_grad():
            obs = obs.to(torch.float32)
            if per_task:
                mean = vmap(lambda p, o: functional_call(policy, p, (o,)))(params, obs)
                std = params["log_std"].exp()[:, None, :]
            else:
                mean, std = functional_call(policy, params, (obs,)), params["log_std"].exp()
            return mean + std * torch.randn(mean.shape, generator=generator)

    return act


def episode_returns(rollouts: Rollouts) -> Tensor:
    """Undiscounted return of every episode, ``[tasks, trajectories]``."""
    return (rollouts.rewards * rollouts.mask).sum(dim=-1)


def discounted_sum(values: Tensor, mask: Tensor, discount: float) -> Tensor:
    """``out[t] = sum_k discount^k values[t + k]`` along the last (time) axis, within the mask."""
    out = torch.zeros_like(values)
    running = torch.zeros_like(values[..., 0])
    for t in range(values.shape[-1] - 1, -1, -1):
        running = (values[..., t] + discount * running) * mask[..., t]
        out[..., t] = running
    return out


def baseline_features(observations: Tensor, mask: Tensor) -> Tensor:
    """rllab's linear-baseline features: obs, obs^2, t, t^2, t^3 (t = step / 100), 1."""
    obs = observations.clamp(-10, 10)
    horizon = observations.shape[-2]
    t = (torch.arange(horizon, dtype=obs.dtype, device=obs.device) / 100.0).expand(obs.shape[:-1])[..., None]
    ones = torch.ones_like(t)
    return torch.cat([obs, obs**2, t, t**2, t**3, ones], dim=-1) * mask[..., None]


def fit_baseline(features: Tensor, returns: Tensor, mask: Tensor, reg: float = 1e-5) -> Tensor:
    """Ridge regression of ``returns`` on ``features`` over one task's valid steps; its predictions.

    ``features`` is ``[trajectories, horizon, F]``; works under ``vmap`` over tasks. Solved by
    Cholesky in float64 (the ridge makes the system positive definite): torch 2.13's CPU
    ``linalg.solve`` on a batch of Ant-sized systems (214 features) with 2 threads fails inside
    MKL ("Parameter 6 was incorrect on entry to SLASWP") and hangs.
    """
    x = features.reshape(-1, features.shape[-1]).double()
    y = (returns * mask).reshape(-1, 1).double()
    gram = x.T @ x
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    chol = torch.linalg.cholesky(gram + reg * eye * (1 + gram.diagonal().mean()))
    weights = torch.cholesky_solve(x.T @ y, chol)
    return (features.double() @ weights).squeeze(-1).to(features.dtype) * mask


def advantages(rollouts: Rollouts, discount: float = 0.99, gae_lambda: float = 1.0, normalize: bool = True) -> Tensor:
    """Per-step advantages ``[tasks, trajectories, horizon]``, no gradient: GAE over a linear
    baseline fitted separately for each task, normalized to zero mean and unit variance per task."""
    with torch.no_grad():
        obs, _, rewards, mask = rollouts
        returns = discounted_sum(rewards, mask, discount)
        values = vmap(fit_baseline)(baseline_features(obs, mask), returns, mask)
        next_values = torch.cat([values[..., 1:], torch.zeros_like(values[..., :1])], dim=-1)
        deltas = (rewards + discount * next_values - values) * mask
        adv = discounted_sum(deltas, mask, discount * gae_lambda)
        if normalize:
            count = mask.sum(dim=(1, 2), keepdim=True)
            mean = adv.sum(dim=(1, 2), keepdim=True) / count
            var = (((adv - mean) * mask) ** 2).sum(dim=(1, 2), keepdim=True) / count
            adv = (adv - mean) / (var.sqrt() + 1e-8) * mask
        return adv


def log_prob(policy: nn.Module, params: Params, observations: Tensor, actions: Tensor) -> Tensor:
    """Log-density of ``actions`` under the diagonal Gaussian policy, summed over action dims."""
    return gaussian_log_prob(functional_call(policy, params, (observations,)), params["log_std"], actions)


def gaussian_log_prob(mean: Tensor, log_std: Tensor, actions: Tensor) -> Tensor:
    """:func:`log_prob` from the policy's mean, for callers that need the mean too."""
    z = (actions - mean) * torch.exp(-log_std)
    return (-0.5 * z**2 - log_std - 0.5 * math.log(2 * math.pi)).sum(dim=-1)


def gaussian_kl(mean_p: Tensor, log_std_p: Tensor, mean_q: Tensor, log_std_q: Tensor) -> Tensor:
    """KL(p || q) of diagonal Gaussians, summed over the last axis."""
    var_p, var_q = torch.exp(2 * log_std_p), torch.exp(2 * log_std_q)
    return (log_std_q - log_std_p + (var_p + (mean_p - mean_q) ** 2) / (2 * var_q) - 0.5).sum(dim=-1)


def reinforce_loss(policy: nn.Module, params: Params, observations: Tensor, actions: Tensor,
                   adv: Tensor, mask: Tensor) -> Tensor:
    """The vanilla policy-gradient surrogate ``-mean(log pi(a|s) * A)`` over one task's valid steps."""
    return -(log_prob(policy, params, observations, actions) * adv * mask).sum() / mask.sum()


def adapt_policy(policy: nn.Module, params: Params, observations: Tensor, actions: Tensor, adv: Tensor,
                 mask: Tensor, inner_lr: float, inner_steps: int = 1, first_order: bool = False) -> Params:
    """The inner loop for one task: SGD on the REINFORCE surrogate of its trajectories (the one
    inner step of :mod:`metarun.meta.inner`)."""
    return adapt(lambda p: reinforce_loss(policy, p, observations, actions, adv, mask),
                 params, [inner_lr] * inner_steps, first_order)


def adapt_tasks(policy: nn.Module, params: Params, rollouts: Rollouts, adv: Tensor, inner_lr: float,
                inner_steps: int = 1, first_order: bool = False, per_task: bool = False) -> Params:
    """:func:`adapt_policy` for every task at once (vmap); returns parameters with a task axis.
    ``per_task``: ``params`` already have one (each task adapts its own policy further)."""
    obs, actions, _, mask = rollouts

    def one(p, o, a, ad, m):
        return adapt_policy(policy, p, o, a, ad, m, inner_lr, inner_steps, first_order)

    return vmap(one, in_dims=(0 if per_task else None, 0, 0, 0, 0))(params, obs, actions, adv, mask)


class MetaBatch(NamedTuple):
    """What the outer step of MAML-TRPO needs, all fixed while it searches."""

    pre: Rollouts  # trajectories of the meta-policy (the inner step's data)
    pre_adv: Tensor
    post: Rollouts  # trajectories of the adapted policies (the outer objective's data)
    post_adv: Tensor
    old_log_prob: Tensor  # log pi_old'(a|s) on post, [tasks, trajectories, horizon]
    old_mean: Tensor  # mean of pi_old' on post, [tasks, trajectories, horizon, act_dim]
    old_log_std: Tensor  # log-std of pi_old', [tasks, act_dim]


def meta_objective(policy: nn.Module, params: Params, batch: MetaBatch, inner_lr: float, inner_steps: int = 1,
                   first_order: bool = False) -> tuple[Tensor, Tensor]:
    """The MAML-TRPO surrogate loss and mean KL, as functions of the meta-parameters.

    For each task: adapt ``params`` on its pre-update trajectories, then on its post-update
    trajectories take ``-mean(ratio * A)`` with ``ratio = pi'(a|s) / pi_old'(a|s)`` and the mean
    KL(pi_old' || pi'). Both are averaged over tasks. At ``params`` equal to the parameters that
    sampled the data, the ratio is 1 and the KL is 0.
    """

    def one(pre_o, pre_a, pre_ad, pre_m, o, a, ad, m, old_lp, old_mean, old_ls):
        fast = adapt_policy(policy, params, pre_o, pre_a, pre_ad, pre_m, inner_lr, inner_steps, first_order)
        mean = functional_call(policy, fast, (o,))  # one forward pass for the ratio and the KL
        ratio = torch.exp(gaussian_log_prob(mean, fast["log_std"], a) - old_lp)
        loss = -(ratio * ad * m).sum() / m.sum()
        kl = (gaussian_kl(old_mean, old_ls, mean, fast["log_std"]) * m).sum() / m.sum()
        return loss, kl

    pre, post = batch.pre, batch.post
    losses, kls = vmap(one)(pre.observations, pre.actions, batch.pre_adv, pre.mask, post.observations,
                            post.actions, batch.post_adv, post.mask, batch.old_log_prob, batch.old_mean,
                            batch.old_log_std)
    return losses.mean(), kls.mean()


def meta_curvature(policy: nn.Module, params: Params, batch: MetaBatch, inner_lr: float, first_order: bool = False,
                   closed_form: bool = True) -> tuple[Callable[[Params], Params], Callable[[], tuple[Params, Tensor]] | None]:
    """MAML-TRPO's Fisher-vector product at ``params`` (one inner step) and, where it has one, a cheaper exact
    meta-gradient (``() -> (gradient, surrogate loss)``) for :func:`metarun.meta.trpo.trpo_step`.

    ``closed_form`` (default), when the policy's mean is a plain MLP: both in closed form layer by layer
    (:class:`ClosedFormMetaCurvature`), about half the time of autograd's; otherwise, or with
    ``closed_form=False``, :func:`meta_fisher_operator`'s products by autograd and no gradient (None:
    ``trpo_step`` takes it by autograd).
    """
    structure = mlp_layers(policy) if closed_form else None
    if structure is None:
        return meta_fisher_operator(policy, params, batch, inner_lr, first_order), None
    curvature = ClosedFormMetaCurvature(*structure, params, batch, inner_lr, first_order)
    return curvature.fisher, curvature.gradient


def meta_fisher_operator(policy: nn.Module, params: Params, batch: MetaBatch, inner_lr: float,
                         first_order: bool = False) -> Callable[[Params], Params]:
    """``v -> F v``: the Hessian of :func:`meta_objective`'s mean KL at ``params``, for one inner step,
    without differentiating through the inner step twice.

    The KL of task ``i`` depends on ``params`` only through its adapted parameters
    ``fast_i = params - alpha * grad L_i(params)`` (``L_i`` its pre-update REINFORCE loss), and at
    ``params`` (the policy that sampled the episodes) the KL is at its minimum, 0: its gradient in
    ``fast_i`` vanishes, so the chain rule's second-derivative term drops and

        F = mean_i J_i K_i J_i,   J_i = I - alpha H_i   (symmetric; I when ``first_order``),

    with ``H_i`` the Hessian of ``L_i`` at ``params`` and ``K_i`` that of the KL in ``fast_i``. A product is
    two Hessian-vector products on the pre-update episodes and one on the post-update episodes, each a
    backward pass through a gradient graph built once, for every task at once; differentiating the KL's
    gradient through the inner step (``hvp_operator`` of the KL, the general path) also carries the
    third derivatives of ``L_i`` that multiply the vanishing gradient. ``tests/test_rl_core.py`` holds the
    two equal in float64. This is autograd's way, for any policy; :func:`meta_curvature` picks the closed
    form where it applies.
    """
    pre, post = batch.pre, batch.post
    tasks = pre.observations.shape[0]
    names = list(params)
    theta = {k: p.detach().expand(tasks, *p.shape).clone().requires_grad_(True) for k, p in params.items()}

    def pre_loss(p, o, a, ad, m):
        return reinforce_loss(policy, p, o, a, ad, m)

    losses = vmap(pre_loss)(theta, pre.observations, pre.actions, batch.pre_adv, pre.mask)
    grad_pre = torch.autograd.grad(losses.sum(), [theta[k] for k in names], create_graph=not first_order)
    fast = {k: (theta[k] - inner_lr * g).detach().requires_grad_(True) for k, g in zip(names, grad_pre)}

    def task_kl(p, o, m, old_mean, old_ls):
        mean = functional_call(policy, p, (o,))
        return (gaussian_kl(old_mean, old_ls, mean, p["log_std"]) * m).sum() / m.sum()

    kls = vmap(task_kl)(fast, post.observations, post.mask, batch.old_mean, batch.old_log_std)
    grad_kl = torch.autograd.grad(kls.sum(), [fast[k] for k in names], create_graph=True)

    def per_task_hvp(grads, leaves, u: list[Tensor]) -> list[Tensor]:
        dot = sum((g * x).sum() for g, x in zip(grads, u))
        return list(torch.autograd.grad(dot, [leaves[k] for k in names], retain_graph=True))

    def jacobian(u: list[Tensor]) -> list[Tensor]:  # J_i u_i for every task
        if first_order:
            return u
        return [x - inner_lr * h for x, h in zip(u, per_task_hvp(grad_pre, theta, u))]

    def product(v: Params) -> Params:
        if set(v) != set(names):
            raise ValueError(f"v has keys {sorted(v)}, params has {sorted(names)}")
        u = jacobian([v[k].expand(tasks, *v[k].shape) for k in names])
        w = jacobian(per_task_hvp(grad_kl, fast, u))
        return {k: x.mean(dim=0).detach() for k, x in zip(names, w)}

    return product


class ClosedFormMetaCurvature:
    """MAML-TRPO's meta-gradient and Fisher-vector products (``mean_i J_i K_i J_i``, see
    :func:`meta_fisher_operator`) in closed form for a policy whose mean is a plain MLP, from
    :class:`MLPCurvature`: ``H_i`` is the Hessian of the REINFORCE loss ``sum_n c_n (|z_n|^2 / 2 + sum(s))``
    (``z = (a - mu) e^-s``, ``c_n = A_n m_n / M``) at ``params``, ``K_i`` that of the KL at the adapted
    parameters (where its gradient is zero), and the meta-gradient ``mean_i J_i g_i`` with ``g_i`` the
    surrogate's gradient at task ``i``'s adapted parameters. One forward pass per episode batch serves the
    gradient and every product; ``tests/test_rl_core.py`` holds both equal to autograd's in float64.

    Args:
        layers, activation: :func:`mlp_layers` of the policy.
        params, batch, inner_lr, first_order: as :func:`meta_objective`.
    """

    def __init__(self, layers: list[tuple[str, str]], activation: str, params: Params, batch: MetaBatch,
                 inner_lr: float, first_order: bool = False):
        pre, post = batch.pre, batch.post
        self.tasks = tasks = pre.observations.shape[0]
        self.names, self.inner_lr, self.first_order = list(params), inner_lr, first_order
        self.weights, self.biases = [w for w, _ in layers], [b for _, b in layers]
        with torch.no_grad():
            log_std = params["log_std"].expand(tasks, -1)
            self.pre_net = MLPCurvature(self._per_task(self.weights, params), self._per_task(self.biases, params),
                                        activation, _samples(pre.observations))
            mask = pre.mask.reshape(tasks, -1)
            c = (batch.pre_adv.reshape(tasks, -1) * mask / mask.sum(1, keepdim=True)).unsqueeze(-1)
            inv_var = torch.exp(-2 * log_std).unsqueeze(1)
            residual = _samples(pre.actions) - self.pre_net.mean
            grad_mu = -c * residual * inv_var
            z2 = residual**2 * inv_var
            grad_w, grad_b = self.pre_net.set_curvature(
                OutputCurvature(grad_mu, c * inv_var, -2 * grad_mu, 2 * (c * z2).sum(1)))
            grad_s = (c * (1 - z2)).sum(1)
            # the adapted parameters and the KL's curvature there (mean = old mean: zero gradient)
            fast_w = [w - inner_lr * g for w, g in zip(self.pre_net.weights, grad_w)]
            fast_b = [b - inner_lr * g for b, g in zip(self.pre_net.biases, grad_b)]
            self.fast_log_std = log_std - inner_lr * grad_s
            self.fast_inv_var = fast_inv_var = torch.exp(-2 * self.fast_log_std).unsqueeze(1)
            self.post_net = MLPCurvature(fast_w, fast_b, activation, _samples(post.observations))
            mask = post.mask.reshape(tasks, -1)
            self.post_weight = (mask / mask.sum(1, keepdim=True)).unsqueeze(-1)
            spread = torch.exp(2 * batch.old_log_std).unsqueeze(1) + (_samples(batch.old_mean) - self.post_net.mean) ** 2
            self.post_net.set_curvature(OutputCurvature(
                None, self.post_weight * fast_inv_var, None, 2 * (self.post_weight * spread * fast_inv_var).sum(1)))
        self.batch = batch

    def _per_task(self, names: list[str], source: Params) -> list[Tensor]:
        return [source[k].expand(self.tasks, *source[k].shape) for k in names]

    def _jacobian(self, dw: list[Tensor], db: list[Tensor], ds: Tensor) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """``J_i u_i = u_i - alpha H_i u_i`` for every task (``u_i`` itself when first order)."""
        if self.first_order:
            return dw, db, ds
        hw, hb, hs = self.pre_net.product(dw, db, ds)
        lr = self.inner_lr
        return [x - lr * h for x, h in zip(dw, hw)], [x - lr * h for x, h in zip(db, hb)], ds - lr * hs

    def _task_mean(self, dw: list[Tensor], db: list[Tensor], ds: Tensor) -> Params:
        out = {**dict(zip(self.weights, dw)), **dict(zip(self.biases, db)), "log_std": ds}
        return {k: out[k].mean(dim=0) for k in self.names}

    def gradient(self) -> tuple[Params, Tensor]:
        """The gradient of :func:`meta_objective`'s surrogate loss at ``params``, and the loss."""
        post, batch = self.batch.post, self.batch
        with torch.no_grad():
            log_prob = gaussian_log_prob(self.post_net.mean, self.fast_log_std.unsqueeze(1), _samples(post.actions))
            ratio = torch.exp(log_prob - batch.old_log_prob.reshape(self.tasks, -1))
            weight = (batch.post_adv.reshape(self.tasks, -1) * ratio).unsqueeze(-1) * self.post_weight
            residual = _samples(post.actions) - self.post_net.mean
            inv_var = self.fast_inv_var
            grad_w, grad_b = self.post_net.backward(-weight * residual * inv_var)
            grad_s = -(weight * (residual**2 * inv_var - 1)).sum(1)
            loss = -weight.sum(dim=(1, 2)).mean()
            return self._task_mean(*self._jacobian(grad_w, grad_b, grad_s)), loss

    def fisher(self, v: Params) -> Params:
        """``F v``: the Hessian of :func:`meta_objective`'s mean KL at ``params`` times ``v``."""
        if set(v) != set(self.names):
            raise ValueError(f"v has keys {sorted(v)}, params has {sorted(self.names)}")
        with torch.no_grad():
            u = self._jacobian(self._per_task(self.weights, v), self._per_task(self.biases, v),
                               v["log_std"].expand(self.tasks, -1))
            return self._task_mean(*self._jacobian(*self.post_net.product(*u)))


def _samples(x: Tensor) -> Tensor:
    """``[tasks, trajectories, horizon, d]`` -> ``[tasks, trajectories * horizon, d]``."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def old_policy_stats(policy: nn.Module, fast: Params, post: Rollouts) -> tuple[Tensor, Tensor, Tensor]:
    """log-probs, means and log-stds of the adapted (sampling) policies on their own trajectories."""
    with torch.no_grad():
        mean = vmap(lambda p, o: functional_call(policy, p, (o,)))(fast, post.observations)
        lp = vmap(gaussian_log_prob)(mean, fast["log_std"], post.actions)
        return lp, mean, fast["log_std"]
