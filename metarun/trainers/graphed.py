"""``trainer.cuda_graph=true``: the whole meta-step (inner loops, meta-gradient, Adam) captured
once in a CUDA graph and replayed every iteration, which removes the Python and kernel-launch
overhead that dominates small conv nets on a GPU.

The task batch is copied into fixed input buffers before each replay; the optimizer must be
``capturable`` (Adam / AdamW with ``capturable=True``, which the trainer sets). Gradients are set
to ``None`` before capture, so every replay writes them afresh instead of accumulating.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from metarun.meta import TaskBatch


class GraphedMetaStep:
    """Wraps a meta-step ``step(run, tasks) -> loss`` (``trainers.supervised.meta_step``) so that
    it is captured once and replayed. The step's own ``zero_grad(set_to_none=True)`` finds the
    gradients already ``None`` during capture, so it records nothing and replays write afresh."""

    def __init__(self, step: Callable[[object, TaskBatch], torch.Tensor], warmup: int = 3) -> None:
        self.step, self.warmup = step, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: TaskBatch | None = None
        self.loss: torch.Tensor | None = None

    def _capture(self, run, tasks: TaskBatch) -> None:
        self.inputs = TaskBatch(*(t.clone() for t in tasks))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as CUDA graph capture requires
            for _ in range(self.warmup):
                self.step(run, self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        run.optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = self.step(run, self.inputs)

    def __call__(self, run, tasks: TaskBatch) -> torch.Tensor:
        if self.graph is None:
            # the warm-up steps train on this first batch: a few extra outer steps, then replay
            self._capture(run, tasks)
        for buffer, value in zip(self.inputs, tasks):
            buffer.copy_(value)
        self.graph.replay()
        return self.loss.clone()
