"""Where datasets and their caches live, and writing a cache so that it is never half-written.

The raw data folder may be read-only (it is in CI), so preprocessed caches go to a separate,
writable cache folder:

* data:  ``task.data_dir``  (default ``$METARUN_DATA_DIR``, else ``./data``)
* cache: ``task.cache_dir`` (default ``$METARUN_CACHE_DIR``, else ``~/.cache/metarun``)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from metarun.utils.checkpoint import save_atomic
from metarun.utils.errors import MetarunError


class DataError(MetarunError):
    """A dataset is missing, incomplete or corrupt; the message names the file or setting."""


def default_data_dir() -> Path:
    return Path(os.environ.get("METARUN_DATA_DIR", "data")).expanduser()


def default_cache_dir() -> Path:
    return Path(os.environ.get("METARUN_CACHE_DIR", "~/.cache/metarun")).expanduser()


def where_data_goes(what: str) -> str:
    """The end of a data-not-found message: the two ways to point metarun at another folder."""
    return (f"point task.data_dir=FOLDER (or the environment variable METARUN_DATA_DIR) at the folder that "
            f"holds {what}; by default metarun looks in ./data under the folder it is started from")


def one_line(e: BaseException) -> str:
    """An exception's message on one line (for a DataError that quotes it)."""
    return " ".join(str(e).split()) or type(e).__name__


def save_cache(obj: Any, path: Path, what: str) -> Path:
    """``torch.save`` to a temp file beside ``path``, then rename: readers never see half a file.
    An unwritable cache folder is a :class:`DataError` naming ``what`` and how to fix it."""
    try:
        return save_atomic(obj, path)
    except OSError as e:
        raise DataError(f"cannot write the {what} cache {path} ({one_line(e)}); point task.cache_dir "
                        f"(or $METARUN_CACHE_DIR) at a writable folder") from e


def load_cache(path: Path) -> Any | None:
    """The cached object, or None when there is none or it cannot be read (it is rebuilt)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=False)
    except Exception:
        return None
