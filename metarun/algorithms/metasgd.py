"""Meta-SGD (Li, Zhou, Chen & Li 2017, arXiv 1707.09835).

MAML whose inner step ``theta - alpha * grad`` has a learned rate per parameter entry: ``alpha`` has
the shape of each parameter and is meta-learned with the initialisation by the same outer optimizer
(unconstrained: its sign sets the direction). With every rate equal to MAML's alpha it is MAML, which
a test checks.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn

from metarun.algorithms.base import Algorithm
from metarun.meta.inner import Rate
from metarun.types import LossFn
from metarun.utils.errors import ConfigError


def key(name: str) -> str:
    """A parameter's name as a ParameterDict key (no dots)."""
    return name.replace(".", "-")


class MetaSGD(Algorithm):
    """Learned per-parameter inner rates, ``algorithm.rates.<parameter>`` in checkpoints.

    ``rate_init``: ``constant`` starts every rate at ``inner_lr`` (as learn2learn does); ``uniform``
    draws them from U[0.005, 0.1] (the Meta-SGD paper's range), from the run's seed.
    """

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        if cfg.algorithm.rate_init not in ("constant", "uniform"):
            raise ConfigError(f"algorithm.rate_init must be constant or uniform, got {cfg.algorithm.rate_init!r}")

    def __init__(self, cfg: DictConfig, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__(cfg, model, loss_fn)
        self.rates = nn.ParameterDict()
        self.rate_names = [name for name, _ in model.named_parameters()]
        for name, p in model.named_parameters():
            rate = torch.full_like(p, self.alpha, requires_grad=False)
            if cfg.rate_init == "uniform":
                rate.uniform_(0.005, 0.1)
            self.rates[key(name)] = nn.Parameter(rate)

    def inner_rate(self, step: int) -> Rate:
        return {name: self.rates[key(name)] for name in self.rate_names}
