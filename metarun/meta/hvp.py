"""Hessian-vector products over parameter dicts (reused by TRPO and implicit MAML).

* :func:`hvp`: one product, reverse-over-reverse (``grad`` of ``<grad f, v>``); composes with ``vmap``.
  (Forward-over-reverse, ``jvp`` of ``grad``, is usually cheaper but fails under ``vmap`` for ReLU
  networks in torch 2.13: "ZeroTensors are immutable".)
* :func:`hvp_operator`: many products at the same point (conjugate gradient), reverse-over-reverse:
  the gradient's graph is built once and each product is one more backward pass through it,
  several times cheaper per product when ``f`` itself contains an inner gradient step (MAML-TRPO).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import grad

from metarun.types import Params


def hvp(f: Callable[[Params], Tensor], params: Params, v: Params) -> Params:
    """The Hessian of the scalar function ``f`` at ``params`` times the direction ``v``.

    Reverse-over-reverse (``grad`` of ``<grad f, v>``): about two gradients' cost, no dense
    Hessian, and it works inside ``vmap`` (iMAML's conjugate gradient runs per task under it).

    Args:
        f: a scalar function of a parameter dict.
        params: where the Hessian is taken.
        v: the direction; same keys and shapes as ``params``.

    Returns:
        ``H(params) @ v`` as a dict shaped like ``params``.

    Example:
        >>> import torch
        >>> p = {"w": torch.tensor([1.0, 2.0])}
        >>> hvp(lambda q: (q["w"] ** 3).sum(), p, {"w": torch.tensor([1.0, 0.0])})["w"]
        tensor([6., 0.])
    """
    if set(v) != set(params):
        raise ValueError(f"v has keys {sorted(v)}, params has {sorted(params)}")
    return grad(lambda p: sum((g * v[k]).sum() for k, g in grad(f)(p).items()))(params)


def hvp_operator(f: Callable[[Params], Tensor], params: Params) -> Callable[[Params], Params]:
    """A function ``v -> H(params) @ v`` for the scalar function ``f``, for repeated products.

    Builds ``grad f`` with ``create_graph=True`` once; each call differentiates ``<grad f, v>``.
    Not for use under ``vmap`` (use :func:`hvp` there).

    Example:
        >>> import torch
        >>> p = {"w": torch.tensor([1.0, 2.0])}
        >>> product = hvp_operator(lambda q: (q["w"] ** 3).sum(), p)
        >>> product({"w": torch.tensor([0.0, 1.0])})["w"]
        tensor([ 0., 12.])
    """
    leaves = {k: p.detach().requires_grad_(True) for k, p in params.items()}
    names = list(leaves)
    grads = torch.autograd.grad(f(leaves), [leaves[k] for k in names], create_graph=True, allow_unused=True)
    grads = [torch.zeros_like(leaves[k]) if g is None else g for k, g in zip(names, grads)]

    def product(v: Params) -> Params:
        if set(v) != set(leaves):
            raise ValueError(f"v has keys {sorted(v)}, params has {sorted(leaves)}")
        dot = sum((g * v[k]).sum() for k, g in zip(names, grads))
        out = torch.autograd.grad(dot, [leaves[k] for k in names], retain_graph=True, allow_unused=True)
        return {k: torch.zeros_like(leaves[k]) if h is None else h.detach() for k, h in zip(names, out)}

    return product
