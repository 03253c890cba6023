"""Gaussian MLP policy (the MAML paper's RL policy: two hidden layers of 100 ReLU units) with a
learned, state-independent log standard deviation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from metarun.models.mlp import MLP


class GaussianPolicy(nn.Module):
    """``forward(obs)`` is the action mean; ``log_std`` is a parameter, one entry per action.

    Meta-learning code calls it through ``functional_call`` and reads ``params["log_std"]``.

    Args:
        obs_dim: observation size (the task passes it).
        act_dim: action size (the task passes it).
        hidden_sizes: hidden widths; paper: (100, 100).
        activation: ``"relu"`` (paper) or ``"tanh"``.
        init_std: initial standard deviation of every action dimension.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden_sizes: Sequence[int] = (100, 100),
                 activation: str = "relu", init_std: float = 1.0) -> None:
        super().__init__()
        self.mean = MLP(obs_dim, act_dim, hidden_sizes, activation)
        self.log_std = nn.Parameter(torch.full((act_dim,), float(torch.log(torch.tensor(init_std)))))

    def forward(self, obs: Tensor) -> Tensor:
        return self.mean(obs)
