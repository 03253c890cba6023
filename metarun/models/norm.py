"""Batch normalization that stays correct under ``torch.func.vmap`` to second order.

Normalization always uses the statistics of the batch it is given, at training and at test
time, as in the MAML paper's code: under ``vmap`` that is each task's support set or query set
on its own. There are no running averages.

Why not ``nn.BatchNorm1d/2d`` / ``F.batch_norm``: under ``torch.func.vmap`` their second-order
meta-gradients are wrong by percents (0.5-3 % in earlier measurements with torch 2.13 on CPU and
2.11 on CUDA; the trap test in tests/test_meta_gradients.py measures 6 % on its small conv4 and
1.6 % on its small MLP; first order is fine). :class:`BatchStatNorm` writes the same
normalization with primitive ops (mean, variance, scale, shift) and matches the per-task loop
to ~1e-15 in float64; the correctness harness (tests/test_meta_gradients.py) holds it to that.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class BatchStatNorm(nn.Module):
    """Affine batch normalization from batch statistics only, over every dimension but the
    features (dimension 1): ``[N, F]`` like ``BatchNorm1d``, ``[N, C, H, W]`` like ``BatchNorm2d``.

    Args:
        features: size of dimension 1 (features or channels).
        eps: added to the variance, as in ``nn.BatchNorm2d``.
    """

    def __init__(self, features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(features))
        self.bias = nn.Parameter(torch.zeros(features))

    def forward(self, x: Tensor) -> Tensor:
        dims = [0, *range(2, x.dim())]
        mean = x.mean(dim=dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)  # biased, as batch norm uses
        x_hat = (x - mean) * torch.rsqrt(var + self.eps)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x_hat * self.weight.view(shape) + self.bias.view(shape)
