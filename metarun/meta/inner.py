"""The one inner step every algorithm, evaluation and meta-RL use.

An inner step is ``p <- p - rate * g`` for the parameters that adapt, where ``g`` is the gradient
of a task's loss. The rate can be

* a number (MAML's alpha),
* a dict ``{name: tensor}``: a tensor shaped like the parameter (Meta-SGD's per-parameter rates)
  or a scalar tensor (MAML++'s per-layer rates), broadcast against the gradient;

and a per-step rate is simply a different rate at each step. ``adapted`` names the parameters that
adapt (ANIL: the head); the others pass through unchanged and get no inner gradient.

Gradients come from one of two engines that must agree: ``"func"`` (``torch.func.grad``, which
composes with ``vmap`` over tasks: the fast path) and ``"autograd"`` (``torch.autograd.grad`` on
one task: the reference the correctness tests hold the fast path to). ``first_order`` detaches the
inner gradients (the first-order approximation); otherwise the result stays differentiable with
respect to the starting parameters and the rates (second order).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import torch
from torch import Tensor
from torch.func import grad

from metarun.types import Params

Rate = float | Tensor | dict[str, Tensor]


def rate_for(rate: Rate, name: str) -> float | Tensor:
    """The rate of parameter ``name``: the number itself, or its entry in a per-parameter dict."""
    return rate[name] if isinstance(rate, dict) else rate


def gradients(loss: Callable[[Params], Tensor], params: Params, adapted: Collection[str] | None = None,
              first_order: bool = False, engine: str = "func") -> Params:
    """The gradient of ``loss(params)`` with respect to the parameters in ``adapted`` (all if None).

    Args:
        loss: a scalar function of a parameter dict (one task's support loss).
        params: where the gradient is taken.
        adapted: the names of the parameters that adapt; the others are held fixed.
        first_order: detach the result, so no second-order term flows through it.
        engine: ``"func"`` (``torch.func.grad``, composes with ``vmap``) or ``"autograd"``.
    """
    names = list(params) if adapted is None else [k for k in params if k in adapted]
    if engine == "func":
        fixed = {k: p for k, p in params.items() if k not in names}
        out = grad(lambda moving: loss({**fixed, **moving}))({k: params[k] for k in names})
        return {k: g.detach() for k, g in out.items()} if first_order else out
    if engine == "autograd":  # (parameters without a graph, as a first-order algorithm's, become leaves)
        moving = {k: params[k] if params[k].requires_grad else params[k].detach().requires_grad_(True) for k in names}
        out = torch.autograd.grad(loss({**params, **moving}), list(moving.values()), create_graph=not first_order,
                                  allow_unused=True)
        return {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(moving.items(), out)}
    raise ValueError(f"engine must be 'func' or 'autograd', got {engine!r}")


def inner_step(params: Params, grads: Params, rate: Rate) -> Params:
    """``p - rate * g`` for every parameter that has a gradient in ``grads``; the rest unchanged."""
    return {k: p - rate_for(rate, k) * grads[k] if k in grads else p for k, p in params.items()}


def adapt(loss: Callable[[Params], Tensor], params: Params, rates: Sequence[Rate], first_order: bool = False,
          adapted: Collection[str] | None = None, engine: str = "func") -> Params:
    """``len(rates)`` inner steps on ``loss``, step ``i`` with ``rates[i]``.

    Example:
        >>> p = {"w": torch.tensor([1.0, 2.0])}
        >>> adapt(lambda q: (q["w"] ** 2).sum(), p, [0.25, 0.25])["w"]  # w <- w - 0.25 * 2w, twice
        tensor([0.2500, 0.5000])
    """
    for rate in rates:
        params = inner_step(params, gradients(loss, params, adapted, first_order, engine), rate)
    return params
