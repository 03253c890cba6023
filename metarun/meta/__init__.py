"""The functional core, maths only: the one inner step, running a task's computation over a
meta-batch, Hessian-vector products, policy-gradient pieces and TRPO."""

from metarun.meta.batching import over_tasks, refuse_torch_batch_norm, resolve_batching, task_loss
from metarun.meta.hvp import hvp, hvp_operator
from metarun.meta.inner import Rate, adapt, gradients, inner_step

__all__ = ["Rate", "adapt", "gradients", "hvp", "hvp_operator", "inner_step", "over_tasks", "refuse_torch_batch_norm",
           "resolve_batching", "task_loss"]
