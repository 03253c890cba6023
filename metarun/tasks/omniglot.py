"""Omniglot few-shot classification (MAML paper, section 5.2): N-way K-shot episodes on 28x28 images.

Characters are split into train / val / test by one of two protocols (``task.split``):

* ``paper`` (default): the MAML code's protocol: all 1,623 characters shuffled with a fixed seed
  into 1,100 train / 100 val / 423 test.
* ``vinyals``: the alphabet-based split of Vinyals et al. 2016 (1,028 / 172 / 423), as used by
  prototypical networks and most later work.

With ``task.rotations`` (default, both protocols) every character rotated by 90, 180 and 270
degrees is an extra class, so the train split of the paper protocol has 4,400 classes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from metarun.data.omniglot import IMAGE_SIZE, load_omniglot, omniglot_splits, preprocess_image, rotate_classes
from metarun.tasks.classification import FewShotClassification


class OmniglotTasks(FewShotClassification):
    """Omniglot episodes; the whole dataset (uint8, ~70 MB with rotations) lives on the device.

    Args:
        ways, shots, queries, test_queries: N, K and queries per class (training / evaluation).
        split: ``"paper"`` or ``"vinyals"``.
        split_seed: seed of the ``paper`` shuffle.
        rotations: add the 90/180/270-degree rotations of each character as classes.
        data_dir: folder with ``images_background.zip`` and ``images_evaluation.zip`` (or
            their extracted folders, or an ``omniglot/`` folder holding them).
        cache_dir: writable folder for the preprocessed tensor (and a download, if any).
        download: fetch the official zips when they are not in ``data_dir``.
        progress: show progress bars while preprocessing.
        device, dtype, name: as in :class:`FewShotClassification`.
    """

    def __init__(self, ways: int = 5, shots: int = 1, queries: int = 1, test_queries: int = 1,
                 split: str = "paper", split_seed: int = 1, rotations: bool = True,
                 data_dir: str | Path = "data", cache_dir: str | Path = "~/.cache/metarun", download: bool = True,
                 progress: bool = True, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 name: str = "omniglot") -> None:
        data = load_omniglot(Path(data_dir).expanduser(), Path(cache_dir).expanduser(), download, progress)
        splits = {}
        for part, characters in omniglot_splits(data, split, split_seed).items():
            images = data.images[characters]
            if rotations:
                images = rotate_classes(images)
            splits[part] = images[:, :, None]  # [classes, 20, 1, 28, 28]
        super().__init__(splits, ways, shots, queries, test_queries, device, dtype, name)

    @classmethod
    def model_sizes(cls, task) -> dict:
        return {"out_features": int(task.ways), "in_channels": 1, "image_size": IMAGE_SIZE}

    @classmethod
    def image_transform(cls, task):
        return lambda image: preprocess_image(image)[None]  # a 105x105 drawing -> [1, 28, 28]
