"""Omniglot loading: the real zips (preprocessed once per session), splits, rotations, bad input, download.

The real data is read from ``$METARUN_DATA_DIR``, else ``../shared/data`` beside the project. Bad input and
the download path use tiny fake sets in the official layout (``EXPECTED_ALPHABETS`` shrunk to match), so
they run in a fraction of a second.
"""

from __future__ import annotations

import functools
import hashlib
import io
import socket
import threading
import time
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metarun.data import omniglot
from metarun.data.cache import DataError
from metarun.data.omniglot import OmniglotData, load_omniglot, omniglot_splits, rotate_classes
from tests.conftest import DATA_DIR, require_data

pytestmark = pytest.mark.unit

OMNIGLOT_DIR = DATA_DIR / "omniglot"


@pytest.fixture(scope="session")
def real(tmp_path_factory) -> tuple[OmniglotData, Path, float]:
    """The real Omniglot, preprocessed once into a session cache: (data, cache_dir, seconds it took)."""
    require_data(OMNIGLOT_DIR / "images_background.zip")
    torch.set_num_threads(1)
    cache_dir = tmp_path_factory.mktemp("omniglot_cache")
    start = time.perf_counter()
    data = load_omniglot(DATA_DIR, cache_dir, download=False, progress=False)
    return data, cache_dir, time.perf_counter() - start


# --------------------------------------------------------------------------------------------------
# The real data


def test_real_images_shape_dtype_and_polarity(real):
    data, _, seconds = real
    assert seconds < 120, f"first preprocessing took {seconds:.0f} s"
    assert data.images.shape == (1623, 20, 28, 28)
    assert data.images.dtype == torch.uint8
    assert data.images.min() == 0 and data.images.max() == 255
    # strokes are bright on a black background: most pixels are background
    assert data.images.float().mean() < 50
    assert (data.images[:, :, 0, :] == 0).float().mean() > 0.95  # the top row is nearly always empty


def test_real_order_and_counts(real):
    data, _, _ = real
    assert len(data) == len(data.characters) == 1623
    sets = [s for s, _, _ in data.characters]
    assert sets == ["background"] * 964 + ["evaluation"] * 659
    assert data.characters[0] == ("background", "Alphabet_of_the_Magi", "character01")
    assert data.characters[963] == ("background", "Tifinagh", "character55")
    assert data.characters[964] == ("evaluation", "Angelic", "character01")
    assert data.characters[-1] == ("evaluation", "ULOG", "character26")
    assert len(data.alphabets) == 50
    assert data.alphabets[:30] == sorted(data.alphabets[:30]) and data.alphabets[30:] == sorted(data.alphabets[30:])
    for set_name, counts in omniglot.EXPECTED_ALPHABETS.items():
        for alphabet, n in counts.items():
            indices = data.character_indices(alphabet)
            assert len(indices) == n
            assert all(data.characters[i][0] == set_name for i in indices)
    assert len(set(data.characters)) == 1623


def test_real_second_load_hits_the_cache(real, monkeypatch):
    data, cache_dir, _ = real
    assert [p.name for p in cache_dir.iterdir()] == [omniglot.CACHE_NAME]

    def no_decoding(*args, **kwargs):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(omniglot, "_decode_all", no_decoding)
    for data_dir in (DATA_DIR, OMNIGLOT_DIR):  # both spellings of the data folder find the same zips
        start = time.perf_counter()
        again = load_omniglot(data_dir, cache_dir, download=False, progress=False)
        assert time.perf_counter() - start < 10
        assert torch.equal(again.images, data.images)
        assert again.characters == data.characters


def test_real_image_matches_a_direct_decode(real):
    data, _, _ = real
    i = data.characters.index(("evaluation", "Angelic", "character03"))
    with zipfile.ZipFile(OMNIGLOT_DIR / "images_evaluation.zip") as z:
        png = z.read("images_evaluation/Angelic/character03/0967_05.png")
    image = Image.open(io.BytesIO(png))
    assert image.mode == "1" and image.size == (105, 105)
    expected = 255 - np.asarray(image.convert("L").resize((28, 28), Image.LANCZOS))
    assert torch.equal(data.images[i, 4], torch.from_numpy(expected))


# --------------------------------------------------------------------------------------------------
# Splits and rotations


@pytest.mark.parametrize("protocol, sizes", [("paper", (1100, 100, 423)), ("vinyals", (1028, 172, 423))])
def test_splits_are_disjoint_and_cover_everything(real, protocol, sizes):
    data, _, _ = real
    splits = omniglot_splits(data, protocol)
    assert tuple(len(splits[k]) for k in ("train", "val", "test")) == sizes
    everything = torch.cat(list(splits.values()))
    assert everything.dtype == torch.long
    assert sorted(everything.tolist()) == list(range(1623))


def test_paper_split_is_deterministic_per_seed(real):
    data, _, _ = real
    first, again, other = (omniglot_splits(data, "paper", seed) for seed in (1, 1, 2))
    for name in ("train", "val", "test"):
        assert torch.equal(first[name], again[name])
    assert not torch.equal(first["test"], other["test"])
    # a shuffle over all characters: the test split mixes background and evaluation alphabets
    assert {data.characters[i][0] for i in first["test"].tolist()} == {"background", "evaluation"}


def test_vinyals_split_membership(real):
    data, _, _ = real
    splits = {name: {data.characters[i][1:] for i in idx.tolist()}
              for name, idx in omniglot_splits(data, "vinyals", seed=123).items()}
    assert ("Hebrew", "character01") in splits["val"] and ("Bengali", "character46") in splits["val"]
    assert ("ULOG", "character26") in splits["test"] and ("Kannada", "character01") in splits["test"]
    assert ("Latin", "character01") in splits["train"] and ("Angelic", "character20") in splits["train"]
    assert ("Gurmukhi", "character41") in splits["train"] and ("Gurmukhi", "character42") in splits["test"]
    alphabets = {name: {a for a, _ in chars} for name, chars in splits.items()}
    assert alphabets["val"] == set(omniglot.VINYALS_VAL_ALPHABETS)
    assert alphabets["test"] == set(omniglot.VINYALS_TEST_ALPHABETS) | {"Gurmukhi"}
    assert len(alphabets["train"]) == 50 - 5 - 12


def test_unknown_split_protocol_names_the_setting():
    data = OmniglotData(images=torch.zeros(1, 20, 28, 28, dtype=torch.uint8), characters=[("background", "A", "c")])
    with pytest.raises(DataError, match=r"task\.split.*'lake'"):
        omniglot_splits(data, "lake")


def test_rotate_classes_order():
    images = torch.arange(3 * 2 * 4 * 4, dtype=torch.uint8).reshape(3, 2, 4, 4)
    rotated = rotate_classes(images)
    assert rotated.shape == (12, 2, 4, 4)
    for k in range(4):
        for c in range(3):
            assert torch.equal(rotated[k * 3 + c], torch.rot90(images[c], k, dims=(-2, -1)))
    assert torch.equal(rotated[:3], images)
    assert torch.equal(rotate_classes(rotated[3:6])[9:], images)  # 90 + 270 degrees = a full turn


# --------------------------------------------------------------------------------------------------
# Tiny fake sets in the official layout

TINY = {"background": {"Aa": 2, "Bb": 1}, "evaluation": {"Cc": 1, "Dd": 1}}


@pytest.fixture
def tiny(monkeypatch):
    """Expect the tiny alphabets in TINY instead of the real 50."""
    monkeypatch.setattr(omniglot, "EXPECTED_ALPHABETS", TINY)
    return TINY


def _png(seed: int, size: int = 105) -> bytes:
    """A mode '1' drawing like the official ones: a black stroke on white."""
    image = Image.new("1", (size, size), 1)
    x, y = 10 + seed % 60, 20 + (seed * 7) % 60
    for dx in range(30):
        for dy in range(3):
            image.putpixel((x + dx, y + dy), 0)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _entries(set_name: str, changes: dict[str, bytes | None] | None = None) -> dict[str, bytes]:
    """``{path inside images_<set>/: png bytes}`` of a complete tiny set, with ``changes`` applied
    (``None`` drops the file)."""
    entries, char_id = {}, 1 if set_name == "background" else 101
    for alphabet, n in TINY[set_name].items():
        for c in range(1, n + 1):
            for d in range(1, 21):
                entries[f"{alphabet}/character{c:02d}/{char_id:04d}_{d:02d}.png"] = _png(char_id * 20 + d)
            char_id += 1
    for path, content in (changes or {}).items():
        if content is None:
            entries = {k: v for k, v in entries.items() if not k.startswith(path)}
        else:
            entries[path] = content
    return entries


def write_zip(folder: Path, set_name: str, changes: dict[str, bytes | None] | None = None) -> Path:
    """``folder/images_<set>.zip`` in the official layout, directory entries included."""
    folder.mkdir(parents=True, exist_ok=True)
    path, top = folder / f"images_{set_name}.zip", f"images_{set_name}"
    entries = _entries(set_name, changes)
    folders = sorted({f"{top}/{'/'.join(name.split('/')[:i])}/" for name in entries for i in (1, 2)})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name in [f"{top}/", *folders]:
            z.writestr(name, b"")
        for name, content in sorted(entries.items()):
            z.writestr(f"{top}/{name}", content)
    return path


def write_folder(folder: Path, set_name: str) -> Path:
    """The extracted ``folder/images_<set>/`` tree."""
    root = folder / f"images_{set_name}"
    for name, content in _entries(set_name).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    return root


def test_tiny_zip_folder_and_nested_layouts_load_the_same(tiny, tmp_path):
    write_zip(tmp_path / "zips", "background")
    write_zip(tmp_path / "zips", "evaluation")
    from_zips = load_omniglot(tmp_path / "zips", tmp_path / "cache1", download=False, progress=False)
    assert from_zips.images.shape == (5, 20, 28, 28)
    assert from_zips.characters == [("background", "Aa", "character01"), ("background", "Aa", "character02"),
                                    ("background", "Bb", "character01"), ("evaluation", "Cc", "character01"),
                                    ("evaluation", "Dd", "character01")]
    assert from_zips.alphabets == ["Aa", "Bb", "Cc", "Dd"]

    write_folder(tmp_path / "data" / "omniglot", "background")  # extracted, one level down
    write_folder(tmp_path / "data" / "omniglot", "evaluation")
    from_folders = load_omniglot(tmp_path / "data", tmp_path / "cache2", download=False, progress=False)
    assert torch.equal(from_folders.images, from_zips.images)
    assert from_folders.characters == from_zips.characters


def test_tiny_changed_source_rebuilds_the_cache(tiny, tmp_path, monkeypatch):
    write_zip(tmp_path / "data", "background")
    write_zip(tmp_path / "data", "evaluation")
    decode_calls = []
    decode = omniglot._decode_all
    monkeypatch.setattr(omniglot, "_decode_all", lambda *a, **k: decode_calls.append(1) or decode(*a, **k))
    first = load_omniglot(tmp_path / "data", tmp_path / "cache", download=False, progress=False)
    load_omniglot(tmp_path / "data", tmp_path / "cache", download=False, progress=False)
    assert len(decode_calls) == 1

    write_zip(tmp_path / "data", "evaluation", {"Dd/character01/0102_01.png": _png(999)})
    changed = load_omniglot(tmp_path / "data", tmp_path / "cache", download=False, progress=False)
    assert len(decode_calls) == 2
    assert not torch.equal(changed.images[4, 0], first.images[4, 0])
    assert torch.equal(changed.images[:4], first.images[:4])


@pytest.mark.parametrize("set_name, changes, message", [
    ("background", {"Bb/": None}, r"images_background\.zip: 1 alphabets, expected 2 \(missing: Bb\)$"),
    ("evaluation", {"Ee/character01/0200_01.png": _png(1)},
     r"images_evaluation\.zip: 3 alphabets, expected 2 \(unexpected: Ee\)$"),
    ("background", {"Aa/character02/": None}, r"images_background\.zip: Aa has 1 characters, expected 2$"),
    ("evaluation", {"Cc/character01/0101_20.png": None},
     r"images_evaluation\.zip: Cc/character01 has 19 drawings, expected 20$"),
    ("evaluation", {"Cc/character01/0101_05.png": b"\x89PNG\r\n\x1a\n not really"},
     r"images_evaluation\.zip: Cc/character01/0101_05\.png is not a readable PNG"),
    ("background", {"Aa/character02/0002_07.png": _png(1)[:60]},
     r"images_background\.zip: Aa/character02/0002_07\.png is not a readable PNG"),
    ("background", {"Bb/character01/0003_20.png": _png(1, size=64)},
     r"images_background\.zip: Bb/character01/0003_20\.png: image is 64x64, expected 105x105$"),
    ("background", {"Bb/character01/extra/0003_21.png": _png(1)},
     r"images_background\.zip: unexpected file images_background/Bb/character01/extra/0003_21\.png"),
])
def test_tiny_bad_input_is_one_line_naming_the_file(tiny, tmp_path, set_name, changes, message):
    for s in omniglot.SETS:
        write_zip(tmp_path / "data", s, changes if s == set_name else None)
    cache_dir = tmp_path / "cache"
    with pytest.raises(DataError, match=message) as error:
        load_omniglot(tmp_path / "data", cache_dir, download=False, progress=False)
    assert "\n" not in str(error.value)
    assert str(tmp_path / "data" / f"images_{set_name}.zip") in str(error.value)
    assert not cache_dir.exists() or not any(cache_dir.iterdir())  # no cache, no temp file


def test_tiny_damaged_zip_member_names_the_archive_and_the_member(tiny, tmp_path):
    """The zip's directory is intact but one member's compressed bytes are not: zlib fails while
    decoding, and the message says which archive and which member."""
    write_zip(tmp_path, "background")
    path = write_zip(tmp_path, "evaluation")
    member = "images_evaluation/Dd/character01/0102_03.png"
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little"), \
        int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
    data_start = info.header_offset + 30 + name_len + extra_len
    raw[data_start:data_start + 4] = b"\xff\xff\xff\xff"  # deflate block type 3: invalid
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError) as error:
        load_omniglot(tmp_path, tmp_path / "cache", download=False, progress=False)
    assert str(error.value).startswith(f"{path}: member {member} cannot be read (Error -3 while decompressing")


def test_tiny_unidentifiable_png_is_named_without_pils_buffer(tiny, tmp_path):
    for s in omniglot.SETS:
        write_zip(tmp_path, s, {"Aa/character01/0001_01.png": b"GIF89a but not an image"} if s == "background" else None)
    with pytest.raises(DataError) as error:
        load_omniglot(tmp_path, tmp_path / "cache", download=False, progress=False)
    assert str(error.value) == (f"{tmp_path / 'images_background.zip'}: Aa/character01/0001_01.png is not a "
                                "readable PNG (not an image PIL recognises)")


def test_tiny_not_a_zip(tiny, tmp_path):
    write_zip(tmp_path, "background")
    (tmp_path / "images_evaluation.zip").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"images_evaluation\.zip: not a readable zip file"):
        load_omniglot(tmp_path, tmp_path / "cache", download=False, progress=False)


# --------------------------------------------------------------------------------------------------
# Download from a local HTTP server


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def server(tiny, tmp_path, monkeypatch):
    """Serve tiny official-layout zips on 127.0.0.1; URL_BASE and MD5 point at them."""
    served = tmp_path / "served"
    for s in omniglot.SETS:
        write_zip(served, s)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setattr(omniglot, "URL_BASE", f"http://127.0.0.1:{httpd.server_address[1]}")
    monkeypatch.setattr(omniglot, "MD5", {p.name: hashlib.md5(p.read_bytes()).hexdigest()
                                          for p in served.glob("*.zip")})
    yield served
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def test_download_lands_in_the_cache_and_loads(server, tmp_path):
    data_dir, cache_dir = tmp_path / "read_only_data", tmp_path / "cache"
    data = load_omniglot(data_dir, cache_dir, progress=False)
    assert data.images.shape == (5, 20, 28, 28)
    assert not data_dir.exists()  # nothing is written to the data folder
    assert sorted(p.name for p in cache_dir.iterdir()) == [
        "images_background.zip", "images_evaluation.zip", omniglot.CACHE_NAME]
    for name in ("images_background.zip", "images_evaluation.zip"):
        assert (cache_dir / name).read_bytes() == (server / name).read_bytes()
    # a second call uses the downloaded files and the cache, without the network
    again = load_omniglot(data_dir, cache_dir, download=False, progress=False)
    assert torch.equal(again.images, data.images)


def test_download_only_fetches_the_missing_set(server, tmp_path):
    write_zip(tmp_path / "data", "background")
    cache_dir = tmp_path / "cache"
    load_omniglot(tmp_path / "data", cache_dir, progress=False)
    assert not (cache_dir / "images_background.zip").exists()
    assert (cache_dir / "images_evaluation.zip").is_file()


def test_download_md5_mismatch_leaves_nothing(server, tmp_path, monkeypatch):
    monkeypatch.setitem(omniglot.MD5, "images_background.zip", "0" * 32)
    cache_dir = tmp_path / "cache"
    with pytest.raises(DataError, match=r"images_background\.zip: downloaded file has md5 [0-9a-f]{32}, "
                                        r"expected 0{32}") as error:
        load_omniglot(tmp_path / "data", cache_dir, progress=False)
    assert "\n" not in str(error.value)
    assert list(cache_dir.iterdir()) == []


def test_download_unreachable_says_what_to_put_where(tiny, tmp_path, monkeypatch):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setattr(omniglot, "URL_BASE", f"http://127.0.0.1:{port}")
    data_dir, cache_dir = tmp_path / "data", tmp_path / "cache"
    with pytest.raises(DataError, match=r"^Omniglot not found and could not be downloaded \(.+\): looked for "
                                        r"images_background\.zip and images_evaluation\.zip \(from "
                                        r"github\.com/brendenlake/omniglot/python\) or their extracted folders "
                                        r"in ") as error:
        load_omniglot(data_dir, cache_dir, progress=False)
    assert f"in {data_dir} and {data_dir / 'omniglot'}; put them there, or point task.data_dir=" in str(error.value)
    assert "\n" not in str(error.value)
    assert not any(cache_dir.iterdir())


def test_download_off_says_what_to_put_where(tiny, tmp_path):
    write_zip(tmp_path / "data", "evaluation")
    with pytest.raises(DataError, match=r"^Omniglot not found \(download is off\): looked for "
                                        r"images_background\.zip \(from github\.com/brendenlake/omniglot/python\)"):
        load_omniglot(tmp_path / "data", tmp_path / "cache", download=False, progress=False)
