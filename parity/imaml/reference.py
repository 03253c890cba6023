"""Run the iMAML authors' code (aravindr93/imaml_dev) on metarun's exported Omniglot 5-way 1-shot data.

The reference's learner is imported from its checkout (``--ref``) and used unchanged:
``make_conv_network``, ``Learner`` (inner SGD ``learn_task``, proximal pull-back through
``regularization_loss``, ``matrix_evaluator``, ``outer_step_with_grad`` with its Adam),
``utils.cg_solve`` and ``utils.measure_accuracy``. What this driver supplies in place of the reference's
files (see README.md):

* tasks: ``implicit_maml/dataset.py`` (``OmniglotTask`` / ``OmniglotFewShotDataset``) reads Omniglot's PNG
  files and imports torchvision; it is not imported. Tasks are formed the same way from metarun's
  ``train`` array (1,100 training characters x 4 rotations): a pool of ``num_tasks`` task definitions
  (N distinct characters; per character a random order of its 20 drawings, the first K the support,
  the next K the query), and, each time a task is loaded, a random rotation per character drawn from
  {0, 90, 180, 270} degrees. Pixels are given the reference's polarity (dark strokes on white,
  ``pixel / 255``: 1 - metarun's input);
* the outer loop: ``examples/omniglot_implicit_maml.py`` is a script (argparse at import); its training
  loop is re-expressed here as calls to the reference's objects, with the README's Omniglot 5-way
  1-shot values, ``meta_steps`` = ``--steps``;
* evaluation: what ``examples/measure_accuracy.py`` does per task, on metarun's exported test episodes.

    OMP_NUM_THREADS=1 /work/envs/imaml/bin/python parity/imaml/reference.py --steps 20000 --eval-every 1000 \
        --seed 1 --out parity/runs/imaml/reference/seed1
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # parity/: common.py
import common  # noqa: E402

# The README's training command for Omniglot 5-way 1-shot (meta_steps replaced by --steps; num_tasks: the
# README asks for at least 200000 to reproduce the paper), and the example script's defaults for the rest.
TRAIN = dict(N_way=5, K_shot=1, inner_lr=1e-1, outer_lr=1e-3, n_steps=16, task_mb_size=32, lam=2.0, cg_steps=5,
             cg_damping=1.0, num_tasks=200000, lam_lr=0.0, lam_min=0.0, scalar_lam=True, inner_alg="gradient")
# The README's measure_accuracy.py command (test time).
TEST = dict(n_steps=16, lam=0.0, inner_lr=1e-1, inner_alg="gradient")
# Learner's own fixed settings, recorded for the config (set inside Learner / matrix_evaluator / cg_solve).
FIXED = dict(outer_alg="adam", adam_betas=[0.9, 0.999], adam_eps=1e-3, inner_optimizer="SGD (no momentum)",
             lam_damping=10.0, cg_residual_tol=1e-10, cg_x_init="zeros", loss="CrossEntropyLoss (mean)")


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", default="/work/refs/imaml_dev", help="checkout of aravindr93/imaml_dev")
    parser.add_argument("--data", default=str(common.DEFAULT_DATA))
    parser.add_argument("--steps", type=int, required=True, help="outer (meta) steps: the reference's meta_steps")
    parser.add_argument("--eval-every", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-tasks", type=int, default=600)
    parser.add_argument("--num-tasks", type=int, default=TRAIN["num_tasks"],
                        help="size of the pool of training task definitions (the reference's num_tasks)")
    parser.add_argument("--polarity", choices=["reference", "metarun"], default="reference",
                        help="reference: dark strokes on white (the reference's pixel/255); metarun: as exported")
    parser.add_argument("--gpu", action="store_true", help="the reference's GPU switch (not exercised by the author)")
    parser.add_argument("--out", required=True)
    return parser.parse_args()


def reference_commit(ref: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(ref), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def to_reference_pixels(x: np.ndarray, polarity: str) -> np.ndarray:
    """metarun's input (float32 in [0, 1], bright strokes) -> the reference's (float32 pixel / 255 of the
    grayscale LANCZOS image, dark strokes), in place. metarun stores 255 - pixel as uint8, so this is exact."""
    np.multiply(x, np.float32(255.0), out=x)
    np.round(x, out=x)
    if polarity == "reference":
        np.subtract(np.float32(255.0), x, out=x)
    np.divide(x, np.float32(255.0), out=x)
    return x


class TaskPool:
    """The reference's OmniglotTask + OmniglotFewShotDataset, over metarun's rotated training array.

    ``train`` is [4 * C, 20, 28, 28]: character c rotated by 90 k degrees is row k * C + c."""

    def __init__(self, train: np.ndarray, num_tasks: int, n_way: int, k_shot: int, gpu: bool, utils):
        self.chars = train.shape[0] // 4
        self.train, self.n_way, self.k_shot, self.gpu, self.utils = train, n_way, k_shot, gpu, utils
        # task definitions (the reference: random.shuffle of the training characters, the first N; per
        # character random.sample of its drawings, the first K support, the next K query; labels 0..N-1)
        self.defs = []
        for _ in range(num_tasks):
            classes = random.sample(range(self.chars), n_way)
            drawings = [random.sample(range(train.shape[1]), 2 * k_shot) for _ in classes]  # = a shuffle's first 2K
            self.defs.append((np.array(classes, dtype=np.int64), np.array(drawings, dtype=np.int64)))

    def __len__(self) -> int:
        return len(self.defs)

    def __getitem__(self, index: int) -> dict:
        classes, drawings = self.defs[index]
        # a fresh rotation per class each time the task is loaded, as OmniglotFewShotDataset.__getitem__
        rotations = np.random.choice([0.0, 90.0, 180.0, 270.0], size=(self.n_way,), replace=True)
        rows = (rotations // 90).astype(np.int64) * self.chars + classes
        k = self.k_shot
        x_train = self.train[rows[:, None], drawings[:, :k]].reshape(-1, 1, 28, 28)
        x_val = self.train[rows[:, None], drawings[:, k:]].reshape(-1, 1, 28, 28)
        y = np.repeat(np.arange(self.n_way), k)
        to = self.utils.to_device
        return dict(x_train=to(np.ascontiguousarray(x_train), self.gpu), y_train=to(y, self.gpu).long(),
                    x_val=to(np.ascontiguousarray(x_val), self.gpu), y_val=to(y.copy(), self.gpu).long())


def evaluate(meta_learner, episodes: dict, gpu: bool, utils) -> dict[int, list[float]]:
    """measure_accuracy.py per task: the agent (a copy, as its pickle round trip), inner lr TEST["inner_lr"],
    n_steps SGD steps on the support without the proximal term, then its pull-back step with lam=0.0,
    query accuracy. Accuracy before adaptation is measured too. Returns fractions in [0, 1]."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    fast_learner = copy.deepcopy(meta_learner)
    fast_learner.inner_alg = TEST["inner_alg"]
    fast_learner.set_inner_lr(TEST["inner_lr"])
    meta_params = meta_learner.get_params().clone()
    before, after = [], []
    for i in range(episodes["test_support_x"].shape[0]):
        task = dict(x_train=utils.to_device(episodes["test_support_x"][i][:, None], gpu),
                    y_train=utils.to_device(episodes["test_support_y"][i].astype(np.int64), gpu).long(),
                    x_val=utils.to_device(episodes["test_query_x"][i][:, None], gpu),
                    y_val=utils.to_device(episodes["test_query_y"][i].astype(np.int64), gpu).long())
        fast_learner.set_params(meta_params)
        before.append(utils.measure_accuracy(task, fast_learner, train=False) / 100.0)
        fast_learner.learn_task(task, num_steps=TEST["n_steps"], add_regularization=False)
        fast_learner.inner_opt.zero_grad()
        fast_learner.regularization_loss(meta_params, TEST["lam"]).backward()
        fast_learner.inner_opt.step()
        after.append(utils.measure_accuracy(task, fast_learner, train=False) / 100.0)
    random.setstate(states[0]), np.random.set_state(states[1]), torch.set_rng_state(states[2])
    return {0: before, TEST["n_steps"]: after}


def main() -> None:
    args = parse()
    torch.set_num_threads(1)
    ref = Path(args.ref).resolve()
    sys.path.insert(0, str(ref))
    import implicit_maml.utils as utils
    from implicit_maml.learner_model import Learner, make_conv_network

    commit = reference_commit(ref)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    data = common.load_episodes(args.data, tasks=args.test_tasks)
    train = to_reference_pixels(data["train"], args.polarity)
    episodes = {k: (to_reference_pixels(v, args.polarity) if k.endswith("_x") else v)
                for k, v in data.items() if k.startswith("test_") and k.count("_") == 2}
    del data
    assert episodes["test_support_x"].shape[1] == TRAIN["N_way"] * TRAIN["K_shot"]
    dataset = TaskPool(train, args.num_tasks, TRAIN["N_way"], TRAIN["K_shot"], args.gpu, utils)

    # model and learners as the example script (two networks; fast_learner is synced to the meta-learner)
    learner_net = make_conv_network(in_channels=1, out_dim=TRAIN["N_way"])
    fast_net = make_conv_network(in_channels=1, out_dim=TRAIN["N_way"])
    meta_learner = Learner(model=learner_net, loss_function=torch.nn.CrossEntropyLoss(), inner_alg=TRAIN["inner_alg"],
                           inner_lr=TRAIN["inner_lr"], outer_lr=TRAIN["outer_lr"], GPU=args.gpu)
    fast_learner = Learner(model=fast_net, loss_function=torch.nn.CrossEntropyLoss(), inner_alg=TRAIN["inner_alg"],
                           inner_lr=TRAIN["inner_lr"], outer_lr=TRAIN["outer_lr"], GPU=args.gpu)
    device = "cuda" if args.gpu else "cpu"
    lam = torch.tensor(TRAIN["lam"]).to(device)  # scalar_lam
    mb, num_tasks = TRAIN["task_mb_size"], len(dataset)

    points, log = [], []
    train_seconds = 0.0
    for outstep in range(args.steps):
        start = time.perf_counter()
        # --- examples/omniglot_implicit_maml.py, the body of `for outstep in ...` (plotting/pickling left out)
        task_mb = np.random.choice(num_tasks, size=mb)
        w_k = meta_learner.get_params()
        meta_grad = 0.0
        stats = np.zeros(5)
        for idx in task_mb:
            fast_learner.set_params(w_k.clone())
            task = dataset[idx]
            vl_before = fast_learner.get_loss(task["x_val"], task["y_val"], return_numpy=True)
            tl = fast_learner.learn_task(task, num_steps=TRAIN["n_steps"])
            fast_learner.inner_opt.zero_grad()  # the pull-back step
            fast_learner.regularization_loss(w_k, lam).backward()
            fast_learner.inner_opt.step()
            vl_after = fast_learner.get_loss(task["x_val"], task["y_val"], return_numpy=True)
            vacc = utils.measure_accuracy(task, fast_learner, train=False)
            valid_loss = fast_learner.get_loss(task["x_val"], task["y_val"])
            valid_grad = torch.autograd.grad(valid_loss, fast_learner.model.parameters())
            flat_grad = torch.cat([g.contiguous().view(-1) for g in valid_grad])
            if TRAIN["cg_steps"] <= 1:
                task_outer_grad = flat_grad
            else:
                evaluator = fast_learner.matrix_evaluator(task, lam, TRAIN["cg_damping"])
                task_outer_grad = utils.cg_solve(evaluator, flat_grad, TRAIN["cg_steps"], x_init=None)
            meta_grad += task_outer_grad / mb
            stats += np.array([float(tl[0]), float(vl_before), float(tl[-1]), float(vl_after), vacc / 100.0]) / mb
        meta_learner.outer_step_with_grad(meta_grad, flat_grad=True)
        # (lam_lr = 0: the script's lambda update leaves lam at 2.0)
        train_seconds += time.perf_counter() - start
        log.append([outstep + 1, train_seconds, *stats.tolist()])

        done = outstep + 1
        if done % args.eval_every == 0 or done == args.steps:
            t0 = time.perf_counter()
            accuracy = evaluate(meta_learner, episodes, args.gpu, utils)
            points.append({"iteration": done, "train_seconds": train_seconds, "accuracy": accuracy})
            print(f"step {done}: train {train_seconds:.1f}s ({train_seconds / done:.2f} s/step), "
                  f"test acc {np.mean(accuracy[0]):.4f} -> {np.mean(accuracy[TEST['n_steps']]):.4f} "
                  f"over {len(accuracy[0])} tasks (eval {time.perf_counter() - t0:.1f}s); "
                  f"last step's train_pre/test_pre/train_post/test_post losses, val_acc {np.round(stats, 3).tolist()}", flush=True)

    config = {**TRAIN, "meta_steps": args.steps, "num_tasks": args.num_tasks, **FIXED,
              "test": {**TEST, "tasks": int(episodes["test_support_x"].shape[0])},
              "query_per_class_train": TRAIN["K_shot"], "eval_every": args.eval_every, "polarity": args.polarity,
              "device": device, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "data": str(Path(args.data).resolve())}
    out = common.write_run(args.out, algorithm="imaml", reference=f"aravindr93/imaml_dev@{commit}", seed=args.seed,
                           config=config, shots=TRAIN["K_shot"], points=points)
    (out / "train_log.json").write_text(json.dumps(
        {"columns": ["iteration", "train_seconds", "train_pre", "test_pre", "train_post", "test_post", "val_acc"],
         "rows": log}) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
