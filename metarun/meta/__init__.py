"""The functional meta-learning core: inner loop, MAML meta-loss, Hessian-vector products."""

from metarun.meta.hvp import hvp
from metarun.meta.maml import (
    MetaOutput,
    TaskBatch,
    adapt,
    adapt_autograd,
    adaptation_curve,
    meta_loss,
    resolve_batching,
    task_loss,
)

__all__ = [
    "MetaOutput",
    "TaskBatch",
    "adapt",
    "adapt_autograd",
    "adaptation_curve",
    "hvp",
    "meta_loss",
    "resolve_batching",
    "task_loss",
]
