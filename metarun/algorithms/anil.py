"""ANIL, almost no inner loop (Raghu, Raghu, Bengio & Vinyals 2020, arXiv 1909.09157).

MAML whose inner loop adapts only the network's head (its last layer); the body and the head's
starting point are both meta-learned by the outer gradient, which flows through the head's
adaptation to the body's features (second order unless ``first_order``). Equal to MAML with the
body's inner rate set to zero, which a test checks.
"""

from __future__ import annotations

from omegaconf import DictConfig
from torch import nn

from metarun.algorithms.base import Algorithm
from metarun.types import LossFn
from metarun.utils.errors import ConfigError


def head_parameters(model: nn.Module) -> list[str]:
    """The names of the head's parameters: those of the last module (in registration order) that
    holds parameters of its own, e.g. conv4's ``head`` or an MLP's last linear layer."""
    owners = [(name, module) for name, module in model.named_modules() if list(module.parameters(recurse=False))]
    if not owners:
        return []
    name, module = owners[-1]
    return [f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False)]


class ANIL(Algorithm):
    """MAML adapting the head only."""

    @classmethod
    def check(cls, cfg: DictConfig, model: nn.Module) -> None:
        head = head_parameters(model)
        if not head or len(head) == len(dict(model.named_parameters())):
            raise ConfigError(f"algorithm=anil needs a model with a body and a head (a last layer of its own); "
                              f"{type(model).__name__} has {'no parameters' if not head else 'only one layer'}")

    def __init__(self, cfg: DictConfig, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__(cfg, model, loss_fn)
        self.adapted = frozenset(head_parameters(model))
