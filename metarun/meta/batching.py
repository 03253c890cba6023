"""Running one task's computation over a meta-batch: batched with ``torch.func.vmap``, or in a
Python loop.

* ``batching="vmap"``: the per-task function runs once under ``vmap`` with the ``"func"`` gradient
  engine (``torch.func.grad``): the fast path.
* ``batching="loop"``: a Python loop over tasks with the ``"autograd"`` engine
  (``torch.autograd.grad``): the reference the correctness tests hold the fast path to, and the
  faster choice for conv nets on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from metarun.types import LossFn, Params, TaskBatch
from metarun.utils.errors import ConfigError

ENGINES = {"vmap": "func", "loop": "autograd"}


def task_loss(model: nn.Module, params: Params, x: Tensor, y: Tensor, loss_fn: LossFn) -> Tensor:
    """Loss of ``model`` run with ``params`` on one task's inputs ``x`` and targets ``y``."""
    return loss_fn(functional_call(model, params, (x,)), y)


def over_tasks(fn: Callable, tasks: TaskBatch, batching: str):
    """``fn(support_x, support_y, query_x, query_y, engine)`` for every task of ``tasks``, results
    stacked along a new first dimension (tensors, or tuples and dicts of them, as vmap returns)."""
    if batching == "vmap":
        return vmap(lambda *task: fn(*task, engine="func"))(*tasks)
    if batching == "loop":
        return _stack([fn(*task, engine="autograd") for task in zip(*tasks)])
    raise ValueError(f"batching must be 'vmap' or 'loop', got {batching!r}")


def _stack(items: list):
    if isinstance(items[0], dict):
        return {k: _stack([item[k] for item in items]) for k in items[0]}
    if isinstance(items[0], tuple):
        return tuple(_stack(list(parts)) for parts in zip(*items))
    return torch.stack(items)


def refuse_torch_batch_norm(model: nn.Module) -> None:
    """A :class:`ConfigError` naming the model's first torch batch-norm layer, if it has one: under
    vmap (which training may use, and evaluation always does) ``F.batch_norm`` gives second-order
    meta-gradients that are off by percents (see :mod:`metarun.models.norm`) and cannot update its
    running statistics at all; :class:`~metarun.models.BatchStatNorm` is the same normalisation,
    exact under vmap."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise ConfigError(
                f"the model has torch's batch norm ({name}: {type(module).__name__}), whose meta-gradients under vmap "
                "are wrong (F.batch_norm: second order off by percents) and whose running statistics vmap cannot "
                "update; normalise with metarun.models.BatchStatNorm (batch statistics, as MAML's code, exact under "
                "vmap)")


def resolve_batching(batching: str, device: torch.device, model: nn.Module, tasks: int = 2) -> str | None:
    """Turn ``batching="auto"`` into ``"vmap"`` or ``"loop"`` where the faster one is known.

    A meta-batch of one task (``tasks``) has nothing to batch: vmap would only add its cost per
    operation (Reptile's sinusoid preset: 45 ms a step with vmap, 17 ms with the loop, on a 2-core
    CPU), so it takes the loop. Otherwise, on CUDA vmap wins for every model we ship; on a CPU it wins
    for MLPs. For a conv net on a CPU it depends on the size and the threads, so this returns
    ``None``: the trainer times both on a probe meta-batch and keeps the faster
    (:func:`metarun.trainers.supervised.measure_batching`).
    """
    if batching != "auto":
        return batching
    if tasks == 1:
        return "loop"
        return "loop"
    if device.type == "cuda":
        return "vmap"
    has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    return None if has_conv else "vmap"
