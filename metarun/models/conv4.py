"""The MAML paper's four-block convolutional network, with vmap-safe batch normalization.

Each block is 3x3 conv -> batch norm -> ReLU, then either stride 2 (Omniglot) or 2x2 max-pool
(MiniImagenet); a linear head classifies. Normalization always uses the statistics of the batch
it is given, at training and at test time, as in the paper's code: under ``vmap`` that is each
task's support set or query set on its own.

Why not ``nn.BatchNorm2d`` / ``F.batch_norm``: under ``torch.func.vmap`` their second-order
meta-gradients are wrong by 0.5-3 % (measured with torch 2.13 on CPU and 2.11 on CUDA; first
order is fine). :class:`BatchStatNorm2d` writes the same normalization with primitive ops
(mean, variance, scale, shift) and matches the per-task loop to ~1e-15 in float64; the
correctness harness (tests/test_meta_gradients.py) holds it to that.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class BatchStatNorm2d(nn.Module):
    """Batch normalization from batch statistics only (no running averages), affine.

    Args:
        channels: number of feature maps.
        eps: added to the variance, as in ``nn.BatchNorm2d``.
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)  # biased, as batch norm uses
        x_hat = (x - mean) * torch.rsqrt(var + self.eps)
        return x_hat * self.weight[None, :, None, None] + self.bias[None, :, None, None]


class Conv4(nn.Module):
    """Four conv blocks and a linear head (Finn et al. 2017, section 5.2; Vinyals et al. 2016).

    Args:
        in_channels: 1 for Omniglot, 3 for MiniImagenet.
        out_features: number of classes per task (``ways``); the trainer passes it.
        hidden: filters per conv layer; paper: 64 (Omniglot), 32 (MiniImagenet).
        image_size: input height = width; paper: 28 (Omniglot), 84 (MiniImagenet).
        downsample: ``"stride"`` (stride-2 convs, Omniglot) or ``"maxpool"`` (2x2 max-pool).
        blocks: number of conv blocks; paper: 4.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_features: int = 5,
        hidden: int = 64,
        image_size: int = 28,
        downsample: str = "stride",
        blocks: int = 4,
    ) -> None:
        super().__init__()
        if downsample not in ("stride", "maxpool"):
            raise ValueError(f"model.downsample must be 'stride' or 'maxpool', got {downsample!r}")
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for _ in range(blocks):
            stride = 2 if downsample == "stride" else 1
            layers += [nn.Conv2d(channels, hidden, 3, stride=stride, padding=1), BatchStatNorm2d(hidden), nn.ReLU()]
            if downsample == "maxpool":
                layers.append(nn.MaxPool2d(2))
                size = size // 2
            else:
                size = (size + 1) // 2
            channels = hidden
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(hidden * size * size, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))
