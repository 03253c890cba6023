"""ResNet-12, the common few-shot backbone (Oreshkin et al. 2018, TADAM; Lee et al. 2019, MetaOptNet).

Four residual blocks of widths 64-160-320-640. Each block: three 3x3 convolutions without bias,
each followed by batch norm, leaky ReLU (slope 0.1) after the first two; a 1x1 convolution with
batch norm as the shortcut; the sum, a leaky ReLU and a 2x2 max-pool (floor: 84 -> 42 -> 21 ->
10 -> 5, 28 -> 14 -> 7 -> 3 -> 1). Then global average pooling and a linear head. DropBlock and
the other regularizers of the MetaOptNet recipe are left out.

Normalization is :class:`BatchStatNorm`, not ``nn.BatchNorm2d``: it uses the statistics of the
batch it is given (each task's support or query set under ``vmap``), as conv4 does, and its
second-order meta-gradients under ``torch.func.vmap`` are right, where ``nn.BatchNorm2d`` /
``F.batch_norm`` are off by percents (see :mod:`metarun.models.norm`). Nothing is written in
``forward``, so the model runs under ``torch.func.functional_call`` and ``vmap``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from metarun.models.norm import BatchStatNorm
from metarun.utils.errors import ConfigError


class ResidualBlock(nn.Module):
    """Three 3x3 conv + norm layers with a 1x1 conv + norm shortcut, then a 2x2 max-pool."""

    def __init__(self, in_channels: int, out_channels: int, leaky_slope: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm1 = BatchStatNorm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = BatchStatNorm(out_channels)
        self.conv3 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm3 = BatchStatNorm(out_channels)
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), BatchStatNorm(out_channels))
        self.act = nn.LeakyReLU(leaky_slope)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.norm1(self.conv1(x)))
        out = self.act(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        return self.pool(self.act(out + self.shortcut(x)))


class ResNet12(nn.Module):
    """Four residual blocks, global average pooling and a linear head.

    Args:
        in_channels: 1 for Omniglot, 3 for MiniImagenet; the trainer passes it.
        out_features: number of classes per task (``ways``); the trainer passes it.
        image_size: input height = width; the trainer passes it. Each block halves it (floor), so
            it must be at least ``2 ** len(channels)`` (16 for four blocks).
        channels: width of each block; standard: 64, 160, 320, 640.
        leaky_slope: negative slope of the leaky ReLUs; standard: 0.1.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_features: int = 5,
        image_size: int = 84,
        channels: Sequence[int] = (64, 160, 320, 640),
        leaky_slope: float = 0.1,
    ) -> None:
        super().__init__()
        channels = list(channels)
        if not channels:
            raise ConfigError("model.channels must list at least one block width, got []")
        if any(c < 1 for c in channels):
            raise ConfigError(f"model.channels must all be >= 1, got {channels}")
        if in_channels < 1 or out_features < 1:
            raise ConfigError(f"in_channels and out_features must be >= 1, got {in_channels} and {out_features}")
        if leaky_slope < 0:
            raise ConfigError(f"model.leaky_slope must be >= 0, got {leaky_slope}")
        if image_size < 2 ** len(channels):
            raise ConfigError(f"model=resnet12 with {len(channels)} blocks halves the image {len(channels)} times: "
                              f"it needs image_size >= {2 ** len(channels)}, got {image_size}")
        widths = [in_channels, *channels]
        self.blocks = nn.Sequential(*(ResidualBlock(a, b, leaky_slope) for a, b in zip(widths, widths[1:])))
        self.head = nn.Linear(channels[-1], out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(x).mean(dim=(2, 3)))
