"""A trained 20-way 1-shot Omniglot model on the 20 official one-shot runs of Lake et al. (2015).

    python docs/examples/one_shot_runs.py RUN_FOLDER [ALL_RUNS_ZIP]

RUN_FOLDER is a run of ``metarun experiment=omniglot_20w1s`` (its best.pt, else last.pt; a checkpoint
file works too). ALL_RUNS_ZIP is the official ``all_runs.zip`` (github.com/brendenlake/omniglot,
``python/one-shot-classification/all_runs.zip``); by default
``$METARUN_DATA_DIR/omniglot/official_small/all_runs.zip``.

Each run is one 20-way 1-shot task: ``runNN/training/class01..20.png`` (one drawing of each of 20
characters: the support set), ``runNN/test/item01..20.png`` (another drawing of each: the queries)
and ``runNN/class_labels.txt`` (which training image each test item belongs with). The script reads
the PNGs straight from the zip, preprocesses them as training did, adapts on each run's support set
and classifies its 20 queries, all through the public API (docs/api.md).
"""

from __future__ import annotations

import os
import sys
import zipfile
from pathlib import Path

import torch

import metarun

# Which runs a model has not trained on. The runs' drawings are drawings of the evaluation set (every
# one equals a drawing of images_evaluation.zip after preprocessing); runs 01-08 are characters of
# Atlantean, Ge_ez, Glagolitic and Gurmukhi, which task.split=vinyals trains on, runs 09-20 of six of
# its test alphabets. task.split=paper trains on 129 of the 200 characters, spread over every run.
HELD_OUT = {"vinyals": [f"run{i:02d}" for i in range(9, 21)], "paper": []}


def read_run(archive: zipfile.ZipFile, run: str) -> tuple[list[bytes], list[bytes], list[int]]:
    """One official run: the support PNGs (class01..classNN), the query PNGs and each query's label
    (the index of its training image)."""
    training = sorted(name for name in archive.namelist()
                      if name.startswith(f"{run}/training/") and name.endswith(".png"))
    pairs = [line.split() for line in archive.read(f"{run}/class_labels.txt").decode().splitlines() if line.strip()]
    support = [archive.read(name) for name in training]
    queries = [archive.read(test) for test, _ in pairs]
    labels = [training.index(train) for _, train in pairs]
    return support, queries, labels


def main(run_folder: str, all_runs: str) -> float:
    trained = metarun.load(run_folder)  # the model, its config and algorithm; the dataset is not loaded
    ways = trained.model_kwargs["out_features"]
    print(f"{trained.path} (iteration {trained.iteration}): {trained.config.algorithm.name}, {ways}-way, "
          f"{trained.test_inner_steps} inner steps")
    if trained.config.task.name != "omniglot" or ways != 20:
        raise SystemExit(f"the official runs are 20-way Omniglot; this model is {trained.config.task.name}, {ways}-way "
                         "(train one with metarun experiment=omniglot_20w1s)")
    with zipfile.ZipFile(all_runs) as archive:
        runs = sorted({name.split("/")[0] for name in archive.namelist() if name.startswith("run")})
        correct = []
        for run in runs:
            support, queries, labels = read_run(archive, run)
            support_x = trained.preprocess(support)  # [20, 1, 28, 28], exactly as training saw images
            params = trained.adapt(support_x, list(range(len(support))))  # the model's test_inner_steps
            logits = trained.predict(params, trained.preprocess(queries))  # [20, 20]
            hits = int((logits.argmax(dim=-1).cpu() == torch.tensor(labels)).sum())
            correct.append(hits)
            print(f"{run}: {hits}/{len(labels)} correct")
    accuracy = sum(correct) / (len(runs) * 20)
    print(f"mean accuracy over {len(runs)} runs: {100 * accuracy:.1f} % (error rate {100 * (1 - accuracy):.1f} %)")
    split = trained.config.task.split
    held_out = [hits for run, hits in zip(runs, correct) if run in HELD_OUT.get(split, [])]
    if held_out:
        print(f"mean accuracy over the {len(held_out)} runs of characters task.split={split} held out: "
              f"{100 * sum(held_out) / (20 * len(held_out)):.1f} %")
    else:
        print(f"(task.split={split} trained on characters of these runs: not a held-out score)")
    return accuracy


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        raise SystemExit(__doc__.split("\n\n")[1])
    default = Path(os.environ.get("METARUN_DATA_DIR", "data")) / "omniglot" / "official_small" / "all_runs.zip"
    main(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else str(default))
