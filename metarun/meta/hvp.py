"""Hessian-vector products over parameter dicts (reused by TRPO and implicit MAML)."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor
from torch.func import grad, jvp

Params = dict[str, Tensor]


def hvp(f: Callable[[Params], Tensor], params: Params, v: Params) -> Params:
    """The Hessian of the scalar function ``f`` at ``params`` times the direction ``v``.

    Forward-over-reverse (``jvp`` of ``grad``): one gradient's cost, no dense Hessian, and it
    works inside ``vmap``.

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
    return jvp(grad(f), (params,), (v,))[1]
