"""Omniglot: find (or download) the official zips, check them, and cache all 1,623 characters at 28x28.

The official data is two zips from ``github.com/brendenlake/omniglot/python``:
``images_background.zip`` (30 alphabets, 964 characters) and ``images_evaluation.zip`` (20 alphabets,
659 characters), laid out as ``images_<set>/<Alphabet>/characterNN/NNNN_DD.png`` with 20 drawings of
each character, every one a 105x105 black-on-white PNG.

:func:`load_omniglot` reads them once, straight from the zips (or from the extracted folders), checks
their structure, and turns every drawing into a 28x28 uint8 image with bright strokes on a black
background (PIL LANCZOS on the grayscale image, then inverted). The result is saved as a single tensor
in the cache folder, so later runs load it in about a second. :func:`preprocess_image` is that
per-drawing transform, public so that a trained model sees a user's own drawings exactly as it saw
the training set (:func:`metarun.load`). The data folder is never written to: a
download (when the zips are not found) also goes to the cache folder.

:func:`omniglot_splits` gives the train/val/test characters of the MAML paper or of Vinyals et al.
(2016), and :func:`rotate_classes` makes the rotated copies (0/90/180/270 degrees) that both protocols
add as extra classes.

Example:
    >>> data = load_omniglot(Path("shared/data"), Path("~/.cache/metarun").expanduser())
    >>> data.images.shape
    torch.Size([1623, 20, 28, 28])
    >>> splits = omniglot_splits(data, "vinyals")
    >>> train_classes = rotate_classes(data.images[splits["train"]])  # [4 * 1028, 20, 28, 28]
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
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
from metarun.utils.checkpoint import atomic_file

log = logging.getLogger(__name__)

SETS = ("background", "evaluation")
"""The two official halves, in the order their characters appear in :class:`OmniglotData`."""

EXPECTED_ALPHABETS: dict[str, dict[str, int]] = {
    "background": {
        "Alphabet_of_the_Magi": 20, "Anglo-Saxon_Futhorc": 29, "Arcadian": 26, "Armenian": 41,
        "Asomtavruli_(Georgian)": 40, "Balinese": 24, "Bengali": 46,
        "Blackfoot_(Canadian_Aboriginal_Syllabics)": 14, "Braille": 26, "Burmese_(Myanmar)": 34,
        "Cyrillic": 33, "Early_Aramaic": 22, "Futurama": 26, "Grantha": 43, "Greek": 24, "Gujarati": 48,
        "Hebrew": 22, "Inuktitut_(Canadian_Aboriginal_Syllabics)": 16, "Japanese_(hiragana)": 52,
        "Japanese_(katakana)": 47, "Korean": 40, "Latin": 26, "Malay_(Jawi_-_Arabic)": 40,
        "Mkhedruli_(Georgian)": 41, "N_Ko": 33, "Ojibwe_(Canadian_Aboriginal_Syllabics)": 14,
        "Sanskrit": 42, "Syriac_(Estrangelo)": 23, "Tagalog": 17, "Tifinagh": 55,
    },
    "evaluation": {
        "Angelic": 20, "Atemayar_Qelisayer": 26, "Atlantean": 26, "Aurek-Besh": 26, "Avesta": 26,
        "Ge_ez": 26, "Glagolitic": 45, "Gurmukhi": 45, "Kannada": 41, "Keble": 26, "Malayalam": 47,
        "Manipuri": 40, "Mongolian": 30, "Old_Church_Slavonic_(Cyrillic)": 45, "Oriya": 46, "Sylheti": 28,
        "Syriac_(Serto)": 23, "Tengwar": 25, "Tibetan": 42, "ULOG": 26,
    },
}
"""Characters per alphabet in each official set (30 + 20 alphabets, 964 + 659 = 1,623 characters)."""

DRAWINGS = 20  # drawings of each character, by 20 different people
SOURCE_SIZE = 105  # every official PNG is 105x105
IMAGE_SIZE = 28  # the size the MAML paper (and Vinyals et al.) train on

URL_BASE = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
MD5 = {
    "images_background.zip": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation.zip": "6b91aef0f799c5bb55b94e3f2daec811",
}
"""md5 of the official zips; checked on download only (user-provided files are checked by structure)."""

CACHE_VERSION = 1  # bump when the preprocessing changes, so old caches are rebuilt
CACHE_NAME = f"omniglot_{IMAGE_SIZE}x{IMAGE_SIZE}_uint8_v{CACHE_VERSION}.pt"

# The Vinyals et al. (2016) split, as used by prototypical networks (Snell et al. 2017). Derived from
# jakesnell/prototypical-networks data/omniglot/splits/vinyals/val.txt and the identical lists in
# tristandeleu/pytorch-meta torchmeta/datasets/assets/omniglot/{train,val,test}.json: validation is five
# whole background alphabets, test is twelve whole evaluation alphabets plus the last four Gurmukhi
# characters, and train is everything else (including Gurmukhi character01-41).
VINYALS_VAL_ALPHABETS = ("Armenian", "Bengali", "Early_Aramaic", "Hebrew", "Mkhedruli_(Georgian)")
VINYALS_TEST_ALPHABETS = (
    "Kannada", "Keble", "Malayalam", "Manipuri", "Mongolian", "Old_Church_Slavonic_(Cyrillic)", "Oriya",
    "Sylheti", "Syriac_(Serto)", "Tengwar", "Tibetan", "ULOG",
)
VINYALS_TEST_CHARACTERS = tuple(("Gurmukhi", f"character{i}") for i in (42, 43, 44, 45))

PAPER_SPLIT_SIZES = (1100, 100, 423)  # cbfinn/maml: num_train = 1200 - 100 val; the rest is test


@dataclass
class OmniglotData:
    """All Omniglot characters as 28x28 images.

    Attributes:
        images: uint8 tensor [characters, 20, 28, 28]; strokes 255, background 0.
        characters: ``(set, alphabet, character folder)`` for each row of ``images``: the background set
            first, then the evaluation set; within each, alphabets and then character folders sorted
            by name (plain string order).
    """

    images: torch.Tensor
    characters: list[tuple[str, str, str]]

    def __len__(self) -> int:
        return len(self.characters)

    @property
    def alphabets(self) -> list[str]:
        """Alphabet names in the order their characters appear."""
        return list(dict.fromkeys(alphabet for _, alphabet, _ in self.characters))

    def character_indices(self, alphabet: str) -> torch.Tensor:
        """Indices (into ``images``) of the characters of one alphabet."""
        return torch.tensor([i for i, (_, a, _) in enumerate(self.characters) if a == alphabet],
                            dtype=torch.long)


# --------------------------------------------------------------------------------------------------
# Sources: a zip read in place, or its extracted folder


class _Source:
    """One official set on disk: ``images_<set>.zip`` or the extracted ``images_<set>/`` folder."""

    def __init__(self, set_name: str, path: Path):
        self.set_name = set_name
        self.path = path
        self.top = f"images_{set_name}"
        self._zip: zipfile.ZipFile | None = None

    def __enter__(self) -> _Source:
        if self.path.is_file():
            try:
                self._zip = zipfile.ZipFile(self.path)
            except (zipfile.BadZipFile, OSError) as e:
                raise DataError(f"{self.path}: not a readable zip file ({one_line(e)})") from e
        return self

    def __exit__(self, *exc) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    def _members(self) -> Iterator[tuple[str, str]]:
        """``(path relative to images_<set>/, fingerprint item)`` for every PNG, skipping hidden files."""
        if self._zip is not None:
            for info in self._zip.infolist():
                parts = info.filename.split("/")
                if info.is_dir() or parts[0] != self.top or _hidden(parts) or not parts[-1].endswith(".png"):
                    continue
                yield "/".join(parts[1:]), f"{info.filename}:{info.CRC}:{info.file_size}"
        else:
            for file in self.path.rglob("*.png"):
                relative = file.relative_to(self.path)
                if not _hidden(relative.parts):
                    yield relative.as_posix(), f"{relative.as_posix()}:{file.stat().st_size}"

    def scan(self) -> tuple[dict[str, dict[str, list[str]]], str]:
        """The tree ``{alphabet: {character: [drawing file, ...]}}`` and a fingerprint of the contents.

        The fingerprint hashes every PNG's name and size (and, in a zip, its CRC), so another copy of the
        same files reuses the cache, while a changed, added or removed file rebuilds it.
        """
        tree: dict[str, dict[str, list[str]]] = {}
        digest = hashlib.sha256(f"{self.set_name}\n".encode())
        for relative, item in sorted(self._members()):
            parts = relative.split("/")
            if len(parts) != 3:
                raise DataError(f"{self.path}: unexpected file {self.top}/{relative} "
                                f"(expected {self.top}/<Alphabet>/<character>/<drawing>.png)")
            alphabet, character, drawing = parts
            tree.setdefault(alphabet, {}).setdefault(character, []).append(drawing)
            digest.update(f"{item}\n".encode())
        if not tree:
            where = f"no {self.top}/ folder inside" if self._zip is not None else "no PNG files inside"
            raise DataError(f"{self.path}: {where} (expected {self.top}/<Alphabet>/<character>/<drawing>.png)")
        return tree, digest.hexdigest()

    def read(self, relative: str) -> bytes:
        """The bytes of one PNG, given its path relative to ``images_<set>/``."""
        try:
            if self._zip is not None:
                return self._zip.read(f"{self.top}/{relative}")
            return (self.path / relative).read_bytes()
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as e:  # zlib: a member's bytes are damaged
            member = f"member {self.top}/{relative}" if self._zip is not None else relative
            raise DataError(f"{self.path}: {member} cannot be read ({one_line(e)})") from e


def _hidden(parts) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _find_source(set_name: str, data_dir: Path, cache_dir: Path) -> Path | None:
    """The first of: ``<data_dir>[/omniglot]/images_<set>.zip`` or ``.../images_<set>/``, then a download
    in ``<cache_dir>``. A zip wins over its extracted folder beside it."""
    for folder in (data_dir, data_dir / "omniglot"):
        if (folder / f"images_{set_name}.zip").is_file():
            return folder / f"images_{set_name}.zip"
        if (folder / f"images_{set_name}").is_dir():
            return folder / f"images_{set_name}"
    downloaded = cache_dir / f"images_{set_name}.zip"
    return downloaded if downloaded.is_file() else None


def _check_structure(source: _Source, tree: dict[str, dict[str, list[str]]]) -> None:
    """Raise a one-line DataError unless the tree has the official alphabets, characters and drawings."""
    expected = EXPECTED_ALPHABETS[source.set_name]
    missing = sorted(set(expected) - set(tree))
    unexpected = sorted(set(tree) - set(expected))
    if missing or unexpected:
        details = "; ".join(f"{label}: {', '.join(names)}"
                            for label, names in (("missing", missing), ("unexpected", unexpected)) if names)
        raise DataError(f"{source.path}: {len(tree)} alphabets, expected {len(expected)} ({details})")
    for alphabet in sorted(tree):
        characters = tree[alphabet]
        if len(characters) != expected[alphabet]:
            raise DataError(f"{source.path}: {alphabet} has {len(characters)} characters, "
                            f"expected {expected[alphabet]}")
        for character in sorted(characters):
            if len(characters[character]) != DRAWINGS:
                raise DataError(f"{source.path}: {alphabet}/{character} has {len(characters[character])} "
                                f"drawings, expected {DRAWINGS}")


# --------------------------------------------------------------------------------------------------
# Download (only when a set is not found)


def _missing_message(names: list[str], data_dir: Path, reason: str) -> str:
    files = " and ".join(f"images_{s}.zip" for s in names)
    return (f"Omniglot not found {reason}: looked for {files} (from github.com/brendenlake/omniglot/python) "
            f"or their extracted folders in {data_dir} and {data_dir / 'omniglot'}; put them there, or "
            f"{where_data_goes('them')}")


def _download(set_name: str, cache_dir: Path, progress: bool) -> Path:
    """Fetch ``images_<set>.zip`` into ``cache_dir`` (temp file, md5 check, then rename)."""
    name = f"images_{set_name}.zip"
    url = f"{URL_BASE}/{name}"
    target = cache_dir / name
    md5 = hashlib.md5()
    with atomic_file(target, suffix=".part") as f, urllib.request.urlopen(url, timeout=60) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"Downloading {name}", disable=not progress) as bar:
            while chunk := response.read(1 << 16):
                f.write(chunk)
                md5.update(chunk)
                bar.update(len(chunk))
        if md5.hexdigest() != MD5[name]:  # raised inside the block: the partial file is removed
            raise DataError(f"{url}: downloaded file has md5 {md5.hexdigest()}, expected {MD5[name]} "
                            f"(corrupt or changed upstream); put the official {name} into the data folder")
    return target


def _download_missing(missing: list[str], data_dir: Path, cache_dir: Path, progress: bool) -> None:
    for set_name in missing:
        try:
            _download(set_name, cache_dir, progress)
        except (OSError, ValueError) as e:  # URLError, HTTPError, timeouts, an unwritable cache folder
            reason = one_line(e.reason if isinstance(e, urllib.error.URLError) else e)
            message = _missing_message(missing, data_dir, f"and could not be downloaded ({reason})")
            raise DataError(message) from e


# --------------------------------------------------------------------------------------------------
# Preprocessing


class _WrongSize(DataError):
    """A readable image of the wrong size."""


def preprocess_image(image: RawImage) -> np.ndarray:
    """One Omniglot drawing exactly as training sees it: decoded, checked to be 105x105, converted to
    grayscale, resized to 28x28 with PIL's LANCZOS filter and inverted (bright strokes on black).

    This is the function that builds the dataset cache, so ``preprocess_image(png)`` equals the cached
    image of that drawing; a model's input is this array divided by 255 in the run's dtype
    (:meth:`metarun.api.Trained.preprocess` does both).

    Args:
        image: the drawing as PNG bytes, a file path, a binary file or a PIL image (105x105, as every
            official Omniglot file, including the one-shot runs of ``all_runs.zip``).

    Returns:
        uint8 array [28, 28]: strokes 255, background 0.

    Raises:
        DataError: the image is not 105x105 (the message says its size).
        Exception: whatever PIL raises for an unreadable file.
    """
    with open_image(image) as opened:
        if opened.size != (SOURCE_SIZE, SOURCE_SIZE):
            raise _WrongSize(f"image is {opened.size[0]}x{opened.size[1]}, expected {SOURCE_SIZE}x{SOURCE_SIZE}")
        small = opened.convert("L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS)
    return 255 - np.asarray(small, dtype=np.uint8)


def _decode_all(sources: list[tuple[_Source, dict[str, dict[str, list[str]]]]],
                progress: bool) -> OmniglotData:
    """Decode every drawing of every (already checked) set into one uint8 tensor."""
    characters = [(source.set_name, alphabet, character)
                  for source, tree in sources for alphabet in sorted(tree) for character in sorted(tree[alphabet])]
    images = np.empty((len(characters), DRAWINGS, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    by_set = {source.set_name: (source, tree) for source, tree in sources}
    with tqdm(total=len(characters) * DRAWINGS, unit="img", desc="Omniglot: preprocessing to 28x28",
              disable=not progress) as bar:
        for row, (set_name, alphabet, character) in enumerate(characters):
            source, tree = by_set[set_name]
            for j, drawing in enumerate(sorted(tree[alphabet][character])):
                relative = f"{alphabet}/{character}/{drawing}"
                png = source.read(relative)  # a DataError of its own when the file cannot be read
                try:
                    images[row, j] = preprocess_image(png)
                except _WrongSize as e:
                    raise DataError(f"{source.path}: {relative}: {e}") from e
                except UnidentifiedImageError as e:  # PIL's message names only its in-memory buffer
                    raise DataError(f"{source.path}: {relative} is not a readable PNG (not an image PIL "
                                    "recognises)") from e
                except Exception as e:
                    raise DataError(f"{source.path}: {relative} is not a readable PNG ({one_line(e)})") from e
            bar.update(DRAWINGS)
    return OmniglotData(images=torch.from_numpy(images), characters=characters)


def load_omniglot(data_dir: Path | None = None, cache_dir: Path | None = None, download: bool = True,
                  progress: bool = True) -> OmniglotData:
    """All 1,623 Omniglot characters x 20 drawings, as 28x28 uint8 images (strokes 255).

    Each official set is taken from the first of ``<data_dir>/images_<set>.zip``,
    ``<data_dir>/images_<set>/`` (extracted), the same two under ``<data_dir>/omniglot/``, and
    ``<cache_dir>/images_<set>.zip`` (an earlier download). Zips are read in place, never extracted. The
    files are checked by structure (alphabets, characters per alphabet, 20 drawings each, 105x105
    images), not by checksum. The first call decodes all 32,460 PNGs (about 10 s on one core) and saves
    ``<cache_dir>/omniglot_28x28_uint8_v1.pt``; later calls load that file, as long as the sources'
    fingerprint (every PNG's name and size) still matches.

    Args:
        data_dir: folder holding the zips or the extracted folders; may be read-only. Default
            :func:`~metarun.data.cache.default_data_dir`.
        cache_dir: writable folder for the preprocessed tensor and for downloads. Default
            :func:`~metarun.data.cache.default_cache_dir`.
        download: fetch a missing set from github.com/brendenlake/omniglot into ``cache_dir`` (md5
            checked). Off: a missing set is an error.
        progress: show tqdm progress bars for the download and the preprocessing.

    Returns:
        The images and, for each row, its ``(set, alphabet, character)``.

    Raises:
        DataError: a set is missing and cannot be downloaded, a download is corrupt, or a file breaks
            the official structure; the one-line message names the file and the problem.
    """
    data_dir = Path(data_dir if data_dir is not None else default_data_dir()).expanduser().absolute()
    cache_dir = Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser().absolute()

    paths = {s: _find_source(s, data_dir, cache_dir) for s in SETS}
    missing = [s for s in SETS if paths[s] is None]
    if missing and not download:
        raise DataError(_missing_message(missing, data_dir, "(download is off)"))
    if missing:
        _download_missing(missing, data_dir, cache_dir, progress)
        paths = {s: _find_source(s, data_dir, cache_dir) for s in SETS}

    sources = [_Source(s, paths[s]) for s in SETS]
    with contextlib.ExitStack() as stack:
        for source in sources:
            stack.enter_context(source)
        scans = [source.scan() for source in sources]
        fingerprint = {source.set_name: digest for source, (_, digest) in zip(sources, scans)}
        cache_path = cache_dir / CACHE_NAME
        cached = load_cache(cache_path)
        if _cache_matches(cached, fingerprint):
            log.info("Omniglot: read the 28x28 cache %s (sources: %s)", cache_path, ", ".join(map(str, paths.values())))
            return OmniglotData(images=cached["images"], characters=[tuple(c) for c in cached["characters"]])

        for source, (tree, _) in zip(sources, scans):
            _check_structure(source, tree)
        data = _decode_all([(source, tree) for source, (tree, _) in zip(sources, scans)], progress)

    save_cache({"version": CACHE_VERSION, "fingerprint": fingerprint, "images": data.images,
                "characters": data.characters}, cache_path, "Omniglot")
    log.info("Omniglot: built the 28x28 cache %s from %s", cache_path, ", ".join(map(str, paths.values())))
    return data


def _cache_matches(cached, fingerprint: dict[str, str]) -> bool:
    return (isinstance(cached, dict) and cached.get("version") == CACHE_VERSION
            and cached.get("fingerprint") == fingerprint
            and isinstance(cached.get("images"), torch.Tensor) and cached["images"].dtype == torch.uint8
            and tuple(cached["images"].shape[1:]) == (DRAWINGS, IMAGE_SIZE, IMAGE_SIZE)
            and len(cached.get("characters", ())) == len(cached["images"]))


# --------------------------------------------------------------------------------------------------
# Splits and rotations


def omniglot_splits(data: OmniglotData, protocol: str = "paper", seed: int = 1) -> dict[str, torch.Tensor]:
    """Character indices (into ``data.images``) for ``train``, ``val`` and ``test``, each sorted.

    Protocols:

    * ``"paper"`` -- the MAML paper's code (cbfinn/maml ``data_generator.py``): all 1,623 characters
      shuffled with a fixed seed, then the first 1,100 are train, the next 100 val and the last 423
      test. The original shuffles ``os.listdir`` order (which depends on the file system) with Python
      2's ``random.seed(1)``, so its exact assignment cannot be reproduced; here the characters in
      :class:`OmniglotData` order are shuffled with ``random.Random(seed).shuffle``. The same seed gives
      the same split on every machine.
    * ``"vinyals"`` -- Vinyals et al. (2016), as in the prototypical-networks lists: 1,028 train / 172
      val / 423 test characters, split by alphabet (see ``VINYALS_*``); ``seed`` is not used.

    Args:
        data: the loaded characters.
        protocol: ``"paper"`` or ``"vinyals"`` (the setting ``task.split``).
        seed: shuffling seed of the ``"paper"`` protocol.

    Returns:
        ``{"train": LongTensor, "val": LongTensor, "test": LongTensor}``: disjoint, together all characters.

    Raises:
        DataError: unknown protocol.
    """
    if protocol == "paper":
        order = list(range(len(data)))
        random.Random(seed).shuffle(order)
        n_train, n_val, _ = PAPER_SPLIT_SIZES
        parts = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    elif protocol == "vinyals":
        parts = {"train": [], "val": [], "test": []}
        for i, (_, alphabet, character) in enumerate(data.characters):
            if alphabet in VINYALS_TEST_ALPHABETS or (alphabet, character) in VINYALS_TEST_CHARACTERS:
                parts["test"].append(i)
            elif alphabet in VINYALS_VAL_ALPHABETS:
                parts["val"].append(i)
            else:
                parts["train"].append(i)
    else:
        raise DataError(f"task.split: unknown Omniglot split protocol {protocol!r}; use 'paper' or 'vinyals'")
    return {name: torch.tensor(sorted(indices), dtype=torch.long) for name, indices in parts.items()}


def rotate_classes(images: torch.Tensor) -> torch.Tensor:
    """Each class in four rotations, each rotation a class of its own.

    Args:
        images: [C, drawings, H, W] (H == W).

    Returns:
        [4C, drawings, H, W]: all C classes unrotated first, then all rotated by 90 degrees, then 180,
        then 270 (``torch.rot90`` over the last two dims, counter-clockwise): class ``c`` rotated by
        ``90 * k`` degrees is row ``k * C + c``.
    """
    return torch.cat([torch.rot90(images, k, dims=(-2, -1)) for k in range(4)])
