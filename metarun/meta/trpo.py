"""TRPO's outer step over a parameter dict: conjugate gradient on Fisher-vector products (the
Hessian of the mean KL, via :func:`metarun.meta.hvp_operator`), then a backtracking line search that keeps
the KL under ``max_kl`` and requires the surrogate to improve (Schulman et al. 2015)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor
from torch.func import grad_and_value

from metarun.meta.hvp import hvp_operator
from metarun.types import Params


def conjugate_gradient(matvec: Callable[[Tensor], Tensor], b: Tensor, iterations: int = 10,
                       tolerance: float = 1e-10) -> Tensor:
    """Approximately solve ``A x = b`` for symmetric positive-definite ``A`` given as ``matvec``."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rr = r @ r
    for _ in range(iterations):
        if rr < tolerance:
            break
        ap = matvec(p)
        alpha = rr / (p @ ap)
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = r @ r
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


def flatten(params: Params) -> Tensor:
    return torch.cat([p.reshape(-1) for p in params.values()])


def unflatten(vector: Tensor, like: Params) -> Params:
    out, start = {}, 0
    for k, p in like.items():
        out[k] = vector[start:start + p.numel()].view_as(p)
        start += p.numel()
    return out


class TRPOStats(NamedTuple):
    loss_before: float
    loss_after: float
    kl: float
    step_fraction: float  # the accepted fraction of the full step; 0 = rejected
    backtracks: int


def trpo_step(params: Params, objective: Callable[[Params], tuple[Tensor, Tensor]], max_kl: float = 0.01,
              cg_iterations: int = 10, cg_damping: float = 1e-5, backtrack_ratio: float = 0.8,
              line_search_steps: int = 15,
              reduce: Callable[[list[Tensor]], list[Tensor]] | None = None,
              fisher: Callable[[Params], Params] | None = None,
              gradient: Callable[[], tuple[Params, Tensor]] | None = None) -> tuple[Params, TRPOStats]:
    """One TRPO update of ``params``.

    Args:
        params: current parameters (detached tensors).
        objective: ``params -> (surrogate loss, mean KL)``; the KL is 0 with zero gradient at ``params``.
        max_kl: trust-region size delta.
        cg_iterations, cg_damping: conjugate gradient on ``(F + damping I) x = g``.
        backtrack_ratio, line_search_steps: the step is shrunk by this ratio until accepted.
        reduce: when the objective is one process's share of a mean over tasks (torchrun), the mean
            over the processes of a list of tensors (:func:`metarun.distributed.average`): applied to
            the gradient, every Fisher-vector product and every loss and KL the line search
            compares, so each process takes the single-process step. None: one process.
        fisher: ``v -> F v`` at ``params`` when the caller has a cheaper exact form (MAML-TRPO:
            :func:`metarun.meta.policy_gradient.meta_curvature`); None: the Hessian of the
            objective's KL by double backward (:func:`metarun.meta.hvp_operator`).
        gradient: ``() -> (gradient, surrogate loss)`` at ``params`` when the caller has a cheaper exact form
            (:func:`metarun.meta.policy_gradient.meta_curvature`); None: autograd on ``objective``.

    Returns:
        the new parameters (``params`` unchanged when no step is accepted) and statistics.
    """
    reduce = reduce or (lambda tensors: tensors)
    params = {k: p.detach() for k, p in params.items()}
    if gradient is None:
        g, (loss_before, _) = grad_and_value(objective, has_aux=True)(params)  # one pass for both
    else:
        g, loss_before = gradient()
    g, loss_before = reduce([flatten(g), loss_before.detach()])

    kl_hessian = fisher or hvp_operator(lambda p: objective(p)[1], params)  # the Fisher at params

    def fisher_vector(v: Tensor) -> Tensor:
        return reduce([flatten(kl_hessian(unflatten(v, params)))])[0] + cg_damping * v

    direction = conjugate_gradient(fisher_vector, g, cg_iterations)
    shs = 0.5 * direction @ fisher_vector(direction)
    full_step = direction * torch.sqrt(max_kl / shs.clamp_min(1e-12))  # 0.5 s^T F s = max_kl at fraction 1
    flat = flatten(params)
    with torch.no_grad():
        for i in range(line_search_steps):
            fraction = backtrack_ratio**i
            candidate = unflatten(flat - fraction * full_step, params)
            loss, kl = reduce(list(objective(candidate)))
            if torch.isfinite(loss) and loss < loss_before and kl <= max_kl:
                return candidate, TRPOStats(float(loss_before), float(loss), float(kl), fraction, i)
    return params, TRPOStats(float(loss_before), float(loss_before), 0.0, 0.0, line_search_steps)
