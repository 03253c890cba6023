"""MiniImagenet few-shot classification (MAML paper, section 5.2): N-way K-shot on 84x84 RGB.

Ravi & Larochelle's class split, 64 / 16 / 20 classes x 600 images. The images are read from any
of three on-disk layouts and cached once as uint8 (see :mod:`metarun.data.miniimagenet`, whose
docstring says how to obtain them: there is no stable public download).
"""

from __future__ import annotations

from pathlib import Path

import torch

from metarun.data.miniimagenet import IMAGE_SIZE, load_miniimagenet, preprocess_image
from metarun.tasks.classification import FewShotClassification


class MiniImagenetTasks(FewShotClassification):
    """MiniImagenet episodes; the uint8 dataset (1.27 GB) lives on the training device.

    Args:
        ways, shots, queries, test_queries: N, K and queries per class (training / evaluation).
        data_dir: folder holding the images in one of the supported layouts.
        splits_dir: folder with the split CSVs, when they are not beside the images.
        cache_dir: writable folder for the uint8 cache.
        images_per_class: images used per class (600 in the standard set).
        progress: show a progress bar while converting.
        device, dtype, name: as in :class:`FewShotClassification`.
    """

    def __init__(self, ways: int = 5, shots: int = 1, queries: int = 15, test_queries: int = 15,
                 data_dir: str | Path = "data", splits_dir: str | Path | None = None,
                 cache_dir: str | Path = "~/.cache/metarun", images_per_class: int = 600, progress: bool = True,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 name: str = "miniimagenet") -> None:
        data = load_miniimagenet(Path(data_dir).expanduser(), Path(cache_dir).expanduser(),
                                 Path(splits_dir).expanduser() if splits_dir else None, progress, images_per_class)
        splits = {part: data[part].images for part in ("train", "val", "test")}
        super().__init__(splits, ways, shots, queries, test_queries, device, dtype, name)

    @classmethod
    def model_sizes(cls, task) -> dict:
        return {"out_features": int(task.ways), "in_channels": 3, "image_size": IMAGE_SIZE}

    @classmethod
    def image_transform(cls, task):
        return lambda image: preprocess_image(image).transpose(2, 0, 1)  # HWC -> [3, 84, 84]
