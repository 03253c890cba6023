"""N-way K-shot classification on any dataset stored as a folder per class (CUB, your own images).

``metarun task=image_folder task.root=/data/cub task.image_size=84`` reads ``root/{train,val,test}/<class>/``
or ``root/<class>/`` with a split file, converts the images once into a uint8 cache (see
:mod:`metarun.data.image_folder`) and samples episodes from it on the device. docs/your_data.md
describes the layouts, keys and errors.
"""

from __future__ import annotations

from pathlib import Path

import torch

from metarun.data.cache import DataError
from metarun.data.image_folder import SPLITS, decode_image, load_image_folder
from metarun.tasks.classification import FewShotClassification
from metarun.utils.errors import ConfigError


class ImageFolderTasks(FewShotClassification):
    """Episodes from a class-folder dataset; the uint8 images live on the training device.

    Args:
        root: the dataset folder (only read); required (None is a ConfigError saying so).
        image_size: height and width the images are stored and fed to the model at.
        channels: 1 (grayscale) or 3 (RGB).
        split_file: CSV (``class,split`` rows) or JSON file assigning ``root/<class>/`` folders to
            splits; None when ``root`` has ``train/``, ``val/`` and ``test/`` folders.
        resize: resize images of another size (LANCZOS, stretched); False refuses them.
        images_per_class: images used per class; None: as many as the smallest class of the split has.
        ways, shots, queries, test_queries: N, K and queries per class (training / evaluation).
        cache_dir: writable folder for the uint8 cache.
        progress: show a progress bar while decoding.
        invert: feed ``255 - pixel`` (dark strokes on white become bright on black, as the built-in
            Omniglot is fed; the cache keeps the images as they are).
        device, dtype, name: as in :class:`FewShotClassification`.

    Raises:
        DataError: as :func:`~metarun.data.image_folder.load_image_folder`, and for a class with fewer
            images than an episode takes (the message names the class, its split and the counts).
    """

    def __init__(self, root: str | Path | None = None, image_size: int = 84, channels: int = 3,
                 split_file: str | Path | None = None, resize: bool = True, images_per_class: int | None = None,
                 ways: int = 5, shots: int = 1,
                 queries: int = 15, test_queries: int = 15, cache_dir: str | Path = "~/.cache/metarun",
                 progress: bool = True, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 name: str = "image_folder", invert: bool = False) -> None:
        if root is None or str(root) == "":
            raise ConfigError(f"task.root is required: the folder of your images, e.g. task={name} task.root=/data/cub "
                              "(root/train/<class>/*.jpg, root/val/..., root/test/..., or root/<class>/*.jpg with "
                              "task.split_file; docs/your_data.md)")
        data = load_image_folder(root, image_size, Path(cache_dir).expanduser(), split_file, channels, resize,
                                 images_per_class, progress)
        self.classes = {split: data[split].classes for split in SPLITS}
        self.cache_path = data.cache_path
        need = shots + max(queries, test_queries)  # (as FewShotClassification: both kinds of episode, every split)
        which = "task.shots + task.queries" if queries >= test_queries else "task.shots + task.test_queries"
        for split in SPLITS:
            part = data[split]
            if part.images.shape[1] < need:
                counts = part.available if images_per_class is None else [images_per_class] * len(part.classes)
                c = min(range(len(counts)), key=counts.__getitem__)
                kept = "has" if images_per_class is None else "uses (task.images_per_class)"
                raise DataError(f"class {part.classes[c]} of the {split} split {kept} {counts[c]} images, fewer than "
                                f"{which} = {shots} + {need - shots} = {need} that an episode takes from each class; "
                                f"lower task.queries / task.test_queries or task.shots, or add images")
        self.invert = bool(invert)
        images = {split: 255 - data[split].images if invert else data[split].images for split in SPLITS}
        super().__init__(images, ways, shots, queries, test_queries, device, dtype, name)

    @classmethod
    def model_sizes(cls, task) -> dict:
        return {"out_features": int(task.ways), "in_channels": int(task.channels), "image_size": int(task.image_size)}

    @classmethod
    def image_transform(cls, task):
        size, channels, resize = int(task.image_size), int(task.channels), bool(task.get("resize", True))
        if task.get("invert", False):
            return lambda image: 255 - decode_image(image, size, channels, resize)
        return lambda image: decode_image(image, size, channels, resize)  # -> [channels, size, size]
