"""The functional meta-learning core: inner loop, MAML meta-loss, Hessian-vector products."""

from metarun.meta.hvp import hvp, hvp_operator
from metarun.meta.maml import (
    Curve,
    MetaOutput,
    TaskBatch,
    adapt,
    adapt_autograd,
    adaptation_curve,
    meta_loss,
    resolve_batching,
    sgd_steps,
    task_loss,
)

__all__ = [
    "Curve",
    "MetaOutput",
    "TaskBatch",
    "adapt",
    "adapt_autograd",
    "adaptation_curve",
    "hvp",
    "hvp_operator",
    "meta_loss",
    "resolve_batching",
    "sgd_steps",
    "task_loss",
]
