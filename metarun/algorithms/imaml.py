"""iMAML, implicit MAML (Rajeswaran, Finn, Kakade & Levine 2019, "Meta-Learning with Implicit
Gradients", arXiv 1909.04630).

The inner problem is proximal: phi = argmin L_support(phi) + lam / 2 * ||phi - theta||^2. At its
optimum d phi / d theta = (I + H / lam)^-1, H the Hessian of the support loss at phi, so a task's
meta-gradient is ``(I + H / lam)^-1 grad L_query(phi)``, found by ``cg_iterations`` steps of conjugate
gradient on Hessian-vector products (:mod:`metarun.meta.hvp`); its cost does not grow with the
number of inner steps. Two keys choose between the paper and the authors' code
(aravindr93/imaml_dev), whose command lines the presets follow:

* ``inner_solver``: ``sgd_pullback`` (the authors' code): ``inner_steps`` plain SGD steps on the support
  loss, then one gradient step on the proximal term alone, ``phi <- phi - inner_lr * lam * (phi -
  theta)``; ``proximal_gd`` (the paper's GD solver): ``inner_steps`` gradient-descent steps on the whole
  proximal objective.
* ``system``: ``damped`` (the authors' code, the default): CG on ``((1 + cg_damping) I + H / (lam +
  lam_damping)) x = g``, whose matrix stays positive definite unless H has an eigenvalue below
  ``-(1 + cg_damping) (lam + lam_damping)`` (-24 with their 1.0 and 10.0); ``paper``: ``(I + H / lam) v =
  g``. Why damped: phi is only an approximate minimum of a non-convex loss, and there H often has
  eigenvalues below -lam. Then ``I + H / lam`` is indefinite, CG's step lengths change sign, and the
  direction it returns can point anywhere: on sinusoid its cosine with the true meta-gradient was 0.04
  over a meta-batch (0.95 damped), and Omniglot 5-way 1-shot after 100 steps reached 44.9 % with the
  paper's system against 65.4 % damped (docs/algorithms.md). The damped system is a preconditioned,
  shrunk version of the same inverse (about half of it where H is small), which Adam's scale-free
  step mostly absorbs.

At evaluation the task is adapted with ``test_lam`` in place of lam (the authors: 0, plain SGD steps).

``backtracking`` (0 = off, the authors') makes each inner step safe: of the steps ``inner_lr * 2^-j``,
j = 0..K, it takes the longest that does not raise the objective that step descends (the support
loss; with ``proximal_gd``, the proximal objective), and no step where none does. The implicit
gradient needs only an approximate minimum, not how it was reached, so this changes no formula; it
keeps the solver from diverging where ``inner_lr`` is too long for a task's curvature (on sinusoid,
plain steps took a task's loss 14 -> 8 -> 180 -> inf; docs/algorithms.md).
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

SOLVERS = ("sgd_pullback", "proximal_gd")
SYSTEMS = ("damped", "paper")


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
    """iMAML with the authors' or the paper's inner solver and linear system."""

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        alg = cfg.algorithm
        if alg.lam <= 0:
            raise ConfigError(f"algorithm.lam must be > 0 (the proximal regularisation lambda), got {alg.lam}")
        if alg.cg_iterations < 1:
            raise ConfigError(f"algorithm.cg_iterations must be >= 1, got {alg.cg_iterations}")
        if alg.inner_steps < 1:
            raise ConfigError(f"algorithm.inner_steps must be >= 1 for iMAML's inner solver, got {alg.inner_steps}")
        if alg.inner_solver not in SOLVERS:
            raise ConfigError(f"algorithm.inner_solver must be one of {', '.join(SOLVERS)}, got {alg.inner_solver!r}")
        if alg.system not in SYSTEMS:
            raise ConfigError(f"algorithm.system must be one of {', '.join(SYSTEMS)}, got {alg.system!r}")
        if alg.get("backtracking", 0) < 0:
            raise ConfigError(f"algorithm.backtracking must be >= 0 (halvings of the inner step), got {alg.backtracking}")
        for name in ("cg_damping", "lam_damping", "test_lam"):
            if alg[name] is not None and alg[name] < 0:
                raise ConfigError(f"algorithm.{name} must be >= 0, got {alg[name]}")

    def __init__(self, cfg: DictConfig, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__(cfg, model, loss_fn)
        self.lam, self.cg_iterations = float(cfg.lam), int(cfg.cg_iterations)
        self.pullback = cfg.inner_solver == "sgd_pullback"
        self.damped = cfg.system == "damped"
        self.cg_damping, self.lam_damping = float(cfg.cg_damping), float(cfg.lam_damping)
        self.test_lam = self.lam if cfg.test_lam is None else float(cfg.test_lam)
        self.backtracking = int(cfg.get("backtracking", 0))

    def graph_key(self) -> tuple:
        return ()

    # --- one task ------------------------------------------------------------------------------

    def start(self, params: Params, lam: float | None = None) -> State:
        """The state before the first step; ``lam`` of the proximal term (default: evaluation's
        ``test_lam``; training passes ``lam``)."""
        return {"params": params, "anchor": params, "lam": self.test_lam if lam is None else lam}

    def adapt_step(self, state: State, x: Tensor, y: Tensor, step: int, first_order: bool = True,
                   engine: str = "func") -> State:
        """A plain SGD step on the support loss (``sgd_pullback``), or a gradient-descent step on the
        proximal objective (``proximal_gd``)."""
        phi, theta, lam = state["params"], state["anchor"], state["lam"]
        grads = gradients(lambda p: self.support_loss(p, x, y), phi, None, True, engine)
        proximal = not self.pullback and lam
        if proximal:
            grads = {k: g + lam * (phi[k] - theta[k]) for k, g in grads.items()}
        if not self.backtracking:
            return {**state, "params": inner_step(phi, grads, self.alpha)}

        def objective(p: Params) -> Tensor:  # what this step descends
            prox = lam / 2 * sum(((p[k] - theta[k]) ** 2).sum() for k in p) if proximal else 0.0
            return self.support_loss(p, x, y) + prox

        with torch.no_grad():  # the longest safe step: shortest first, so a longer one that is safe wins
            before, scale = objective(phi), torch.zeros((), dtype=x.dtype, device=x.device)
            for j in range(self.backtracking, -1, -1):
                after = objective(inner_step(phi, grads, self.alpha * 2.0 ** -j))
                scale = torch.where(torch.isfinite(after) & (after <= before), 2.0 ** -j, scale)
        return {**state, "params": inner_step(phi, grads, self.alpha * scale)}

    def weights(self, state: State, step: int) -> Params:
        """The adapted parameters; with ``sgd_pullback``, after the pull-back step towards theta."""
        phi, theta, lam = state["params"], state["anchor"], state["lam"]
        if not (self.pullback and lam and step > 0):
            return phi
        return {k: p - self.alpha * lam * (p - theta[k]) for k, p in phi.items()}

    def support_loss(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        return self.loss_fn(functional_call(self.model, params, (x,)), y)

    # --- the implicit meta-gradient ----------------------------------------------------------

    def task_direction(self, theta: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor,
                       engine: str) -> tuple[Params, Tensor]:
        """One task's meta-gradient, the CG solution of :attr:`system` at its adapted parameters, and
        its query loss."""
        state = self.start(theta, self.lam)
        for i in range(self.inner_steps):
            state = self.adapt_step(state, sx, sy, i, True, engine)
        phi = {k: p.detach() for k, p in self.weights(state, self.inner_steps).items()}
        query = gradients(lambda p: self.support_loss(p, qx, qy), phi, None, True, engine)
        with torch.no_grad():
            loss = self.support_loss(phi, qx, qy)
        identity, scale = (1.0 + self.cg_damping, self.lam + self.lam_damping) if self.damped else (1.0, self.lam)

        def matvec(v: Params) -> Params:
            h = hessian_vector(lambda p: self.support_loss(p, sx, sy), phi, v, engine)
            return {k: identity * v[k] + h[k] / scale for k in v}

        return conjugate_gradient(matvec, query, self.cg_iterations), loss

    def outer_gradient(self, params: Params, tasks: TaskBatch, batching: str) -> tuple[Params, Tensor]:
        theta = {k: p.detach() for k, p in params.items()}
        directions, losses = over_tasks(lambda *task, engine: self.task_direction(theta, *task, engine), tasks, batching)
        return {k: d.mean(dim=0) for k, d in directions.items()}, losses.mean()


def hessian_vector(f, params: Params, v: Params, engine: str) -> Params:
    """``H(params) v`` for the scalar ``f``: reverse-over-reverse with ``torch.func`` (``"func"``,
    composes with vmap) or double backward (``"autograd"``, the reference)."""
    if engine == "func":
        return hvp(f, params, v)
    leaves = {k: p.detach().requires_grad_(True) for k, p in params.items()}
    grads = torch.autograd.grad(f(leaves), list(leaves.values()), create_graph=True)
    out = torch.autograd.grad(sum((g * v[k]).sum() for k, g in zip(leaves, grads)), list(leaves.values()),
                              allow_unused=True)
    return {k: torch.zeros_like(leaves[k]) if h is None else h.detach() for k, h in zip(leaves, out)}
