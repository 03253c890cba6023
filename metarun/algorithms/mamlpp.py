"""MAML++ (Antoniou, Edwards & Storkey 2019, "How to train your MAML", arXiv 1810.09502).

MAML with these changes, each switchable in ``algorithm/mamlpp.yaml`` (with all of them off it is
MAML, which a test checks):

* ``multi_step_loss`` (MSL): the outer loss is a weighted sum of the query losses after every inner
  step, the weights annealed towards the last step over ``multi_step_loss_epochs`` epochs (the
  reference code's schedule, ``get_per_step_loss_importance_vector``); afterwards only the last step.
* ``learned_rates`` (LSLR): an inner rate per parameter tensor and per step, meta-learned (start: alpha).
* ``per_step_norm`` (BNWB): the normalization layers' weights and biases are meta-learned separately
  for each inner step and not adapted in the inner loop; as in the reference code, the support pass of
  step ``i`` and the query pass after update ``i`` use the weights of index ``i``.
* ``first_order_epochs`` (DA): first order for that many epochs, then second order.
* cosine annealing of the outer rate (CA): ``algorithm.outer_schedule`` in the paper settings.

An epoch is ``iterations_per_epoch`` outer steps (500 in the reference code). Per-step running
statistics (BNRS) are not modelled: the reference code updates them but always normalizes with the
batch's statistics (``training=True``), as metarun's norm layers do, so they change no output there.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.func import functional_call

from metarun.algorithms.base import Algorithm, State
from metarun.meta.inner import Rate
from metarun.models.norm import BatchStatNorm
from metarun.types import LossFn, Params
from metarun.utils.errors import ConfigError


def key(name: str) -> str:
    return name.replace(".", "-")


def norm_parameters(model: nn.Module) -> list[str]:
    """Names of the normalization layers' weights and biases."""
    return [f"{name}.{p}" for name, module in model.named_modules() if isinstance(module, BatchStatNorm)
            for p, _ in module.named_parameters(recurse=False)]


def step_loss_weights(steps: int, epoch: int, epochs: int) -> list[float]:
    """MSL's weight of the query loss after each inner step at ``epoch`` (the reference code's
    ``get_per_step_loss_importance_vector``): 1/N each at first, the others decaying by
    ``1 / N / epochs`` per epoch to at least ``0.03 / N``, the last growing to take the rest."""
    if epoch >= epochs:
        return [0.0] * (steps - 1) + [1.0]
    decay, floor = 1.0 / steps / epochs, 0.03 / steps
    weights = [max(1.0 / steps - epoch * decay, floor) for _ in range(steps - 1)]
    return weights + [min(1.0 / steps + epoch * (steps - 1) * decay, 1.0 - (steps - 1) * floor)]


class MAMLPlusPlus(Algorithm):
    """MAML++; its meta-parameters are ``algorithm.rates.<parameter>`` (``[steps]`` each) and
    ``algorithm.norm.<norm parameter>`` (``[steps, features]``)."""

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        alg = cfg.algorithm
        for name in ("multi_step_loss_epochs", "first_order_epochs"):
            if alg[name] < 0:
                raise ConfigError(f"algorithm.{name} must be >= 0, got {alg[name]}")
        if alg.iterations_per_epoch < 1:
            raise ConfigError(f"algorithm.iterations_per_epoch must be >= 1, got {alg.iterations_per_epoch}")
        if (alg.learned_rates or alg.per_step_norm or alg.multi_step_loss) and alg.inner_steps < 1:
            raise ConfigError("algorithm.inner_steps must be >= 1 for MAML++'s per-step features "
                              "(learned_rates, per_step_norm, multi_step_loss)")

    @classmethod
    def check(cls, cfg: DictConfig, model: nn.Module) -> None:
        if cfg.per_step_norm and not norm_parameters(model):
            raise ConfigError(f"algorithm.per_step_norm=true needs a model with normalization layers "
                              f"(metarun.models.BatchStatNorm); {type(model).__name__} has none: set "
                              f"algorithm.per_step_norm=false")

    def __init__(self, cfg: DictConfig, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__(cfg, model, loss_fn)
        steps, params = self.inner_steps, dict(model.named_parameters())
        self.norm_names = norm_parameters(model) if cfg.per_step_norm else []
        if self.norm_names:  # per-step copies replace the model's own in every forward pass
            self.adapted = frozenset(k for k in params if k not in self.norm_names)
            self.norm = nn.ParameterDict({key(k): nn.Parameter(params[k].detach().expand(steps, -1).clone())
                                          for k in self.norm_names})
        self.rate_names = [k for k in params if k not in self.norm_names] if cfg.learned_rates else []
        if self.rate_names:
            self.rates = nn.ParameterDict({key(k): nn.Parameter(torch.full((steps,), self.alpha, dtype=params[k].dtype))
                                           for k in self.rate_names})
        self.multi_step_loss, self.msl_epochs = bool(cfg.multi_step_loss), int(cfg.multi_step_loss_epochs)
        self.first_order_epochs, self.epoch_length = int(cfg.first_order_epochs), int(cfg.iterations_per_epoch)
        self.second_order_wanted = not self.first_order
        # in the parameters' dtype from the start: a float64 step before the first on_iteration must not see
        # float32 weights (off by 3e-8)
        self.register_buffer("loss_weights", torch.tensor(step_loss_weights(max(steps, 1), 0, self.msl_epochs),
                                                          dtype=next(model.parameters()).dtype))
        self.msl_active = self.multi_step_loss and self.msl_epochs > 0
        self.on_iteration(0)

    # --- schedules ---------------------------------------------------------------------------

    def on_iteration(self, iteration: int) -> None:
        epoch = iteration // self.epoch_length
        if self.multi_step_loss:
            self.msl_active = epoch < self.msl_epochs
            weights = step_loss_weights(self.inner_steps, epoch, self.msl_epochs)
            self.loss_weights.copy_(torch.tensor(weights, dtype=self.loss_weights.dtype))
        self.first_order = not self.second_order_wanted or epoch < self.first_order_epochs

    def graph_key(self) -> tuple:
        return (self.first_order, self.msl_active)

    # --- the inner loop ----------------------------------------------------------------------

    def inner_rate(self, step: int) -> Rate:
        if not self.rate_names:
            return self.alpha
        i = min(step, self.inner_steps - 1)  # evaluation beyond the trained steps keeps the last rate
        return {k: self.rates[key(k)][i] for k in self.rate_names}

    def step_weights(self, step: int) -> Params:
        i = min(step, self.inner_steps - 1)
        return {k: self.norm[key(k)][i] for k in self.norm_names}

    def weights(self, state: State, step: int) -> Params:
        # the query pass after update i (step = i + 1) uses index i, as the reference code does
        fixed = self.step_weights(max(step - 1, 0))
        return {**state, **fixed} if fixed else state

    def task_objective(self, params: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor,
                       engine: str) -> tuple[Tensor, Tensor]:
        if not self.msl_active:
            return super().task_objective(params, sx, sy, qx, qy, engine)
        state, loss = self.start(params), 0.0
        for i in range(self.inner_steps):  # the query loss after every step, weighted
            state = self.adapt_step(state, sx, sy, i, self.first_order, engine)
            out = functional_call(self.model, self.weights(state, i + 1), (qx,))
            loss = loss + self.loss_weights[i] * self.loss_fn(out, qy)
        return loss, out
