"""learn2learn's ``OmniglotCNN`` and metarun's ``parity.learn2learn.omniglot_cnn.OmniglotCNN`` drawn ``--draws``
times each: whether the parity runs on the reference's network start from the same distribution of
weights. Each parameter's mean and standard deviation, averaged over the draws, side by side.

Two halves, each in its own environment, as ``gradient_check.py``::

    /work/envs/l2l/bin/python parity/learn2learn/init_check.py reference /tmp/l2l_init.pt
    .venv/bin/python parity/learn2learn/init_check.py metarun /tmp/l2l_init.pt

Exit 1 if a mean or a standard deviation differs by more than 5 % of the larger standard deviation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def moments(draw, draws: int) -> torch.Tensor:
    """[parameters, 2]: each parameter tensor's mean and standard deviation, averaged over the draws."""
    total = 0
    for seed in range(draws):
        torch.manual_seed(1000 + seed)
        total = total + torch.tensor([[p.mean().item(), p.std().item() if p.numel() > 1 else 0.0] for p in draw()])
    return total / draws


def reference(out: Path, draws: int) -> None:
    import learn2learn as l2l

    def draw():
        model = l2l.vision.models.OmniglotCNN(output_size=5)
        del model.base  # as reference.py's build (the same tensors, registered twice)
        return list(model.parameters())

    torch.save(moments(draw, draws), out)
    print(f"init_check: learn2learn's OmniglotCNN, {draws} draws, written to {out}")


def compare(saved: Path, draws: int) -> int:
    sys.path.insert(0, str(HERE.parents[1]))
    from parity.learn2learn.gradient_check import metarun_names
    from parity.learn2learn.omniglot_cnn import OmniglotCNN

    def draw():
        named = dict(OmniglotCNN().named_parameters())
        return [named[n] for n in metarun_names("fomaml")]  # the reference's order

    theirs, ours = torch.load(saved), moments(draw, draws)
    worst = 0.0
    for name, (m0, s0), (m1, s1) in zip(metarun_names("fomaml"), theirs.tolist(), ours.tolist(), strict=True):
        scale = max(s0, s1, 1e-12)
        worst = max(worst, abs(m0 - m1) / scale, abs(s0 - s1) / scale)
        print(f"{name:22s} mean {m1:+.4f} (learn2learn {m0:+.4f})  sd {s1:.4f} (learn2learn {s0:.4f})")
    print(f"init_check: largest difference {worst:.3f} of a standard deviation")
    return int(worst > 0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("side", choices=["reference", "metarun"])
    parser.add_argument("file", type=Path)
    parser.add_argument("--draws", type=int, default=200)
    args = parser.parse_args()
    if args.side == "reference":
        reference(args.file, args.draws)
    else:
        sys.exit(compare(args.file, args.draws))


if __name__ == "__main__":
    main()
