"""Datasets: the real partial CIFAR files, user .npz arrays, the validation split, augmentation, batches."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.data import DatasetBundle, Split, augment_batch, iterate_batches, load_dataset
from core.errors import ConfigError, DataError

C10_TRAIN_FIRST = [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
C10_TEST_FIRST = [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]


@pytest.fixture(scope="module")
def c10(shared_dir: Path) -> DatasetBundle:
    if not (shared_dir / "data" / "cifar-10-batches-py-partial").is_dir():
        pytest.skip("partial CIFAR-10 absent")
    return load_dataset("cifar10-partial", shared_dir / "data", val_size=0)


# ---------------------------------------------------------------- the real partial CIFAR files


def test_partial_cifar10_matches_sources(c10):
    assert c10.num_classes == 10 and c10.name == "cifar10-partial"
    assert len(c10.train) == 5438 and len(c10.test) == 1017 and len(c10.val) == 0
    assert c10.train.x.dtype == torch.uint8 and c10.train.x.shape[1:] == (3, 32, 32)
    assert c10.train.y.dtype == torch.int64
    assert c10.train.y[:10].tolist() == C10_TRAIN_FIRST
    assert c10.test.y[:10].tolist() == C10_TEST_FIRST
    assert set(c10.test.y.tolist()) == set(range(10))
    assert c10.image_shape == (3, 32, 32)
    assert "5438" in c10.note and "not comparable" in c10.note


def test_partial_cifar10_labels_match_the_full_label_file(shared_dir, c10):
    labels = np.load(shared_dir / "data" / "cifar10_full_labels.npz")
    sizes = [1102, 1017, 1017, 1285, 1017]
    expected = np.concatenate([labels[f"data_batch_{i + 1}"][:n] for i, n in enumerate(sizes)])
    assert c10.train.y.tolist() == expected.tolist()
    assert c10.test.y.tolist() == labels["test_batch"][:1017].tolist()


def test_partial_cifar10_default_val_split_and_folder_root(shared_dir):
    folder = shared_dir / "data" / "cifar-10-batches-py-partial"
    if not folder.is_dir():
        pytest.skip("partial CIFAR-10 absent")
    bundle = load_dataset("cifar10_partial", folder)  # the folder itself also works
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (4438, 1000, 1017)


def test_partial_cifar100(shared_dir):
    if not (shared_dir / "data" / "cifar-100-python-partial").is_dir():
        pytest.skip("partial CIFAR-100 absent")
    bundle = load_dataset("cifar100-partial", shared_dir / "data", val_size=100)
    assert bundle.num_classes == 100
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (1017, 100, 916)
    assert int(bundle.test.y.max()) < 100


def test_partial_missing_folder(tmp_path):
    with pytest.raises(DataError, match="data_batch_1.*not found in"):
        load_dataset("cifar10-partial", tmp_path)


def test_partial_reader_refuses_code(tmp_path):
    folder = tmp_path / "cifar-100-python-partial"
    folder.mkdir()
    for name in ("train", "test"):
        with (folder / name).open("wb") as f:
            pickle.dump({"data": Path("x"), "fine_labels": [0]}, f)  # a non-numpy global
    with pytest.raises(DataError, match="refusing global"):
        load_dataset("cifar100-partial", tmp_path, val_size=0)


# ---------------------------------------------------------------- torchvision CIFAR


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_missing_torchvision_cifar_says_how_to_fix(tmp_path, name):
    with pytest.raises(DataError) as info:
        load_dataset(name, tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "--download" in message


def test_unknown_dataset_and_bad_sizes(tmp_path):
    with pytest.raises(ConfigError, match="unknown dataset"):
        load_dataset("mnist", tmp_path)
    with pytest.raises(ConfigError, match="val_size"):
        load_dataset("npz", tmp_path / "a.npz", val_size=-1)


# ---------------------------------------------------------------- npz


def _npz(tmp_path: Path, name: str = "d.npz", **arrays) -> Path:
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def test_npz_uint8_nhwc_with_test_arrays(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (50, 8, 8, 3), dtype=np.uint8)
    y = np.arange(50) % 4
    xt = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    yt = np.arange(10) % 4
    bundle = load_dataset("npz", _npz(tmp_path, x=x, y=y, x_test=xt, y_test=yt), val_size=10)
    assert bundle.num_classes == 4
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (40, 10, 10)
    assert bundle.test.x.shape == (10, 3, 8, 8)
    assert torch.equal(bundle.test.x, torch.from_numpy(xt).permute(0, 3, 1, 2))
    # every training image keeps its own label through the split
    originals = {bytes(x[i].transpose(2, 0, 1)): int(y[i]) for i in range(50)}
    for split in (bundle.train, bundle.val):
        for img, label in zip(split.x, split.y, strict=True):
            assert originals[bytes(img.numpy())] == int(label)


def test_npz_float_nchw_and_carved_test(tmp_path):
    x = np.random.default_rng(1).integers(0, 256, (40, 1, 8, 8)).astype(np.float32) / 255
    y = np.arange(40) % 3
    bundle = load_dataset("npz", _npz(tmp_path, x=x, y=y, num_classes=np.array(5)), val_size=4)
    assert bundle.num_classes == 5
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (28, 4, 8)
    everything = torch.cat([bundle.train.x, bundle.val.x, bundle.test.x]).float() / 255
    assert torch.allclose(everything.sum(0), torch.from_numpy(x).sum(0), atol=1e-4)
    assert "20%" in bundle.note


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((4, 8, 8, 3), np.int64), "y": np.zeros(4, int)}, "dtype int64"),
        ({"x": np.zeros(12, np.uint8), "y": np.zeros(12, int)}, "4-D"),
        ({"x": np.zeros((4, 3, 8, 8), np.uint8), "y": np.zeros(4, int)}, "C = 1 or 3 last"),
        ({"x": np.full((4, 3, 8, 8), 2.0, np.float32), "y": np.zeros(4, int)}, r"\[0, 1\]"),
        ({"x": np.zeros((4, 8, 8, 3), np.uint8), "y": np.array([0, 1, 2, 7]), "num_classes": np.array(5)},
         "found label 7 but num_classes is 5"),
        ({"x": np.zeros((4, 8, 8, 3), np.uint8), "y": np.array([0, 1, -1, 1])}, "negative label"),
        ({"x": np.zeros((4, 8, 8, 3), np.uint8), "y": np.zeros(3, int)}, "3 labels but there are 4"),
        ({"x": np.zeros((4, 8, 8, 3), np.uint8), "y": np.zeros(4, np.float32)}, "integers"),
        ({"x": np.zeros((4, 8, 8, 3), np.uint8), "y": np.zeros(4, int)}, "at least 2 classes"),
        ({"x": np.zeros((4, 8, 8, 3), np.uint8)}, "no array 'y'"),
        ({"x": np.zeros((4, 8, 8, 3), np.uint8), "y": np.arange(4) % 2, "x_test": np.zeros((2, 8, 8, 3))},
         "x_test and y_test"),
    ],
)  # fmt: skip
def test_bad_npz_says_what_is_wrong(tmp_path, arrays, message):
    with pytest.raises(DataError, match=message):
        load_dataset("npz", _npz(tmp_path, **arrays), val_size=1)


def test_npz_with_objects_or_not_a_file(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, x=np.array([{"a": 1}], dtype=object), y=np.zeros(1, int))
    with pytest.raises(DataError, match="unpickling"):
        load_dataset("npz", path)
    with pytest.raises(DataError, match="not a file"):
        load_dataset("npz", tmp_path / "missing.npz")
    (tmp_path / "text.npz").write_text("nope")
    with pytest.raises(DataError, match="not an .npz file"):
        load_dataset("npz", tmp_path / "text.npz")


# ---------------------------------------------------------------- validation split


def _labelled_npz(tmp_path: Path, n: int = 60) -> Path:
    x = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1).repeat(8, 1).repeat(8, 2)  # image i is all i
    return _npz(tmp_path, x=x, y=np.arange(n) % 2, x_test=x[:2], y_test=np.array([0, 1]))


def _ids(split: Split) -> list[int]:
    return split.x[:, 0, 0, 0].tolist()


def test_val_split_is_deterministic_disjoint_and_seeded(tmp_path):
    path = _labelled_npz(tmp_path)
    a = load_dataset("npz", path, val_size=10, seed=3)
    b = load_dataset("npz", path, val_size=10, seed=3)
    c = load_dataset("npz", path, val_size=10, seed=4)
    assert _ids(a.val) == _ids(b.val) and _ids(a.train) == _ids(b.train)
    assert _ids(a.val) != _ids(c.val)
    assert not set(_ids(a.val)) & set(_ids(a.train))
    assert sorted(_ids(a.val) + _ids(a.train)) == list(range(60))
    assert _ids(a.train) == sorted(_ids(a.train))  # original order kept


def test_train_subset_is_deterministic_and_bounded(tmp_path):
    path = _labelled_npz(tmp_path)
    a = load_dataset("npz", path, val_size=10, train_subset=20)
    b = load_dataset("npz", path, val_size=10, train_subset=20)
    full = load_dataset("npz", path, val_size=10)
    assert len(a.train) == 20 and _ids(a.train) == _ids(b.train)
    assert _ids(a.val) == _ids(full.val)
    assert set(_ids(a.train)) <= set(_ids(full.train))
    with pytest.raises(DataError, match="train_subset 51"):
        load_dataset("npz", path, val_size=10, train_subset=51)


def test_val_size_too_large(tmp_path):
    with pytest.raises(DataError, match="val_size 60 leaves no training images"):
        load_dataset("npz", _labelled_npz(tmp_path), val_size=60)


# ---------------------------------------------------------------- augmentation


def _reference_augment(x: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """torchvision's RandomCrop(padding) + RandomHorizontalFlip, image by image, with the same draws."""
    n, _, h, w = x.shape
    top = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    out = []
    for i in range(n):
        padded = F.pad(x[i], (padding,) * 4)
        crop = padded[:, top[i] : top[i] + h, left[i] : left[i] + w]
        out.append(crop.flip(-1) if flip[i] else crop)
    return torch.stack(out)


def test_augment_matches_a_per_image_reference():
    x = torch.rand(16, 3, 32, 32)
    got = augment_batch(x, torch.Generator().manual_seed(5))
    expected = _reference_augment(x, torch.Generator().manual_seed(5))
    assert torch.equal(got, expected)


def test_augment_hand_computed_small_example():
    x = torch.arange(1 * 1 * 3 * 3, dtype=torch.float32).view(1, 1, 3, 3) + 1
    gen = torch.Generator().manual_seed(0)
    top, left = torch.randint(0, 3, (1,), generator=gen), torch.randint(0, 3, (1,), generator=gen)
    flip = torch.rand(1, generator=gen) < 0.5
    padded = torch.zeros(5, 5)
    padded[1:4, 1:4] = x[0, 0]
    crop = padded[top : top + 3, left : left + 3]
    expected = crop.flip(-1) if flip else crop
    got = augment_batch(x, torch.Generator().manual_seed(0), padding=1)
    assert torch.equal(got[0, 0], expected)


def test_augment_keeps_shape_range_and_is_seeded():
    x = torch.rand(64, 3, 32, 32)
    a = augment_batch(x, torch.Generator().manual_seed(1))
    b = augment_batch(x, torch.Generator().manual_seed(1))
    c = augment_batch(x, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and a.dtype == x.dtype and a.is_contiguous()
    assert 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------- batches


def _split(n: int = 10) -> Split:
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 32, 32).contiguous()
    return Split(x, torch.arange(n) % 3)


def test_iterate_in_order_and_scaled():
    batches = list(iterate_batches(_split(), 4, shuffle=False, augment=False, generator=None, device="cpu"))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    xb, yb = batches[0]
    assert xb.dtype == torch.float32 and yb.dtype == torch.int64
    assert torch.equal(xb[:, 0, 0, 0] * 255, torch.arange(4, dtype=torch.float32))
    dropped = list(
        iterate_batches(
            _split(), 4, shuffle=False, augment=False, generator=None, device="cpu", drop_last=True
        )
    )
    assert [len(y) for _, y in dropped] == [4, 4]


def test_iterate_shuffled_is_a_seeded_permutation():
    def run(seed: int) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return [
            x
            for x, _ in iterate_batches(_split(), 3, shuffle=True, augment=True, generator=gen, device="cpu")
        ]

    a, b, c = run(7), run(7), run(8)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a, c, strict=True))
    split = _split()
    gen = torch.Generator().manual_seed(7)
    seen = []
    for xb, yb in iterate_batches(split, 3, shuffle=True, augment=False, generator=gen, device="cpu"):
        ids = (xb[:, 0, 16, 16] * 255).round().long()
        assert torch.equal(split.y[ids], yb)  # labels travel with their images
        seen += ids.tolist()
    assert sorted(seen) == list(range(10)) and seen != list(range(10))


def test_split_to_and_bad_batch_size():
    split = _split().to("cpu")
    assert len(split) == 10
    with pytest.raises(ConfigError, match="batch_size"):
        next(iterate_batches(split, 0, shuffle=False, augment=False, generator=None, device="cpu"))
