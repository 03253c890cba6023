"""Any few-shot dataset stored as a folder per class: read once, cached as uint8 tensors.

:func:`load_image_folder` reads one of two layouts (image files ``*.png``, ``*.jpg``, ``*.jpeg``, any
case; hidden files and other files are skipped):

(a) A folder per split, then a folder per class::

        root/train/<class>/*.jpg
        root/val/<class>/*.jpg      (the folder may also be called validation/)
        root/test/<class>/*.jpg

(b) One folder of classes, ``root/<class>/*.jpg``, and a split file (``task.split_file``) that assigns
    each class to a split. A relative split-file path is looked for in the current folder, then in
    ``root``. Two formats, told apart by the file's suffix:

    * ``.json``: ``{"train": ["class", ...], "val": [...], "test": [...]}`` (``validation`` is accepted
      for ``val``);
    * anything else is CSV: a row ``class,split`` per class, split one of ``train``, ``val``
      (``validation``), ``test``; an optional first row ``class,split`` is a header.

    Class folders that the split file does not list are left out (the log says how many).

Each image is decoded with PIL, converted to ``channels`` (1: PIL mode ``"L"``, grayscale; 3: ``"RGB"``)
and then, when its size is not ``image_size`` x ``image_size``, resized to that size with PIL's LANCZOS
filter. The resize stretches: the aspect ratio is not kept and nothing is cropped. Mixed-size sources
(CUB's photos) are normal. With ``resize=False`` an image of another size is refused instead (a
:class:`DataError` naming the file), for data that is already prepared at its final size.

A split is stored as one uint8 tensor ``[classes, n, C, H, W]``, so every class of a split keeps the same
number ``n`` of images: by default the image count of the split's smallest class (the larger classes
keep their first ``n`` files in name order; the log says how many images that leaves out), or
``images_per_class`` when it is given (each class its first ``images_per_class`` files; a class with
fewer is an error naming it).

Classes are sorted by folder name; the same class name may not be in two splits.

The root folder is only read. The cache is written to ``cache_dir`` as
``image_folder_<root name>_<key>.pt``, the key a hash of the root's absolute path and the settings
(``image_size``, ``channels``, ``resize``, ``images_per_class``, the split file), so each setting keeps
its own cache. The file records a fingerprint of the content: the relative path, size and modification
time (ns) of every image file used, its split and class, and the settings. A later load with the same
fingerprint reads the cache without decoding anything; any added, removed, renamed or modified image
file (or a changed split file) rebuilds it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from metarun.data.cache import DataError, default_cache_dir, load_cache, one_line, save_cache
from metarun.data.images import RawImage, open_image

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "val": "val", "validation": "val", "test": "test"}
"""Split names accepted in a folder name or a split file, and the split each one means."""

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # compared in lower case
MODES = {1: "L", 3: "RGB"}  # channels -> the PIL mode images are converted to
RESAMPLE = Image.Resampling.LANCZOS

CACHE_VERSION = 1  # bump when the conversion changes, so old caches are rebuilt

LAYOUTS = ("expected root/train/<class>/*.jpg, root/val/<class>/*.jpg and root/test/<class>/*.jpg, "
           "or root/<class>/*.jpg with task.split_file=FILE (CSV rows class,split or JSON "
           '{"train": [...], "val": [...], "test": [...]})')
"""The end of a message about a missing or empty folder: what metarun looks for."""

_DECODE_THREADS = min(8, os.cpu_count() or 1)  # PIL releases the GIL while decoding and resizing


@dataclass
class ImageFolderSplit:
    """The images of one split.

    Attributes:
        images: uint8 tensor ``[classes, n, C, H, W]``, channels first.
        classes: the class (folder) name of each row of ``images``, sorted.
        available: how many image files each class has (``n`` of them are in ``images``).
    """

    images: torch.Tensor
    classes: list[str]
    available: list[int]


@dataclass
class ImageFolderData:
    """The three splits; ``data["val"]`` is the same as ``data.val``.

    Attributes:
        cache_path: the cache file the data was read from or written to.
    """

    train: ImageFolderSplit
    val: ImageFolderSplit
    test: ImageFolderSplit
    cache_path: Path

    def __getitem__(self, split: str) -> ImageFolderSplit:
        if split not in SPLITS:
            raise KeyError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        return getattr(self, split)


@dataclass
class _Plan:
    """What to decode: per split, the sorted classes and each class's image files (sorted)."""

    layout: str  # "split folders", or "split file <absolute path>"
    classes: dict[str, list[str]]
    files: dict[str, list[list[Path]]]  # every image file of every class, not only the n kept
    kept: dict[str, int]  # n: images per class kept in each split


# --------------------------------------------------------------------------------------------------
# Finding the classes and their files


def _entries(folder: Path) -> list[os.DirEntry]:
    """The entries of ``folder`` in name order, without hidden ones (``.DS_Store``, ``._*``)."""
    try:
        with os.scandir(folder) as it:
            return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as e:
        raise DataError(f"cannot list {folder} ({one_line(e)})") from e


def _class_dirs(folder: Path) -> dict[str, Path]:
    return {e.name: Path(e.path) for e in _entries(folder) if e.is_dir()}


def _image_files(class_dir: Path, split: str) -> list[Path]:
    files = [Path(e.path) for e in _entries(class_dir) if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES)]
    if not files:
        raise DataError(f"class {class_dir.name} of the {split} split ({class_dir}) has no image files "
                        f"({', '.join(IMAGE_SUFFIXES)})")
    return files


def _split_folders(root: Path) -> dict[str, Path]:
    """Layout (a): the folder of each split; a DataError when one is missing or doubled."""
    found: dict[str, list[Path]] = {split: [] for split in SPLITS}
    for name, split in SPLIT_ALIASES.items():
        if (root / name).is_dir():
            found[split].append(root / name)
    if not any(found.values()):
        raise DataError(f"{root} has no train/, val/ or test/ folder and no task.split_file was given; {LAYOUTS}")
    for split, folders in found.items():
        if not folders:
            raise DataError(f"{root} has no {split}/ folder; {LAYOUTS}")
        if len(folders) > 1:
            raise DataError(f"{root} has both {folders[0].name}/ and {folders[1].name}/: keep one of them as the "
                            f"{split} split")
    return {split: folders[0] for split, folders in found.items()}


def _find_split_file(split_file: Path, root: Path) -> Path:
    """A relative split file is looked for in the current folder, then in ``root``."""
    candidates = [split_file] if split_file.is_absolute() else [split_file.absolute(), root / split_file]
    for path in candidates:
        if path.is_file():
            return path
    raise DataError(f"task.split_file={split_file} not found (looked in {' and in '.join(map(str, candidates))})")


def read_split_file(path: Path) -> dict[str, list[str]]:
    """The classes of each split, from a JSON or CSV split file (see the module docstring).

    Raises:
        DataError: the file cannot be read, is malformed, names an unknown split, or lists a class twice.
    """
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read the split file {path} ({one_line(e)})") from e
    pairs: list[tuple[str, str]] = []  # (class, split as written)
    if Path(path).suffix.lower() == ".json":
        try:
            content = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"split file {path} is not valid JSON ({one_line(e)})") from e
        if not isinstance(content, dict) or not all(isinstance(v, list) and all(isinstance(c, str) for c in v)
                                                    for v in content.values()):
            raise DataError(f'split file {path}: expected a JSON object {{"train": ["class", ...], "val": [...], '
                            f'"test": [...]}}')
        pairs = [(name, split) for split, names in content.items() for name in names]
    else:
        rows = [(line, row) for line, row in enumerate(csv.reader(text.splitlines()), start=1)
                if any(cell.strip() for cell in row)]
        if rows and [cell.strip().lower() for cell in rows[0][1]] == ["class", "split"]:
            rows = rows[1:]
        for line, row in rows:
            if len(row) != 2 or not row[0].strip():
                raise DataError(f"split file {path}, line {line}: {','.join(row)!r} is not 'class,split' (expected "
                                f"a row class,split per class, or a .json file)")
            pairs.append((row[0].strip(), row[1].strip()))
    classes: dict[str, list[str]] = {split: [] for split in SPLITS}
    seen: dict[str, str] = {}
    for name, written in pairs:
        split = SPLIT_ALIASES.get(written.lower())
        if split is None:
            raise DataError(f"split file {path}: class {name} has the split {written!r}; expected train, val "
                            f"(or validation) or test")
        if name in seen:
            raise DataError(f"split file {path} lists class {name} twice ({seen[name]} and {split})")
        seen[name] = split
        classes[split].append(name)
    return {split: sorted(names) for split, names in classes.items()}


def _plan(root: Path, split_file: Path | None, images_per_class: int | None) -> _Plan:
    """Find every split's classes and image files, and how many images per class are kept."""
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "not found"
        raise DataError(f"task.root={root} {what}; {LAYOUTS}")
    class_dirs: dict[str, dict[str, Path]] = {}
    if split_file is None:
        layout = "split folders"
        for split, folder in _split_folders(root).items():
            class_dirs[split] = _class_dirs(folder)
            if not class_dirs[split]:
                raise DataError(f"the {split} split {folder} has no class folders; {LAYOUTS}")
    else:
        path = _find_split_file(split_file, root)
        layout = f"split file {path}"
        folders = _class_dirs(root)
        assigned = read_split_file(path)
        for split in SPLITS:
            if not assigned[split]:
                raise DataError(f"split file {path} gives the {split} split no classes; {LAYOUTS}")
            missing = [name for name in assigned[split] if name not in folders]
            if missing:
                more = f" (nor have {len(missing) - 1} more of its classes)" if len(missing) > 1 else ""
                raise DataError(f"class {missing[0]} of the {split} split (listed in {path}) has no folder "
                                f"{root / missing[0]}{more}")
            class_dirs[split] = {name: folders[name] for name in assigned[split]}
        unused = len(folders) - sum(len(names) for names in assigned.values())
        if unused:
            log.info("image_folder: %d class folders of %s are not in %s and are left out", unused, root, path.name)

    for split in SPLITS:  # the same class in two splits would leak test classes into training
        for other in SPLITS[SPLITS.index(split) + 1:]:
            both = sorted(set(class_dirs[split]) & set(class_dirs[other]))
            if both:
                raise DataError(f"class {both[0]} is in both the {split} and the {other} split of {root}")

    classes = {split: sorted(class_dirs[split]) for split in SPLITS}
    files = {split: [_image_files(class_dirs[split][name], split) for name in classes[split]] for split in SPLITS}
    kept = {}
    for split in SPLITS:
        counts = [len(f) for f in files[split]]
        if images_per_class is None:
            kept[split] = min(counts)
        else:
            short = [(name, n) for name, n in zip(classes[split], counts) if n < images_per_class]
            if short:
                name, n = short[0]
                raise DataError(f"class {name} of the {split} split has {n} images, fewer than "
                                f"task.images_per_class={images_per_class} ({class_dirs[split][name]})")
            kept[split] = images_per_class
    return _Plan(layout, classes, files, kept)


def _settings(image_size: int, channels: int, resize: bool, images_per_class: int | None) -> str:
    return (f"image_folder v{CACHE_VERSION} size={image_size} channels={channels} resize={resize} "
            f"per_class={images_per_class}")


def _fingerprint(plan: _Plan, root: Path, settings: str) -> str:
    """A hash of the settings and of every image file: split, class, relative path, size, mtime (ns)."""
    digest = hashlib.sha256(f"{settings}\n".encode())
    for split in SPLITS:
        for name, paths in zip(plan.classes[split], plan.files[split]):
            for path in paths:
                try:
                    st = path.stat()
                except OSError as e:
                    raise DataError(f"cannot read {path} ({one_line(e)})") from e
                digest.update(f"{split}\t{name}\t{path.relative_to(root).as_posix()}\t{st.st_size}\t"
                              f"{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Decoding


def decode_image(raw: RawImage, image_size: int, channels: int = 3, resize: bool = True) -> np.ndarray:
    """Decode one image (a file, or any :data:`~metarun.data.images.RawImage`): converted to
    ``channels`` (1: PIL mode "L", 3: "RGB"), then resized to ``image_size`` x ``image_size`` with
    PIL's LANCZOS filter (stretched, not cropped) unless it is that size already.

    Returns:
        uint8 array ``[channels, image_size, image_size]``, channels first as the cache holds it.

    Raises:
        DataError: the file cannot be decoded, or (``resize=False``) is not ``image_size`` x
            ``image_size``; the message names the file.
    """
    path = raw if isinstance(raw, (str, os.PathLike)) else f"#{type(raw).__name__}"  # its name in messages
    try:
        with open_image(raw) as image:
            if not resize and image.size != (image_size, image_size):
                width, height = image.size
                raise DataError(f"image {path} is {width}x{height}, not {image_size}x{image_size} (task.resize=false "
                                f"refuses other sizes; task.resize=true resizes every image)")
            image = image.convert(MODES[channels])
            if image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), RESAMPLE)
            pixels = np.array(image, dtype=np.uint8)
            return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    except DataError:
        raise
    except Exception as e:  # corrupt files raise many types: OSError, SyntaxError, ValueError, ...
        raise DataError(f"cannot decode image {path} ({one_line(e)})") from e


def _convert(plan: _Plan, image_size: int, channels: int, resize: bool, progress: bool) -> dict[str, ImageFolderSplit]:
    """Decode the kept images of every class into one preallocated uint8 tensor per split."""
    total = sum(plan.kept[split] * len(plan.classes[split]) for split in SPLITS)
    splits = {}

    def decode(path: Path) -> np.ndarray:
        return decode_image(path, image_size, channels, resize)

    with ThreadPoolExecutor(_DECODE_THREADS) as pool, \
            tqdm(total=total, desc="image folder -> uint8 cache", unit="img", disable=not progress) as bar:
        for split in SPLITS:
            n = plan.kept[split]
            images = torch.empty((len(plan.classes[split]), n, channels, image_size, image_size), dtype=torch.uint8)
            for c, paths in enumerate(plan.files[split]):
                for i, pixels in enumerate(pool.map(decode, paths[:n])):
                    images[c, i] = torch.from_numpy(pixels)
                bar.update(n)
            splits[split] = ImageFolderSplit(images, plan.classes[split], [len(p) for p in plan.files[split]])
    return splits


# --------------------------------------------------------------------------------------------------
# The cache and the entry point


def _read_cache(path: Path, fingerprint: str, plan: _Plan, image_size: int,
                channels: int) -> dict[str, ImageFolderSplit] | None:
    """The cached splits if the cache is complete and has this fingerprint."""
    cached = load_cache(path)
    if not isinstance(cached, dict) or cached.get("version") != CACHE_VERSION \
            or cached.get("fingerprint") != fingerprint:
        return None
    try:
        splits = {split: ImageFolderSplit(cached["splits"][split]["images"], plan.classes[split],
                                          [len(p) for p in plan.files[split]]) for split in SPLITS}
    except (KeyError, TypeError):
        return None
    for split, part in splits.items():
        expected = (len(part.classes), plan.kept[split], channels, image_size, image_size)
        if not isinstance(part.images, torch.Tensor) or part.images.dtype != torch.uint8 \
                or tuple(part.images.shape) != expected:
            return None
    return splits


def cache_path_for(root: Path, cache_dir: Path, settings: str, layout: str) -> Path:
    """The cache file of this root folder with these settings and layout (see the module docstring)."""
    key = hashlib.sha256(f"{root}\n{settings}\n{layout}\n".encode()).hexdigest()[:12]
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in root.name) or "root"
    return cache_dir / f"image_folder_{safe}_{key}.pt"


def load_image_folder(root: Path | str, image_size: int, cache_dir: Path | str | None = None,
                      split_file: Path | str | None = None, channels: int = 3, resize: bool = True,
                      images_per_class: int | None = None, progress: bool = True) -> ImageFolderData:
    """Load a class-folder dataset's three splits as uint8 tensors, decoding the images once into a cache.

    See the module docstring for the layouts, the conversion and the cache.

    Args:
        root: the dataset folder; only read.
        image_size: the height and width every image is stored at.
        cache_dir: where the cache is written and read (never ``root``). Defaults to
            :func:`~metarun.data.cache.default_cache_dir`.
        split_file: a CSV or JSON file assigning the classes of ``root/<class>/`` to splits (layout b);
            None for layout (a), a folder per split.
        channels: 1 (grayscale, PIL "L") or 3 (RGB).
        resize: resize images of another size (LANCZOS); False refuses them.
        images_per_class: images kept per class; None keeps as many as the split's smallest class has.
        progress: show a tqdm progress bar while decoding.

    Returns:
        The train, val and test splits, each a uint8 tensor ``[classes, n, channels, image_size,
        image_size]`` with its sorted class names and each class's image count.

    Raises:
        DataError: the folder or a split is missing or empty, a class has no or too few images, a file
            cannot be decoded or (``resize=False``) has another size; the message names the file, class or
            setting. Nothing is written to the cache folder then.
    """
    root = Path(root).expanduser().absolute()
    cache_dir = Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser().absolute()
    split_file = Path(split_file).expanduser() if split_file not in (None, "") else None
    if channels not in MODES:
        raise DataError(f"task.channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    if image_size < 1:
        raise DataError(f"task.image_size must be at least 1, got {image_size}")
    if images_per_class is not None and images_per_class < 1:
        raise DataError(f"task.images_per_class must be at least 1 or null, got {images_per_class}")

    plan = _plan(root, split_file, images_per_class)
    settings = _settings(image_size, channels, resize, images_per_class)
    cache_path = cache_path_for(root, cache_dir, settings, plan.layout)
    fingerprint = _fingerprint(plan, root, settings)
    splits = _read_cache(cache_path, fingerprint, plan, image_size, channels)
    if splits is not None:
        log.info("image_folder: read the cache %s (source: %s)", cache_path, root)
    else:
        splits = _convert(plan, image_size, channels, resize, progress)
        payload = {"version": CACHE_VERSION, "fingerprint": fingerprint, "source": str(root), "layout": plan.layout,
                   "settings": settings,
                   "splits": {s: {"images": splits[s].images, "classes": splits[s].classes} for s in SPLITS}}
        save_cache(payload, cache_path, "image folder")
        log.info("image_folder: built the cache %s from %s (%s)", cache_path, root, plan.layout)
    for split in SPLITS:
        part = splits[split]
        total = sum(part.available)
        left = total - part.images.shape[0] * part.images.shape[1]
        kind = "grayscale" if channels == 1 else f"{channels} channels"
        log.info("image_folder %s: %d classes x %d images (%dx%d, %s)%s", split, len(part.classes), plan.kept[split],
                 image_size, image_size, kind,
                 f"; {left:,} of its {total:,} image files left out to give every class the same count" if left
                 else f"; all its {total:,} image files")
    return ImageFolderData(**splits, cache_path=cache_path)
