"""Sinusoid regression (MAML paper, section 5.1): y = A sin(x - phase) on x in [-5, 5].

Each task draws an amplitude and a phase; its support and query points are drawn from the same
curve. A whole meta-batch is generated in one call, on the training device, from a
``torch.Generator`` the caller owns (so the stream can be checkpointed and resumed exactly).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from metarun.types import TaskBatch


@dataclass
class SinusoidBatch:
    """A meta-batch of sinusoid tasks plus the curve parameters (for plots)."""

    tasks: TaskBatch
    amplitude: Tensor  # [tasks]
    phase: Tensor  # [tasks]


class SinusoidTasks:
    """The sinusoid task distribution.

    Args:
        shots: support points per task in training (K).
        queries: query points per task in training.
        test_shots: the K values evaluated.
        test_queries: query points per evaluation task.
        amplitude: (low, high) of the uniform amplitude distribution; paper: (0.1, 5.0).
        phase: (low, high) of the uniform phase distribution; paper: (0, pi).
        x_range: (low, high) of the uniform input distribution; paper: (-5, 5).
        device: where the tensors are made.
        dtype: their floating-point type.
        name: the family's name (from the config).
    """

    @classmethod
    def model_sizes(cls, task) -> dict:
        return {}  # the config's model sizes are the whole story (in_features = out_features = 1)

    def __init__(
        self,
        shots: int = 10,
        queries: int = 10,
        test_shots: tuple[int, ...] = (5, 10),
        test_queries: int = 100,
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, torch.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        name: str = "sinusoid",
    ) -> None:
        self.shots, self.queries = shots, queries
        self.test_shots, self.test_queries = tuple(test_shots), test_queries
        self.amplitude, self.phase, self.x_range = tuple(amplitude), tuple(phase), tuple(x_range)
        self.device, self.dtype = torch.device(device), dtype

    def _uniform(self, shape, bounds, generator: torch.Generator) -> Tensor:
        u = torch.rand(shape, generator=generator, device=self.device, dtype=self.dtype)
        return bounds[0] + (bounds[1] - bounds[0]) * u

    def sample(
        self, num_tasks: int, shots: int, queries: int, generator: torch.Generator, split: str = "train"
    ) -> SinusoidBatch:
        """Draw ``num_tasks`` tasks with ``shots`` support and ``queries`` query points each.

        Inputs and targets have shape ``[tasks, points, 1]``. Every split draws from the same
        distribution; validation and test sets differ from training by their generator's seed.
        """
        amplitude = self._uniform((num_tasks, 1, 1), self.amplitude, generator)
        phase = self._uniform((num_tasks, 1, 1), self.phase, generator)
        x = self._uniform((num_tasks, shots + queries, 1), self.x_range, generator)
        y = amplitude * torch.sin(x - phase)
        tasks = TaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])
        return SinusoidBatch(tasks, amplitude.flatten(), phase.flatten())

    def curve(self, amplitude: Tensor, phase: Tensor, x: Tensor) -> Tensor:
        """The true function of tasks with these parameters at inputs ``x`` (``[points, 1]``)."""
        return amplitude[:, None, None] * torch.sin(x[None] - phase[:, None, None])

    # --- what the supervised trainer asks of a task family -------------------------------------
    loss_fn = staticmethod(torch.nn.functional.mse_loss)
    metric_name = "mse"
    lower_is_better = True

    @staticmethod
    def metric_fn(outputs: Tensor, targets: Tensor) -> Tensor:
        """Per-task metric: mean squared error on the query set."""
        return ((outputs - targets) ** 2).mean()

    def visualize(self, writer, step: int, model, params, generator: torch.Generator, adapt) -> None:
        """Write :meth:`figure` for one validation task to TensorBoard."""
        writer.add_figure("val/adaptation", self.figure(model, params, generator, self.shots, adapt), step)

    def figure(self, model, params, generator: torch.Generator, shots: int, adapt, steps=(1, 10)):
        """A figure like the paper's Figure 2 for one task: true curve, the K points, and the
        prediction before adaptation and after each of ``steps`` inner steps, adapted by ``adapt``
        (``adapt(params, x, y, steps) -> params``: the running algorithm's own inner loop)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from torch.func import functional_call

        batch = self.sample(1, shots, 1, generator)
        sx, sy = batch.tasks.support_x[0], batch.tasks.support_y[0]
        grid = torch.linspace(*self.x_range, 200, device=self.device, dtype=self.dtype)[:, None]
        truth = self.curve(batch.amplitude, batch.phase, grid)[0]
        params = {k: p.detach() for k, p in params.items()}
        fig, ax = plt.subplots(figsize=(6, 4))
        # colours from the colour-blind-safe tab10 cycle, one per curve, every curve in the legend
        colors = iter(plt.get_cmap("tab10").colors)
        ax.plot(grid.cpu(), truth.cpu(), "-", color=next(colors), lw=2, label="ground truth")
        ax.plot(sx.cpu(), sy.cpu(), "^", color=next(colors), label=f"{shots} points used for gradient")
        ax.plot(grid.cpu(), functional_call(model, params, (grid,)).detach().cpu(), ":", color=next(colors),
                label="pre-update")
        for n in steps:
            fast = adapt(params, sx, sy, n)
            ax.plot(grid.cpu(), functional_call(model, fast, (grid,)).detach().cpu(), "--", color=next(colors),
                    label=f"{n} grad step{'s' * (n > 1)}")
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        return fig
