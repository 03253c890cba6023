"""Reptile (Nichol, Achiam & Schulman 2018, "On First-Order Meta-Learning Algorithms", arXiv 1803.02999).

Each task of a meta-batch is trained from the meta-parameters theta for ``inner_steps`` steps of
Adam (beta1 = 0, the reference code's) or SGD on all its examples (support and query: Reptile has no
query loss in training), giving phi_i; the outer update moves theta towards their mean,
``theta <- theta + eps * (mean_i phi_i - theta)``. The trainer's optimizer makes that step: the
algorithm hands it ``theta - mean_i phi_i`` as the direction and the outer optimizer is plain SGD
of rate eps, annealed linearly to 0 over the run (``algorithm.outer_schedule``).

Evaluation adapts on the support set the same way. ``transductive=true`` predicts a task's query
examples as one batch (normalization statistics shared among them); ``false`` predicts each query
example in one batch with the support set (the reference code's non-transductive mode).

Differences from the reference code: the inner Adam state starts afresh for every task (the reference
carries it over from task to task), and the inner steps are full-batch on the task's examples (the
reference draws minibatches of ``inner_batch`` from ``train_shots`` examples per class).
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.func import functional_call, vmap

from metarun.algorithms.base import Algorithm, State
from metarun.meta.batching import over_tasks
from metarun.meta.inner import gradients, inner_step
from metarun.types import LossFn, Params, TaskBatch
from metarun.utils.errors import ConfigError


class Reptile(Algorithm):
    """Reptile with an Adam (beta1 = 0) or SGD inner loop."""

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        alg = cfg.algorithm
        if alg.inner_optimizer not in ("adam", "sgd"):
            raise ConfigError(f"algorithm.inner_optimizer must be adam or sgd, got {alg.inner_optimizer!r}")
        betas = list(alg.adam_betas)
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ConfigError(f"algorithm.adam_betas must be two numbers in [0, 1), got {betas}")
        if alg.adam_eps <= 0:
            raise ConfigError(f"algorithm.adam_eps must be > 0, got {alg.adam_eps}")
        if cfg.trainer.cuda_graph:
            raise ConfigError("trainer.cuda_graph=true is not available for algorithm=reptile: its outer step "
                              "is plain SGD, which torch cannot capture with a changing rate")

    def __init__(self, cfg: DictConfig, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__(cfg, model, loss_fn)
        self.adam = cfg.inner_optimizer == "adam"
        self.beta1, self.beta2 = (float(b) for b in cfg.adam_betas)
        self.eps = float(cfg.adam_eps)
        self.transductive = bool(cfg.transductive)

    def graph_key(self) -> tuple:
        return ()

    # --- one task ------------------------------------------------------------------------------

    def start(self, params: Params) -> State:
        zeros = {k: torch.zeros_like(p) for k, p in params.items()}
        return {"params": params, "m": zeros, "v": dict(zeros)} if self.adam else {"params": params}

    def adapt_step(self, state: State, x: Tensor, y: Tensor, step: int, first_order: bool = True,
                   engine: str = "func") -> State:
        """One step of the inner optimizer; always first order (Reptile never differentiates it)."""
        params = state["params"]

        def loss(p: Params) -> Tensor:
            return self.loss_fn(functional_call(self.model, p, (x,)), y)

        grads = gradients(loss, params, None, True, engine)
        if not self.adam:
            return {"params": inner_step(params, grads, self.alpha)}
        t = step + 1
        m = {k: self.beta1 * state["m"][k] + (1 - self.beta1) * g for k, g in grads.items()}
        v = {k: self.beta2 * state["v"][k] + (1 - self.beta2) * g * g for k, g in grads.items()}
        direction = {k: (m[k] / (1 - self.beta1**t)) / ((v[k] / (1 - self.beta2**t)).sqrt() + self.eps) for k in grads}
        return {"params": inner_step(params, direction, self.alpha), "m": m, "v": v}

    def weights(self, state: State, step: int) -> Params:
        return state["params"]

    def query_outputs(self, weights: Params, sx: Tensor, qx: Tensor) -> Tensor:
        if self.transductive:
            return super().query_outputs(weights, sx, qx)

        def one(q: Tensor) -> Tensor:  # the query example in one batch with the support set
            return functional_call(self.model, weights, (torch.cat([sx, q[None]]),))[-1]

        return vmap(one)(qx)

    # --- the outer update ----------------------------------------------------------------------

    def outer_gradient(self, params: Params, tasks: TaskBatch, batching: str) -> tuple[Params, Tensor]:
        """``theta - mean_i phi_i`` for the model's parameters, and the mean loss of the adapted
        parameters on their tasks' examples (for the logs)."""
        theta = {k: p.detach() for k, p in params.items()}

        def one_task(sx, sy, qx, qy, engine):
            x, y = torch.cat([sx, qx]), torch.cat([sy, qy])
            state = self.start(theta)
            for i in range(self.inner_steps):
                state = self.adapt_step(state, x, y, i, True, engine)
            fast = state["params"]
            return fast, self.loss_fn(functional_call(self.model, fast, (x,)), y).detach()

        fast, losses = over_tasks(one_task, tasks, batching)
        return {k: theta[k] - fast[k].mean(dim=0) for k in theta}, losses.mean()
