"""Complete validation of a user's ``.npz`` dataset, reading at most one bounded chunk of it at a time.

An upload is registered only if a job can train on it, so everything a job would trip over is checked
here, the same way for the API (at upload, in the isolated checking process), the worker and the CLI:
array shapes and sizes from the ``.npy`` headers first (``core.archive_limits``: nothing declared is
allocated), then the values streamed chunk by chunk: integer labels in [0, C) with 2 <= C <= MAX_CLASSES
(all arithmetic on Python ints, so 2**40 or uint64 2**64-1 cannot overflow into a plausible C), finite
pixels in [0, 1] for float images, image sides MIN_SIDE..MAX_SIDE with 1 or 3 channels (what the
registry's students accept), equal x and y lengths and at least one example per split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.archive_limits import ExpansionLimits, NpyHeader, iter_npy_chunks, npz_headers
from core.errors import DataError

MAX_CLASSES = 100_000
MIN_SIDE, MAX_SIDE = 8, 1024
CHANNELS = (1, 3)
LAYOUTS = "uint8 (N, H, W, C) with values 0..255 or float (N, C, H, W) in [0, 1], C = 1 or 3"


@dataclass(frozen=True)
class NpzSummary:
    """What a valid ``.npz`` holds; ``n_test`` is 0 when the test split is to be carved from x."""

    num_classes: int
    n_train: int
    n_test: int
    image_shape: tuple[int, int, int]  # (C, H, W)


def _image_shape(h: NpyHeader, key: str) -> tuple[int, int, int]:
    """(C, H, W) of an image array from its header, or a DataError naming what is wrong."""
    if len(h.shape) != 4:
        raise DataError(f"{key} must be a 4-D image array, {LAYOUTS}; got shape {h.shape}")
    if h.shape[0] == 0:
        raise DataError(f"{key} holds no images: every split needs at least one example")
    if h.dtype == np.uint8:
        _, height, width, channels = h.shape
        if channels not in CHANNELS:
            raise DataError(
                f"{key} is uint8, so it must be (N, H, W, C) with C = 1 or 3 last; got shape {h.shape}"
            )
    elif np.issubdtype(h.dtype, np.floating):
        _, channels, height, width = h.shape
        if channels not in CHANNELS:
            raise DataError(
                f"{key} is {h.dtype}, so it must be (N, C, H, W) with C = 1 or 3; got shape {h.shape}"
            )
    else:
        raise DataError(f"{key} has dtype {h.dtype}; store {LAYOUTS}")
    if not (MIN_SIDE <= height <= MAX_SIDE and MIN_SIDE <= width <= MAX_SIDE):
        raise DataError(
            f"{key} images are {height}x{width} pixels; the students accept {MIN_SIDE} to {MAX_SIDE} "
            f"pixels a side (shape {h.shape})"
        )
    return channels, height, width


def _check_pixels(path: Path, h: NpyHeader, key: str) -> None:
    if h.dtype == np.uint8:
        for _ in iter_npy_chunks(path, h):  # every byte is a valid pixel; reading checks integrity
            pass
        return
    lo, hi = np.inf, -np.inf
    for chunk in iter_npy_chunks(path, h):
        if not np.isfinite(chunk).all():
            raise DataError(f"{key} contains NaN or infinite values")
        lo, hi = min(lo, float(chunk.min())), max(hi, float(chunk.max()))
    if lo < 0.0 or hi > 1.0:
        raise DataError(f"{key} values must lie in [0, 1] but range from {lo:g} to {hi:g}; divide by 255?")


def _label_range(path: Path, h: NpyHeader, key: str, n_images: int) -> tuple[int, int]:
    """(min, max) of the labels as Python ints (no overflow, whatever the integer dtype)."""
    if len(h.shape) != 1:
        raise DataError(f"{key} must be a 1-D array of integer labels, got shape {h.shape}")
    if not np.issubdtype(h.dtype, np.integer):
        raise DataError(f"{key} has dtype {h.dtype}; labels must be integers 0..C-1")
    if h.shape[0] != n_images:
        raise DataError(f"{key} has {h.shape[0]} labels but there are {n_images} images")
    lo, hi = None, None
    for chunk in iter_npy_chunks(path, h):
        c_lo, c_hi = int(chunk.min()), int(chunk.max())
        lo = c_lo if lo is None else min(lo, c_lo)
        hi = c_hi if hi is None else max(hi, c_hi)
    assert lo is not None and hi is not None  # n_images >= 1
    if lo < 0:
        raise DataError(f"labels out of range: {key} has a negative label {lo}")
    if hi >= MAX_CLASSES:
        raise DataError(
            f"labels out of range: {key} has label {hi}; labels must be 0..C-1 with at most "
            f"{MAX_CLASSES} classes"
        )
    return lo, hi


def _declared_classes(path: Path, h: NpyHeader) -> int:
    if h.count != 1 or not np.issubdtype(h.dtype, np.integer):
        raise DataError(f"num_classes must be a single integer, got {h.dtype} array of shape {h.shape}")
    value = int(next(iter_npy_chunks(path, h))[0])
    if not 2 <= value <= MAX_CLASSES:
        raise DataError(f"num_classes is {value}; it must be 2 to {MAX_CLASSES}")
    return value


def check_npz(path: Path, limits: ExpansionLimits | None = None, name: str | None = None) -> NpzSummary:
    """Validate the dataset at ``path`` completely; messages call the file ``name`` (default: the path)."""
    label = name or str(path)
    if not path.is_file():
        raise DataError(f"npz dataset: {label} is not a file; pass the path of an .npz with arrays x and y")
    with path.open("rb") as f:
        if f.read(4) != b"PK\x03\x04":
            raise DataError(f"{label} is not an .npz file (a zip of .npy arrays, as numpy.savez writes)")
    headers = npz_headers(path, label, limits, DataError)
    for need in ("x", "y"):
        if need not in headers:
            raise DataError(
                f"{label} has no array {need!r} (found {', '.join(sorted(headers)) or 'none'}); "
                "store images as x and integer labels as y"
            )
    if ("x_test" in headers) != ("y_test" in headers):
        raise DataError(f"{label}: x_test and y_test must come together")
    shape = _image_shape(headers["x"], "x")
    splits = [("x", "y")]
    if "x_test" in headers:
        test_shape = _image_shape(headers["x_test"], "x_test")
        if test_shape != shape:
            raise DataError(f"x_test images are {test_shape} (C,H,W) but x images are {shape}")
        splits.append(("x_test", "y_test"))
    biggest = 0
    for xk, yk in splits:  # every cheap header check first, then the values
        n = headers[xk].shape[0]
        biggest = max(biggest, _label_range(path, headers[yk], yk, n)[1])
    for xk, _ in splits:
        _check_pixels(path, headers[xk], xk)
    if "num_classes" in headers:
        num_classes = _declared_classes(path, headers["num_classes"])
        if biggest >= num_classes:
            raise DataError(f"labels out of range: found label {biggest} but num_classes is {num_classes}")
    else:
        num_classes = biggest + 1
    if num_classes < 2:
        raise DataError(f"{label}: need at least 2 classes, labels only reach {biggest}")
    n_train = headers["x"].shape[0]
    n_test = headers["x_test"].shape[0] if "x_test" in headers else 0
    if n_test == 0 and n_train // 5 < 1:
        raise DataError(f"{label}: {n_train} images are too few to carve a test split; add x_test/y_test")
    return NpzSummary(num_classes, n_train, n_test, shape)
