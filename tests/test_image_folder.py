"""task=image_folder: a class-folder dataset of your own, its two layouts, its cache, its errors, and a
run of the ``metarun`` command on it with a model of your own.

Every dataset is written here with PIL: 6 train / 3 val / 3 test classes of 6 images, 16x16, each class
a colour of its own plus noise, PNGs and JPEGs mixed.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metarun.data import image_folder as imf
from metarun.data.cache import DataError
from metarun.data.image_folder import SPLITS, load_image_folder, read_split_file
from metarun.tasks.image_folder import ImageFolderTasks
from tests.conftest import run_cli

CLASSES = {"train": 6, "val": 3, "test": 3}
PER_CLASS = 6
SOURCE_SIZE = 16

unit = pytest.mark.unit
smoke = pytest.mark.smoke
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def class_name(split: str, c: int) -> str:
    return f"{split}_{'zyxwvu'[c]}"  # written in reverse name order: the loader must sort them


def write_image(path: Path, seed: int, size: tuple[int, int] = (SOURCE_SIZE, SOURCE_SIZE)) -> None:
    """A class-coloured noisy image: its colour from the class (the seed's tens), its noise from the seed."""
    rng = np.random.default_rng(seed)
    colour = np.array([(seed // 10 * 37) % 256, (seed // 10 * 91) % 256, (seed // 10 * 53) % 256])
    pixels = np.clip(colour + rng.integers(-40, 40, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def write_class(folder: Path, index: int, count: int = PER_CLASS) -> None:
    for i in range(count):
        write_image(folder / f"img{i:02d}.{'png' if i % 2 else 'jpg'}", seed=index * 10 + i)


def split_folders(root: Path, val_name: str = "val") -> Path:
    """Layout (a): root/<split>/<class>/img*.{png,jpg}."""
    index = 0
    for split, count in CLASSES.items():
        for c in range(count):
            write_class(root / (val_name if split == "val" else split) / class_name(split, c), index)
            index += 1
    return root


def flat_folders(root: Path, extra: int = 0) -> dict[str, list[str]]:
    """Layout (b): root/<class>/img*; returns each split's classes (``extra`` class folders left unlisted)."""
    assignment, index = {}, 0
    for split, count in CLASSES.items():
        assignment[split] = [class_name(split, c) for c in range(count)]
        for name in assignment[split]:
            write_class(root / name, index)
            index += 1
    for e in range(extra):
        write_class(root / f"unlisted_{e}", 100 + e)
    return assignment


def reference(path: Path, size: int, mode: str = "RGB") -> torch.Tensor:
    """A direct PIL decode + LANCZOS resize of one file, channels first."""
    with Image.open(path) as image:
        pixels = np.array(image.convert(mode).resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8)
    pixels = torch.from_numpy(pixels)
    return pixels[None] if pixels.ndim == 2 else pixels.permute(2, 0, 1)


def files_of(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


# --------------------------------------------------------------------------------------------------
# The two layouts


@unit
@pytest.mark.parametrize("channels,val_name", [(3, "val"), (1, "validation")])
def test_split_folders_load_sorted_classes_resized_like_pil(tmp_path, channels, val_name):
    root = split_folders(tmp_path / "data", val_name)
    before = files_of(root)
    data = load_image_folder(root, 12, tmp_path / "cache", channels=channels, progress=False)
    for split, count in CLASSES.items():
        part = data[split]
        assert part.images.shape == (count, PER_CLASS, channels, 12, 12) and part.images.dtype == torch.uint8
        assert part.classes == sorted(class_name(split, c) for c in range(count))
        assert part.available == [PER_CLASS] * count
    # a PNG and a JPEG, both decoded and resized 16 -> 12 exactly as PIL does it
    folder = root / val_name / data.val.classes[1]
    for i in (2, 3):
        expected = reference(folder / f"img{i:02d}.{'png' if i % 2 else 'jpg'}", 12, imf.MODES[channels])
        assert torch.equal(data.val.images[1, i], expected)
    assert files_of(root) == before  # the root folder is only read: the cache is elsewhere
    assert data.cache_path.parent == tmp_path / "cache" and data.cache_path.is_file()


@unit
@pytest.mark.parametrize("form", ["csv", "csv-with-header", "json"])
def test_a_split_file_assigns_the_class_folders(tmp_path, form, caplog):
    root = tmp_path / "data"
    assignment = flat_folders(root, extra=2)
    if form == "json":
        split_file = root / "splits.json"
        split_file.write_text(json.dumps({"train": assignment["train"], "validation": assignment["val"],
                                          "test": assignment["test"]}))
    else:
        split_file = root / "splits.csv"
        rows = [f"{name},{split}" for split, names in assignment.items() for name in reversed(names)]
        split_file.write_text("\n".join((["class,split"] if form == "csv-with-header" else []) + rows) + "\n")
    assert read_split_file(split_file) == {split: sorted(names) for split, names in assignment.items()}
    caplog.set_level(logging.INFO, logger="metarun.data.image_folder")
    os.chdir(tmp_path)  # (pytest restores it) a relative split file is found in root too
    data = load_image_folder(root, 16, tmp_path / "cache", split_file=split_file.name, progress=False)
    for split, count in CLASSES.items():
        assert data[split].images.shape == (count, PER_CLASS, 3, 16, 16)
        assert data[split].classes == sorted(assignment[split])
    name = data.train.classes[0]
    assert torch.equal(data.train.images[0, 4], reference(root / name / "img04.jpg", 16))  # 16x16: unresized
    assert "2 class folders" in caplog.text and "left out" in caplog.text


@unit
def test_classes_keep_the_smallest_count_or_images_per_class(tmp_path, caplog):
    root = split_folders(tmp_path / "data")
    write_class(root / "train" / class_name("train", 0), 0, count=PER_CLASS + 3)  # 9 images in one class
    caplog.set_level(logging.INFO, logger="metarun.data.image_folder")
    data = load_image_folder(root, 16, tmp_path / "cache", progress=False)
    assert data.train.images.shape[1] == PER_CLASS and sorted(data.train.available)[-1] == PER_CLASS + 3
    assert "train: 6 classes x 6 images (16x16, 3 channels); 3 of its 39 image files left out" in caplog.text
    assert "val: 3 classes x 6 images (16x16, 3 channels); all its 18 image files" in caplog.text  # not "0 of its"
    caplog.clear()
    load_image_folder(root, 16, tmp_path / "cache", channels=1, progress=False)
    assert "test: 3 classes x 6 images (16x16, grayscale)" in caplog.text  # not "1 channels"
    capped = load_image_folder(root, 16, tmp_path / "cache", images_per_class=4, progress=False)
    assert [capped[s].images.shape[1] for s in SPLITS] == [4, 4, 4]
    assert capped.cache_path != data.cache_path  # each setting its own cache
    with pytest.raises(DataError, match=rf"class {class_name('train', 5)} of the train split has 6 images, fewer "
                                        r"than task.images_per_class=7"):
        load_image_folder(root, 16, tmp_path / "cache", images_per_class=7, progress=False)


# --------------------------------------------------------------------------------------------------
# The cache


def no_decoding(*args, **kwargs):
    raise AssertionError("decoded an image although the cache is valid")


@unit
def test_the_cache_is_reused_and_rebuilt_when_a_file_is_added_or_modified(tmp_path, monkeypatch, caplog):
    root, cache = split_folders(tmp_path / "data"), tmp_path / "cache"
    first = load_image_folder(root, 16, cache, progress=False)
    caplog.set_level(logging.INFO, logger="metarun.data.image_folder")
    with monkeypatch.context() as m:
        m.setattr(imf, "decode_image", no_decoding)
        second = load_image_folder(root, 16, cache, progress=False)  # nothing decoded
    assert "read the cache" in caplog.text
    assert all(torch.equal(first[s].images, second[s].images) for s in SPLITS)

    # a file added to every class of val: the split now has 7 images per class
    for c in range(CLASSES["val"]):
        write_class(root / "val" / class_name("val", c), 50 + c, count=PER_CLASS + 1)
    with monkeypatch.context() as m:
        m.setattr(imf, "decode_image", no_decoding)
        with pytest.raises(AssertionError, match="decoded an image"):
            load_image_folder(root, 16, cache, progress=False)
    assert load_image_folder(root, 16, cache, progress=False).val.images.shape[1] == PER_CLASS + 1

    # a file modified in place (same name): its new pixels are read
    path = root / "test" / class_name("test", 0) / "img01.png"
    stat = path.stat()
    write_image(path, seed=999)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # (on a file system with coarse times too)
    data = load_image_folder(root, 16, cache, progress=False)
    c = data.test.classes.index(class_name("test", 0))
    assert torch.equal(data.test.images[c, 1], reference(path, 16))
    assert sorted(p.name for p in cache.iterdir()) == [data.cache_path.name]  # rebuilt in place, no temp left


# --------------------------------------------------------------------------------------------------
# Bad input: one DataError naming the file, class or folder


def corrupt_file(root: Path) -> str:
    path = root / "val" / class_name("val", 1) / "img03.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return f"cannot decode image {path}"


def empty_class(root: Path) -> str:
    folder = root / "test" / "empty_class"
    folder.mkdir()
    (folder / "notes.txt").write_text("no images here")
    return f"class empty_class of the test split ({folder}) has no image files"


def missing_split(root: Path) -> str:
    for folder in sorted((root / "test").rglob("*"), reverse=True):
        folder.unlink() if folder.is_file() else folder.rmdir()
    (root / "test").rmdir()
    return f"{root} has no test/ folder; expected root/train/<class>/*.jpg"


def empty_split(root: Path) -> str:
    missing_split(root)
    (root / "test").mkdir()
    return f"the test split {root / 'test'} has no class folders"


def no_split_folders(root: Path) -> str:
    for split in SPLITS:
        (root / split).rename(root / f"old_{split}")
    return "has no train/, val/ or test/ folder and no task.split_file was given"


def a_class_in_two_splits(root: Path) -> str:
    write_class(root / "test" / class_name("train", 0), 0)
    return f"class {class_name('train', 0)} is in both the train and the test split"


def val_and_validation(root: Path) -> str:
    (root / "validation").mkdir()
    return "has both val/ and validation/"


@unit
@pytest.mark.parametrize("breaks", [corrupt_file, empty_class, missing_split, empty_split, no_split_folders,
                                    a_class_in_two_splits, val_and_validation], ids=lambda f: f.__name__)
def test_bad_folders_are_a_data_error_naming_the_file_or_folder(tmp_path, breaks):
    root = split_folders(tmp_path / "data")
    fragment = breaks(root)
    with pytest.raises(DataError, match=fragment.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")
                       .replace("*", r"\*").replace(".", r"\.")):
        load_image_folder(root, 16, tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())  # no cache written


@unit
def test_a_missing_root_says_which_layouts_are_expected(tmp_path):
    with pytest.raises(DataError, match=r"task.root=.*nowhere not found; expected root/train/<class>/\*\.jpg.*"
                                        r"task.split_file"):
        load_image_folder(tmp_path / "nowhere", 16, tmp_path / "cache")


@unit
def test_an_image_of_another_size_is_refused_without_resize(tmp_path):
    root = split_folders(tmp_path / "data")
    odd = root / "train" / class_name("train", 2) / "img05.png"
    write_image(odd, seed=25, size=(20, 18))
    with pytest.raises(DataError, match=rf"image {odd} is 20x18, not 16x16 \(task.resize=false"):
        load_image_folder(root, 16, tmp_path / "cache", resize=False, progress=False)
    data = load_image_folder(root, 16, tmp_path / "cache", resize=True, progress=False)  # resized (mixed sizes)
    c = data.train.classes.index(class_name("train", 2))
    assert torch.equal(data.train.images[c, 5], reference(odd, 16))


@unit
@pytest.mark.parametrize("content,fragment", [
    ("train_z,train\ntrain_z,test\n", "lists class train_z twice"),
    ("train_z,holdout\n", "class train_z has the split 'holdout'"),
    ("train_z\n", "is not 'class,split'"),
    ("nosuch,train\n", "class nosuch of the train split .* has no folder"),
])
def test_a_bad_split_file_names_the_class(tmp_path, content, fragment):
    root = tmp_path / "data"
    assignment = flat_folders(root)
    lines = [f"{name},{split}" for split, names in assignment.items() for name in names if name != "train_z"]
    (tmp_path / "splits.csv").write_text(content + "\n".join(lines) + "\n")
    with pytest.raises(DataError, match=fragment):
        load_image_folder(root, 16, tmp_path / "cache", split_file=tmp_path / "splits.csv", progress=False)


@unit
def test_a_class_with_fewer_images_than_an_episode_takes_is_named(tmp_path):
    root = split_folders(tmp_path / "data")
    small = root / "val" / class_name("val", 2)
    for path in sorted(small.iterdir())[3:]:
        path.unlink()  # 3 images left
    kwargs = dict(root=root, image_size=16, cache_dir=tmp_path / "cache", progress=False, ways=3, shots=1)
    with pytest.raises(DataError, match=rf"class {small.name} of the val split has 3 images, fewer than "
                                        r"task.shots \+ task.queries = 1 \+ 4 = 5"):
        ImageFolderTasks(**kwargs, queries=4, test_queries=2)
    with pytest.raises(DataError, match=r"task.shots \+ task.test_queries = 1 \+ 3 = 4"):
        ImageFolderTasks(**kwargs, queries=1, test_queries=3)
    tasks = ImageFolderTasks(**kwargs, queries=2, test_queries=2)
    assert tasks.model_kwargs == {"out_features": 3, "in_channels": 3, "image_size": 16}
    episode = tasks.sample(2, 1, 2, torch.Generator().manual_seed(0), split="val")
    assert episode.tasks.support_x.shape == (2, 3, 3, 16, 16) and episode.tasks.query_y.shape == (2, 6)


def test_invert_feeds_255_minus_each_pixel_in_training_and_in_metarun_load(tmp_path):
    """task.invert: dark strokes on white fed as bright on black (as the built-in Omniglot is), the same
    through the task's image_transform that metarun.load uses; the cache is shared."""
    from omegaconf import OmegaConf

    root = split_folders(tmp_path / "data")
    kwargs = dict(root=root, image_size=16, cache_dir=tmp_path / "cache", progress=False, ways=3, shots=1,
                  queries=2, test_queries=2)
    plain, inverted = ImageFolderTasks(**kwargs), ImageFolderTasks(**kwargs, invert=True)
    assert plain.cache_path == inverted.cache_path
    for split in ("train", "val", "test"):
        assert torch.equal(inverted.splits[split], 255 - plain.splits[split])
    image = next((root / "train" / class_name("train", 0)).iterdir())
    transform = ImageFolderTasks.image_transform(OmegaConf.create(dict(image_size=16, channels=3, invert=True)))
    same = ImageFolderTasks.image_transform(OmegaConf.create(dict(image_size=16, channels=3)))
    assert (transform(image) == 255 - same(image)).all()


# --------------------------------------------------------------------------------------------------
# The metarun command


def one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("metarun: error: ") and all(f in lines[0] for f in fragments), lines[0]


@smoke
def test_the_command_says_in_one_line_what_is_missing(tmp_path):
    one_line_error(run_cli(["task=image_folder"], tmp_path), "task.root is required", "task.root=/data/cub")
    one_line_error(run_cli(["task=image_folder", "task.root=nowhere", "task.cache_dir=cache"], tmp_path),
                   "task.root=", "nowhere not found; expected root/train/<class>/*.jpg")
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "cache").exists()


TINY_NET = '''\
"""A model of the user's own, outside the metarun package."""
from torch import nn

from metarun.models import BatchStatNorm


class TinyNet(nn.Module):
    def __init__(self, in_channels, out_features, image_size, width=8):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, width, 3, stride=2, padding=1), BatchStatNorm(width),
                                  nn.ReLU(), nn.Flatten(), nn.Linear(width * ((image_size + 1) // 2) ** 2, out_features))

    def forward(self, x):
        return self.body(x)
'''


@smoke
def test_a_run_on_your_own_folder_with_your_own_model(tmp_path):
    """What docs/your_data.md tells a user to type: the model's YAML in their --config-dir, its class in
    the folder they run metarun from (a module outside the package); 2 iterations, evaluated."""
    root = split_folders(tmp_path / "data")
    project = tmp_path / "project"
    (project / "my_configs" / "model").mkdir(parents=True)
    (project / "my_nets.py").write_text(TINY_NET)
    (project / "my_configs" / "model" / "tiny.yaml").write_text("_target_: my_nets.TinyNet\nwidth: 8\n")
    metarun = [str(Path(sys.executable).with_name("metarun"))]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HYDRA_FULL_ERROR")}
    quick = ["debug=smoke", "trainer.iterations=2", "trainer.val_tasks=2", "trainer.test_tasks=4",
             "algorithm.batching=loop", "algorithm.inner_steps=1", "algorithm.test_inner_steps=2",
             "trainer.report_steps=[0,2]", "algorithm.meta_batch_size=2", f"task.cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.run([*metarun, "--config-dir", "my_configs", "task=image_folder", f"task.root={root}",
                           "task.image_size=16", "task.ways=3", "task.shots=1", "task.queries=2", "task.test_queries=2",
                           "model=tiny", "model.width=4", "hydra.run.dir=run", *quick],
                          cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((project / "run" / "results.json").read_text())
    assert results["task"] == "image_folder" and results["iteration"] == 2 and results["test_tasks"] == 4
    accuracies = [v["mean"] for v in results["results"]["1-shot"].values()]
    assert len(accuracies) == 2 and all(0 <= a <= 1 for a in accuracies)
    state = torch.load(project / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert state["model"]["body.0.weight"].shape == (4, 3, 3, 3)  # the user's model, with model.width=4
    assert (tmp_path / "cache").is_dir() and not list(root.rglob("*.pt"))
    log = (project / "run" / "metarun.log").read_text()  # where it runs, and which protocol it starts from
    assert f"run folder: {project / 'run'}" in log
    assert "task=image_folder runs with setting=miniimagenet_5w1s: 3-way 1-shot, 2 queries, 2 iterations" in log
    assert "setting=omniglot_5w1s model=conv4" in log

    # evaluate reads the saved config back, the user's model in it
    proc = subprocess.run([*metarun, "evaluate=run", "trainer.test_tasks=2"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((project / "run" / "results.json").read_text())
    assert results["test_tasks"] == 2

    # and the report of it: the table's number is the run's
    proc = subprocess.run([*metarun, "report", "run", "--out", "report"], cwd=project, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    row = next(csv.DictReader((project / "report" / "report.csv").open()))
    assert row["task"] == "image_folder" and row["group"] == "1-shot"
    assert float(row["after_2_steps_mean"]) == results["results"]["1-shot"]["after_2_steps"]["mean"]
    assert (project / "report" / "image_folder_1_shot_adaptation.svg").is_file()
