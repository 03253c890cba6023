"""One meta-gradient of learn2learn and of metarun, from the same OmniglotCNN weights on the same episodes,
in float64: what a gap between the parity curves cannot be when they agree (the gradient), in seconds.

Two halves, each in its own environment: the reference's (the learn2learn venv of README.md) builds the
learner exactly as ``reference.py`` trains it (its ``build``, ``layout`` and ``fast_adapt``), takes one
meta-batch's gradient and saves weights, episodes and gradient; metarun's (the repository's venv) loads
the weights into ``omniglot_cnn.OmniglotCNN``, takes the algorithm preset's ``outer_gradient`` and prints
each parameter's relative error::

    for a in maml fomaml anil metasgd; do
      /work/envs/l2l/bin/python parity/learn2learn/gradient_check.py reference $a /tmp/l2l_grad_$a.pt
      .venv/bin/python parity/learn2learn/gradient_check.py metarun $a /tmp/l2l_grad_$a.pt
    done

``--anil-features joint`` (the example's, and the parity runs') pools ANIL's batch-norm statistics over
support and query, which metarun's passes do not: only ``split`` can agree. A conv bias's gradient is
zero up to rounding (batch norm follows it), so its relative error is noise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

TASKS, WAYS, SHOTS = 3, 5, 1


def episodes() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, TASKS, WAYS * SHOTS, 1, 28, 28, generator=g, dtype=torch.float64)
    y = torch.arange(WAYS).repeat_interleave(SHOTS).repeat(TASKS, 1)
    return {"sx": x[0], "qx": x[1], "y": y}


def reference(algorithm: str, out: Path, joint: bool) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import reference as ref  # noqa: E402  (learn2learn's environment)

    torch.manual_seed(0)
    learner, features, parameters, _ = ref.build(algorithm, WAYS, fast_lr=0.4, meta_lr=0.001)
    learner.double()
    if features is not None:
        features.double()
    data = episodes()
    for t in range(TASKS):
        batch = ref.layout(data["sx"][t], data["y"][t], data["qx"][t], data["y"][t], WAYS, SHOTS)
        error, _ = ref.fast_adapt(batch, learner.clone(), features, F.cross_entropy, 1, SHOTS, WAYS, joint=joint)
        (error / TASKS).backward()
    torch.save({"weights": [p.detach() for p in parameters], "grads": [p.grad for p in parameters], **data}, out)
    print(f"gradient_check: learn2learn's {algorithm} gradient written to {out}")


def metarun_names(algorithm: str) -> list[str]:
    """metarun's names of the reference's parameters, in the reference's order: each block registers its
    batch norm before its convolution; Meta-SGD's rates follow the weights, in the same order."""
    names = []
    for i in range(4):
        names += [f"features.{3 * i + 1}.weight", f"features.{3 * i + 1}.bias", f"features.{3 * i}.weight",
                  f"features.{3 * i}.bias"]
    names += ["head.weight", "head.bias"]
    if algorithm == "metasgd":
        names += [f"algorithm.rates.{name.replace('.', '-')}" for name in names]
    return names


def compare(algorithm: str, saved: Path) -> float:
    root = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root))
    from metarun.algorithms import ALGORITHMS
    from metarun.cli import compose
    from metarun.types import TaskBatch
    from parity.gradients import largest_relative_error, metarun_named
    from parity.learn2learn.omniglot_cnn import OmniglotCNN

    ref = torch.load(saved)
    model = OmniglotCNN().double()
    cfg = compose("experiment=omniglot_5w1s", f"algorithm={algorithm}")
    alg = ALGORITHMS[algorithm](cfg.algorithm, model, F.cross_entropy).double()
    names = metarun_names(algorithm)
    own = metarun_named(dict(model.named_parameters()), dict(alg.named_parameters()))
    if sorted(names) != sorted(own):
        sys.exit(f"gradient_check: parameters differ: {sorted(set(names) ^ set(own))}")
    with torch.no_grad():
        for name, value in zip(names, ref["weights"]):
            own[name].copy_(value)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    tasks = TaskBatch(ref["sx"], ref["y"], ref["qx"], ref["y"])
    grads, _ = alg.outer_gradient(params, tasks, "loop")
    worst = largest_relative_error([(name, grads[name], expected) for name, expected in zip(names, ref["grads"])])
    print(f"gradient_check: {algorithm}: largest relative error {worst:.1e}")
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("side", choices=["reference", "metarun"])
    parser.add_argument("algorithm", choices=["maml", "fomaml", "anil", "metasgd"])
    parser.add_argument("file", type=Path)
    parser.add_argument("--anil-features", default="split", choices=["split", "joint"])
    args = parser.parse_args()
    if args.side == "reference":
        reference(args.algorithm, args.file, args.anil_features == "joint")
    elif compare(args.algorithm, args.file) > 1e-10:
        sys.exit(1)


if __name__ == "__main__":
    main()
