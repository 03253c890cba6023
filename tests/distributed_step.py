"""Run under torchrun by tests/test_distributed.py: for every algorithm, one meta-step on W ranks,
each with its share of a meta-batch of 16 tasks, against one process stepping on all 16 (computed
on rank 0 from copies taken before the step), in float64. Writes the largest differences to the
JSON file named on the command line.

    torchrun --standalone --nproc_per_node=2 tests/distributed_step.py out.json
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

from metarun import distributed
from metarun.cli import compose
from metarun.trainers import supervised

ALGORITHMS = {"maml": [], "fomaml": [], "anil": [], "metasgd": [], "mamlpp": ["algorithm.learned_rates=true"],
              "reptile": [], "imaml": []}
TASKS = 16


def one(name: str, extra: list[str], tmp: Path) -> dict:
    cfg = compose(f"algorithm={name}", "dtype=float64", f"algorithm.meta_batch_size={TASKS}", "trainer.num_threads=1",
                  "algorithm.batching=loop", *extra)
    run = supervised.setup(cfg, tmp)
    tasks = run.task.sample(TASKS, run.task.shots, run.task.queries, torch.Generator().manual_seed(7)).tasks
    share = run.tasks_per_rank
    mine = type(tasks)(*(t[distributed.rank() * share:(distributed.rank() + 1) * share] for t in tasks))
    # the single-process reference: copies of the model, algorithm and optimizer before the step
    # (one deepcopy, so the copies share the copied parameters as the originals share theirs)
    model, algorithm, optimizer = copy.deepcopy((run.model, run.algorithm, run.optimizer))
    start = {k: p.detach().clone() for k, p in run.algorithm.meta_parameters().items()}
    run.algorithm.on_iteration(0)
    algorithm.on_iteration(0)
    loss = supervised.meta_step(run, mine)
    after = {k: p.detach().clone() for k, p in run.algorithm.meta_parameters().items()}
    averaged = {k: p.grad.detach().clone() for k, p in run.algorithm.meta_parameters().items()}
    everyone = distributed.all_gather_object({k: v.cpu() for k, v in after.items()}, "the test")
    # one process's step on all 16 tasks (outer_gradient alone: no all-reduce)
    grads, alone_loss = algorithm.outer_gradient(dict(model.named_parameters()), tasks, run.batching)
    for k, p in algorithm.meta_parameters().items():
        p.grad = grads[k]
    optimizer.step()
    reference = {k: p.detach() for k, p in algorithm.meta_parameters().items()}
    return {
        "parameters": len(after),
        "own_parameters": sum(k.startswith("algorithm.") for k in after),
        # the direction the optimizer stepped along (Adam's first step is nearly its sign: the
        # gradient itself is the sharper check)
        "grad_difference": max(float((averaged[k] - grads[k]).abs().max()) for k in after),
        "largest_grad": max(float(grads[k].abs().max()) for k in after),
        "max_difference": max(float((after[k] - reference[k]).abs().max()) for k in after),
        "largest_update": max(float((reference[k] - start[k]).abs().max()) for k in after),
        "ranks_equal": all(torch.equal(other[k], everyone[0][k]) for other in everyone for k in after),
        "loss_difference": abs(float(loss) - float(alone_loss)),
    }


def rl(tmp: Path) -> dict:
    """MAML-TRPO on 2D navigation: each rank's share of 8 tasks' episodes (all ranks sample the same
    8, from generators of the same seed), against one process's TRPO step on all 8, in float64."""
    from torch.utils._pytree import tree_map

    from metarun.trainers import rl as rl_trainer

    cfg = compose("task=navigation2d", "algorithm.meta_batch_size=8", "algorithm.trajectories=4",
                  "trainer.num_threads=1")
    run = rl_trainer.setup(cfg, tmp)
    generators = {"tasks": torch.Generator().manual_seed(3), "actions": torch.Generator().manual_seed(4)}
    batch, _ = run.algorithm.collect(run.envs, generators, seed=11, num_tasks=8)
    # the step in float64: in float32 the conjugate gradient alone moves it by about 1 % when the
    # same mean is merely summed in another order (one process, two halves)
    run.policy.to(torch.float64)
    batch = tree_map(lambda t: t.double() if t.is_floating_point() else t, batch)
    share = run.tasks_per_rank
    mine = tree_map(lambda t: t[distributed.rank() * share:(distributed.rank() + 1) * share], batch)
    params = {k: p.detach().clone() for k, p in run.policy.named_parameters()}
    stepped, stats = run.algorithm.outer_step(params, mine, distributed.average)
    alone, alone_stats = run.algorithm.outer_step(params, batch)
    everyone = distributed.all_gather_object({k: v.cpu() for k, v in stepped.items()}, "the test")
    return {
        "max_difference": max(float((stepped[k] - alone[k]).abs().max()) for k in params),
        "largest_update": max(float((alone[k] - params[k]).abs().max()) for k in params),
        "step_fraction": [stats.step_fraction, alone_stats.step_fraction],
        "kl": [stats.kl, alone_stats.kl],
        "ranks_equal": all(torch.equal(other[k], everyone[0][k]) for other in everyone for k in params),
    }


def main() -> None:
    distributed.init()
    tmp = Path(sys.argv[1]).parent
    out = {name: one(name, extra, tmp) for name, extra in ALGORITHMS.items()}
    out["maml_trpo"] = rl(tmp)
    if distributed.is_main():
        out["world_size"] = distributed.world_size()
        Path(sys.argv[1]).write_text(json.dumps(out, indent=1))
    distributed.finish()  # (leaves together, then exits without the finalisation where gloo can abort)


if __name__ == "__main__":
    main()
