"""The types task families and algorithms share. Both import them from here and neither imports
the other: a task family produces a :class:`TaskBatch` (or :class:`Rollouts`), an algorithm
consumes it."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from torch import Tensor

Params = dict[str, Tensor]
"""A model's parameters by name, as ``torch.func.functional_call`` takes them."""

LossFn = Callable[[Tensor, Tensor], Tensor]
"""``loss_fn(outputs, targets) -> scalar``."""


class TaskBatch(NamedTuple):
    """A meta-batch of supervised tasks; every tensor has the task index as its first dimension."""

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor


class Rollouts(NamedTuple):
    """Trajectories of several RL tasks; every tensor starts with ``[tasks, trajectories, horizon]``."""

    observations: Tensor
    actions: Tensor
    rewards: Tensor
    mask: Tensor  # 1 while an episode is alive


class MetaOutput(NamedTuple):
    """An outer objective on a meta-batch."""

    loss: Tensor  # mean query loss over the tasks (differentiable with respect to the meta-parameters)
    task_losses: Tensor  # per-task query loss, shape [tasks]
    query_outputs: Tensor  # model outputs on the query sets, shape [tasks, queries, ...]


class Curve(NamedTuple):
    """An evaluation's adaptation curve, each ``[inner_steps + 1, tasks]``."""

    metric: Tensor  # the task family's metric on each query set after 0, 1, ... steps
    loss: Tensor  # the query loss at the same points (a task diverged where it grows far above step 0)
    other: Tensor | None = None  # the metric with the queries predicted the other way (transductive or not:
                                 # Algorithm.query_outputs), from the same adaptation, where asked (else NaN)
