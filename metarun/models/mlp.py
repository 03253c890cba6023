"""Multi-layer perceptron (the sinusoid regressor of the MAML paper: 1-40-40-1, ReLU)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class MLP(nn.Module):
    """A plain MLP; meta-learning code calls it through ``functional_call``.

    Args:
        in_features: input size.
        out_features: output size.
        hidden_sizes: width of each hidden layer.
        activation: ``"relu"`` or ``"tanh"``.
    """

    def __init__(
        self,
        in_features: int = 1,
        out_features: int = 1,
        hidden_sizes: Sequence[int] = (40, 40),
        activation: str = "relu",
    ) -> None:
        super().__init__()
        acts = {"relu": nn.ReLU, "tanh": nn.Tanh}
        if activation not in acts:
            raise ValueError(f"model.activation must be one of {sorted(acts)}, got {activation!r}")
        layers: list[nn.Module] = []
        width = in_features
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), acts[activation]()]
            width = hidden
        layers.append(nn.Linear(width, out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
