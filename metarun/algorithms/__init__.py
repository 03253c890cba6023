"""Meta-learning algorithms behind one interface (:class:`~metarun.algorithms.base.Algorithm`):
one module each, and one line each in :data:`ALGORITHMS`."""

from __future__ import annotations

from omegaconf import DictConfig
from torch import nn

from metarun.algorithms.anil import ANIL
from metarun.algorithms.base import Algorithm
from metarun.algorithms.imaml import IMAML
from metarun.algorithms.maml import MAML
from metarun.algorithms.mamlpp import MAMLPlusPlus
from metarun.algorithms.metasgd import MetaSGD
from metarun.algorithms.reptile import Reptile
from metarun.types import LossFn
from metarun.utils.errors import ConfigError

ALGORITHMS: dict[str, type[Algorithm]] = {  # algorithm.name -> class
    "maml": MAML,
    "fomaml": MAML,
    "anil": ANIL,
    "metasgd": MetaSGD,
    "mamlpp": MAMLPlusPlus,
    "reptile": Reptile,
    "imaml": IMAML,
}


def build(cfg: DictConfig, model: nn.Module, loss_fn: LossFn) -> Algorithm:
    """The algorithm ``cfg.name`` for ``model``, after its own checks of the config and the model."""
    cls = ALGORITHMS.get(cfg.name)
    if cls is None:
        raise ConfigError(f"algorithm={cfg.name} is not a supervised algorithm (known: {', '.join(sorted(ALGORITHMS))})")
    cls.check(cfg, model)
    return cls(cfg, model, loss_fn)


__all__ = ["ALGORITHMS", "Algorithm", "build"]
