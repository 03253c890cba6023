"""One raw image, however a user holds it: encoded bytes, a file path, a file object or a PIL image.

The per-image preprocessing of each dataset (:func:`metarun.data.omniglot.preprocess_image`,
:func:`metarun.data.miniimagenet.preprocess_image`) opens its input with :func:`open_image`, so the
same function serves the dataset cache (PNG bytes read from a zip, files on disk) and
:meth:`metarun.api.Trained.preprocess` (whatever the user has).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Union

from PIL import Image

RawImage = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]", IO[bytes], Image.Image]
"""What counts as one raw image: its encoded bytes (PNG, JPEG, ...), a path to its file, an open
binary file, or an image PIL has already opened."""


def is_raw_image(obj: object) -> bool:
    """Whether ``obj`` is one image (rather than a sequence of them), as :data:`RawImage` lists."""
    return isinstance(obj, (bytes, bytearray, memoryview, str, os.PathLike, Image.Image)) or hasattr(obj, "read")


@contextmanager
def open_image(image: RawImage) -> Iterator[Image.Image]:
    """``image`` as a PIL image, decoded; a file opened here is closed when the block ends (an image
    PIL had already opened is passed through and left open).

    Raises:
        TypeError: ``image`` is none of the kinds :data:`RawImage` lists.
        Exception: whatever PIL raises for a file it cannot read (``FileNotFoundError``,
            ``PIL.UnidentifiedImageError``, ...).
    """
    if isinstance(image, Image.Image):
        yield image
        return
    if isinstance(image, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(image))
    elif isinstance(image, (str, os.PathLike)) or hasattr(image, "read"):
        source = image
    else:
        raise TypeError(f"expected image bytes, a file path, a binary file or a PIL image, got {type(image).__name__}")
    with Image.open(source) as opened:
        opened.load()
        yield opened
