"""File helpers the library's writers share: JSON-safe values, atomic JSON and text writes, file digests.

Reports, model cards and export records are read by people and programs while a run may still be
writing them, so every write goes to a temporary file that is fsynced and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch


def finite(obj: Any) -> Any:
    """JSON has no inf/nan: replace them by None, recursively."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def jsonable(obj: Any) -> Any:
    """``json.dump``'s ``default``: tuples and sets as lists, tensors as lists, paths and the rest as text."""
    if isinstance(obj, (tuple, set)):
        return list(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return str(obj)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a temporary file, fsync, then rename: a reader never sees a half-written file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """``obj`` as indented JSON, atomically (see ``write_text``)."""
    write_text(path, json.dumps(obj, indent=2, default=jsonable) + "\n")


def sha256_file(path: str | os.PathLike) -> str:
    """The file's sha256, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
