"""MAML as pure functions over a parameter dict.

Everything here works on ``params: dict[str, Tensor]`` and calls the model through
``torch.func.functional_call``, so the same per-task code runs in a Python loop or under
``torch.func.vmap`` over the tasks of a meta-batch.

Two implementations of the meta-loss live side by side on purpose:

* ``batching="vmap"``: the inner gradient is ``torch.func.grad`` and the tasks are batched with
  ``torch.func.vmap``; this is the fast path.
* ``batching="loop"``: a Python loop over tasks whose inner gradient is ``torch.autograd.grad``
  (``create_graph=True`` for second order). It is the reference the correctness tests hold the
  fast path to, and the faster choice for conv nets on a CPU.

In both, the meta-gradient is ordinary reverse-mode autograd on the mean query loss, so
``meta_loss(...).backward()`` fills ``.grad`` of the model's parameters and any torch optimizer
does the outer step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

Params = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


class TaskBatch(NamedTuple):
    """A meta-batch of tasks; every tensor has the task index as its first dimension."""

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor


class MetaOutput(NamedTuple):
    """Result of a meta-loss evaluation."""

    loss: Tensor  # mean query loss over the tasks (differentiable w.r.t. the meta-parameters)
    task_losses: Tensor  # per-task query loss, shape [tasks]
    query_outputs: Tensor  # model outputs on the query sets, shape [tasks, queries, ...]


def task_loss(model: nn.Module, params: Params, x: Tensor, y: Tensor, loss_fn: LossFn) -> Tensor:
    """Loss of ``model`` run with ``params`` on one task's inputs ``x`` and targets ``y``."""
    return loss_fn(functional_call(model, params, (x,)), y)


def sgd_steps(loss: Callable[[Params], Tensor], params: Params, lr: float, steps: int,
              first_order: bool = False) -> Params:
    """``steps`` differentiable SGD steps on ``loss(params)``, built on ``torch.func.grad``.

    The shared inner loop of every algorithm here (supervised MAML, MAML for RL). The result
    stays differentiable with respect to ``params`` (second order); ``first_order=True``
    detaches the inner gradients.
    """
    step = grad(loss)
    for _ in range(steps):
        grads = step(params)
        if first_order:
            grads = {k: g.detach() for k, g in grads.items()}
        params = {k: p - lr * grads[k] for k, p in params.items()}
    return params


def adapt(
    model: nn.Module,
    params: Params,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    inner_lr: float,
    inner_steps: int,
    first_order: bool = False,
) -> Params:
    """Adapt ``params`` to one task with ``inner_steps`` SGD steps on its support set.

    Uses ``torch.func.grad``, so it composes with ``vmap`` and with an outer ``backward()``:
    the returned parameters stay differentiable with respect to ``params`` (second order).
    With ``first_order=True`` the inner gradients are detached, which drops the second-order
    term of the meta-gradient (FOMAML).

    Args:
        model: the network; only its structure is used, the weights come from ``params``.
        params: the parameters to adapt from (the meta-parameters, or an adapted copy).
        x, y: the task's support inputs and targets.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        inner_lr: the inner step size alpha.
        inner_steps: how many steps; zero returns ``params`` unchanged.
        first_order: detach the inner gradients.

    Example:
        >>> model = torch.nn.Linear(1, 1)
        >>> params = dict(model.named_parameters())
        >>> x, y = torch.randn(5, 1), torch.randn(5, 1)
        >>> fast = adapt(model, params, x, y, torch.nn.functional.mse_loss, 0.01, 1)
        >>> sorted(fast)
        ['bias', 'weight']
    """
    return sgd_steps(lambda p: task_loss(model, p, x, y, loss_fn), params, inner_lr, inner_steps, first_order)


def adapt_autograd(
    model: nn.Module,
    params: Params,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    inner_lr: float,
    inner_steps: int,
    first_order: bool = False,
) -> Params:
    """The reference inner loop: same maths as :func:`adapt`, built on ``torch.autograd.grad``.

    Only for a single task outside ``vmap``. ``create_graph`` keeps the inner graph for second
    order; first order cuts it.
    """
    for _ in range(inner_steps):
        names = list(params)
        loss = task_loss(model, params, x, y, loss_fn)
        needs = [params[k] for k in names]
        grads = torch.autograd.grad(loss, needs, create_graph=not first_order, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(needs, grads)]
        params = {k: params[k] - inner_lr * g for k, g in zip(names, grads)}
    return params


def meta_loss(
    model: nn.Module,
    params: Params,
    tasks: TaskBatch,
    loss_fn: LossFn,
    inner_lr: float,
    inner_steps: int,
    first_order: bool = False,
    batching: str = "vmap",
) -> MetaOutput:
    """Mean query loss after adapting to each task's support set (the MAML objective).

    Args:
        model, params, loss_fn, inner_lr, inner_steps, first_order: as in :func:`adapt`.
        tasks: the meta-batch; first dimension of every tensor is the task.
        batching: ``"vmap"`` (fast) or ``"loop"`` (reference); both give the same values and
            gradients up to floating-point rounding.

    Returns:
        A :class:`MetaOutput`; call ``.loss.backward()`` for the meta-gradient.
    """
    if batching == "vmap":

        def one_task(sx, sy, qx, qy):
            fast = adapt(model, params, sx, sy, loss_fn, inner_lr, inner_steps, first_order)
            out = functional_call(model, fast, (qx,))
            return loss_fn(out, qy), out

        task_losses, outputs = vmap(one_task)(*tasks)
    elif batching == "loop":
        losses, outs = [], []
        for sx, sy, qx, qy in zip(*tasks):
            fast = adapt_autograd(model, params, sx, sy, loss_fn, inner_lr, inner_steps, first_order)
            out = functional_call(model, fast, (qx,))
            losses.append(loss_fn(out, qy))
            outs.append(out)
        task_losses, outputs = torch.stack(losses), torch.stack(outs)
    else:
        raise ValueError(f"batching must be 'vmap' or 'loop', got {batching!r}")
    return MetaOutput(task_losses.mean(), task_losses, outputs)


class Curve(NamedTuple):
    """What :func:`adaptation_curve` records, each ``[inner_steps + 1, tasks]``."""

    metric: Tensor  # the task family's metric on each query set after 0, 1, ... steps
    loss: Tensor  # the query loss at the same points (a task diverged where it grows far above step 0)


def adaptation_curve(
    model: nn.Module,
    params: Params,
    tasks: TaskBatch,
    loss_fn: LossFn,
    metric_fn: Callable[[Tensor, Tensor], Tensor],
    inner_lr: float,
    inner_steps: int,
) -> Curve:
    """``metric_fn`` and ``loss_fn`` on each task's query set after 0, 1, ..., ``inner_steps`` inner steps.

    For evaluation: no graph is kept. Returns a :class:`Curve` of two ``[inner_steps + 1, tasks]`` tensors.
    """
    params = {k: p.detach() for k, p in params.items()}

    def one_task(sx, sy, qx, qy):
        fast, values = params, []
        step = grad(lambda p: task_loss(model, p, sx, sy, loss_fn))
        for i in range(inner_steps + 1):
            out = functional_call(model, fast, (qx,))
            values.append(torch.stack([metric_fn(out, qy), loss_fn(out, qy)]))
            if i < inner_steps:
                g = step(fast)
                fast = {k: p - inner_lr * g[k] for k, p in fast.items()}
        return torch.stack(values)  # [steps + 1, 2]

    curves = vmap(one_task)(*tasks)  # [tasks, steps + 1, 2]
    return Curve(curves[..., 0].T, curves[..., 1].T)


def resolve_batching(batching: str, device: torch.device, model: nn.Module) -> str | None:
    """Turn ``batching="auto"`` into ``"vmap"`` or ``"loop"`` where the faster one is known.

    On CUDA vmap wins for every model we ship; on a CPU it wins for MLPs (sinusoid: ~5x). For a
    conv net on a CPU it depends on the size (measured on 2 cores, one thread: Omniglot 5-way
    vmap 1.5x faster, 20-way 0.87x), so this returns ``None``: the trainer times both on the first
    meta-batch and keeps the faster (:func:`metarun.trainers.supervised.measure_batching`).
    """
    if batching != "auto":
        return batching
    if device.type == "cuda":
        return "vmap"
    has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    return None if has_conv else "vmap"
