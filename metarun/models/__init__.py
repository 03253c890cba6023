"""Plain network modules; no meta-learning logic lives here."""

from metarun.models.conv4 import BatchStatNorm2d, Conv4
from metarun.models.mlp import MLP
from metarun.models.policy import GaussianPolicy

__all__ = ["MLP", "Conv4", "BatchStatNorm2d", "GaussianPolicy"]
