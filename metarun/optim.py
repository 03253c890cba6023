"""Optimizers torch does not have in the form metarun needs.

:class:`SGD` is plain SGD whose rate may be a tensor on the device that the step reads there. Reptile's
outer step is SGD along ``theta - mean(phi)`` with a linearly annealed rate; ``torch.optim.SGD`` reads
a tensor rate with ``.item()`` (``alpha=-lr``), which a CUDA graph cannot capture, so a graphed
Reptile step needs this one. With a number for its rate it makes exactly ``torch.optim.SGD``'s
updates (momentum 0), bit for bit; with a tensor, the same to rounding (tests/test_algorithms.py).
"""

from __future__ import annotations

import torch
from torch import Tensor


class SGD(torch.optim.Optimizer):
    """``p <- p - lr * (grad + weight_decay * p)``; ``lr`` a number or a 0-dim tensor (then a
    scheduler changes it in place and a captured step sees the change).

    Args:
        params: the parameters (or parameter groups).
        lr: the rate.
        weight_decay: L2 penalty added to the gradient, as ``torch.optim.SGD``'s.
    """

    def __init__(self, params, lr: float | Tensor = 1e-3, weight_decay: float = 0.0) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("a tensor lr must have one element")
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, decay = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad if decay == 0 else p.grad.add(p, alpha=decay)
                if isinstance(lr, Tensor):
                    p.addcmul_(grad, lr.to(p.dtype), value=-1)  # on the device, no .item()
                else:
                    p.add_(grad, alpha=-lr)
        return loss
