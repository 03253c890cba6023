"""learn2learn's test and metarun's scoring the same trained weights on the same 600 episodes: whether a gap
between the parity curves can be the test (each side's adaptation and scoring) rather than the training.

Two halves, each in its own environment, as ``gradient_check.py``. metarun's (the repository's venv) reads
a finished metarun run on learn2learn's network (``parity/runs/<algorithm>/metarun-l2lcnn/seed<s>``): the
weights (and Meta-SGD's rates) of its last checkpoint, in the reference's parameter order, and the
mean accuracies its own test wrote to results.json. The reference's (learn2learn's venv) loads those
weights into the learner ``reference.py`` builds and runs that driver's ``evaluate`` (per episode
``clone``, the test steps, accuracy on the query set), then compares the means after 0 steps and after
the test steps::

    .venv/bin/python parity/learn2learn/test_check.py metarun parity/runs/metasgd/metarun-l2lcnn/seed0 /tmp/l2l_test.pt
    /work/envs/l2l/bin/python parity/learn2learn/test_check.py reference /tmp/l2l_test.pt

Exit 1 if they differ by a query answer or more.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
WAYS, SHOTS = 5, 1


def export(run: Path, out: Path) -> None:
    sys.path.insert(0, str(HERE.parents[1]))
    from parity.gradients import metarun_named
    from parity.learn2learn.gradient_check import metarun_names

    checkpoint = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    results = json.loads((run / "results.json").read_text())
    algorithm = checkpoint["config"]["algorithm"]["name"]
    state = metarun_named(checkpoint["model"], checkpoint["algorithm"])
    ours = {int(k.split("_")[1]): v["mean"] for k, v in results["results"][f"{SHOTS}-shot"].items()}
    torch.save({"algorithm": algorithm, "weights": [state[name] for name in metarun_names(algorithm)],
                "accuracy": ours, "iteration": checkpoint["iteration"]}, out)
    print(f"test_check: {run} ({algorithm}, iteration {checkpoint['iteration']}) written to {out}")


def reference(saved: Path) -> int:
    sys.path.insert(0, str(HERE))
    import reference as driver  # noqa: E402  (learn2learn's environment)

    ref = torch.load(saved, weights_only=False)
    learner, features, parameters, _ = driver.build(ref["algorithm"], WAYS, fast_lr=0.4, meta_lr=0.001)
    with torch.no_grad():
        for p, w in zip(parameters, ref["weights"], strict=True):
            p.copy_(w)
    data = driver.common.load_episodes()
    episodes = {k: data[k] for k in ("test_support_x", "test_support_y", "test_query_x", "test_query_y")}
    steps = max(ref["accuracy"])  # metarun's test steps: its preset's (Meta-SGD 1, the others 3)
    # ANIL's body on each half apart, as metarun's passes run it (the example's pools both halves)
    record = driver.evaluate(learner, features, torch.nn.CrossEntropyLoss(), episodes, WAYS, SHOTS, steps,
                             joint=ref["algorithm"] != "anil")
    worst = 0.0
    for s in (0, steps):
        theirs, ours = sum(record[s]) / len(record[s]), ref["accuracy"][s]
        worst = max(worst, abs(theirs - ours))
        print(f"after {s} step(s): learn2learn's test {100 * theirs:.2f} %, metarun's {100 * ours:.2f} % "
              f"({len(record[s])} tasks)")
    # the same answers give the same mean; one query answer of the 3,000 is 1/30 of a point
    return int(worst > 0.5 / (len(record[0]) * WAYS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="side", required=True)
    m = sub.add_parser("metarun")
    m.add_argument("run", type=Path)
    m.add_argument("file", type=Path)
    r = sub.add_parser("reference")
    r.add_argument("file", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.side == "metarun":
        export(args.run, args.file)
    else:
        sys.exit(reference(args.file))


if __name__ == "__main__":
    main()
