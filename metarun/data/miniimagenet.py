"""MiniImagenet: find it on disk in any of three common layouts and cache it as uint8 84x84 tensors.

MiniImagenet (Vinyals et al. 2016) is 100 ImageNet classes with 600 images each. Ravi & Larochelle
(ICLR 2017) split the classes 64 / 16 / 20 into train / val / test, listed in their split CSVs
(``shared/data/miniimagenet/splits/{train,val,test}.csv``). :func:`load_miniimagenet` finds the images,
checks them, converts every image to RGB at 84x84 and saves all three splits once as uint8 tensors in the
cache folder (1.27 GB for the full set). Later calls load that cache, as long as the source files are
unchanged.

Example:
    >>> data = load_miniimagenet(Path("data"), Path("~/.cache/metarun").expanduser())
    >>> data.train.images.shape
    torch.Size([64, 600, 3, 84, 84])
    >>> data["test"].classes[:2]
    ['n01930112', 'n01981276']

Getting MiniImagenet
--------------------
There is no stable public download. The images are ImageNet's (ILSVRC-2012), under ImageNet's
non-commercial terms of access, and the copies people share (Google Drive links, Kaggle uploads) come
and go. Get them in one of these ways:

1. From ImageNet itself. Download ``ILSVRC2012_img_train.tar`` from image-net.org (this needs an account
   and accepting ImageNet's terms), then extract the 100 classes named in the split CSVs. By the usual
   convention, the CSV row ``n0153282900000005.jpg,n01532829`` is the 5th image of class ``n01532829``
   when that class's ``n01532829_<number>.JPEG`` files are sorted by number. Two public scripts do this:
   ``mini_imagenet_generator.py`` in yaoyao-liu/mini-imagenet-tools writes layout (b); pass
   ``--image_resize 0`` to keep the full-size images. ``utils/create_miniImagenet.py`` in
   gitabcworld/FewShotLearning writes layout (a).
2. From an existing copy in one of the layouts below, e.g. the ``mini-imagenet-cache-*.pkl`` files that
   learn2learn reads.

Put the data in ``<data_dir>/miniimagenet/`` or directly in ``<data_dir>`` (``task.data_dir``, default
``$METARUN_DATA_DIR``, else ``./data``), in one of these layouts:

(a) Ravi & Larochelle's layout: one flat folder ``images/`` of ``*.jpg``, named as in the CSVs, and
    ``train.csv``, ``val.csv``, ``test.csv``. The CSVs may be next to ``images/``, in ``splits/`` beside
    it, in ``<data_dir>/miniimagenet/splits/``, or anywhere given as ``splits_dir``. Each class uses its
    first ``images_per_class`` rows, in CSV order.
(b) A folder per class: ``train/<wnid>/*.jpg``, ``val/<wnid>/*.jpg`` and ``test/<wnid>/*.jpg``. Images
    may also be ``.jpeg``, ``.JPEG`` or ``.png``. Each class uses its first ``images_per_class`` files in
    name order.
(c) The pickle cache: ``mini-imagenet-cache-train.pkl``, ``mini-imagenet-cache-validation.pkl`` and
    ``mini-imagenet-cache-test.pkl``. Each one is a pickled dict with ``image_data`` (a uint8 numpy
    array, N x 84 x 84 x 3) and ``class_dict`` (wnid -> list of row indices). Each class uses its first
    ``images_per_class`` indices. Unpickling can run code, so use only files you trust.

Images in (a) and (b) may be any size: the full-size ImageNet JPEGs, or copies already resized. Each one
is converted to RGB and then resized to 84x84 with PIL's LANCZOS filter. An 84x84 image passes through
unchanged. For (b) and (c), the split CSVs are used when they are found (``splits_dir``, next to the
data, ``splits/`` beside it, or ``<data_dir>/miniimagenet/splits/``). Each split must then have exactly
the classes its CSV lists: 64 / 16 / 20 with the real CSVs.

Detection: ``<data_dir>/miniimagenet/`` is searched before ``<data_dir>``. In each folder the layouts
are tried in the order (a), (b), (c), and the first one present is used.

The data folder is only read. The cache is ``miniimagenet_84x84_uint8_v1.pt`` in the cache folder
(``task.cache_dir``, default ``$METARUN_CACHE_DIR``, else ``~/.cache/metarun``). It records a fingerprint
of the source: the layout and the names and sizes of the files used. It is rebuilt when these change.
You may delete the raw images after the first run: when no source is found, an existing cache with
``images_per_class`` images per class is used as it is.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import pickle
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from metarun.data.cache import (
    DataError,
    default_cache_dir,
    default_data_dir,
    load_cache,
    one_line,
    save_cache,
    where_data_goes,
)
from metarun.data.images import RawImage, open_image

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
"""The three splits, in the order they are converted and stored."""

PAPER_CLASSES = {"train": 64, "val": 16, "test": 20}  # Ravi & Larochelle (2017), Vinyals et al. (2016)
PAPER_IMAGES_PER_CLASS = 600
IMAGE_SIZE = 84  # the resolution every MiniImagenet paper trains on

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # layout (b); compared in lower case (ImageNet uses .JPEG)
PICKLE_NAMES = {
    "train": "mini-imagenet-cache-train.pkl",
    "val": "mini-imagenet-cache-validation.pkl",
    "test": "mini-imagenet-cache-test.pkl",
}
"""Layout (c): the pickle file of each split (learn2learn's names)."""

CACHE_VERSION = 1  # bump when the conversion changes, so old caches are rebuilt
CACHE_NAME = f"miniimagenet_{IMAGE_SIZE}x{IMAGE_SIZE}_uint8_v{CACHE_VERSION}.pt"

# PIL releases the GIL while decoding and resizing, so threads speed up the one-off conversion
# (60,000 full-size JPEGs) without the memory cost of worker processes.
_DECODE_THREADS = min(8, os.cpu_count() or 1)


@dataclass
class MiniImagenetSplit:
    """The images of one split.

    Attributes:
        images: uint8 tensor [classes, images_per_class, 3, 84, 84]: RGB, channels first.
        classes: the WordNet id (wnid) of each row of ``images``, sorted (plain string order).
    """

    images: torch.Tensor
    classes: list[str]


@dataclass
class MiniImagenetData:
    """MiniImagenet's three splits; ``data["val"]`` is the same as ``data.val``."""

    train: MiniImagenetSplit
    val: MiniImagenetSplit
    test: MiniImagenetSplit

    def __getitem__(self, split: str) -> MiniImagenetSplit:
        if split not in SPLITS:
            raise KeyError(f"unknown MiniImagenet split {split!r}; expected one of {', '.join(SPLITS)}")
        return getattr(self, split)


# --------------------------------------------------------------------------------------------------
# Split CSVs


def read_split_csv(path: Path) -> dict[str, list[str]]:
    """Read one Ravi & Larochelle split CSV.

    Args:
        path: a CSV with the header ``filename,label`` and rows like ``n0153282900000005.jpg,n01532829``.

    Returns:
        wnid -> its image file names in file order; classes in order of first appearance.

    Raises:
        DataError: the file cannot be read, has another header, a malformed row, a file name listed
            twice, or no rows.
    """
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read the MiniImagenet split CSV {path} ({one_line(e)})") from e
    if not rows or [cell.strip() for cell in rows[0]] != ["filename", "label"]:
        raise DataError(f"{path}: expected the header 'filename,label' of Ravi & Larochelle's split CSVs")
    classes: dict[str, list[str]] = {}
    seen: set[str] = set()
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise DataError(f"{path}, line {line}: expected 'filename,label', got {','.join(row)!r}")
        filename, wnid = row[0].strip(), row[1].strip()
        if filename in seen:
            raise DataError(f"{path}, line {line}: {filename} is listed twice")
        seen.add(filename)
        classes.setdefault(wnid, []).append(filename)
    if not classes:
        raise DataError(f"{path}: no rows after the header")
    return classes


def read_split_csvs(splits_dir: Path) -> dict[str, dict[str, list[str]]]:
    """Read ``train.csv``, ``val.csv`` and ``test.csv`` and check that no class is in two splits.

    Args:
        splits_dir: the folder holding the three CSVs.

    Returns:
        split -> wnid -> image file names, as :func:`read_split_csv` gives them.

    Raises:
        DataError: a CSV is missing or malformed, or a class appears in two splits.
    """
    splits_dir = Path(splits_dir)
    missing = [f"{split}.csv" for split in SPLITS if not (splits_dir / f"{split}.csv").is_file()]
    if missing:
        raise DataError(f"MiniImagenet split CSVs missing in {splits_dir}: {', '.join(missing)}")
    splits = {split: read_split_csv(splits_dir / f"{split}.csv") for split in SPLITS}
    _check_disjoint({split: list(classes) for split, classes in splits.items()}, str(splits_dir))
    return splits


def _check_disjoint(classes: dict[str, Iterable[str]], where: str) -> None:
    seen: dict[str, str] = {}
    for split, wnids in classes.items():
        for wnid in wnids:
            if wnid in seen:
                raise DataError(f"MiniImagenet class {wnid} is in both the {seen[wnid]} and the {split} "
                                f"split of {where}; the splits must not share classes")
            seen[wnid] = split


def _check_classes(found: list[str], csv_path: Path, expected: Iterable[str], what: Path) -> None:
    """Raise unless ``found`` (the classes of ``what``) are exactly those that ``csv_path`` lists."""
    expected = set(expected)
    missing, extra = sorted(expected - set(found)), sorted(set(found) - expected)
    if not missing and not extra:
        return
    details = [f"{label}: {_few(names)}" for label, names in (("missing", missing), ("not in the CSV", extra))
               if names]
    raise DataError(f"{what} has {len(found)} classes but {csv_path} lists {len(expected)} "
                    f"({'; '.join(details)})")


# --------------------------------------------------------------------------------------------------
# Finding the data


@dataclass(frozen=True)
class _Source:
    """The data found on disk: its layout, its folder, and the folder of the split CSVs (if found)."""

    layout: str  # "csv" (a), "folders" (b) or "pickle" (c)
    root: Path
    splits_dir: Path | None


def _find_source(data_dir: Path, splits_dir: Path | None) -> _Source | None:
    """The first layout present in ``data_dir/miniimagenet`` or ``data_dir``; None when there is none."""
    roots = [data_dir / "miniimagenet", data_dir]
    for root in (r for r in roots if r.is_dir()):
        if (root / "images").is_dir():
            found = _find_splits_dir(root, data_dir, splits_dir)
            if found is None:
                raise DataError(f"found {root / 'images'} but no split CSVs (train.csv, val.csv, test.csv) "
                                f"in {root}, {root / 'splits'} or {data_dir / 'miniimagenet' / 'splits'}; "
                                f"put them there or pass splits_dir (Ravi & Larochelle's CSVs are in "
                                f"shared/data/miniimagenet/splits)")
            return _Source("csv", root, found)
        if all((root / split).is_dir() for split in SPLITS):
            return _Source("folders", root, _find_splits_dir(root, data_dir, splits_dir))
        present = [name for name in PICKLE_NAMES.values() if (root / name).is_file()]
        if present:
            missing = [name for name in PICKLE_NAMES.values() if name not in present]
            if missing:
                raise DataError(f"{root / missing[0]} is missing: the pickle layout needs all of "
                                f"{', '.join(PICKLE_NAMES.values())} (found {', '.join(present)})")
            return _Source("pickle", root, _find_splits_dir(root, data_dir, splits_dir))
    return None


def _find_splits_dir(root: Path, data_dir: Path, splits_dir: Path | None) -> Path | None:
    """``splits_dir`` (which must hold the CSVs), else the first usual place that holds all three."""
    names = [f"{split}.csv" for split in SPLITS]
    if splits_dir is not None:
        missing = [name for name in names if not (splits_dir / name).is_file()]
        if missing:
            raise DataError(f"splits_dir {splits_dir} lacks {', '.join(missing)}")
        return splits_dir
    for candidate in (root, root / "splits", data_dir / "miniimagenet" / "splits"):
        if all((candidate / name).is_file() for name in names):
            return candidate
    return None


def _not_found_message(data_dir: Path) -> str:
    home = data_dir / "miniimagenet"
    return (f"MiniImagenet not found in {data_dir}: no stable public download exists; obtain "
            f"the images yourself (ImageNet terms apply; see the docstring of metarun.data.miniimagenet) and "
            f"put them in one of: {home}/images/*.jpg + split CSVs (train.csv, val.csv, test.csv), "
            f"{home}/{{train,val,test}}/<wnid>/*.jpg, or "
            f"{home}/mini-imagenet-cache-{{train,validation,test}}.pkl (or the same directly in {data_dir}); "
            f"or {where_data_goes('them')}")


# --------------------------------------------------------------------------------------------------
# Layouts (a) and (b): image files


@dataclass
class _ImagePlan:
    """The image files that become each split's tensor, and the fingerprint of that selection."""

    classes: dict[str, list[str]]  # split -> sorted wnids
    files: dict[str, list[list[Path]]]  # split -> for each class, its images_per_class files in order
    fingerprint: str


def _plan_csv_layout(source: _Source, csv_classes: dict[str, dict[str, list[str]]],
                     images_per_class: int) -> _ImagePlan:
    """Layout (a): the first ``images_per_class`` CSV rows of each class, found in ``images/``."""
    digest = _new_digest(source.layout, images_per_class)
    classes: dict[str, list[str]] = {}
    files: dict[str, list[list[Path]]] = {}
    for split in SPLITS:
        csv_path = source.splits_dir / f"{split}.csv"
        classes[split] = sorted(csv_classes[split])
        files[split] = []
        for wnid in classes[split]:
            names = csv_classes[split][wnid]
            if len(names) < images_per_class:
                raise DataError(f"class {wnid} in {csv_path} has {len(names)} images, fewer than "
                                f"images_per_class={images_per_class}")
            paths = [source.root / "images" / name for name in names[:images_per_class]]
            for path in paths:
                try:
                    size = path.stat().st_size
                except FileNotFoundError:
                    raise DataError(f"MiniImagenet image {path} (listed in {csv_path}) is missing") from None
                except OSError as e:
                    raise DataError(f"cannot read MiniImagenet image {path} ({one_line(e)})") from e
                digest.update(f"{split}/{wnid}/{path.name} {size}\n".encode())
            files[split].append(paths)
    return _ImagePlan(classes, files, digest.hexdigest())


def _plan_folder_layout(source: _Source, csv_classes: dict[str, dict[str, list[str]]] | None,
                        images_per_class: int) -> _ImagePlan:
    """Layout (b): the first ``images_per_class`` image files (by name) of each ``<split>/<wnid>/``."""
    classes = {split: sorted(e.name for e in _entries(source.root / split) if e.is_dir()) for split in SPLITS}
    for split in SPLITS:
        split_dir = source.root / split
        if not classes[split]:
            raise DataError(f"{split_dir} has no class folders (expected {split_dir}/<wnid>/*.jpg)")
        if csv_classes is not None:
            _check_classes(classes[split], source.splits_dir / f"{split}.csv", csv_classes[split], split_dir)
    _check_disjoint(classes, str(source.root))

    digest = _new_digest(source.layout, images_per_class)
    files: dict[str, list[list[Path]]] = {}
    for split in SPLITS:
        files[split] = []
        for wnid in classes[split]:
            class_dir = source.root / split / wnid
            images = sorted((e for e in _entries(class_dir) if _is_image(e)), key=lambda e: e.name)
            if len(images) < images_per_class:
                raise DataError(f"class {wnid} in {class_dir} has {len(images)} images, fewer than "
                                f"images_per_class={images_per_class}")
            for entry in images[:images_per_class]:
                digest.update(f"{split}/{wnid}/{entry.name} {entry.stat().st_size}\n".encode())
            files[split].append([Path(e.path) for e in images[:images_per_class]])
    return _ImagePlan(classes, files, digest.hexdigest())


def _entries(folder: Path) -> list[os.DirEntry]:
    """The entries of ``folder``, without hidden ones (``.DS_Store``, macOS ``._*`` files)."""
    try:
        with os.scandir(folder) as it:
            return [e for e in it if not e.name.startswith(".")]
    except OSError as e:
        raise DataError(f"cannot list {folder} ({one_line(e)})") from e


def _is_image(entry: os.DirEntry) -> bool:
    return entry.is_file() and entry.name.lower().endswith(IMAGE_SUFFIXES)


def preprocess_image(image: RawImage) -> np.ndarray:
    """One image exactly as the cache holds it (layouts (a) and (b)): converted to RGB and resized to
    84x84 with PIL's LANCZOS filter. A model's input is this array channels first, divided by 255 in
    the run's dtype (:meth:`metarun.api.Trained.preprocess` does both).

    Args:
        image: a JPEG (or any format PIL reads) of any size and colour mode: its bytes, a file path, a
            binary file or a PIL image.

    Returns:
        uint8 array [84, 84, 3]. An image that is already 84x84 keeps its pixels.

    Raises:
        Exception: whatever PIL raises for a file it cannot decode.
    """
    with open_image(image) as opened:
        rgb = opened.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    return np.array(rgb, dtype=np.uint8)


def decode_image(path: Path) -> np.ndarray:
    """Decode one image file to MiniImagenet's format (:func:`preprocess_image`).

    Args:
        path: a JPEG (or any format PIL reads) of any size and colour mode.

    Returns:
        uint8 array [84, 84, 3]. An image that is already 84x84 keeps its pixels.

    Raises:
        DataError: the file cannot be decoded; the message names it.
    """
    try:
        return preprocess_image(Path(path))
    except Exception as e:  # corrupt files raise many types: OSError, SyntaxError, ValueError, ...
        raise DataError(f"cannot decode MiniImagenet image {path} ({one_line(e)})") from e


def _convert_images(plan: _ImagePlan, images_per_class: int, progress: bool) -> MiniImagenetData:
    """Decode every planned image into one preallocated uint8 tensor per split."""
    total = sum(len(paths) for split in SPLITS for paths in plan.files[split])
    splits: dict[str, MiniImagenetSplit] = {}
    with ThreadPoolExecutor(_DECODE_THREADS) as pool, \
            tqdm(total=total, desc="MiniImagenet -> uint8 cache", unit="img", disable=not progress) as bar:
        for split in SPLITS:
            class_files = plan.files[split]
            images = torch.empty((len(class_files), images_per_class, 3, IMAGE_SIZE, IMAGE_SIZE),
                                 dtype=torch.uint8)
            for c, paths in enumerate(class_files):
                for i, pixels in enumerate(pool.map(decode_image, paths)):
                    images[c, i] = torch.from_numpy(pixels).permute(2, 0, 1)
                bar.update(len(paths))
            splits[split] = MiniImagenetSplit(images, plan.classes[split])
    return MiniImagenetData(**splits)


# --------------------------------------------------------------------------------------------------
# Layout (c): pickles


def _read_pickle(path: Path) -> tuple[np.ndarray, dict[str, list[int]]]:
    """``image_data`` and ``class_dict`` of one pickle file, checked."""
    try:
        with open(path, "rb") as f:
            content = pickle.load(f)
    except Exception as e:  # a damaged pickle raises many types: UnpicklingError, EOFError, ValueError, ...
        raise DataError(f"cannot unpickle {path} ({one_line(e)})") from e
    if not isinstance(content, dict) or not {"image_data", "class_dict"} <= content.keys():
        keys = sorted(map(str, content)) if isinstance(content, dict) else None
        raise DataError(f"{path}: expected a pickled dict with keys 'image_data' and 'class_dict', got "
                        + (f"keys {keys}" if keys is not None else type(content).__name__))
    image_data, class_dict = content["image_data"], content["class_dict"]
    shape = (IMAGE_SIZE, IMAGE_SIZE, 3)
    if not isinstance(image_data, np.ndarray) or image_data.dtype != np.uint8 or image_data.ndim != 4 \
            or image_data.shape[1:] != shape:
        got = (f"{image_data.dtype} array of shape {image_data.shape}" if isinstance(image_data, np.ndarray)
               else type(image_data).__name__)
        raise DataError(f"{path}: image_data must be a uint8 array of shape N x 84 x 84 x 3, got {got}")
    if not isinstance(class_dict, dict) or not class_dict or not all(isinstance(k, str) for k in class_dict):
        raise DataError(f"{path}: class_dict must be a non-empty dict from wnid (str) to row indices")
    return image_data, class_dict


def _class_rows(path: Path, wnid: str, rows, length: int, images_per_class: int) -> np.ndarray:
    """The first ``images_per_class`` row indices of one class of a pickle, checked."""
    try:
        indices = np.asarray(rows)
    except Exception as e:
        raise DataError(f"{path}: class_dict[{wnid!r}] is not a list of row indices ({one_line(e)})") from e
    if indices.ndim != 1 or (len(indices) and not np.issubdtype(indices.dtype, np.integer)):
        raise DataError(f"{path}: class_dict[{wnid!r}] is not a list of row indices")
    if len(indices) < images_per_class:
        raise DataError(f"class {wnid} in {path} has {len(indices)} images, fewer than "
                        f"images_per_class={images_per_class}")
    indices = indices[:images_per_class].astype(np.int64)
    if indices.min() < 0 or indices.max() >= length:
        raise DataError(f"{path}: class_dict[{wnid!r}] has row indices outside image_data (N={length})")
    return indices


def _convert_pickles(source: _Source, csv_classes: dict[str, dict[str, list[str]]] | None,
                     images_per_class: int, progress: bool) -> MiniImagenetData:
    """Copy each class's rows into one preallocated tensor per split, one pickle in memory at a time."""
    splits: dict[str, MiniImagenetSplit] = {}
    bar = tqdm(total=len(SPLITS), desc="MiniImagenet -> uint8 cache", unit="split", disable=not progress)
    with bar:
        for split in SPLITS:
            path = source.root / PICKLE_NAMES[split]
            image_data, class_dict = _read_pickle(path)
            wnids = sorted(class_dict)
            if csv_classes is not None:
                _check_classes(wnids, source.splits_dir / f"{split}.csv", csv_classes[split], path)
            _check_disjoint({**{s: splits[s].classes for s in splits}, split: wnids}, str(source.root))
            images = torch.empty((len(wnids), images_per_class, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8)
            for c, wnid in enumerate(wnids):
                rows = _class_rows(path, wnid, class_dict[wnid], len(image_data), images_per_class)
                images[c] = torch.from_numpy(image_data[rows]).permute(0, 3, 1, 2)
            splits[split] = MiniImagenetSplit(images, wnids)
            del image_data, class_dict  # free this split's pickle before reading the next
            bar.update(1)
    return MiniImagenetData(**splits)


def _pickle_fingerprint(source: _Source, images_per_class: int) -> str:
    digest = _new_digest(source.layout, images_per_class)
    for split in SPLITS:
        path = source.root / PICKLE_NAMES[split]
        digest.update(f"{path.name} {path.stat().st_size}\n".encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# The cache and the entry point


def _new_digest(layout: str, images_per_class: int):
    return hashlib.sha256(f"miniimagenet v{CACHE_VERSION} {layout} {images_per_class}\n".encode())


def _read_cache(path: Path, images_per_class: int, fingerprint: str | None) -> MiniImagenetData | None:
    """The cached data if it is complete and matches (any fingerprint when ``fingerprint`` is None)."""
    cached = load_cache(path)
    if not isinstance(cached, dict) or cached.get("version") != CACHE_VERSION \
            or cached.get("images_per_class") != images_per_class:
        return None
    if fingerprint is not None and cached.get("fingerprint") != fingerprint:
        return None
    try:
        splits = {split: MiniImagenetSplit(cached["splits"][split]["images"],
                                           list(cached["splits"][split]["classes"])) for split in SPLITS}
    except (KeyError, TypeError):
        return None
    for split in splits.values():
        expected = (len(split.classes), images_per_class, 3, IMAGE_SIZE, IMAGE_SIZE)
        if not isinstance(split.images, torch.Tensor) or split.images.dtype != torch.uint8 \
                or tuple(split.images.shape) != expected:
            return None
    return MiniImagenetData(**splits)


def _write_cache(data: MiniImagenetData, path: Path, source: _Source, images_per_class: int,
                 fingerprint: str) -> None:
    payload = {
        "version": CACHE_VERSION,
        "fingerprint": fingerprint,
        "layout": source.layout,
        "source": str(source.root),
        "images_per_class": images_per_class,
        "splits": {split: {"images": data[split].images, "classes": data[split].classes} for split in SPLITS},
    }
    save_cache(payload, path, "MiniImagenet")
    log.info("MiniImagenet: built the 84x84 cache %s from %s (%s layout)", path, source.root, source.layout)


def load_miniimagenet(data_dir: Path | None = None, cache_dir: Path | None = None,
                      splits_dir: Path | None = None, progress: bool = True,
                      images_per_class: int = PAPER_IMAGES_PER_CLASS) -> MiniImagenetData:
    """Load MiniImagenet's three splits as uint8 tensors, converting the source once into a cache.

    See the module docstring for the accepted layouts, how they are found, and how to get the data.

    Args:
        data_dir: where to look for the data (in ``data_dir/miniimagenet/``, then ``data_dir``); only
            read. Defaults to :func:`~metarun.data.cache.default_data_dir`.
        cache_dir: where the converted cache is written and read. Defaults to
            :func:`~metarun.data.cache.default_cache_dir`.
        splits_dir: the folder of ``train.csv``, ``val.csv`` and ``test.csv``, if they are not in one of the
            usual places. It is required for layout (a) and optional for (b) and (c), which are checked
            against the CSVs when they are found.
        progress: show a tqdm progress bar while converting.
        images_per_class: images kept per class (the first ones, see the module docstring). 600 is the
            full set; tests use a handful.

    Returns:
        The train, val and test splits; each has a uint8 tensor
        [classes, images_per_class, 3, 84, 84] and its sorted class wnids.

    Raises:
        DataError: the data is missing (the message says how to get it), or a file is corrupt or
            inconsistent (the message names it). Nothing is written to the cache folder then.
    """
    data_dir = Path(data_dir if data_dir is not None else default_data_dir()).expanduser().absolute()
    cache_dir = Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser().absolute()
    splits_dir = Path(splits_dir).expanduser().absolute() if splits_dir is not None else None
    if images_per_class < 1:
        raise DataError(f"images_per_class must be at least 1, got {images_per_class}")
    cache_path = cache_dir / CACHE_NAME

    source = _find_source(data_dir, splits_dir)
    if source is None:
        cached = _read_cache(cache_path, images_per_class, fingerprint=None)
        if cached is None:
            raise DataError(_not_found_message(data_dir))
        log.info("MiniImagenet: read the 84x84 cache %s (the images are not in %s)", cache_path, data_dir)
        return cached

    csv_classes = read_split_csvs(source.splits_dir) if source.splits_dir is not None else None
    if source.layout == "pickle":
        fingerprint = _pickle_fingerprint(source, images_per_class)
    else:
        planner = _plan_csv_layout if source.layout == "csv" else _plan_folder_layout
        plan = planner(source, csv_classes, images_per_class)
        fingerprint = plan.fingerprint

    cached = _read_cache(cache_path, images_per_class, fingerprint)
    if cached is not None:
        log.info("MiniImagenet: read the 84x84 cache %s (source: %s)", cache_path, source.root)
        return cached
    if source.layout == "pickle":
        data = _convert_pickles(source, csv_classes, images_per_class, progress)
    else:
        data = _convert_images(plan, images_per_class, progress)
    _write_cache(data, cache_path, source, images_per_class, fingerprint)
    return data


def _few(names: list[str], shown: int = 3) -> str:
    more = f" (+{len(names) - shown} more)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
