"""The MAML++ authors' training loop and metarun's trainer from the same weights on the same stream of
training episodes, in float64, for ``--steps`` outer steps: whether a gap between the parity curves can be
the loop (Adam over the weights, rates and per-step norm weights, the cosine schedule, the multi-step loss's
annealing) rather than the seeds. ``gradient_check.py`` checks one meta-gradient; this checks the steps.

Two halves, each in its own environment, as ``gradient_check.py``. The reference's builds
``MAMLFewShotClassifier`` as ``reference.py`` does, with one outer step per epoch (``total_iter_per_epoch
= 1``) so that 20 steps pass through the multi-step loss's whole annealing (epochs 0 to 9) and on into the
last step's loss alone, and the cosine schedule (T_max 100 epochs) moves at every step. It draws the
episodes with ``reference.py``'s ``TrainEpisodes`` and takes ``run_train_iter``'s steps (scheduler, forward,
``meta_update``) on them in float64: the default dtype is float64 for its run, so the model and the
step-loss weights it builds each step (``torch.Tensor``, float32 in its own runs) are float64, and the
images are passed as float64 where ``run_train_iter`` would cast them to float32. It saves the starting
weights, the episodes, each step's loss and the weights at the end. metarun's builds the run with the
trainer's ``setup`` (the ``mamlpp`` preset with the parity values of ``parity/metarun.sh``, an epoch of one
step, the cosine over 100 steps), loads the starting weights and takes the trainer's iteration
(``on_iteration``, ``meta_step``, the scheduler's step) on the same episodes::

    /work/envs/mamlpp/bin/python parity/mamlpp/trajectory_check.py reference /tmp/mamlpp_traj.pt
    .venv/bin/python parity/mamlpp/trajectory_check.py metarun /tmp/mamlpp_traj.pt

Each step's loss and the weights at the end are compared, beside the same comparison of metarun with itself
(its meta-batch under vmap and one task after another): the same loop in the same arithmetic up to the order
of its sums. Adam divides by the root of small second moments, so rounding grows from about the third step,
and two runs of one loop end up to about 1e-8 apart after 20 steps; exit 1 above 1e-6. The convolutions' biases,
which batch norm follows, are not compared: their gradients are rounding noise that Adam turns into steps.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import random
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ITERATIONS_PER_EPOCH, EPOCHS = 1, 100  # one step per epoch; the reference config's 100 epochs for the cosine
# Two float64 runs of one loop drift apart from about the third step (metarun's two batchings: up to 5e-9 in
# the loss after 20 steps); a different loop does not come near: the cosine over 99 steps instead of 100, or
# epochs of two steps, left the 20th step's loss 0.28 (relative) from the reference's
BOUND = 1e-6


def reference(out: Path, ref: Path, steps: int, seed: int) -> None:
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(ref))
    import reference as driver  # noqa: E402  (the reference's environment)

    driver.quiet()
    torch.set_default_dtype(torch.float64)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    args, device = driver.reference_args(ref, driver.CONFIG, seed, ITERATIONS_PER_EPOCH)
    assert args.total_epochs == EPOCHS
    from few_shot_learning_system import MAMLFewShotClassifier
    with contextlib.redirect_stdout(io.StringIO()):  # it prints every parameter's shape
        model = MAMLFewShotClassifier(im_shape=(2, 1, 28, 28), device=device, args=args)
    named = {k: p for k, p in model.named_parameters() if p.requires_grad}
    start = {k: p.detach().clone() for k, p in named.items()}
    episodes = driver.TrainEpisodes(driver.common.load_episodes(tasks=1)["train"], args,
                                    np.random.RandomState(seed), invert=False)
    batches, losses = [], []
    for it in range(steps):
        xs, xq, ys, yq = (torch.from_numpy(a) for a in episodes.batch_of_tasks())
        batch = (xs.double(), xq.double(), ys.long(), yq.long())
        epoch = it // ITERATIONS_PER_EPOCH
        # run_train_iter's step, without its cast of the images to float32
        model.scheduler.step(epoch=epoch)
        model.current_epoch = epoch
        loss, _ = model.train_forward_prop(data_batch=batch, epoch=epoch)
        model.meta_update(loss=loss["loss"])
        model.optimizer.zero_grad()
        model.zero_grad()
        batches.append(batch)
        losses.append(loss["loss"].item())
    # [steps, meta-batch, N * K, 1, 28, 28] and [steps, meta-batch, N * K]: each task's set as its forward flattens it
    sx, qx, sy, qy = (torch.stack([b[i].flatten(1, 2) for b in batches]) for i in range(4))
    torch.save({"start": start, "end": {k: p.detach() for k, p in named.items()}, "sx": sx, "qx": qx,
                "sy": sy, "qy": qy, "losses": losses}, out)
    print(f"trajectory_check: the reference's MAML++, {steps} steps (loss {losses[0]:.4f} -> {losses[-1]:.4f}), "
          f"written to {out}")


def metarun_trajectory(ref: dict, batching: str) -> tuple[dict[str, torch.Tensor], list[float]]:
    """metarun's trainer from the reference's starting weights over its episodes: the weights at the end (by
    the names of ``metarun_names``) and each step's loss."""
    from metarun.cli import compose
    from metarun.trainers.supervised import meta_step, setup
    from metarun.types import TaskBatch
    from parity.mamlpp.gradient_check import load_weights

    cfg = compose("experiment=omniglot_5w1s", "algorithm=mamlpp", "model=conv4_maxpool", "model.hidden=64",
                  "model.activation=leaky_relu", "algorithm.meta_batch_size=8",
                  f"algorithm.iterations_per_epoch={ITERATIONS_PER_EPOCH}",
                  f"algorithm.outer_schedule.T_max={EPOCHS * ITERATIONS_PER_EPOCH}", "dtype=float64", "device=cpu",
                  f"algorithm.batching={batching}", "trainer.num_threads=1")
    run = setup(cfg, Path("/tmp"))
    own = load_weights(run.model, run.algorithm, ref["start"])
    losses = []
    for it in range(len(ref["losses"])):
        run.algorithm.on_iteration(it)  # the trainer's iteration (supervised.train)
        losses.append(meta_step(run, TaskBatch(ref["sx"][it], ref["sy"][it], ref["qx"][it], ref["qy"][it])).item())
        run.scheduler.step()
    return {k: v.detach().clone() for k, v in own.items()}, losses


def compare(saved: Path) -> float:
    sys.path.insert(0, str(HERE.parents[1]))
    from parity.gradients import largest_relative_error
    from parity.mamlpp.gradient_check import metarun_names

    ref = torch.load(saved)
    names = metarun_names()
    conv_biases = {ours for ours, _ in names.values() if ours.startswith("features.") and ours.endswith(".bias")}
    end = {ours: ref["end"][theirs][part] for theirs, (ours, part) in names.items() if ours not in conv_biases}
    trajectories = {b: metarun_trajectory(ref, b) for b in ("vmap", "loop")}

    def loss_gap(a: list[float], b: list[float]) -> float:
        return max(abs(x - y) / abs(y) for x, y in zip(a, b))

    def weight_gap(a: dict, b: dict) -> float:
        return max(((a[k] - b[k]).norm() / b[k].norm()).item() for k in end)

    own, losses = trajectories["vmap"]
    print(f"step 1: loss metarun {losses[0]:.12f}, the reference {ref['losses'][0]:.12f}")
    print(f"step {len(losses)}: loss metarun {losses[-1]:.12f}, the reference {ref['losses'][-1]:.12f}")
    print(f"not compared (batch norm follows them): {', '.join(sorted(conv_biases))}")
    worst = largest_relative_error([(k, own[k], end[k]) for k in end])
    worst_loss = loss_gap(losses, ref["losses"])
    # the yardstick: metarun against itself, the tasks batched under vmap and one after another
    loop_weights, loop_losses = trajectories["loop"]
    print(f"largest relative difference over {len(losses)} steps, of a step's loss / of the weights at the end:\n"
          f"  metarun (vmap) vs the reference      {worst_loss:.1e} / {worst:.1e}\n"
          f"  metarun (loop) vs the reference      {loss_gap(loop_losses, ref['losses']):.1e} / "
          f"{weight_gap(loop_weights, end):.1e}\n"
          f"  metarun (vmap) vs metarun (loop)     {loss_gap(losses, loop_losses):.1e} / "
          f"{weight_gap(own, loop_weights):.1e}")
    return max(worst, worst_loss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("side", choices=["reference", "metarun"])
    parser.add_argument("file", type=Path)
    parser.add_argument("--steps", type=int, default=20, help="outer steps (reference side)")
    parser.add_argument("--seed", type=int, default=0, help="the model's and the episodes' seed (reference side)")
    parser.add_argument("--ref", type=Path, default=Path("/work/refs/HowToTrainYourMAMLPytorch"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.side == "reference":
        reference(args.file, args.ref.resolve(), args.steps, args.seed)
    elif compare(args.file) > BOUND:
        sys.exit(1)


if __name__ == "__main__":
    main()
