"""MiniImagenet loading: the three on-disk layouts, the cache, the real split CSVs and bad input.

No MiniImagenet images exist here, so every layout is tested on a tiny synthetic dataset written in that
layout: 3 / 2 / 2 classes of 5 small JPEGs of odd sizes and colour modes, of which the loader keeps 4.
"""

from __future__ import annotations

import csv
import io
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metarun.data import miniimagenet as mi
from metarun.data.cache import DataError
from metarun.data.miniimagenet import CACHE_NAME, PICKLE_NAMES, SPLITS, load_miniimagenet, read_split_csvs

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]

# Deliberately unsorted: the loader must sort them.
CLASSES = {
    "train": ["n01000003", "n01000001", "n01000002"],
    "val": ["n02000002", "n02000001"],
    "test": ["n03000001", "n03000002"],
}
ON_DISK = 5  # images written per class
KEPT = 4  # images_per_class in the tests: the 5th image of each class must be left out
ODD_SIZES = [(100, 90), (90, 120), (84, 84), (130, 70), (61, 95)]  # (width, height)
MODES = ["RGB", "L", "RGB", "CMYK", "RGB"]  # ImageNet has a few grayscale and CMYK JPEGs
LAYOUTS = ["csv", "folders", "pickle"]

# split -> wnid -> [(file name, JPEG bytes)], in the order the loader should keep them
Source = dict[str, dict[str, list[tuple[str, bytes]]]]


def make_source(sizes: list[tuple[int, int]], seed: int = 0) -> Source:
    rng = np.random.default_rng(seed)
    source: Source = {}
    for split, wnids in CLASSES.items():
        source[split] = {}
        for wnid in wnids:
            images = []
            for i in range(ON_DISK):
                width, height = sizes[i % len(sizes)]
                pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                image = Image.fromarray(pixels, "RGB").convert(MODES[i % len(MODES)])
                buffer = io.BytesIO()
                image.save(buffer, "JPEG", quality=90)
                images.append((f"{wnid}{i + 1:08d}.jpg", buffer.getvalue()))
            source[split][wnid] = images
    return source


@pytest.fixture(scope="module")
def odd_source() -> Source:
    return make_source(ODD_SIZES)


def reference(jpeg: bytes | Path) -> np.ndarray:
    """What the loader should produce for one image: PIL decode, RGB, LANCZOS to 84x84 (HWC)."""
    image = Image.open(jpeg if isinstance(jpeg, Path) else io.BytesIO(jpeg))
    return np.array(image.convert("RGB").resize((84, 84), Image.Resampling.LANCZOS))


def write_csvs(folder: Path, source: Source) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, classes in source.items():
        with open(folder / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["filename", "label"])
            writer.writerows((name, wnid) for wnid, images in classes.items() for name, _ in images)


def write_csv_layout(root: Path, source: Source) -> None:
    """Layout (a): ``images/*.jpg`` and the split CSVs next to it."""
    (root / "images").mkdir(parents=True)
    for classes in source.values():
        for images in classes.values():
            for name, jpeg in images:
                (root / "images" / name).write_bytes(jpeg)
    write_csvs(root, source)


def write_folder_layout(root: Path, source: Source) -> None:
    """Layout (b): ``<split>/<wnid>/*.jpg``."""
    for split, classes in source.items():
        for wnid, images in classes.items():
            (root / split / wnid).mkdir(parents=True)
            for name, jpeg in images:
                (root / split / wnid / name).write_bytes(jpeg)


def write_pickle_layout(root: Path, source: Source) -> None:
    """Layout (c): one pickle per split, rows interleaved across classes so the indices matter."""
    root.mkdir(parents=True, exist_ok=True)
    for split, classes in source.items():
        rows, class_dict = [], {wnid: [] for wnid in classes}
        for i in range(ON_DISK):
            for wnid, images in classes.items():
                class_dict[wnid].append(len(rows))
                rows.append(reference(images[i][1]))
        content = {"image_data": np.stack(rows), "class_dict": class_dict}
        (root / PICKLE_NAMES[split]).write_bytes(pickle.dumps(content))


WRITERS: dict[str, Callable[[Path, Source], None]] = {
    "csv": write_csv_layout, "folders": write_folder_layout, "pickle": write_pickle_layout,
}


def load(data_dir: Path, cache_dir: Path, ipc: int = KEPT, **kwargs) -> mi.MiniImagenetData:
    kwargs.setdefault("progress", False)
    return load_miniimagenet(data_dir, cache_dir, images_per_class=ipc, **kwargs)


def expected_image(layout: str, root: Path, split: str, wnid: str, i: int) -> torch.Tensor:
    """Image ``i`` of class ``wnid`` read straight from the files of ``layout``, CHW."""
    name = f"{wnid}{i + 1:08d}.jpg"
    if layout == "csv":
        pixels = reference(root / "images" / name)
    elif layout == "folders":
        pixels = reference(root / split / wnid / name)
    else:
        content = pickle.loads((root / PICKLE_NAMES[split]).read_bytes())
        pixels = content["image_data"][content["class_dict"][wnid][i]]
    return torch.from_numpy(pixels).permute(2, 0, 1)


def snapshot(root: Path) -> dict[Path, tuple[int, int]]:
    return {p.relative_to(root): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def assert_only_cache(cache_dir: Path) -> None:
    assert sorted(p.name for p in cache_dir.iterdir()) == [CACHE_NAME]  # no temp file left beside it


# --------------------------------------------------------------------------------------------------
# Each layout


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_loads_every_image(layout, odd_source, tmp_path):
    data_dir, cache_dir = tmp_path / "data", tmp_path / "cache"
    WRITERS[layout](data_dir, odd_source)
    before = snapshot(data_dir)

    data = load(data_dir, cache_dir)

    for split in SPLITS:
        part = data[split]
        assert part.classes == sorted(CLASSES[split])
        assert part.images.dtype == torch.uint8
        assert part.images.shape == (len(CLASSES[split]), KEPT, 3, 84, 84)
        for c, wnid in enumerate(part.classes):
            for i in range(KEPT):  # the 5th image on disk is left out
                assert torch.equal(part.images[c, i], expected_image(layout, data_dir, split, wnid, i)), \
                    (split, wnid, i)
    assert data.val is data["val"]
    assert snapshot(data_dir) == before  # the data folder is only read
    assert_only_cache(cache_dir)


def test_images_are_resized_not_cropped(odd_source, tmp_path):
    """A 100x90 source: the first train image differs from a crop but matches the LANCZOS resize."""
    write_folder_layout(tmp_path / "data", odd_source)
    data = load(tmp_path / "data", tmp_path / "cache")
    name, jpeg = odd_source["train"]["n01000001"][0]
    source = np.array(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    assert source.shape == (90, 100, 3)
    got = data.train.images[0, 0].permute(1, 2, 0).numpy()
    assert np.array_equal(got, reference(jpeg))
    assert not np.array_equal(got, source[:84, :84])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_second_call_loads_the_cache(layout, odd_source, tmp_path, monkeypatch):
    data_dir, cache_dir = tmp_path / "data", tmp_path / "cache"
    WRITERS[layout](data_dir, odd_source)
    first = load(data_dir, cache_dir)

    def must_not_run(*args):
        raise AssertionError("the source was decoded again instead of loading the cache")

    monkeypatch.setattr(mi, "decode_image", must_not_run)
    monkeypatch.setattr(mi, "_read_pickle", must_not_run)
    second = load(data_dir, cache_dir)
    for split in SPLITS:
        assert torch.equal(first[split].images, second[split].images)
        assert first[split].classes == second[split].classes
    assert_only_cache(cache_dir)


def test_cache_is_rebuilt_when_the_source_changes(odd_source, tmp_path, monkeypatch, capsys):
    data_dir, cache_dir = tmp_path / "data", tmp_path / "cache"
    write_folder_layout(data_dir, odd_source)
    load(data_dir, cache_dir)

    decoded = []
    real_decode = mi.decode_image
    monkeypatch.setattr(mi, "decode_image", lambda path: decoded.append(path) or real_decode(path))

    # A different image under the same name (and a different size in bytes): the cache is stale.
    replacement = make_source([(150, 40)], seed=1)["test"]["n03000002"][2][1]
    target = data_dir / "test" / "n03000002" / "n0300000200000003.jpg"
    target.write_bytes(replacement)
    data = load(data_dir, cache_dir, progress=True)
    assert "MiniImagenet -> uint8 cache" in capsys.readouterr().err  # the tqdm bar
    assert len(decoded) == 7 * KEPT
    assert torch.equal(data.test.images[1, 2], torch.from_numpy(reference(replacement)).permute(2, 0, 1))

    # Another images_per_class is another conversion.
    decoded.clear()
    data = load(data_dir, cache_dir, ipc=2)
    assert data.train.images.shape == (3, 2, 3, 84, 84) and len(decoded) == 7 * 2
    assert_only_cache(cache_dir)


def test_cache_is_used_once_the_source_is_deleted(odd_source, tmp_path):
    data_dir, cache_dir = tmp_path / "data", tmp_path / "cache"
    write_csv_layout(data_dir, odd_source)
    first = load(data_dir, cache_dir)
    shutil.rmtree(data_dir)

    again = load(data_dir, cache_dir)
    assert torch.equal(first.train.images, again.train.images) and again.test.classes == first.test.classes
    with pytest.raises(DataError, match="MiniImagenet not found"):
        load(data_dir, cache_dir, ipc=3)  # the cache holds 4 images per class, not 3


def test_all_layouts_give_identical_tensors(odd_source, tmp_path):
    """Same pixels in every layout: 84x84 JPEGs for all three (the pickle holds their decoded pixels);
    odd-sized JPEGs for the two image layouts."""
    square = make_source([(84, 84)], seed=2)
    results = {}
    for name, source, layouts in (("square", square, LAYOUTS), ("odd", odd_source, ["csv", "folders"])):
        for layout in layouts:
            root = tmp_path / name / layout
            WRITERS[layout](root / "data", source)
            results[name, layout] = load(root / "data", root / "cache")
    for (name, layout), data in results.items():
        reference_data = results[name, "csv"]
        for split in SPLITS:
            assert data[split].classes == reference_data[split].classes
            assert torch.equal(data[split].images, reference_data[split].images), (name, layout, split)


# --------------------------------------------------------------------------------------------------
# Where the data and the CSVs are found


def test_found_in_the_miniimagenet_subfolder_with_a_splits_folder(odd_source, tmp_path):
    data_dir = tmp_path / "data"
    home = data_dir / "miniimagenet"
    write_csv_layout(home, odd_source)
    (home / "splits").mkdir()
    for split in SPLITS:
        (home / f"{split}.csv").rename(home / "splits" / f"{split}.csv")
    data = load(data_dir, tmp_path / "cache")
    assert data.train.classes == sorted(CLASSES["train"])


def test_splits_dir_argument(odd_source, tmp_path):
    data_dir = tmp_path / "data"
    write_csv_layout(data_dir, odd_source)
    splits_dir = tmp_path / "elsewhere"
    splits_dir.mkdir()
    for split in SPLITS:
        (data_dir / f"{split}.csv").rename(splits_dir / f"{split}.csv")
    data = load(data_dir, tmp_path / "cache", splits_dir=splits_dir)
    assert data.val.classes == sorted(CLASSES["val"])


@pytest.mark.parametrize("layout", ["folders", "pickle"])
def test_matching_csvs_are_accepted_beside_folders_and_pickles(layout, odd_source, tmp_path):
    data_dir = tmp_path / "data"
    WRITERS[layout](data_dir, odd_source)
    write_csvs(data_dir / "splits", odd_source)
    data = load(data_dir, tmp_path / "cache")
    assert [len(data[split].classes) for split in SPLITS] == [3, 2, 2]


def real_splits_dir() -> Path:
    data_root = os.environ.get("METARUN_DATA_DIR")
    root = Path(data_root) if data_root else Path(__file__).resolve().parents[2] / "shared" / "data"
    return root / "miniimagenet" / "splits"


def test_real_split_csvs_have_64_16_20_classes_of_600():
    splits = read_split_csvs(real_splits_dir())
    assert {split: len(classes) for split, classes in splits.items()} == mi.PAPER_CLASSES
    for classes in splits.values():
        for wnid, names in classes.items():
            assert len(names) == mi.PAPER_IMAGES_PER_CLASS
            assert all(name.startswith(wnid) and name.endswith(".jpg") for name in names)
    train, val, test = (set(splits[split]) for split in SPLITS)
    assert not (train & val or train & test or val & test)
    assert len(train | val | test) == 100


# --------------------------------------------------------------------------------------------------
# Missing and bad input: one line naming the problem, and nothing left in the cache folder


def assert_fails_cleanly(data_dir: Path, cache_dir: Path, needles: list[str], **kwargs) -> str:
    with pytest.raises(DataError) as info:
        load(data_dir, cache_dir, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)
    assert not cache_dir.exists() or not any(cache_dir.iterdir())
    return message


@pytest.mark.parametrize("make_dir", [False, True])
def test_missing_data_says_how_to_get_it(make_dir, tmp_path):
    data_dir = tmp_path / "data"
    if make_dir:  # e.g. the shared data folder: other datasets and the CSVs, but no images
        write_csvs(data_dir / "miniimagenet" / "splits", make_source([(8, 8)]))
        (data_dir / "omniglot").mkdir()
    assert_fails_cleanly(data_dir, tmp_path / "cache", [
        f"MiniImagenet not found in {data_dir}", "no stable public download",
        f"{data_dir / 'miniimagenet'}/images/*.jpg", "train.csv",
        "{train,val,test}/<wnid>/*.jpg", "mini-imagenet-cache-{train,validation,test}.pkl",
    ])


def _replace_file(relative: str, content: bytes | Callable[[bytes], bytes]):
    def mutate(root: Path) -> dict:
        path = root / relative
        path.write_bytes(content(path.read_bytes()) if callable(content) else content)
        return {}
    return mutate


def _delete(*relatives: str):
    def mutate(root: Path) -> dict:
        for relative in relatives:
            (root / relative).unlink()
        return {}
    return mutate


def _rewrite_csv(split: str, edit: Callable[[list[list[str]]], list[list[str]]]):
    def mutate(root: Path) -> dict:
        path = root / f"{split}.csv"
        rows = list(csv.reader(path.read_text().splitlines()))
        path.write_text("\n".join(",".join(row) for row in edit(rows)) + "\n")
        return {}
    return mutate


def _rewrite_pickle(split: str, edit: Callable[[dict], object]):
    def mutate(root: Path) -> dict:
        path = root / PICKLE_NAMES[split]
        path.write_bytes(pickle.dumps(edit(pickle.loads(path.read_bytes()))))
        return {}
    return mutate


def _csvs_with_extra_val_class(root: Path) -> dict:
    source = make_source([(8, 8)])
    source["val"]["n02000009"] = [(f"n02000009{i:08d}.jpg", b"") for i in range(1, ON_DISK + 1)]
    write_csvs(root / "splits", source)
    return {}


def _real_csvs(root: Path) -> dict:
    return {"splits_dir": real_splits_dir()}


def _move_class(src: str, dst: str):
    def mutate(root: Path) -> dict:
        shutil.copytree(root / src, root / dst)
        return {}
    return mutate


LAST = "n0300000200000004.jpg"  # the last image converted: earlier ones decode fine first
BAD_INPUTS = {
    "corrupt jpeg (a)": ("csv", _replace_file(f"images/{LAST}", b"this is not a jpeg"), [LAST, "decode"]),
    "truncated jpeg (b)": ("folders", _replace_file(f"test/n03000002/{LAST}", lambda b: b[: len(b) // 2]),
                           [f"test/n03000002/{LAST}", "truncated"]),
    "csv names a missing image": ("csv", _delete("images/n0200000100000002.jpg"),
                                  ["n0200000100000002.jpg", "val.csv", "missing"]),
    "csv class too small": ("csv", _rewrite_csv("train", lambda rows: [r for r in rows if r[0] not in {
        "n0100000200000004.jpg", "n0100000200000005.jpg"}]),
        ["n01000002", "train.csv", "3 images", "images_per_class=4"]),
    "folder class too small": ("folders", _delete("val/n02000002/n0200000200000001.jpg",
                                                  "val/n02000002/n0200000200000005.jpg"),
                               ["n02000002", "3 images", "images_per_class=4"]),
    "pickle class too small": ("pickle", _rewrite_pickle("test", lambda d: {
        **d, "class_dict": {**d["class_dict"], "n03000001": d["class_dict"]["n03000001"][:2]}}),
        ["n03000001", "mini-imagenet-cache-test.pkl", "2 images", "images_per_class=4"]),
    "csv header": ("csv", _rewrite_csv("test", lambda rows: [["image", "class"], *rows[1:]]),
                   ["test.csv", "header"]),
    "csv classes overlap": ("csv", _rewrite_csv("val", lambda rows: [*rows, ["extra.jpg", "n01000001"]]),
                            ["n01000001", "train", "val"]),
    "csv layout without csvs": ("csv", _delete("train.csv", "val.csv", "test.csv"),
                                ["images", "no split CSVs", "splits_dir"]),
    "folder classes overlap": ("folders", _move_class("train/n01000001", "test/n01000001"),
                               ["n01000001", "train", "test"]),
    "folders vs csv class count": ("folders", _csvs_with_extra_val_class, ["val", "has 2 classes", "lists 3",
                                                                           "n02000009"]),
    "folders vs real csvs": ("folders", _real_csvs, ["train", "has 3 classes", "lists 64"]),
    "pickle vs real csvs": ("pickle", _real_csvs, ["mini-imagenet-cache-train.pkl", "has 3 classes",
                                                   "lists 64"]),
    "pickle wrong shape": ("pickle", _rewrite_pickle("val", lambda d: {
        **d, "image_data": np.zeros((10, 32, 32, 3), np.uint8)}),
        ["mini-imagenet-cache-validation.pkl", "N x 84 x 84 x 3", "(10, 32, 32, 3)"]),
    "pickle channels first": ("pickle", _rewrite_pickle("train", lambda d: {
        **d, "image_data": d["image_data"].transpose(0, 3, 1, 2)}),
        ["mini-imagenet-cache-train.pkl", "(15, 3, 84, 84)"]),
    "pickle wrong dtype": ("pickle", _rewrite_pickle("train", lambda d: {
        **d, "image_data": d["image_data"].astype(np.float32)}),
        ["mini-imagenet-cache-train.pkl", "float32"]),
    "pickle missing key": ("pickle", _rewrite_pickle("test", lambda d: {"image_data": d["image_data"]}),
                           ["mini-imagenet-cache-test.pkl", "class_dict"]),
    "pickle row out of range": ("pickle", _rewrite_pickle("test", lambda d: {
        **d, "class_dict": {**d["class_dict"], "n03000002": [0, 1, 2, 99]}}),
        ["mini-imagenet-cache-test.pkl", "n03000002", "outside"]),
    "pickle not a pickle": ("pickle", _replace_file(PICKLE_NAMES["val"], b"garbage"),
                            ["mini-imagenet-cache-validation.pkl", "unpickle"]),
    "pickle file missing": ("pickle", _delete(PICKLE_NAMES["val"]), ["mini-imagenet-cache-validation.pkl",
                                                                     "missing"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_clear_line_and_writes_nothing(case, odd_source, tmp_path):
    layout, mutate, needles = BAD_INPUTS[case]
    data_dir = tmp_path / "data"
    WRITERS[layout](data_dir, odd_source)
    kwargs = mutate(data_dir)
    assert_fails_cleanly(data_dir, tmp_path / "cache", needles, **kwargs)


def test_bad_images_per_class(odd_source, tmp_path):
    write_folder_layout(tmp_path / "data", odd_source)
    assert_fails_cleanly(tmp_path / "data", tmp_path / "cache", ["images_per_class", "0"], ipc=0)


def test_unwritable_cache_folder(odd_source, tmp_path):
    write_folder_layout(tmp_path / "data", odd_source)
    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("")
    with pytest.raises(DataError) as info:
        load(tmp_path / "data", blocker / "cache")
    assert "\n" not in str(info.value) and "cache_dir" in str(info.value)
    assert list(tmp_path.glob("**/*.tmp")) == []
