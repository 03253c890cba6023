"""N-way K-shot episodes drawn from a class-by-image uint8 tensor that lives on the device.

A split is a tensor ``[classes, images_per_class, C, H, W]`` (uint8) already on the training
device; a whole meta-batch of episodes is gathered with tensor indexing, no data loader and no
host-to-device copy, so data never shows up in a profile of a training step.

Within a task the ``ways`` classes are a random draw without replacement, in random order, so
the label a class gets (its slot, 0..ways-1) is permuted from task to task.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from metarun.data.cache import DataError
from metarun.data.images import RawImage
from metarun.types import TaskBatch
from metarun.utils.errors import MetarunError


@dataclass
class EpisodeBatch:
    """A meta-batch of episodes and which classes / images they used (for plots and tests)."""

    tasks: TaskBatch  # support_x [T, ways*shots, C, H, W], support_y [T, ways*shots], query likewise
    classes: Tensor  # [T, ways] class indices into the split
    images: Tensor  # [T, ways, shots + queries] image indices within each class


class FewShotClassification:
    """Few-shot classification episodes over per-split image tensors.

    Subclasses load the data and call ``super().__init__`` with ``splits``.

    Args:
        splits: ``{"train"|"val"|"test": uint8 tensor [classes, images, C, H, W]}``.
        ways, shots, queries: N, K and queries per class of a training episode.
        test_queries: queries per class in validation and test episodes.
        device, dtype: where the images live and the float type they become.
        name: the family's name (from the config).
    """

    loss_fn = staticmethod(F.cross_entropy)
    metric_name = "accuracy"
    lower_is_better = False

    def __init__(self, splits: dict[str, Tensor], ways: int, shots: int, queries: int, test_queries: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, name: str = "") -> None:
        self.ways, self.shots, self.queries, self.test_queries = ways, shots, queries, test_queries
        self.test_shots = (shots,)
        self.device, self.dtype, self.name = torch.device(device), dtype, name
        self.splits = {k: v.to(self.device) for k, v in splits.items()}
        channels, size = self.splits["train"].shape[2:4]
        # what the model must fit (the trainer passes these to it): classes per task, image shape
        self.model_kwargs = {"out_features": ways, "in_channels": channels, "image_size": size}
        for split, data in self.splits.items():
            classes, per_class = data.shape[:2]
            if ways > classes:
                raise DataError(f"task.ways={ways} is more than the {classes} classes of the {split} split")
            for q_name, q in (("task.queries", queries), ("task.test_queries", test_queries)):
                if shots + q > per_class:
                    raise DataError(f"task.shots + {q_name} = {shots + q} is more than the {per_class} images "
                                    f"per class of the {split} split")

    @classmethod
    def model_sizes(cls, task) -> dict | None:
        """The ``model_kwargs`` a task built from the config ``task`` passes to the model, where the
        config alone fixes them (:func:`metarun.load` rebuilds a model from an old checkpoint with
        them, without the data); None where only the data tells (the task is built to find them)."""
        return None

    @classmethod
    def image_transform(cls, task) -> Callable[[RawImage], np.ndarray]:
        """The family's per-image preprocessing for the config ``task``: one raw image (encoded bytes,
        a path, a binary file or a PIL image) to uint8 ``[C, H, W]``, exactly as the dataset cache
        holds it (:meth:`metarun.api.Trained.preprocess`)."""
        raise MetarunError(f"task {task.get('name', cls.__name__)} has no image preprocessing in metarun; give "
                           "adapt() and predict() float tensors shaped as the model's inputs")

    @staticmethod
    def metric_fn(outputs: Tensor, targets: Tensor) -> Tensor:
        """Per-task metric: accuracy on the query set."""
        return (outputs.argmax(dim=-1) == targets).to(outputs.dtype).mean()

    def sample(self, num_tasks: int, shots: int, queries: int, generator: torch.Generator,
               split: str = "train") -> EpisodeBatch:
        """Draw ``num_tasks`` episodes of ``ways`` classes with ``shots`` + ``queries`` images each."""
        data = self.splits[split]
        classes, per_class = data.shape[:2]
        dev = self.device
        # a task's classes, in label order, are the first `ways` entries of a random permutation:
        # the indices of its `ways` smallest uniform draws. topk finds them without sorting all the
        # draws (25x faster than argsort for 4,400 classes on CPU); so for the images per class.
        chosen = torch.rand(num_tasks, classes, generator=generator, device=dev)
        chosen = chosen.topk(self.ways, dim=1, largest=False).indices
        picks = torch.rand(num_tasks, self.ways, per_class, generator=generator, device=dev)
        picks = picks.topk(shots + queries, dim=2, largest=False).indices
        images = data[chosen[:, :, None], picks]  # [T, ways, shots + queries, C, H, W]
        images = images.to(self.dtype) / 255.0
        labels = torch.arange(self.ways, device=dev).view(1, self.ways, 1).expand(num_tasks, -1, shots + queries)

        def part(x: Tensor, lo: int, hi: int) -> Tensor:
            return x[:, :, lo:hi].reshape(num_tasks, self.ways * (hi - lo), *x.shape[3:])

        tasks = TaskBatch(part(images, 0, shots), part(labels, 0, shots),
                          part(images, shots, shots + queries), part(labels, shots, shots + queries))
        return EpisodeBatch(tasks, chosen, picks)

    def visualize(self, writer, step: int, model, params, generator: torch.Generator, adapt) -> None:
        """An image grid of one validation episode: a row per class, its support images, a gap,
        then its query images."""
        episode = self.sample(1, self.shots, self.test_queries, generator, split="val")
        data = self.splits["val"]
        images = data[episode.classes[0][:, None], episode.images[0]]  # [ways, shots + queries, C, H, W]
        images = F.pad(images, (1, 1, 1, 1), value=128)  # a grey frame around each image
        ways, n, c, h, w = images.shape
        gap = torch.full((ways, 1, c, h, w), 255, dtype=images.dtype, device=images.device)
        images = torch.cat([images[:, :self.shots], gap, images[:, self.shots:]], dim=1)
        grid = images.permute(2, 0, 3, 1, 4).reshape(c, ways * h, (n + 1) * w)
        writer.add_image("val/episode_support_then_query", grid.cpu(), step)
