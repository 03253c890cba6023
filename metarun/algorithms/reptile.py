"""Reptile (Nichol, Achiam & Schulman 2018, "On First-Order Meta-Learning Algorithms", arXiv 1803.02999).

Each task of a meta-batch is trained from the meta-parameters theta by ``inner_steps`` steps of Adam
(beta1 = 0, the reference code's) or SGD, giving phi_i; the outer update moves theta towards their
mean, ``theta <- theta + eps * (mean_i phi_i - theta)``. The trainer's optimizer makes that step: the
algorithm hands it ``theta - mean_i phi_i`` as the direction and the outer optimizer is plain SGD of
rate eps, annealed linearly to 0 over the run (``algorithm.outer_schedule``).

The training protocol is the reference code's (openai/supervised-reptile), each part a key:

* ``train_shots``: a training task is ``ways`` classes with ``train_shots`` examples each, all of them
  training examples (Reptile has no query loss); null takes ``task.shots + task.queries``.
* ``inner_batch``: each inner step is one minibatch of that many examples, taken in order from
  shuffled passes over the task's examples (without replacement; a batch may run into the next pass,
  as the reference's ``_mini_batches``); null: every step on all of them.
* ``carry_adam_state``: one inner Adam whose moments and step count run on from task to task, the
  tasks of a meta-batch one after another, through the whole run (the reference's single TensorFlow
  optimizer). Evaluation starts every test task from that state and discards what it did to it, as
  the reference restores its full state after each test task. false: a fresh Adam per task, and the
  tasks of a meta-batch can be batched with vmap.
* ``eval_inner_batch``: evaluation's minibatches of the support set (the reference's ``--eval-batch``),
  drawn the same way from a fixed seed, the same order for every test task; null: full batch.
* ``inner_loss``: ``sum`` over a minibatch's examples (the reference minimizes TensorFlow's per-example
  losses, which sums them) or ``mean``. Adam's step hardly depends on the scale, but a carried Adam
  state meets evaluation minibatches of another size, and an SGD step is scaled by it.

The carried state is kept in buffers (``inner_adam.m_*``, ``inner_adam.v_*``, ``inner_adam.t``), so
checkpoints hold it and a resumed run continues exactly.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.func import functional_call

from metarun.algorithms.base import Algorithm, State
from metarun.meta.batching import ENGINES, over_tasks
from metarun.meta.inner import gradients, inner_step
from metarun.types import LossFn, Params, TaskBatch
from metarun.utils.errors import ConfigError


def key(name: str) -> str:
    return name.replace(".", "-")


def minibatch_order(examples: int, batch: int, steps: int, tasks: int, generator: torch.Generator) -> Tensor:
    """``[tasks, steps * batch]`` example indices: for each task, shuffled passes over its ``examples``
    put end to end, cut after ``steps`` batches of ``batch`` (the reference's minibatches without
    replacement)."""
    passes = math.ceil(steps * batch / examples)
    draws = torch.rand(tasks, passes, examples, generator=generator, device=generator.device)
    return draws.argsort(dim=2).reshape(tasks, passes * examples)[:, :steps * batch]


class Reptile(Algorithm):
    """Reptile with an Adam (beta1 = 0) or SGD inner loop, minibatches and a carried Adam state."""

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        alg = cfg.algorithm
        if alg.inner_optimizer not in ("adam", "sgd"):
            raise ConfigError(f"algorithm.inner_optimizer must be adam or sgd, got {alg.inner_optimizer!r}")
        betas = list(alg.adam_betas)
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ConfigError(f"algorithm.adam_betas must be two numbers in [0, 1), got {betas}")
        if alg.adam_eps <= 0:
            raise ConfigError(f"algorithm.adam_eps must be > 0, got {alg.adam_eps}")
        for name in ("train_shots", "inner_batch", "eval_inner_batch"):
            if alg[name] is not None and alg[name] < 1:
                raise ConfigError(f"algorithm.{name} must be >= 1 or null, got {alg[name]}")
        if alg.inner_loss not in ("sum", "mean"):
            raise ConfigError(f"algorithm.inner_loss must be sum or mean, got {alg.inner_loss!r}")
        if alg.carry_adam_state and alg.inner_optimizer == "adam" and int(os.environ.get("WORLD_SIZE", 1)) > 1:
            raise ConfigError("algorithm.carry_adam_state=true runs the tasks of a meta-batch one after another "
                              "through one Adam state, which ranks cannot share: set algorithm.carry_adam_state=false "
                              "under torchrun")

    def __init__(self, cfg: DictConfig, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__(cfg, model, loss_fn)
        self.adam = cfg.inner_optimizer == "adam"
        self.beta1, self.beta2 = (float(b) for b in cfg.adam_betas)
        self.eps = float(cfg.adam_eps)
        self.train_shots = cfg.train_shots
        self.inner_batch, self.eval_batch = cfg.inner_batch, cfg.eval_inner_batch
        self.summed = cfg.inner_loss == "sum"
        self.carry = bool(cfg.carry_adam_state) and self.adam
        self._plans: dict[tuple[int, int], Tensor] = {}
        if self.carry:  # the inner Adam's state, carried from task to task (checkpointed with the run)
            self.inner_adam = nn.Module()
            for name, p in model.named_parameters():
                self.inner_adam.register_buffer(f"m_{key(name)}", torch.zeros_like(p.detach()))
                self.inner_adam.register_buffer(f"v_{key(name)}", torch.zeros_like(p.detach()))
            self.inner_adam.register_buffer("t", torch.zeros((), dtype=next(model.parameters()).dtype))

    def carried(self, slot: str, name: str) -> Tensor:
        """The carried Adam's moment ``slot`` (m or v) of parameter ``name``."""
        return self.inner_adam.get_buffer(f"{slot}_{key(name)}")

    def graph_key(self) -> tuple:
        return ()

    # --- training episodes --------------------------------------------------------------------

    def training_tasks(self, family, count: int, generator: torch.Generator) -> TaskBatch:
        """``count`` tasks of ``train_shots`` examples per class (all of them in the support set, none in
        the query set), laid out in the order the inner steps take them: step ``i`` trains on examples
        ``i * inner_batch`` to ``(i + 1) * inner_batch``."""
        shots = self.train_shots or family.shots + family.queries
        tasks = family.sample(count, shots, 0, generator).tasks
        x, y = tasks.support_x, tasks.support_y
        if self.inner_batch is not None:
            order = minibatch_order(x.shape[1], self.inner_batch, self.inner_steps, count, generator)
            rows = torch.arange(count, device=order.device)[:, None]
            x, y = x[rows, order], y[rows, order]
        return TaskBatch(x, y, x[:, :0], y[:, :0])

    def train_batch(self, x: Tensor, y: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """Training step ``step``'s examples of a task laid out by :meth:`training_tasks`."""
        if self.inner_batch is None:
            return x, y
        b = self.inner_batch
        return x[step * b:(step + 1) * b], y[step * b:(step + 1) * b]

    def eval_plan(self, examples: int) -> Tensor:
        """Evaluation's minibatches of a support set of ``examples``: index rows ``[steps, eval_inner_batch]``
        for ``test_inner_steps`` (or more) steps, drawn once from a fixed seed (the same for every task)."""
        plan = self._plans.get((examples, self.eval_batch))
        if plan is None:
            rng = np.random.default_rng(0)
            steps = 1024  # enough for any evaluation here; extended below if more are asked for
            passes = math.ceil(steps * self.eval_batch / examples)
            order = np.concatenate([rng.permutation(examples) for _ in range(passes)])[:steps * self.eval_batch]
            plan = torch.as_tensor(order.reshape(steps, self.eval_batch))
            self._plans[(examples, self.eval_batch)] = plan
        return plan

    # --- one task -----------------------------------------------------------------------------

    def start(self, params: Params) -> State:
        if not self.adam:
            return {"params": params}
        if self.carry:  # where the carried Adam stands
            return {"params": params, "m": {k: self.carried("m", k) for k in params},
                    "v": {k: self.carried("v", k) for k in params}, "t": self.inner_adam.t}
        zeros = {k: torch.zeros_like(p) for k, p in params.items()}
        any_param = next(iter(params.values()))
        return {"params": params, "m": zeros, "v": dict(zeros),
                "t": torch.zeros((), dtype=any_param.dtype, device=any_param.device)}

    def optimizer_step(self, state: State, x: Tensor, y: Tensor, engine: str) -> State:
        """One step of the inner optimizer on the examples ``(x, y)``; always first order (Reptile
        never differentiates it). Adam as torch's (bias-corrected moments, then eps)."""
        params = state["params"]

        scale = x.shape[0] if self.summed else 1  # (the mean loss times the examples: their sum)

        def loss(p: Params) -> Tensor:
            return self.loss_fn(functional_call(self.model, p, (x,)), y) * scale

        grads = gradients(loss, params, None, True, engine)
        if not self.adam:
            return {"params": inner_step(params, grads, self.alpha)}
        t = state["t"] + 1
        m = {k: self.beta1 * state["m"][k] + (1 - self.beta1) * g for k, g in grads.items()}
        v = {k: self.beta2 * state["v"][k] + (1 - self.beta2) * g * g for k, g in grads.items()}
        c1, c2 = 1 - self.beta1 ** t, 1 - self.beta2 ** t
        direction = {k: (m[k] / c1) / ((v[k] / c2).sqrt() + self.eps) for k in grads}
        return {"params": inner_step(params, direction, self.alpha), "m": m, "v": v, "t": t}

    def adapt_step(self, state: State, x: Tensor, y: Tensor, step: int, first_order: bool = True,
                   engine: str = "func") -> State:
        """One evaluation step on the support set ``(x, y)`` (on its minibatch ``step`` with
        ``eval_inner_batch``)."""
        if self.eval_batch is not None:
            rows = self.eval_plan(x.shape[0])
            index = rows[step % len(rows)].to(x.device)
            x, y = x[index], y[index]
        return self.optimizer_step(state, x, y, engine)

    def weights(self, state: State, step: int) -> Params:
        return state["params"]

    # --- the outer update ----------------------------------------------------------------------

    def train_task(self, state: State, x: Tensor, y: Tensor, engine: str) -> tuple[State, Tensor]:
        """``inner_steps`` steps on one training task (laid out by :meth:`training_tasks`); returns the
        state and the loss of the adapted parameters on the task's examples (for the logs)."""
        for i in range(self.inner_steps):
            state = self.optimizer_step(state, *self.train_batch(x, y, i), engine)
        with torch.no_grad():
            loss = self.loss_fn(functional_call(self.model, state["params"], (x,)), y)
        return state, loss

    def outer_gradient(self, params: Params, tasks: TaskBatch, batching: str) -> tuple[Params, Tensor]:
        """``theta - mean_i phi_i`` for the model's parameters, and the mean loss of the adapted
        parameters on their tasks' examples (for the logs). With ``carry_adam_state`` the tasks run one
        after another, each continuing the inner Adam where the one before left it, and the state
        after the last is kept for the next meta-batch."""
        theta = {k: p.detach() for k, p in params.items()}
        if not self.carry:
            def one_task(sx, sy, qx, qy, engine):
                state, loss = self.train_task(self.start(theta), torch.cat([sx, qx]), torch.cat([sy, qy]), engine)
                return state["params"], loss

            fast, losses = over_tasks(one_task, tasks, batching)
            return {k: theta[k] - fast[k].mean(dim=0) for k in theta}, losses.mean()
        state, total, losses = self.start(theta), {k: torch.zeros_like(p) for k, p in theta.items()}, []
        for sx, sy, qx, qy in zip(*tasks):  # (in order: the state runs on from task to task)
            state, loss = self.train_task({**state, "params": theta}, torch.cat([sx, qx]), torch.cat([sy, qy]),
                                          ENGINES[batching])
            total = {k: total[k] + state["params"][k] for k in total}
            losses.append(loss)
        with torch.no_grad():  # in place, so a captured CUDA graph updates the buffers it recorded
            for k in theta:
                self.carried("m", k).copy_(state["m"][k])
                self.carried("v", k).copy_(state["v"][k])
            self.inner_adam.t.copy_(state["t"])
        count = len(losses)
        return {k: theta[k] - total[k] / count for k in theta}, torch.stack(losses).mean()
