"""Plain network modules; no meta-learning logic lives here."""

from metarun.models.mlp import MLP

__all__ = ["MLP"]
