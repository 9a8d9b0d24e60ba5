"""Datasets as resident uint8 tensors, a held-out validation split, augmentation and batching.

Images stay uint8 until a batch is drawn (4x less memory, and a whole CIFAR set fits on a GPU);
batches come out float32 in [0, 1], NCHW. Every random choice (validation split, order,
augmentation) comes from an explicit seed or ``torch.Generator``, so (seed, epoch) fixes an epoch.
The reference code picks its best checkpoint on the test set; here a validation split carved from
the training set does that job, so reported test numbers are not selected on.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from core.archive_limits import ExpansionLimits
from core.errors import ConfigError, DataError
from core.npz_check import check_npz

DATASETS = ("cifar10", "cifar100", "cifar10-partial", "cifar100-partial", "npz")
_TORCHVISION = {
    "cifar10": ("CIFAR10", "cifar-10-batches-py", 10),
    "cifar100": ("CIFAR100", "cifar-100-python", 100),
}
# folder, train files, test files, label key, classes
_PARTIAL = {
    "cifar10-partial": (
        "cifar-10-batches-py-partial",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "labels",
        10,
    ),
    "cifar100-partial": ("cifar-100-python-partial", ["train"], ["test"], "fine_labels", 100),
}


@dataclass
class Split:
    """Images ``x`` uint8 (N, C, H, W) and labels ``y`` int64 (N,), on any device."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def to(self, device: str | torch.device) -> Split:
        """The same split on ``device``: keep a dataset resident on the GPU and batch without copies."""
        return Split(self.x.to(device), self.y.to(device))


@dataclass
class DatasetBundle:
    """The three splits of a dataset and a note saying where they came from and how they were cut."""

    name: str
    num_classes: int
    train: Split
    val: Split
    test: Split
    note: str

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])  # type: ignore[return-value]


def load_dataset(
    name: str,
    root: str | Path | None,
    *,
    val_size: int = 1000,
    seed: int = 0,
    train_subset: int | None = None,
    download: bool = False,
    limits: ExpansionLimits | None = None,
    display_name: str | None = None,
    evaluation_only: bool = False,
) -> DatasetBundle:
    """Load ``name`` from ``root`` and carve a seeded validation split out of its training set.

    For ``npz``: ``limits`` bounds what the file may expand to (checked before any array is read) and
    ``display_name`` is how messages name the file (an upload's own filename, not a server path).
    ``evaluation_only``: only the test split will be used (evaluating a model, not training one), so an
    npz without ``x_test`` is evaluated whole: its seeded 20% test split exists for training only.
    """
    key = str(name).strip().lower().replace("_", "-")
    if key not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    if isinstance(val_size, bool) or not isinstance(val_size, int) or val_size < 0:
        raise ConfigError(f"val_size must be a non-negative integer, got {val_size!r}")
    if train_subset is not None and (not isinstance(train_subset, int) or train_subset < 1):
        raise ConfigError(f"train_subset must be a positive integer, got {train_subset!r}")
    if root is None or str(root) == "":
        raise DataError(f"dataset {key!r} needs a data root (--data-root)")
    root = Path(root).expanduser()
    gen = torch.Generator().manual_seed(int(seed))

    if key in _TORCHVISION:
        train, test, num_classes, note = _load_torchvision(key, root, download)
    elif key in _PARTIAL:
        train, test, num_classes, note = _load_partial(key, root)
    else:
        train, test, num_classes, note = _load_npz(root, gen, limits, display_name, evaluation_only)

    n_train = len(train)
    if val_size >= n_train:
        raise DataError(
            f"val_size {val_size} leaves no training images: the training set has {n_train}; "
            "use a smaller --val-size"
        )
    train, val = _split_off(train, val_size, gen, keep=train_subset)
    note += (
        f"; validation: {len(val)} training images held out (seed {seed}) for checkpoint selection"
        f"; train: {len(train)}"
        + (f" (subset of {train_subset})" if train_subset is not None else "")
        + f"; test: {len(test)}"
    )
    return DatasetBundle(key, num_classes, train, val, test, note)


def _split_off(split: Split, k: int, gen: torch.Generator, keep: int | None = None) -> tuple[Split, Split]:
    """(rest, part): ``part`` is ``k`` seeded-random items; ``rest`` the others, or ``keep`` of them.

    Both stay in the original order, so the result depends only on the seed.
    """
    n = len(split)
    perm = torch.randperm(n, generator=gen)
    part = perm[:k].sort().values
    rest = perm[k:]
    if keep is not None:
        if keep > len(rest):
            raise DataError(
                f"train_subset {keep} is more than the {len(rest)} training images left after the "
                "validation split; lower --train-subset or --val-size"
            )
        rest = rest[:keep]
    rest = rest.sort().values
    return Split(split.x[rest], split.y[rest]), Split(split.x[part], split.y[part])


# ---------------------------------------------------------------- CIFAR through torchvision


def _load_torchvision(key: str, root: Path, download: bool) -> tuple[Split, Split, int, str]:
    import torchvision

    cls_name, folder, num_classes = _TORCHVISION[key]
    if root.name == folder:  # the user pointed at the data folder itself
        root = root.parent
    cls = getattr(torchvision.datasets, cls_name)
    try:
        sets = [cls(str(root), train=flag, download=download) for flag in (True, False)]
    except RuntimeError as exc:
        raise DataError(
            f"{key} not found or corrupted: looked for {root / folder} (the official python version). "
            f"Pass --download to fetch it, or place the extracted official files there ({exc})"
        ) from None
    except OSError as exc:  # includes URLError when downloading without a network
        raise DataError(
            f"could not download {key} into {root}: {exc}; place the official files there"
        ) from None
    train, test = (
        Split(_nhwc_to_tensor(s.data), torch.as_tensor(np.asarray(s.targets), dtype=torch.int64))
        for s in sets
    )
    return train, test, num_classes, f"{key}: official torchvision files in {root / folder}"


def _nhwc_to_tensor(x: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------- the partial CIFAR pickles


class _NumpyArrayUnpickler(pickle.Unpickler):
    """Reads CIFAR's pickles, which need only numpy's array-rebuilding globals; anything else is refused.

    The shipped files are trusted, but ``root`` comes from a user, so a swapped file must not run code.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}")
        if name == "_reconstruct":
            core = getattr(np, "_core", None) or np.core
            return core.multiarray._reconstruct
        return getattr(np, name)


def _read_cifar_pickle(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as f:
            batch = _NumpyArrayUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise DataError(f"{path} is not a CIFAR python batch file: {exc}") from None
    if not isinstance(batch, dict) or "data" not in batch or label_key not in batch:
        raise DataError(f"{path} has no 'data' and {label_key!r} entries; is it a CIFAR python batch file?")
    data, labels = np.asarray(batch["data"]), np.asarray(batch[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DataError(
            f"{path}: expected 'data' uint8 (N, 3072) and N labels, got {data.dtype} {data.shape} "
            f"and {len(labels)} labels"
        )
    return data.reshape(-1, 3, 32, 32), labels


def _load_partial(key: str, root: Path) -> tuple[Split, Split, int, str]:
    folder, train_files, test_files, label_key, num_classes = _PARTIAL[key]
    base = root if root.name == folder else root / folder
    missing = [f for f in train_files + test_files if not (base / f).is_file()]
    if missing:
        raise DataError(
            f"{key}: {', '.join(missing)} not found in {base}; point --data-root at the folder that "
            f"contains {folder}/ (the project ships it in shared/data)"
        )

    def read(files: list[str]) -> Split:
        parts = [_read_cifar_pickle(base / f, label_key) for f in files]
        x = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
        if y.min() < 0 or y.max() >= num_classes:
            raise DataError(f"{key}: labels outside 0..{num_classes - 1} in {base}")
        return Split(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y))

    train, test = read(train_files), read(test_files)
    full = "CIFAR-10" if num_classes == 10 else "CIFAR-100"
    note = (
        f"{key}: only the {len(train)} training and {len(test)} test images recovered from the official "
        f"{full} files (of 50000 / 10000), in official order; results are not comparable with "
        "full-test-set numbers"
    )
    return train, test, num_classes, note


# ---------------------------------------------------------------- user arrays in an .npz file


def _load_npz(
    path: Path, gen: torch.Generator, limits: ExpansionLimits | None, name: str | None,
    whole_is_test: bool = False,
) -> tuple[Split, Split, int, str]:
    summary = check_npz(path, limits, name)  # everything validated before a whole array is read
    label = name or path.name
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("x", "y", "x_test", "y_test") if k in z.files}
    except Exception as exc:
        raise DataError(f"{label} is not a readable .npz file: {type(exc).__name__}") from None
    train = Split(_images(arrays["x"]), _labels(arrays["y"]))
    if summary.n_test:
        test = Split(_images(arrays["x_test"]), _labels(arrays["y_test"]))
        note = f"npz {label}: given train and test arrays"
    elif whole_is_test:
        test = train
        note = f"npz {label}: no x_test, so every image of x ({len(test)}) is evaluated"
    else:
        n_test = len(train) // 5
        train, test = _split_off(train, n_test, gen)
        note = f"npz {label}: no x_test, so a seeded 20% of x ({n_test} images) is the test split"
    return train, test, summary.num_classes, note


def _images(a: np.ndarray) -> Tensor:
    """uint8 NHWC or float NCHW in [0, 1] (as ``check_npz`` validated) -> uint8 NCHW tensor."""
    if a.dtype == np.uint8:
        return _nhwc_to_tensor(a)
    return torch.from_numpy(np.rint(a.astype(np.float32) * 255.0).astype(np.uint8))


def _labels(a: np.ndarray) -> Tensor:
    """Labels ``check_npz`` found in [0, C) with C <= MAX_CLASSES, so int64 holds them exactly."""
    return torch.from_numpy(a.astype(np.int64))


# ---------------------------------------------------------------- augmentation and batches


def _draw(generator: torch.Generator | None, fn: Any, *args: Any, device: torch.device, **kw: Any) -> Tensor:
    """Draw on the generator's device (as torch requires), then move to where the data is."""
    gen_device = generator.device if generator is not None else device
    return fn(*args, generator=generator, device=gen_device, **kw).to(device)


def augment_batch(x: Tensor, generator: torch.Generator | None, *, padding: int = 4) -> Tensor:
    """RandomCrop(size, padding, zero fill) + RandomHorizontalFlip(0.5) for a whole batch at once.

    Offsets and flips are drawn from ``generator`` in that order (rows, columns, flips); the crop is
    one gather over the padded batch, so it runs on the batch's device with no per-image loop.
    """
    n, _, h, w = x.shape
    dev = x.device
    top = _draw(generator, torch.randint, 0, 2 * padding + 1, (n,), device=dev)
    left = _draw(generator, torch.randint, 0, 2 * padding + 1, (n,), device=dev)
    flip = _draw(generator, torch.rand, n, device=dev) < 0.5
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = top[:, None] + torch.arange(h, device=dev)
    cols = torch.arange(w, device=dev).expand(n, w)
    cols = torch.where(flip[:, None], w - 1 - cols, cols) + left[:, None]
    batch = torch.arange(n, device=dev)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def iterate_batches(
    split: Split,
    batch_size: int,
    *,
    shuffle: bool,
    augment: bool,
    generator: torch.Generator | None,
    device: str | torch.device,
    drop_last: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (float32 images in [0, 1], int64 labels) on ``device``; uint8 travels, floats are made there."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    device = torch.device(device)
    n = len(split)
    order = _draw(generator, torch.randperm, n, device=split.x.device) if shuffle else None
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        if drop_last and stop - start < batch_size:
            break
        if order is None:
            xb, yb = split.x[start:stop], split.y[start:stop]
        else:
            idx = order[start:stop]
            xb, yb = split.x[idx], split.y[idx]
        xb = xb.to(device, non_blocking=True).to(torch.float32).div_(255.0)
        yb = yb.to(device, non_blocking=True).to(torch.int64)
        if augment:
            xb = augment_batch(xb, generator)
        yield xb, yb
