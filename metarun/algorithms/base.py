"""The seam between the trainers and the meta-learning algorithms.

A trainer knows an algorithm only through :class:`Algorithm`:

* the meta-parameters it owns beyond the model's (``self.parameters()``: Meta-SGD's rates, MAML++'s
  per-step rates and norm weights), which the outer optimizer updates and checkpoints save;
* :meth:`Algorithm.outer_gradient`: how a meta-batch becomes the direction the outer optimizer steps
  along, for every meta-parameter (a gradient, as MAML; a parameter difference, as Reptile; an
  implicit gradient, as iMAML);
* :meth:`Algorithm.start`, :meth:`Algorithm.adapt_step` and :meth:`Algorithm.weights`: how it adapts
  to one task, step by step; training, evaluation and the figures all adapt through these;
* :meth:`Algorithm.check`: what it needs of its config and the model;
* :meth:`Algorithm.training_tasks`: how a training meta-batch is drawn from the task family (each
  task's support and query sets; Reptile draws its own training episodes).

The per-task methods are pure functions of tensors, so the same code runs for one task in a Python
loop (the ``"autograd"`` gradient engine) or for a whole meta-batch under ``torch.func.vmap``
(the ``"func"`` engine); see :mod:`metarun.meta.batching`.
"""

from __future__ import annotations

from collections.abc import Collection
from functools import partial

import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.func import functional_call, vmap

from metarun.meta.batching import over_tasks
from metarun.meta.inner import Rate, gradients, inner_step
from metarun.types import Curve, LossFn, MetaOutput, Params, TaskBatch

State = Params
"""What an algorithm carries from one inner step to the next for one task: the adapted parameters
(and, for an algorithm whose inner optimizer has state, that state too)."""

PREFIX = "algorithm."
"""Meta-parameters the algorithm owns are named ``algorithm.<name>`` beside the model's own names."""


class Algorithm(nn.Module):
    """A gradient-based meta-learner; this base class is MAML with the first-order switch.

    Subclasses change what they need: :meth:`inner_rate` (Meta-SGD, MAML++), :attr:`adapted`
    (ANIL), :meth:`step_weights` (MAML++), :meth:`task_objective` (MAML++'s multi-step loss), or
    :meth:`outer_gradient` and the inner step itself (Reptile, iMAML).

    Args:
        cfg: the ``algorithm`` config group.
        model: the network; the algorithm calls it through ``functional_call`` and does not own it.
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` of the task family.
    """

    def __init__(self, cfg: DictConfig, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.__dict__["model"] = model  # not a submodule: the model's parameters are not the algorithm's
        self.loss_fn = loss_fn
        self.name = str(cfg.name)
        self.alpha = float(cfg.inner_lr)
        self.inner_steps = int(cfg.inner_steps)
        self.first_order = bool(cfg.first_order)
        self.adapted: frozenset[str] | None = None  # the parameters that adapt in the inner loop (None: all)

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        """Range checks of the whole config (``cfg``) that a type cannot express, run before anything is
        built; raise :class:`~metarun.utils.errors.ConfigError` naming the setting. Nothing by default."""

    @classmethod
    def check(cls, cfg: DictConfig, model: nn.Module) -> None:
        """Raise :class:`~metarun.utils.errors.ConfigError` naming the setting this algorithm cannot
        serve with ``cfg`` (the ``algorithm`` group) and ``model``; nothing by default."""

    def on_iteration(self, iteration: int) -> None:
        """Called before each outer step with the number of steps taken so far, for what follows a
        schedule (MAML++'s loss weights and derivative order). It may change tensors in place only,
        so a captured CUDA graph sees the change; nothing by default."""

    def graph_key(self) -> tuple:
        """What a captured step depends on beyond tensors (a CUDA graph is captured again when it
        changes): the derivative order by default."""
        return (self.first_order,)

    def training_tasks(self, family, count: int, generator: torch.Generator) -> TaskBatch:
        """``count`` training tasks drawn from the task family with ``generator`` (the run's training
        stream): each with the family's support and query sets (``task.shots``, ``task.queries``)."""
        return family.sample(count, family.shots, family.queries, generator).tasks

    # --- the meta-parameters -------------------------------------------------------------------

    def meta_parameters(self) -> dict[str, nn.Parameter]:
        """Every parameter the outer optimizer updates: the model's, then the algorithm's own."""
        return {**dict(self.model.named_parameters()),
                **{PREFIX + k: p for k, p in self.named_parameters()}}

    # --- adapting to one task (pure: runs per task, also under vmap) ---------------------------

    def inner_rate(self, step: int) -> Rate:
        """The inner learning rate of step ``step`` (a number, or a tensor per parameter name)."""
        return self.alpha

    def step_weights(self, step: int) -> Params:
        """Parameters that replace the adapted ones in the forward pass at step ``step`` (MAML++'s
        per-step norm weights); none by default."""
        return {}

    def start(self, params: Params) -> State:
        """The state before the first inner step."""
        return params

    def adapt_step(self, state: State, x: Tensor, y: Tensor, step: int, first_order: bool,
                   engine: str = "func") -> State:
        """One inner step on the support set ``(x, y)``: the one inner step of :mod:`metarun.meta.inner`."""
        fixed = self.step_weights(step)

        def loss(p: Params) -> Tensor:
            return self.loss_fn(functional_call(self.model, {**p, **fixed}, (x,)), y)

        return inner_step(state, gradients(loss, state, self.adapted, first_order, engine), self.inner_rate(step))

    def weights(self, state: State, step: int) -> Params:
        """The parameters the model runs with after ``step`` inner steps."""
        fixed = self.step_weights(step)
        return {**state, **fixed} if fixed else state

    def adapt_to(self, params: Params, x: Tensor, y: Tensor, steps: int) -> Params:
        """``steps`` inner steps on one task's support set, no graph kept (figures, users' code)."""
        params = {k: p.detach() for k, p in params.items()}
        state = self.start(params)
        for i in range(steps):
            state = self.adapt_step(state, x, y, i, first_order=True)
        return self.weights(state, steps)

    # --- the outer update ----------------------------------------------------------------------

    def task_objective(self, params: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor,
                       engine: str) -> tuple[Tensor, Tensor]:
        """One task's outer loss: ``inner_steps`` inner steps on the support set, then the query loss.
        Returns the loss and the query outputs."""
        state = self.start(params)
        for i in range(self.inner_steps):
            state = self.adapt_step(state, sx, sy, i, self.first_order, engine)
        out = functional_call(self.model, self.weights(state, self.inner_steps), (qx,))
        return self.loss_fn(out, qy), out

    def outer_loss(self, params: Params, tasks: TaskBatch, batching: str) -> MetaOutput:
        """The mean of :meth:`task_objective` over the meta-batch (vmap or loop)."""
        losses, outputs = over_tasks(partial(self.task_objective, params), tasks, batching)
        return MetaOutput(losses.mean(), losses, outputs)

    def outer_gradient(self, params: Params, tasks: TaskBatch, batching: str) -> tuple[Params, Tensor]:
        """The direction the outer optimizer steps along for every meta-parameter, keyed as
        :meth:`meta_parameters` (here: the gradient of :meth:`outer_loss`), and the mean query loss."""
        own = dict(self.named_parameters())
        out = self.outer_loss(params, tasks, batching)
        wrt = [*params.values(), *own.values()]
        grads = torch.autograd.grad(out.loss, wrt, allow_unused=True)
        names = [*params, *(PREFIX + k for k in own)]
        return {k: torch.zeros_like(p) if g is None else g for k, p, g in zip(names, wrt, grads)}, out.loss.detach()

    # --- evaluation ----------------------------------------------------------------------------

    def query_outputs(self, weights: Params, sx: Tensor, qx: Tensor, transductive: bool = True) -> Tensor:
        """The model's outputs on a task's query examples at evaluation.

        ``transductive``: all of them in one batch, so a normalization layer uses the query set's own
        statistics (MAML's code, and most published numbers). Otherwise each query example is
        predicted alone in one batch with the support set, so what it is normalized with is the
        support set's statistics plus its own (Reptile's non-transductive mode; no query example sees
        another). With no batch-statistics layer in the model both give the same outputs."""
        if transductive:
            return functional_call(self.model, weights, (qx,))

        def one(q: Tensor) -> Tensor:
            return functional_call(self.model, weights, (torch.cat([sx, q[None]]),))[-1]

        return vmap(one)(qx)

    @torch.no_grad()  # (torch.func.grad inside still differentiates: it ignores an outer no_grad)
    def curve(self, params: Params, tasks: TaskBatch, metric_fn, steps: int, transductive: bool = True,
              other_at: Collection[int] = (), batching: str = "vmap") -> Curve:
        """The metric and the loss on each task's query set after 0, 1, ..., ``steps`` inner steps
        (no graph kept), each ``[steps + 1, tasks]``, predicting the queries as ``transductive`` says
        (:meth:`query_outputs`). ``other_at``: after these numbers of steps, also the metric of the
        other mode, from the same adaptation (``Curve.other``, NaN after the other numbers).
        ``batching``: ``vmap`` adapts the tasks together, ``loop`` one after another (faster where the
        run's probe found the loop faster, as for a conv4 with max-pools on a CPU)."""
        params = {k: p.detach() for k, p in params.items()}
        other_at = set(other_at)

        def one_task(sx, sy, qx, qy):
            state, values = self.start(params), []
            for i in range(steps + 1):
                weights = self.weights(state, i)
                out = self.query_outputs(weights, sx, qx, transductive)
                row = [metric_fn(out, qy), self.loss_fn(out, qy)]
                if other_at:
                    other = metric_fn(self.query_outputs(weights, sx, qx, not transductive), qy) if i in other_at else None
                    row.append(torch.full_like(row[0], float("nan")) if other is None else other)
                values.append(torch.stack(row))
                if i < steps:
                    state = self.adapt_step(state, sx, sy, i, first_order=True)
            return torch.stack(values)  # [steps + 1, 2 or 3]

        if batching == "loop":
            curves = torch.stack([one_task(*task) for task in zip(*tasks)])
        else:
            curves = vmap(one_task)(*tasks)  # [tasks, steps + 1, 2 or 3]
        return Curve(curves[..., 0].T, curves[..., 1].T, curves[..., 2].T if other_at else None)
