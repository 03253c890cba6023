"""Run the Reptile authors' code (openai/supervised-reptile, TensorFlow 1.x graph code) on metarun's data.

The reference is imported from its own checkout (``--ref``); nothing of it is copied here. It runs in
its own environment (``/work/envs/reptile-tf``: tensorflow-cpu 2.15 through ``tensorflow.compat.v1``,
see README.md), not in metarun's venv.

What this driver keeps from the reference, unchanged: ``Reptile`` (``train_step``, its ``_full_state``
and ``_test_predictions``), ``_mini_batches``, ``OmniglotModel`` with its default optimizer
(``AdamOptimizer(beta1=0)``), ``weight_decay`` as the pre-step op, and the outer loop of ``train.py``
(linear meta-step annealing over all ``--steps``), with the values of the README's o15t command.

What it replaces, and only that:

* the data: the reference's ``Character`` objects (PNG files, 1,200 random characters, rotations added
  by ``augment_dataset``) become :class:`ExportedCharacter`, one per class of the exported ``train``
  array (rotations already are classes of their own there, so nothing is augmented again);
* the evaluation task: ``Reptile.evaluate`` samples a fresh task; :func:`evaluate_episode` is the same
  body run on a given support set (its ``train_set``) and query set (its ``test_set``) from the exported
  600 test episodes, and it also records the accuracy before any inner step;
* the bookkeeping of ``train.py`` (checkpoints, TensorBoard summaries, its sampled 1-task evaluations)
  gives way to :func:`common.write_run`.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import random  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # parity/ -> common
import common  # noqa: E402

# The README's "transductive 1-shot 5-way Omniglot" command (checkpoint ckpt_o15t), by its flags' names.
# Every flag that the command does not pass keeps args.py's default (replacement off, weight decay 1).
O15T = {
    "shots": 1, "classes": 5, "inner_batch": 10, "inner_iters": 5, "meta_step": 1.0, "meta_batch": 5,
    "meta_iters": 100000, "eval_batch": 5, "eval_iters": 50, "learning_rate": 0.001,
    "meta_step_final": 0.0, "train_shots": 10, "transductive": True, "replacement": False, "weight_decay": 1.0,
}


def o15t_from_readme(ref: Path) -> dict:
    """The o15t command's flags as written in the checkout's README (a check on :data:`O15T`)."""
    text = (ref / "README.md").read_text()
    line = next(ln for ln in text.splitlines() if "run_omniglot.py" in ln and "ckpt_o15t" in ln)
    words = shlex.split(line)[3:]  # python -u run_omniglot.py ...
    flags, i = {}, 0
    while i < len(words):
        name = words[i][2:].replace("-", "_")
        if i + 1 < len(words) and not words[i + 1].startswith("--"):
            flags[name] = words[i + 1]
            i += 2
        else:
            flags[name] = True
            i += 1
    return flags


def check_o15t(ref: Path) -> None:
    flags = o15t_from_readme(ref)
    flags.pop("checkpoint")
    for name, value in flags.items():
        want = O15T[name]
        got = value if isinstance(want, bool) else type(want)(value)
        if got != want:
            sys.exit(f"reference README's o15t has --{name} {value}, the driver {want}")


def import_reference(ref: Path):
    """Import the reference's modules with ``tensorflow`` standing for ``tensorflow.compat.v1``.

    The reference does ``import tensorflow as tf`` and uses TF1 graph APIs (``tf.placeholder``,
    ``tf.layers``, ``tf.train.AdamOptimizer``, ``tf.Session``); under TF 2.x these live in
    ``tensorflow.compat.v1``. During the import only, ``sys.modules['tensorflow']`` is that module, so the
    reference's ``tf`` names it; the reference's files are not touched."""
    import tensorflow

    tf1 = tensorflow.compat.v1
    tf1.disable_v2_behavior()  # graph mode, ref variables, TF1 control flow: TF 1.x semantics
    _ = tf1.layers.conv2d, tf1.layers.dense, tf1.layers.batch_normalization  # resolve lazy modules first
    sys.path.insert(0, str(ref))
    saved = sys.modules["tensorflow"]
    sys.modules["tensorflow"] = tf1
    try:
        from supervised_reptile import models, reptile, variables
    finally:
        sys.modules["tensorflow"] = saved
    return tensorflow, tf1, models, reptile, variables


class ExportedCharacter:
    """Stands for the reference's ``omniglot.Character``: one class of the exported ``train`` array.

    ``sample(n)`` is ``Character.sample``: shuffle the class's drawings with python's ``random`` and
    return the first ``n`` (distinct drawings), as 28x28 float32 arrays. The images are metarun's
    (LANCZOS to 28x28, strokes 1 on background 0), not the reference's PIL resize of its PNGs."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def sample(self, num_images):
        order = list(range(len(self.images)))
        random.shuffle(order)
        return [self.images[i] for i in order[:num_images]]


def evaluate_episode(reptile, ref_reptile, model, train_set, test_set, inner_batch_size, inner_iters,
                     replacement):
    """``Reptile.evaluate`` (supervised_reptile/reptile.py) on a given episode instead of a sampled one.

    Same steps: save the full state (every global variable: weights, Adam's m and v, its beta powers),
    run ``inner_iters`` mini-batches of ``_mini_batches(train_set, ...)`` (pre-step op, then the model's
    ``minimize_op``), predict ``test_set`` with ``_test_predictions`` (transductive: one batch), count
    the correct ones, restore the full state. The one addition: the predictions before any inner step
    (they change no variable). Returns (correct before, correct after)."""
    sess = reptile.session
    old_vars = reptile._full_state.export_variables()
    preds = reptile._test_predictions(train_set, test_set, model.input_ph, model.predictions)
    correct_before = sum([pred == sample[1] for pred, sample in zip(preds, test_set)])
    for batch in ref_reptile._mini_batches(train_set, inner_batch_size, inner_iters, replacement):
        inputs, labels = zip(*batch)
        if reptile._pre_step_op:
            sess.run(reptile._pre_step_op)
        sess.run(model.minimize_op, feed_dict={model.input_ph: inputs, model.label_ph: labels})
    preds = reptile._test_predictions(train_set, test_set, model.input_ph, model.predictions)
    correct_after = sum([pred == sample[1] for pred, sample in zip(preds, test_set)])
    reptile._full_state.import_variables(old_vars)
    return int(correct_before), int(correct_after)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", default="/work/refs/supervised-reptile", help="the reference's checkout")
    parser.add_argument("--data", default=str(common.DEFAULT_DATA))
    parser.add_argument("--steps", type=int, default=O15T["meta_iters"], help="outer steps (--meta-iters)")
    parser.add_argument("--eval-every", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-tasks", type=int, default=600)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    ref = Path(args.ref).resolve()
    check_o15t(ref)
    commit = subprocess.run(["git", "-C", str(ref), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ref), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=True).stdout.strip()
    if dirty:
        sys.exit(f"{ref} has local changes: run the reference as committed")

    tensorflow, tf1, models, ref_reptile, ref_variables = import_reference(ref)
    c = O15T
    random.seed(args.seed)
    np.random.seed(args.seed)
    tf1.set_random_seed(args.seed)

    data = common.load_episodes(args.data, tasks=args.test_tasks)
    train_set = [ExportedCharacter(images) for images in data["train"]]
    episodes = []
    for sx, sy, qx, qy in zip(data["test_support_x"], data["test_support_y"], data["test_query_x"],
                              data["test_query_y"]):
        episodes.append(([(x, int(y)) for x, y in zip(sx, sy)], [(x, int(y)) for x, y in zip(qx, qy)]))
    print(f"{len(train_set)} training classes, {len(episodes)} test episodes", flush=True)

    # run_omniglot.py: the model first (its optimizer's slots are global variables), then train.py's Reptile
    model = models.OmniglotModel(c["classes"], learning_rate=c["learning_rate"])
    config = tf1.ConfigProto(intra_op_parallelism_threads=1, inter_op_parallelism_threads=1)
    sess = tf1.Session(config=config)
    reptile = ref_reptile.Reptile(sess, transductive=c["transductive"],
                                  pre_step_op=ref_variables.weight_decay(c["weight_decay"]))
    sess.run(tf1.global_variables_initializer())

    def evaluate(iteration: int, seconds: float) -> dict:
        start = time.perf_counter()
        before, after = [], []
        for support, query in episodes:
            b, a = evaluate_episode(reptile, ref_reptile, model, support, query, c["eval_batch"],
                                    c["eval_iters"], c["replacement"])
            before.append(b / len(query))
            after.append(a / len(query))
        print(f"step {iteration}: test accuracy {np.mean(before):.4f} (0 steps) {np.mean(after):.4f} "
              f"({c['eval_iters']} steps), {len(episodes)} tasks in {time.perf_counter() - start:.1f}s, "
              f"train {seconds:.1f}s", flush=True)
        return {"iteration": iteration, "train_seconds": seconds, "accuracy": {0: before, c["eval_iters"]: after}}

    points, seconds = [], 0.0
    meta_iters = args.steps  # train.py's loop, over the whole run's steps
    for i in range(meta_iters):
        start = time.perf_counter()
        frac_done = i / meta_iters
        cur_meta_step_size = frac_done * c["meta_step_final"] + (1 - frac_done) * c["meta_step"]
        reptile.train_step(train_set, model.input_ph, model.label_ph, model.minimize_op,
                           num_classes=c["classes"], num_shots=(c["train_shots"] or c["shots"]),
                           inner_batch_size=c["inner_batch"], inner_iters=c["inner_iters"],
                           replacement=c["replacement"], meta_step_size=cur_meta_step_size,
                           meta_batch_size=c["meta_batch"])
        seconds += time.perf_counter() - start
        if (i + 1) % args.eval_every == 0 or i + 1 == meta_iters:
            points.append(evaluate(i + 1, seconds))

    values = {**c, "meta_iters": meta_iters, "eval_every": args.eval_every, "test_tasks": len(episodes),
              "optimizer": "tf.train.AdamOptimizer(learning_rate, beta1=0) (beta2=0.999, epsilon=1e-8)",
              "seed": args.seed, "data": str(Path(args.data).resolve()),
              "tensorflow": tensorflow.__version__, "threads": 1}
    out = common.write_run(args.out, algorithm="reptile", reference=f"openai/supervised-reptile@{commit}",
                           seed=args.seed, config=values, shots=c["shots"], points=points)
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
