"""One MAML++ meta-gradient of the authors' code and of metarun, from the same weights on the same episodes,
in float64: whether a gap between the parity curves can be the algorithm (it cannot when they agree).

Two halves, each in its own environment. The reference's (the venv of README.md) builds
``MAMLFewShotClassifier`` exactly as ``reference.py`` trains it (its own argument set and initialisation),
runs its ``forward`` at ``--epoch`` on 3 random episodes (second order, 5 steps, the multi-step loss while
the epoch is below 10) and saves weights, episodes and the gradient of every trainable parameter: the
network, the per-step batch-norm weights and biases, the learned per-layer per-step rates. metarun's (the
repository's venv) loads those weights into ``conv4_maxpool`` with the parity values and the ``mamlpp``
preset's own meta-parameters, takes its ``outer_gradient`` and prints each parameter's relative error::

    for e in 0 10; do
      /work/envs/mamlpp/bin/python parity/mamlpp/gradient_check.py reference /tmp/mamlpp_grad_$e.pt --epoch $e
      .venv/bin/python parity/mamlpp/gradient_check.py metarun /tmp/mamlpp_grad_$e.pt
    done

The reference builds its step-loss weights as float32 (``torch.Tensor(loss_weights)``): at epoch 0 its
0.2 is 0.2 + 3e-9, so gradients there agree to about 1e-8, not to rounding. From epoch 10 the loss is
the last step's alone and they agree to rounding. The reference keeps a 6th rate per layer
(``number_of_training_steps_per_iter + 1``) that no step uses; its gradient is zero and it is not compared.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

TASKS, WAYS, STEPS = 3, 5, 5
HERE = Path(__file__).resolve().parent
# metarun's conv4_maxpool blocks are (conv, norm, activation, pool): conv i is features.{4i}, its norm features.{4i+1}
BLOCKS = 4


def reference(out: Path, ref: Path, epoch: int, seed: int) -> None:
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(ref))
    import reference as driver  # noqa: E402  (the reference's environment)

    args, device = driver.reference_args(ref, driver.CONFIG, seed, None)
    from few_shot_learning_system import MAMLFewShotClassifier
    with contextlib.redirect_stdout(io.StringIO()):  # it prints every parameter's shape
        model = MAMLFewShotClassifier(im_shape=(2, 1, 28, 28), device=device, args=args)
    model.double()
    g = torch.Generator().manual_seed(1)
    sx, qx = torch.rand(2, TASKS, WAYS, 1, 1, 28, 28, generator=g, dtype=torch.float64)  # [B, N, K, C, H, W]
    y = torch.arange(WAYS).repeat(TASKS, 1)[..., None]  # [B, N, K]: class n is label n
    model.current_epoch = epoch  # what run_train_iter sets before its forward
    losses, _ = model.forward(data_batch=(sx, qx, y, y), epoch=epoch, use_second_order=True,
                              use_multi_step_loss_optimization=args.use_multi_step_loss_optimization,
                              num_steps=args.number_of_training_steps_per_iter, training_phase=True)
    losses["loss"].backward()
    named = {k: p for k, p in model.named_parameters() if p.requires_grad}
    torch.save({"weights": {k: p.detach() for k, p in named.items()}, "grads": {k: p.grad for k, p in named.items()},
                "sx": sx.flatten(1, 2), "qx": qx.flatten(1, 2), "y": y.flatten(1),
                "epoch": epoch, "loss": losses["loss"].item()}, out)
    print(f"gradient_check: the reference's MAML++ gradient at epoch {epoch} (loss {losses['loss'].item():.6f}) "
          f"written to {out}")


ALL = slice(None)


def metarun_names() -> dict[str, tuple[str, slice]]:
    """The reference's trainable parameter -> metarun's name, and the part of it that metarun has (the rates:
    the first STEPS). metarun's per-step tensors are keyed by the model parameter's name with dots as dashes."""
    names: dict[str, tuple[str, slice]] = {}
    for i in range(BLOCKS):
        conv, norm = f"features-{4 * i}", f"features-{4 * i + 1}"
        for p in ("weight", "bias"):
            names[f"classifier.layer_dict.conv{i}.conv.{p}"] = (f"features.{4 * i}.{p}", ALL)
            names[f"classifier.layer_dict.conv{i}.norm_layer.{p}"] = (f"algorithm.norm.{norm}-{p}", ALL)
            names[f"inner_loop_optimizer.names_learning_rates_dict.layer_dict-conv{i}-conv-{p}"] = (
                f"algorithm.rates.{conv}-{p}", slice(0, STEPS))
    for theirs, ours in (("weights", "weight"), ("bias", "bias")):
        names[f"classifier.layer_dict.linear.{theirs}"] = (f"head.{ours}", ALL)
        names[f"inner_loop_optimizer.names_learning_rates_dict.layer_dict-linear-{theirs}"] = (
            f"algorithm.rates.head-{ours}", slice(0, STEPS))
    return names


def load_weights(model, algorithm, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy the reference's trainable parameters (``weights``, by its names) into metarun's ``model`` and
    ``algorithm``; returns metarun's parameters by the names of :func:`metarun_names`."""
    from metarun.algorithms.mamlpp import norm_parameters
    from parity.gradients import metarun_named

    names = metarun_names()
    own = metarun_named(dict(model.named_parameters()), dict(algorithm.named_parameters()))
    compared = set(own) - set(norm_parameters(model))  # the model's norm weights give way to per-step copies
    if compared != {ours for ours, _ in names.values()} or set(weights) != set(names):
        sys.exit(f"parity/mamlpp: parameters differ: {sorted(compared ^ {ours for ours, _ in names.values()})}")
    with torch.no_grad():
        for theirs, (ours, part) in names.items():
            own[ours].copy_(weights[theirs][part])
    return own


def compare(ref: dict) -> float:
    """metarun's gradient from the reference's saved weights and episodes (``ref``), against its gradient."""
    sys.path.insert(0, str(HERE.parents[1]))
    from metarun.algorithms import ALGORITHMS
    from metarun.cli import compose
    from metarun.models import Conv4
    from metarun.types import TaskBatch
    from parity.gradients import largest_relative_error

    cfg = compose("experiment=omniglot_5w1s", "algorithm=mamlpp", "algorithm.meta_batch_size=8")
    model = Conv4(in_channels=1, out_features=WAYS, hidden=64, image_size=28, downsample="maxpool",
                  activation="leaky_relu").double()
    alg = ALGORITHMS["mamlpp"](cfg.algorithm, model, F.cross_entropy).double()
    alg.on_iteration(ref["epoch"] * cfg.algorithm.iterations_per_epoch)
    names = metarun_names()
    load_weights(model, alg, ref["weights"])
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    tasks = TaskBatch(ref["sx"], ref["y"], ref["qx"], ref["y"])
    grads, loss = alg.outer_gradient(params, tasks, "loop")
    print(f"loss: metarun {loss.item():.12f}, the reference {ref['loss']:.12f}")
    unused = max(ref["grads"][k][STEPS:].abs().max().item() for k, (_, part) in names.items() if part != ALL)
    print(f"the reference's unused 6th rates: largest gradient {unused:.1e}")
    worst = largest_relative_error([(ours, grads[ours], ref["grads"][theirs][part])
                                    for theirs, (ours, part) in names.items()])
    print(f"gradient_check: MAML++ at epoch {ref['epoch']}: largest relative error {worst:.1e}")
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("side", choices=["reference", "metarun"])
    parser.add_argument("file", type=Path)
    parser.add_argument("--epoch", type=int, default=0, help="the reference's epoch (MSL below 10; reference side)")
    parser.add_argument("--seed", type=int, default=0, help="the reference's model seed (reference side)")
    parser.add_argument("--ref", type=Path, default=Path("/work/refs/HowToTrainYourMAMLPytorch"))
    args = parser.parse_args()
    if args.side == "reference":
        reference(args.file, args.ref.resolve(), args.epoch, args.seed)
        return
    saved = torch.load(args.file)
    # float32 step-loss weights in the reference while the multi-step loss is on (see above)
    bound = 1e-10 if saved["epoch"] >= 10 else 1e-6
    if compare(saved) > bound:
        sys.exit(1)


if __name__ == "__main__":
    main()
