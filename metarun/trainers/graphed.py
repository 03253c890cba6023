"""``trainer.cuda_graph=true``: the whole meta-step (inner loops, meta-gradient, Adam) captured
once in a CUDA graph and replayed every iteration, which removes the Python and kernel-launch
overhead that dominates small conv nets on a GPU.

The task batch is copied into fixed input buffers before each replay; the optimizer must be Adam
or AdamW with ``capturable=True`` (which the trainer sets), so its state lives on the device.
Gradients are set to ``None`` before capture, so every replay writes them afresh instead of
accumulating. Capture needs a few warm-up steps first (lazy CUDA initialisation, and the optimizer
state must exist before capture or the graph would re-create it at every replay); they run on the
first batch and are then undone in place, so a graphed run makes the same updates as an eager one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from metarun.types import TaskBatch


@torch.no_grad()
def warm_up_and_undo(step: Callable, run, tasks: TaskBatch, times: int) -> None:
    """Call ``step(run, tasks)`` ``times`` times, then put the parameters, the algorithm's buffers
    (Reptile's carried inner Adam) and the optimizer state back as they were, in place (the tensors
    keep their addresses, which a graph records). State that did not exist before (a fresh Adam) is
    zeroed, which is Adam's and AdamW's initial state."""
    meta_parameters = [*run.algorithm.meta_parameters().values(), *run.algorithm.buffers()]
    params = [p.detach().clone() for p in meta_parameters]
    before = {id(t): t.clone() for s in run.optimizer.state.values() for t in s.values() if torch.is_tensor(t)}
    with torch.enable_grad():
        for _ in range(times):
            step(run, tasks)
    for p, saved in zip(meta_parameters, params):
        p.copy_(saved)
    for state in run.optimizer.state.values():
        for t in state.values():
            if torch.is_tensor(t):
                t.copy_(before[id(t)]) if id(t) in before else t.zero_()


class GraphedMetaStep:
    """Wraps a meta-step ``step(run, tasks) -> loss`` (``trainers.supervised.meta_step``) so that
    it is captured once and replayed. The step's own ``zero_grad(set_to_none=True)`` finds the
    gradients already ``None`` during capture, so it records nothing and replays write afresh.
    What the algorithm's step depends on beyond tensors (``run.algorithm.graph_key()``: MAML++'s
    derivative order, say) is watched: when it changes the step is captured again."""

    def __init__(self, step: Callable[[object, TaskBatch], torch.Tensor], warmup: int = 3) -> None:
        self.step, self.warmup = step, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: TaskBatch | None = None
        self.loss: torch.Tensor | None = None
        self.key: tuple | None = None

    def _capture(self, run, tasks: TaskBatch) -> None:
        self.key = run.algorithm.graph_key()
        self.inputs = TaskBatch(*(t.clone() for t in tasks))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as CUDA graph capture requires
            warm_up_and_undo(self.step, run, self.inputs, self.warmup)
        torch.cuda.current_stream().wait_stream(side)
        run.optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # recorded, not run: the first replay makes the update
            self.loss = self.step(run, self.inputs)

    def __call__(self, run, tasks: TaskBatch) -> torch.Tensor:
        if self.graph is None or run.algorithm.graph_key() != self.key:
            self._capture(run, tasks)
        for buffer, value in zip(self.inputs, tasks):
            buffer.copy_(value)
        self.graph.replay()
        return self.loss.clone()
