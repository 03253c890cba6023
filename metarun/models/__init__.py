"""Plain network modules; no meta-learning logic lives here."""

from metarun.models.conv4 import Conv4
from metarun.models.mlp import MLP
from metarun.models.norm import BatchStatNorm
from metarun.models.policy import GaussianPolicy
from metarun.models.resnet12 import ResNet12

__all__ = ["MLP", "Conv4", "ResNet12", "BatchStatNorm", "GaussianPolicy"]
