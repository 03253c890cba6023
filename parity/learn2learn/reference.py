"""learn2learn's MAML / FOMAML / ANIL / Meta-SGD on metarun's Omniglot episodes (a parity reference).

Runs in learn2learn's own environment (see README.md here), never in metarun's venv: it imports
``learn2learn`` from its install and copies none of its code. The training loop is that of
learn2learn's ``examples/vision/maml_omniglot.py`` (MAML, FOMAML, Meta-SGD: the examples' README and
issue #15 say "swap MAML for MetaSGD" / "set first_order=True") and ``examples/vision/anil_fc100.py``
(ANIL): per task ``clone()``, ``adapt()`` on the adaptation half, ``backward()`` of the evaluation
half's loss, then every meta-parameter's gradient multiplied by ``1 / meta_batch_size`` and one Adam
step. What differs from the examples (model, data, evaluation), and why: README.md.

    /work/envs/l2l/bin/python parity/learn2learn/reference.py --algorithm maml \
        --steps 5 --eval-every 5 --test-tasks 20 --out /tmp/l2l-maml
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

with warnings.catch_warnings():  # learn2learn imports gym, which warns about numpy 2 on import
    warnings.simplefilter("ignore")
    import learn2learn as l2l  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # parity/, for common.py
import common  # noqa: E402

REPOSITORY = "learnables/learn2learn"
COMMIT = "db5cee3795490071282bbdfa81179ef732349196"  # the checkout installed in /work/envs/l2l
ALGORITHMS = ("maml", "fomaml", "anil", "metasgd")


def accuracy(predictions, targets):
    """The examples' accuracy()."""
    predictions = predictions.argmax(dim=1).view(targets.shape)
    return (predictions == targets).sum().float() / targets.size(0)


def split(data, labels, shots, ways):
    """The examples' split of a task's 2 * shots * ways images: even positions adapt, odd evaluate."""
    adaptation_indices = np.zeros(data.size(0), dtype=bool)
    adaptation_indices[np.arange(shots * ways) * 2] = True
    evaluation_indices = torch.from_numpy(~adaptation_indices)
    adaptation_indices = torch.from_numpy(adaptation_indices)
    return (data[adaptation_indices], labels[adaptation_indices],
            data[evaluation_indices], labels[evaluation_indices])


def fast_adapt(batch, learner, features, loss, adaptation_steps, shots, ways, record=None, joint=True):
    """The examples' fast_adapt (``features`` is None but for ANIL, whose example runs the feature
    extractor once over all 2 * shots * ways images, then splits: batch norm's statistics pool the
    support and query images; ``joint=False`` runs it on each half apart instead, not the example's
    way, as MAML's forward passes do, for comparisons only). ``record`` (evaluation only): a
    dict to which the evaluation half's accuracy is appended before adapting and after each step;
    these extra forward passes change nothing (batch statistics of the batch given; the running
    statistics they update are never read in train mode)."""
    data, labels = batch
    if features is not None and joint:
        data = features(data)
    adaptation_data, adaptation_labels, evaluation_data, evaluation_labels = split(data, labels, shots, ways)
    if features is not None and not joint:
        adaptation_data, evaluation_data = features(adaptation_data), features(evaluation_data)
    if record is not None:
        record.setdefault(0, []).append(accuracy(learner(evaluation_data), evaluation_labels).item())
    for step in range(adaptation_steps):
        train_error = loss(learner(adaptation_data), adaptation_labels)
        learner.adapt(train_error)
        if record is not None:
            record.setdefault(step + 1, []).append(accuracy(learner(evaluation_data), evaluation_labels).item())
    predictions = learner(evaluation_data)
    valid_error = loss(predictions, evaluation_labels)
    valid_accuracy = accuracy(predictions, evaluation_labels)
    return valid_error, valid_accuracy


def layout(support_x, support_y, query_x, query_y, ways, shots):
    """One episode in the examples' layout (their tasksets' ConsecutiveLabels): the classes one after
    the other, each class's 2 * shots images alternating support, query, so that the even positions
    are the support set (the adaptation half) and the odd ones the query set."""
    data, labels = [], []
    for c in range(ways):
        s, q = support_x[support_y == c], query_x[query_y == c]
        if len(s) != shots or len(q) != shots:
            sys.exit(f"reference: episode class {c} has {len(s)} support / {len(q)} query images, the "
                     f"examples' layout needs {shots} of each")
        for i in range(shots):
            data += [s[i], q[i]]
            labels += [c, c]
    return torch.from_numpy(np.stack(data)), torch.tensor(labels, dtype=torch.long)


class TrainTasks:
    """N-way tasks of 2 * shots drawings per class from metarun's training classes (the 1,100
    training characters and their rotations: 4,400 classes), in the examples' layout. ``num_tasks``
    > 0 draws from a fixed pool of that many task descriptions, made the first time each is drawn, as
    the examples' ``Taskset(num_tasks=20000)``; -1 draws a fresh task every time (as metarun)."""

    def __init__(self, images, ways, shots, num_tasks):
        self.images, self.ways, self.shots, self.num_tasks = images, ways, shots, num_tasks
        self.pool: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def describe(self):
        classes = np.random.choice(self.images.shape[0], self.ways, replace=False)
        drawings = np.stack([np.random.choice(self.images.shape[1], 2 * self.shots, replace=False)
                             for _ in classes])
        return classes, drawings

    def sample(self):
        if self.num_tasks > 0:
            i = random.randint(0, self.num_tasks - 1)
            if i not in self.pool:
                self.pool[i] = self.describe()
            classes, drawings = self.pool[i]
        else:
            classes, drawings = self.describe()
        data = self.images[classes[:, None], drawings]  # [ways, 2 * shots, 28, 28]
        labels = np.repeat(np.arange(self.ways), 2 * self.shots)
        return torch.from_numpy(data.reshape(-1, *data.shape[2:])), torch.from_numpy(labels)


def build(algorithm, ways, fast_lr, meta_lr):
    """learn2learn's OmniglotCNN, wrapped as the examples wrap their models; returns (the learner
    that is cloned per task, the feature extractor run outside it (ANIL) or None, the optimizer and
    the parameters it updates, whose gradients get the 1 / meta_batch_size)."""
    model = l2l.vision.models.OmniglotCNN(output_size=ways)
    # OmniglotCNN registers its ConvBase twice (``base`` and ``features[1]``, the same tensors).
    # MAML's update_module follows the shared tensors, but MetaSGD's meta_sgd_update does not: it
    # would adapt the copy under ``base`` and leave ``features[1]``, which forward() uses, as it was
    # (so only the head adapts and the conv layers' rates get no gradient). Forward only uses
    # ``features``; dropping the alias leaves the parameters, their order and values unchanged.
    del model.base
    if algorithm in ("maml", "fomaml"):
        learner = l2l.algorithms.MAML(model, lr=fast_lr, first_order=algorithm == "fomaml")
        features, parameters = None, list(learner.parameters())
    elif algorithm == "metasgd":
        learner = l2l.algorithms.MetaSGD(model, lr=fast_lr, first_order=False)
        features, parameters = None, list(learner.parameters())  # the initialisation and the rates
    else:  # anil, as anil_fc100.py: features outside, MAML on the classifier, Adam on both
        features = model.features
        learner = l2l.algorithms.MAML(model.classifier, lr=fast_lr)
        parameters = list(features.parameters()) + list(learner.parameters())
    optimizer = torch.optim.Adam(parameters, lr=meta_lr)
    return learner, features, parameters, optimizer


def evaluate(learner, features, loss, episodes, ways, shots, steps, joint=True):
    """The examples' evaluation, per exported test episode: clone, fast_adapt (``steps`` steps on the
    support set), accuracy on the query set; the model stays in train() mode, as the examples leave
    it. Returns ``{steps done: [per-task accuracy]}``."""
    record: dict[int, list[float]] = {}
    for t in range(len(episodes["test_support_x"])):
        batch = layout(episodes["test_support_x"][t], episodes["test_support_y"][t],
                       episodes["test_query_x"][t], episodes["test_query_y"][t], ways, shots)
        fast_adapt(batch, learner.clone(), features, loss, steps, shots, ways, record=record, joint=joint)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithm", required=True, choices=ALGORITHMS)
    parser.add_argument("--data", default=str(common.DEFAULT_DATA))
    parser.add_argument("--steps", type=int, default=60000, help="outer steps (MAML paper: 60,000)")
    parser.add_argument("--eval-every", type=int, default=1000)
    parser.add_argument("--test-tasks", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--fast-lr", type=float, default=0.4, help="inner rate (Meta-SGD: the rates' start)")
    parser.add_argument("--meta-lr", type=float, default=1e-3, help="Adam's rate")
    parser.add_argument("--meta-batch", type=int, default=32)
    parser.add_argument("--adaptation-steps", type=int, default=1, help="inner steps in training")
    parser.add_argument("--test-steps", type=int, default=3, help="inner steps at evaluation")
    parser.add_argument("--num-tasks", type=int, default=-1,
                        help="training-task pool (-1: a fresh task each time, as metarun; the example: 20000)")
    parser.add_argument("--anil-features", default="joint", choices=["joint", "split"],
                        help="ANIL: the feature extractor on support+query at once (joint: the example) or "
                             "on each apart (split: as MAML's passes; not the example's)")
    parser.add_argument("--log-every", type=int, default=100)
    args = parser.parse_args()

    torch.set_num_threads(1)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    data = common.load_episodes(args.data, tasks=args.test_tasks)
    ways = len(np.unique(data["test_support_y"][0]))
    shots = data["test_support_x"].shape[1] // ways
    episodes = {k: data[k] for k in ("test_support_x", "test_support_y", "test_query_x", "test_query_y")}
    tasks = TrainTasks(data["train"], ways, shots, args.num_tasks)
    learner, features, parameters, optimizer = build(args.algorithm, ways, args.fast_lr, args.meta_lr)
    loss = nn.CrossEntropyLoss(reduction="mean")
    config = {
        "algorithm": args.algorithm, "seed": args.seed, "ways": ways, "shots": shots, "queries": shots,
        "test_queries": int(data["test_query_x"].shape[1]) // ways,
        "fast_lr": args.fast_lr, "meta_lr": args.meta_lr, "meta_batch": args.meta_batch,
        "adaptation_steps": args.adaptation_steps, "test_steps": args.test_steps, "steps": args.steps,
        "eval_every": args.eval_every, "test_tasks": len(episodes["test_support_x"]), "num_tasks": args.num_tasks,
        "first_order": args.algorithm == "fomaml", "outer_optimizer": "Adam (torch defaults but lr)",
        "meta_gradient": "sum of per-task backward(), times 1/meta_batch", "metasgd_rate_init": args.fast_lr
        if args.algorithm == "metasgd" else None,
        "model": "l2l.vision.models.OmniglotCNN(output_size=ways) without its `base` alias",
        "batch_norm": "train() mode throughout: batch statistics of the batch given",
        "anil_split": "features = OmniglotCNN.features, Adam-updated, not adapted; head = MAML(classifier)"
        if args.algorithm == "anil" else None,
        "anil_features": args.anil_features if args.algorithm == "anil" else None,
        "train_classes": int(data["train"].shape[0]), "data": str(Path(args.data).resolve()),
        "meta_parameters": int(sum(p.numel() for p in parameters)),
        "torch": torch.__version__, "learn2learn": l2l.__version__, "threads": torch.get_num_threads(),
    }
    print(f"reference: {args.algorithm} {ways}-way {shots}-shot, {config['meta_parameters']} meta-parameters, "
          f"{config['test_tasks']} test tasks", flush=True)

    points, train_seconds = [], 0.0
    for iteration in range(1, args.steps + 1):
        start = time.perf_counter()
        optimizer.zero_grad()
        meta_train_error, meta_train_accuracy = 0.0, 0.0
        for _task in range(args.meta_batch):
            clone = learner.clone()
            evaluation_error, evaluation_accuracy = fast_adapt(tasks.sample(), clone, features, loss,
                                                               args.adaptation_steps, shots, ways,
                                                               joint=args.anil_features == "joint")
            evaluation_error.backward()
            meta_train_error += evaluation_error.item()
            meta_train_accuracy += evaluation_accuracy.item()
        for p in parameters:  # average the accumulated gradients and optimize
            p.grad.data.mul_(1.0 / args.meta_batch)
        optimizer.step()
        train_seconds += time.perf_counter() - start
        if iteration % args.log_every == 0 or iteration == args.steps:
            print(f"iteration {iteration}: meta-train error {meta_train_error / args.meta_batch:.4f} accuracy "
                  f"{meta_train_accuracy / args.meta_batch:.4f}, {train_seconds:.1f} s", flush=True)
        if iteration % args.eval_every == 0 or iteration == args.steps:
            start = time.perf_counter()
            record = evaluate(learner, features, loss, episodes, ways, shots, args.test_steps,
                              joint=args.anil_features == "joint")
            seconds = time.perf_counter() - start
            points.append({"iteration": iteration, "train_seconds": train_seconds, "accuracy": record})
            print(f"eval at {iteration}: " + ", ".join(f"{s} steps {np.mean(v):.4f}" for s, v in record.items())
                  + f" ({seconds:.1f} s)", flush=True)

    out = common.write_run(args.out, algorithm=args.algorithm, reference=f"{REPOSITORY}@{COMMIT}", seed=args.seed,
                           config=config, shots=shots, points=points)
    print(f"reference: wrote {out}")


if __name__ == "__main__":
    main()
