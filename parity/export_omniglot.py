"""Write metarun's Omniglot splits to one ``.npz`` file that the reference implementations read.

Every parity driver feeds its reference the same images metarun trains and tests on: the MAML paper's
character split (1,100 / 100 / 423 characters, shuffled with seed 1), each character's 20 drawings at
28x28 as metarun preprocesses them (LANCZOS, bright strokes on black), the training classes with their
90/180/270-degree rotations as classes of their own (4,400 train classes), the test classes without
(as the references test). Arrays are uint8 ``[classes, 20, 28, 28]``; divide by 255 for metarun's input.

It also writes the exact test tasks metarun's evaluation draws (``trainer.test_seed``, ``split="test"``):
``test_support_x [tasks, ways * shots, 28, 28]`` uint8, ``test_support_y [tasks, ways * shots]``, and
``test_query_x``, ``test_query_y`` likewise, so a reference adapts and is scored on the very episodes
metarun is scored on.

    python parity/export_omniglot.py                 # -> parity/data/omniglot_paper_5w1s.npz (git-ignored)
    python parity/export_omniglot.py --split vinyals --ways 20
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch

from metarun.data.omniglot import load_omniglot, omniglot_splits, rotate_classes
from metarun.tasks.omniglot import OmniglotTasks


def main() -> None:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("METARUN_DATA_DIR", here.parent.parent / "shared/data"))
    parser.add_argument("--cache-dir", default=os.environ.get("METARUN_CACHE_DIR", "~/.cache/metarun"))
    parser.add_argument("--split", default="paper", choices=["paper", "vinyals"])
    parser.add_argument("--split-seed", type=int, default=1)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--test-queries", type=int, default=1)
    parser.add_argument("--test-tasks", type=int, default=600)
    parser.add_argument("--test-seed", type=int, default=1000003, help="metarun's trainer.test_seed")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = Path(args.out or here / "data" / f"omniglot_{args.split}_{args.ways}w{args.shots}s.npz")
    data = load_omniglot(Path(args.data_dir).expanduser(), Path(args.cache_dir).expanduser(), download=False)
    splits = omniglot_splits(data, args.split, args.split_seed)
    arrays = {part: data.images[characters] for part, characters in splits.items()}
    arrays = {"train": rotate_classes(arrays["train"]), "val": arrays["val"], "test": arrays["test"],
              # the same classes as metarun's val/test tasks draw (metarun rotates those too: *_rotated)
              "val_rotated": rotate_classes(arrays["val"]), "test_rotated": rotate_classes(arrays["test"])}
    tasks = OmniglotTasks(args.ways, args.shots, 1, args.test_queries, args.split, args.split_seed,
                          data_dir=args.data_dir, cache_dir=args.cache_dir, download=False, progress=False)
    episodes = tasks.sample(args.test_tasks, args.shots, args.test_queries,
                            torch.Generator().manual_seed(args.test_seed), split="test").tasks
    for name, value in zip(("support_x", "support_y", "query_x", "query_y"), episodes):
        arrays[f"test_{name}"] = (value[:, :, 0] * 255).round().to(torch.uint8) if name.endswith("x") else value
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **{k: v.numpy().astype(np.uint8) for k, v in arrays.items()})
    print(f"{out}: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in arrays.items()))


if __name__ == "__main__":
    main()
