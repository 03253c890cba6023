"""Multi-layer perceptron: the sinusoid regressor of the MAML paper (1-40-40-1, ReLU) and its
non-convolutional Omniglot classifier (784-256-128-64-64-N, batch norm and ReLU per layer)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from metarun.models.norm import BatchStatNorm
from metarun.utils.errors import ConfigError


class MLP(nn.Module):
    """A plain MLP; meta-learning code calls it through ``functional_call``.

    Args:
        in_features: input size (ignored when ``image_size`` is given).
        out_features: output size; for classification the trainer passes ``ways``.
        hidden_sizes: width of each hidden layer.
        activation: ``"relu"`` or ``"tanh"``.
        batch_norm: batch normalization (batch statistics, :class:`BatchStatNorm`) before each
            hidden activation, as the paper's non-convolutional network has.
        in_channels, image_size: set by an image task; the input ``[N, C, H, W]`` is then
            flattened and ``in_features`` is ``C * H * W``.
    """

    def __init__(
        self,
        in_features: int | None = 1,
        out_features: int | None = 1,
        hidden_sizes: Sequence[int] = (40, 40),
        activation: str = "relu",
        batch_norm: bool = False,
        in_channels: int | None = None,
        image_size: int | None = None,
    ) -> None:
        super().__init__()
        acts = {"relu": nn.ReLU, "tanh": nn.Tanh}
        if activation not in acts:
            raise ConfigError(f"model.activation must be one of {sorted(acts)}, got {activation!r}")
        self.images = image_size is not None
        width = (in_channels or 1) * image_size**2 if self.images else in_features
        if width is None or out_features is None:
            raise ConfigError("model.in_features and model.out_features must be set for a task that does not give them")
        layers: list[nn.Module] = []
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), *([BatchStatNorm(hidden)] if batch_norm else []), acts[activation]()]
            width = hidden
        layers.append(nn.Linear(width, out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1) if self.images else x)
