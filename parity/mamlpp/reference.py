"""Run the MAML++ authors' learner (AntreasAntoniou/HowToTrainYourMAMLPytorch) on metarun's Omniglot data.

Run it in the reference's own environment (see parity/mamlpp/README.md), not metarun's venv::

    OMP_NUM_THREADS=1 /work/envs/mamlpp/bin/python parity/mamlpp/reference.py \
        --ref /work/refs/HowToTrainYourMAMLPytorch --steps 50000 --eval-every 5000 --seed 0 \
        --out parity/runs/mamlpp/reference/seed0

What comes from the reference checkout (imported, not copied): the argument set (``utils.parser_utils.get_args``
on the 5-way 1-shot MAML++ config JSON), ``MAMLFewShotClassifier`` (network, inner loop, learned rates, MSL,
Adam + cosine schedule) and its ``run_train_iter`` / ``run_validation_iter``. What this adapter replaces:

* the data provider (``data.py``, which needs torchvision and the authors' image folders): training batches are
  drawn from metarun's ``train`` array the way ``FewShotLearningDatasetParallel.get_set`` draws them (N distinct
  characters, a random multiple of 90 degrees per character, K + num_target_samples distinct drawings each);
* ``ExperimentBuilder`` (which writes checkpoints and logs): the loop below passes
  ``epoch = current_iter / total_iter_per_epoch`` to ``run_train_iter`` as ``ExperimentBuilder.run_experiment`` does;
* the test protocol: the current weights are evaluated on metarun's exported test episodes through
  ``run_validation_iter`` (no top-5-by-validation checkpoint ensemble).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import random
import re
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # parity/ -> common
import common  # noqa: E402

CONFIG = "experiment_config/omniglot_maml++-omniglot_1_8_0.1_64_5_0.json"  # 5-way, 1-shot, meta-batch 8, seed 0
WAYS, SHOTS = 5, 1
ROTATIONS = 4  # metarun's train array: class k * characters + c is character c rotated by 90 * k degrees


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ref", default="/work/refs/HowToTrainYourMAMLPytorch", help="the reference checkout")
    p.add_argument("--data", default=str(common.DEFAULT_DATA))
    p.add_argument("--config", default=CONFIG, help="experiment config JSON, relative to --ref")
    p.add_argument("--steps", type=int, default=50000, help="outer steps (config: 100 epochs x 500 = 50000)")
    p.add_argument("--eval-every", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-tasks", type=int, default=600)
    p.add_argument("--iterations-per-epoch", type=int, default=None,
                   help="outer steps per epoch (MSL, derivative order and the cosine schedule count epochs); "
                        "default: the config's total_iter_per_epoch")
    p.add_argument("--no-invert", action="store_true",
                   help="feed metarun's images as they are (bright strokes on 0) instead of 1 - x "
                        "(the reference's Omniglot PNGs: background 1, strokes 0)")
    p.add_argument("--out", required=True)
    return p.parse_args()


def reference_args(ref: Path, config: str, seed: int, iterations_per_epoch: int | None):
    """The reference's own argument set: its get_args() on the config JSON (its parser defaults + the JSON)."""
    argv, env = sys.argv, os.environ.get("DATASET_DIR")
    sys.argv = ["train_maml_system.py", "--name_of_args_json_file", str(ref / config)]
    os.environ["DATASET_DIR"] = str(ref / "datasets")  # only read into args.dataset_path (unused here)
    try:
        from utils.parser_utils import get_args
        with contextlib.redirect_stdout(io.StringIO()):
            args, device = get_args()
    finally:
        sys.argv = argv
        if env is None:
            del os.environ["DATASET_DIR"]
        else:
            os.environ["DATASET_DIR"] = env
    args.seed = seed  # the model's seed (set_torch_seed(args.seed) in MAMLFewShotClassifier.__init__)
    if iterations_per_epoch is not None:
        args.total_iter_per_epoch = iterations_per_epoch
    return args, device


class TrainEpisodes:
    """Training batches as the reference's data provider forms them, from metarun's rotated-class array."""

    def __init__(self, train: np.ndarray, args, rng: np.random.RandomState, invert: bool):
        assert train.shape[0] % ROTATIONS == 0
        self.train, self.rng, self.invert = train, rng, invert
        self.characters = train.shape[0] // ROTATIONS
        self.n, self.k, self.q = args.num_classes_per_set, args.num_samples_per_class, args.num_target_samples
        self.batch = args.batch_size

    def task(self):
        rng = self.rng
        chars = rng.choice(self.characters, size=self.n, replace=False)  # distinct characters
        rng.shuffle(chars)
        rot = rng.randint(0, 4, size=self.n)  # a rotation per class (get_set's k_list)
        xs = []
        for c, k in zip(chars, rot):
            drawings = rng.choice(self.train.shape[1], size=self.k + self.q, replace=False)
            xs.append(self.train[k * self.characters + c, drawings])  # [K + Q, 28, 28]
        x = np.stack(xs)[:, :, None]  # [N, K + Q, 1, 28, 28]; class n is episode label n
        if self.invert:
            x = 1.0 - x
        y = np.repeat(np.arange(self.n, dtype=np.float32)[:, None], self.k + self.q, axis=1)
        return x[:, :self.k], x[:, self.k:], y[:, :self.k], y[:, self.k:]

    def batch_of_tasks(self):
        tasks = [self.task() for _ in range(self.batch)]
        # (x_support_set [B, N, K, 1, 28, 28], x_target_set [B, N, Q, 1, 28, 28], y_support_set [B, N, K],
        #  y_target_set [B, N, Q]), float32, as its DataLoader yields them
        return tuple(np.ascontiguousarray(np.stack([t[i] for t in tasks]).astype(np.float32)) for i in range(4))


def test_batches(data: dict, batch: int, invert: bool):
    """metarun's exported episodes in the reference's layout: [B, N*K, 1, 1, 28, 28] and labels [B, N*K, 1]
    (its forward flattens each task's set; it reads only the layout's class axis length, N)."""
    sx, sy, qx, qy = (data[k] for k in ("test_support_x", "test_support_y", "test_query_x", "test_query_y"))
    if invert:
        sx, qx = 1.0 - sx, 1.0 - qx
    for i in range(0, len(sx), batch):
        j = slice(i, i + batch)
        yield (sx[j][:, :, None, None].astype(np.float32), qx[j][:, :, None, None].astype(np.float32),
               sy[j][:, :, None].astype(np.float32), qy[j][:, :, None].astype(np.float32))


def evaluate(model, data: dict, batch: int, invert: bool) -> dict[int, list[float]]:
    """Per-task query accuracy after 0 steps (the meta-learned weights with step-0 norm weights, query-batch
    statistics, as its step-0 forward) and after its number_of_evaluation_steps_per_iter steps
    (run_validation_iter, i.e. its evaluation_forward_prop)."""
    steps = model.args.number_of_evaluation_steps_per_iter
    acc: dict[int, list[float]] = {0: [], steps: []}
    for xs, xq, ys, yq in test_batches(data, batch, invert):
        with torch.no_grad():
            for x, y in zip(xq, yq):
                preds = model.classifier.forward(x=torch.from_numpy(x.reshape(-1, *x.shape[-3:])), num_step=0,
                                                 params=None, training=True, backup_running_statistics=True)
                model.classifier.restore_backup_stats()  # keep the running statistics as they were
                acc[0].append(float((preds.argmax(1).numpy() == y.reshape(-1)).mean()))
        _, preds = model.run_validation_iter(data_batch=(xs, xq, ys, yq))
        for p, y in zip(preds, yq):
            acc[steps].append(float((np.argmax(p, axis=1) == y.reshape(-1)).mean()))
    return acc


def quiet() -> None:
    """Silence the warnings the reference's torch-1.x idioms raise at every step."""
    for message in ("Detected call of `lr_scheduler.step()`", "The epoch parameter in `scheduler.step()`",
                    "The .grad attribute of a Tensor that is not a leaf", "To get the last learning rate",
                    "\"is not\" with"):
        warnings.filterwarnings("ignore", message=".*" + re.escape(message))


def main() -> None:
    a = parse()
    torch.set_num_threads(1)
    quiet()
    ref = Path(a.ref).resolve()
    sys.path.insert(0, str(ref))
    commit = os.popen(f"git -C {ref} rev-parse HEAD").read().strip()

    random.seed(a.seed)
    np.random.seed(a.seed)
    torch.manual_seed(a.seed)
    args, device = reference_args(ref, a.config, a.seed, a.iterations_per_epoch)
    assert args.num_classes_per_set == WAYS and args.num_samples_per_class == SHOTS

    from few_shot_learning_system import MAMLFewShotClassifier
    with contextlib.redirect_stdout(io.StringIO()):  # it prints every parameter's shape
        model = MAMLFewShotClassifier(im_shape=(2, args.image_channels, args.image_height, args.image_width),
                                      device=device, args=args)

    data = common.load_episodes(a.data, tasks=a.test_tasks)
    invert = not a.no_invert
    episodes = TrainEpisodes(data["train"], args, np.random.RandomState(a.seed), invert)

    points, train_seconds, it = [], 0.0, 0
    ipe = args.total_iter_per_epoch
    while it < a.steps:
        t0 = time.perf_counter()
        batch = episodes.batch_of_tasks()
        losses, _ = model.run_train_iter(data_batch=batch, epoch=it / ipe)  # as ExperimentBuilder.train_iteration
        it += 1
        train_seconds += time.perf_counter() - t0
        if it % 100 == 0 or it == 1:
            print(f"step {it} epoch {int((it - 1) / ipe)} loss {losses['loss'].item():.4f} "
                  f"acc {float(losses['accuracy']):.3f} lr {model.optimizer.param_groups[0]['lr']:.6f} "
                  f"{train_seconds / it:.3f} s/step", flush=True)
        if it % a.eval_every == 0 or it == a.steps:
            t1 = time.perf_counter()
            acc = evaluate(model, data, args.batch_size, invert)
            print(f"eval step {it}: " + ", ".join(f"after {s} steps {np.mean(v):.4f}" for s, v in acc.items())
                  + f" ({len(acc[0])} tasks, {time.perf_counter() - t1:.1f} s)", flush=True)
            points.append({"iteration": it, "train_seconds": train_seconds, "accuracy": acc})

    config = {k: v for k, v in sorted(vars(args).items()) if isinstance(v, (int, float, str, bool, list, type(None)))}
    config.update({"config_file": a.config, "steps": a.steps, "eval_every": a.eval_every, "test_tasks": a.test_tasks,
                   "iterations_per_epoch": ipe, "input": "1 - x (background 1, strokes 0)" if invert else "x",
                   "device": "cpu", "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "test_protocol": "current weights, run_validation_iter, no top-5 checkpoint ensemble"})
    out = common.write_run(a.out, algorithm="mamlpp", reference=f"AntreasAntoniou/HowToTrainYourMAMLPytorch@{commit}",
                           seed=a.seed, config=config, shots=SHOTS, points=points)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
