"""learn2learn's training loop and metarun's trainer from the same OmniglotCNN weights on the same stream of
training episodes, in float64, for ``--steps`` outer steps: whether a gap between the parity curves can be
the loop (the outer optimizer, the averaging over tasks, what gets updated) rather than the seeds.

Two halves, each in its own environment, as ``gradient_check.py``. The reference's builds the learner with
``reference.py``'s ``build`` and draws the tasks with its ``TrainTasks`` from metarun's training classes,
then runs its loop (per task ``clone``, ``fast_adapt``, ``backward``; gradients times 1 / meta-batch; Adam)
and saves the starting weights, every episode, the loss of every step and the weights at the end.
metarun's builds the run with the trainer's own ``setup`` (the preset's outer optimizer and values, on
``OmniglotCNN``), loads the starting weights and takes the trainer's ``meta_step`` on the same episodes::

    for a in fomaml anil metasgd; do
      /work/envs/l2l/bin/python parity/learn2learn/trajectory_check.py reference $a /tmp/l2l_traj_$a.pt
      .venv/bin/python parity/learn2learn/trajectory_check.py metarun $a /tmp/l2l_traj_$a.pt
    done

Each step's loss and the weights at the end are compared; they agree to rounding, growing slowly with
the steps (Adam divides by the square root of small second moments), if the loops are the same.
ANIL runs with ``--anil-features split`` (batch norm per half, as metarun's passes), as in
``gradient_check.py``.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
WAYS, SHOTS, META_BATCH = 5, 1, 32


def reference(algorithm: str, out: Path, steps: int, seed: int, joint: bool) -> None:
    sys.path.insert(0, str(HERE))
    import reference as ref  # noqa: E402  (learn2learn's environment)

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    learner, features, parameters, _ = ref.build(algorithm, WAYS, fast_lr=0.4, meta_lr=0.001)
    learner.double()
    if features is not None:
        features.double()
    optimizer = torch.optim.Adam(parameters, lr=0.001)  # build()'s, over the float64 tensors
    start = [p.detach().clone() for p in parameters]
    tasks = ref.TrainTasks(ref.common.load_episodes(tasks=1)["train"], WAYS, SHOTS, -1)
    episodes, losses = [], []
    for _ in range(steps):
        optimizer.zero_grad()
        batch, total = [tasks.sample() for _ in range(META_BATCH)], 0.0
        for data, labels in batch:
            error, _ = ref.fast_adapt((data.double(), labels), learner.clone(), features, F.cross_entropy, 1,
                                      SHOTS, WAYS, joint=joint)
            error.backward()
            total += error.item()
        for p in parameters:
            p.grad.data.mul_(1.0 / META_BATCH)
        optimizer.step()
        episodes.append(torch.stack([data for data, _ in batch]))  # [meta-batch, 2 * ways, 28, 28]
        losses.append(total / META_BATCH)
    torch.save({"start": start, "end": [p.detach() for p in parameters], "episodes": torch.stack(episodes),
                "labels": batch[0][1], "losses": losses}, out)
    print(f"trajectory_check: learn2learn's {algorithm}, {steps} steps (loss {losses[0]:.4f} -> {losses[-1]:.4f}), "
          f"written to {out}")


def compare(algorithm: str, saved: Path) -> float:
    sys.path.insert(0, str(HERE.parents[1]))
    from metarun.cli import compose
    from metarun.trainers.supervised import meta_step, setup
    from metarun.types import TaskBatch
    from parity.gradients import largest_relative_error, metarun_named
    from parity.learn2learn.gradient_check import metarun_names

    ref = torch.load(saved)
    cfg = compose("experiment=omniglot_5w1s", f"algorithm={algorithm}", "model=custom",
                  "model._target_=parity.learn2learn.omniglot_cnn.OmniglotCNN", "dtype=float64", "device=cpu",
                  f"algorithm.meta_batch_size={META_BATCH}", "algorithm.batching=vmap", "trainer.num_threads=1")
    run = setup(cfg, Path("/tmp"))
    names = metarun_names(algorithm)
    own = metarun_named(dict(run.model.named_parameters()), dict(run.algorithm.named_parameters()))
    with torch.no_grad():
        for name, value in zip(names, ref["start"]):
            own[name].copy_(value)
    # the examples' layout: each class's images alternate support, query
    x, y = ref["episodes"][:, :, :, None].double(), ref["labels"]
    worst_loss = 0.0
    for step, expected in enumerate(ref["losses"]):
        batch = x[step]
        tasks = TaskBatch(batch[:, 0::2], y[0::2].expand(len(batch), -1), batch[:, 1::2],
                          y[1::2].expand(len(batch), -1))
        loss = meta_step(run, tasks).item()
        worst_loss = max(worst_loss, abs(loss - expected) / abs(expected))
        if step in (0, len(ref["losses"]) - 1):
            print(f"step {step + 1}: loss metarun {loss:.12f}, learn2learn {expected:.12f}")
    print(f"largest relative difference of a step's loss: {worst_loss:.1e}")
    # a conv bias that batch norm follows changes no output, so its gradient is rounding noise, which Adam
    # turns into steps of about its rate: both sides' biases wander apart, harmlessly
    inert = {f"{name}.bias" for name, module in run.model.named_modules() if isinstance(module, torch.nn.Conv2d)}
    print(f"not compared (batch norm follows them): {', '.join(sorted(inert))}")
    worst = largest_relative_error([(name, own[name].detach(), end) for name, end in zip(names, ref["end"])
                                    if name not in inert])
    print(f"trajectory_check: {algorithm}, {len(ref['losses'])} steps: largest relative difference of the "
          f"weights at the end {worst:.1e}")
    return max(worst, worst_loss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("side", choices=["reference", "metarun"])
    parser.add_argument("algorithm", choices=["maml", "fomaml", "anil", "metasgd"])
    parser.add_argument("file", type=Path)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--anil-features", default="split", choices=["split", "joint"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.side == "reference":
        reference(args.algorithm, args.file, args.steps, args.seed, args.anil_features == "joint")
    elif compare(args.algorithm, args.file) > 1e-8:
        sys.exit(1)


if __name__ == "__main__":
    main()
