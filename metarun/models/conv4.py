"""The MAML paper's four-block convolutional network.

Each block is 3x3 conv -> batch norm -> ReLU (or leaky ReLU, as MAML++'s code), then either stride 2
(Omniglot) or 2x2 max-pool (MiniImagenet); a linear head classifies. Normalization always uses the statistics of the batch
it is given, at training and at test time, as in the paper's code (:class:`BatchStatNorm`, which
says why it is not ``nn.BatchNorm2d``).
"""

from __future__ import annotations

from torch import Tensor, nn

from metarun.models.norm import BatchStatNorm
from metarun.utils.errors import ConfigError


class Conv4(nn.Module):
    """Four conv blocks and a linear head (Finn et al. 2017, section 5.2; Vinyals et al. 2016).

    Args:
        in_channels: 1 for Omniglot, 3 for MiniImagenet.
        out_features: number of classes per task (``ways``); the trainer passes it.
        hidden: filters per conv layer; paper: 64 (Omniglot), 32 (MiniImagenet).
        image_size: input height = width; paper: 28 (Omniglot), 84 (MiniImagenet).
        downsample: ``"stride"`` (stride-2 convs, Omniglot) or ``"maxpool"`` (2x2 max-pool).
        blocks: number of conv blocks; paper: 4.
        activation: ``"relu"`` (the paper's) or ``"leaky_relu"`` (slope 0.01, MAML++'s reference code).
        init: the weights' initialisation: ``"torch"`` (PyTorch's default, kaiming-uniform with a = sqrt(5):
            bound 1 / sqrt(fan_in)) or ``"xavier"`` (glorot-uniform weights and zero biases, TensorFlow's
            default: the Reptile and MAML reference codes; bound sqrt(6 / (fan_in + fan_out)), 1.7x
            larger for the 3x3x64 convolutions, which slows Adam's relative steps).
        init_gain: the gain of ``"xavier"`` (iMAML's reference code: 1.73).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_features: int = 5,
        hidden: int = 64,
        image_size: int = 28,
        downsample: str = "stride",
        blocks: int = 4,
        activation: str = "relu",
        init: str = "torch",
        init_gain: float = 1.0,
    ) -> None:
        super().__init__()
        if downsample not in ("stride", "maxpool"):
            raise ConfigError(f"model.downsample must be 'stride' or 'maxpool', got {downsample!r}")
        if activation not in ("relu", "leaky_relu"):
            raise ConfigError(f"model.activation must be 'relu' or 'leaky_relu', got {activation!r}")
        if init not in ("torch", "xavier"):
            raise ConfigError(f"model.init must be 'torch' or 'xavier', got {init!r}")
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for _ in range(blocks):
            stride = 2 if downsample == "stride" else 1
            act = nn.ReLU() if activation == "relu" else nn.LeakyReLU(0.01)
            layers += [nn.Conv2d(channels, hidden, 3, stride=stride, padding=1), BatchStatNorm(hidden), act]
            if downsample == "maxpool":
                layers.append(nn.MaxPool2d(2))
                size = size // 2
            else:
                size = (size + 1) // 2
            channels = hidden
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(hidden * size * size, out_features)
        if init == "xavier":
            for module in self.modules():
                if isinstance(module, (nn.Conv2d, nn.Linear)):
                    nn.init.xavier_uniform_(module.weight, gain=init_gain)
                    nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))
