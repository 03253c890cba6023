"""iMAML, implicit MAML (Rajeswaran, Finn, Kakade & Levine 2019, "Meta-Learning with Implicit
Gradients", arXiv 1909.04630).

The inner problem is proximal: phi = argmin L_support(phi) + lam / 2 * ||phi - theta||^2, solved
approximately by ``inner_steps`` gradient-descent steps of rate ``inner_lr`` from theta (the paper's
GD solver). The meta-gradient does not differentiate through those steps: at the inner optimum,
d phi / d theta = (I + H / lam)^-1 with H the Hessian of the support loss at phi, so each task's
contribution is ``v = (I + H / lam)^-1 grad L_query(phi)``, found by ``cg_iterations`` steps of
conjugate gradient on Hessian-vector products (:mod:`metarun.meta.hvp`). Its cost does not grow with
the number of inner steps.

Differences from the reference code (aravindr93/imaml_dev): that code takes plain SGD steps and one
proximal pull-back step instead of gradient descent on the proximal objective, and solves
((1 + damping) I + H / (lam + 10)) x = g instead of the paper's (I + H / lam) v = g; this follows
the paper. The Hessian-free inner solver of the paper is not implemented.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.func import functional_call

from metarun.algorithms.base import Algorithm, State
from metarun.meta.batching import over_tasks
from metarun.meta.hvp import hvp
from metarun.meta.inner import gradients, inner_step
from metarun.types import LossFn, Params, TaskBatch
from metarun.utils.errors import ConfigError


def dot(a: Params, b: Params) -> Tensor:
    return sum((a[k] * b[k]).sum() for k in a)


def conjugate_gradient(matvec, b: Params, iterations: int) -> Params:
    """``iterations`` steps of conjugate gradient on ``A x = b`` from x = 0, over parameter dicts;
    a fixed number of steps and no branch on the data, so it runs under vmap and in a CUDA graph
    (a step that has already converged adds zero)."""
    x = {k: torch.zeros_like(v) for k, v in b.items()}
    r = dict(b)
    p = dict(b)
    rr = dot(r, r)
    for _ in range(iterations):
        ap = matvec(p)
        pap = dot(p, ap)
        alpha = torch.where(pap != 0, rr / torch.where(pap != 0, pap, 1.0), 0.0)
        x = {k: x[k] + alpha * p[k] for k in x}
        r = {k: r[k] - alpha * ap[k] for k in r}
        rr_new = dot(r, r)
        beta = torch.where(rr != 0, rr_new / torch.where(rr != 0, rr, 1.0), 0.0)
        p = {k: r[k] + beta * p[k] for k in p}
        rr = rr_new
    return x


class IMAML(Algorithm):
    """iMAML with the gradient-descent inner solver."""

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        alg = cfg.algorithm
        if alg.lam <= 0:
            raise ConfigError(f"algorithm.lam must be > 0 (the proximal regularisation lambda), got {alg.lam}")
        if alg.cg_iterations < 1:
            raise ConfigError(f"algorithm.cg_iterations must be >= 1, got {alg.cg_iterations}")
        if alg.inner_steps < 1:
            raise ConfigError(f"algorithm.inner_steps must be >= 1 for iMAML's inner solver, got {alg.inner_steps}")

    def __init__(self, cfg: DictConfig, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__(cfg, model, loss_fn)
        self.lam, self.cg_iterations = float(cfg.lam), int(cfg.cg_iterations)

    def graph_key(self) -> tuple:
        return ()

    # --- one task: gradient descent on the proximal objective --------------------------------

    def start(self, params: Params) -> State:
        return {"params": params, "anchor": params}

    def adapt_step(self, state: State, x: Tensor, y: Tensor, step: int, first_order: bool = True,
                   engine: str = "func") -> State:
        phi, theta = state["params"], state["anchor"]
        grads = gradients(lambda p: self.support_loss(p, x, y), phi, None, True, engine)
        proximal = {k: g + self.lam * (phi[k] - theta[k]) for k, g in grads.items()}
        return {"params": inner_step(phi, proximal, self.alpha), "anchor": theta}

    def weights(self, state: State, step: int) -> Params:
        return state["params"]

    def support_loss(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        return self.loss_fn(functional_call(self.model, params, (x,)), y)

    # --- the implicit meta-gradient ----------------------------------------------------------

    def task_direction(self, theta: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor,
                       engine: str) -> tuple[Params, Tensor]:
        """One task's ``(I + H / lam)^-1 grad L_query(phi)`` and its query loss."""
        state = self.start(theta)
        for i in range(self.inner_steps):
            state = self.adapt_step(state, sx, sy, i, True, engine)
        phi = {k: p.detach() for k, p in state["params"].items()}
        query = gradients(lambda p: self.support_loss(p, qx, qy), phi, None, True, engine)
        with torch.no_grad():
            loss = self.support_loss(phi, qx, qy)

        def matvec(v: Params) -> Params:
            h = hessian_vector(lambda p: self.support_loss(p, sx, sy), phi, v, engine)
            return {k: v[k] + h[k] / self.lam for k in v}

        return conjugate_gradient(matvec, query, self.cg_iterations), loss

    def outer_gradient(self, params: Params, tasks: TaskBatch, batching: str) -> tuple[Params, Tensor]:
        theta = {k: p.detach() for k, p in params.items()}
        directions, losses = over_tasks(lambda *task, engine: self.task_direction(theta, *task, engine), tasks, batching)
        return {k: d.mean(dim=0) for k, d in directions.items()}, losses.mean()


def hessian_vector(f, params: Params, v: Params, engine: str) -> Params:
    """``H(params) v`` for the scalar ``f``: forward-over-reverse (``"func"``, composes with vmap) or
    double backward (``"autograd"``, the reference)."""
    if engine == "func":
        return hvp(f, params, v)
    leaves = {k: p.detach().requires_grad_(True) for k, p in params.items()}
    grads = torch.autograd.grad(f(leaves), list(leaves.values()), create_graph=True)
    out = torch.autograd.grad(sum((g * v[k]).sum() for k, g in zip(leaves, grads)), list(leaves.values()),
                              allow_unused=True)
    return {k: torch.zeros_like(leaves[k]) if h is None else h.detach() for k, h in zip(leaves, out)}
