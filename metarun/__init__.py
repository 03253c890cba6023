"""metarun: a fast, gradient-checked MAML experiment runner.

From Python, :func:`load` gives a trained model ready to adapt to new tasks (docs/api.md).
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load"]


def load(path, device="cpu"):
    """Load a trained model from a run folder (its best.pt, else last.pt) or a checkpoint file, without
    loading its dataset; returns a :class:`metarun.api.Trained` (``model``, ``config``, ``algorithm``,
    ``iteration``; ``adapt``, ``predict``, ``preprocess``). See :func:`metarun.api.load`."""
    from metarun.api import load as _load  # (imported here: ``import metarun`` stays cheap)

    return _load(path, device)
