"""Teacher loading: every format round-trips, bad files fail with a fixable message, and no file runs code."""

from __future__ import annotations

import io
import json
import pickle
import random
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from core.errors import ConfigError, ModelLoadError
from core.models import KNOWN_CHECKPOINTS, create_model
from core.teachers import Normalized, load_model_file, parse_normalize, probe_model


def _write_marker(path: str) -> None:
    """What a malicious checkpoint would run while being unpickled."""
    Path(path).write_text("pwned")


class _CodeCarrier:
    """Unpickling this object calls ``_write_marker`` (pickle's documented way to run code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (_write_marker, (self.marker,))


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    torch.manual_seed(0)
    model = create_model("tiny_cnn", 10)
    with torch.no_grad():  # non-trivial BN statistics, so a wrong buffer would show
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def pt2_file(tiny: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("export") / "tiny.pt2"
    batch = torch.export.Dim("batch")
    program = torch.export.export(tiny, (torch.rand(2, 3, 32, 32),), dynamic_shapes=({0: batch},))
    torch.export.save(program, path)
    return path


def _assert_same_outputs(loaded: nn.Module, reference: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), reference(x))


def _assert_frozen_teacher(loaded) -> None:
    assert not loaded.model.training
    assert all(not p.requires_grad for p in loaded.model.parameters())


# ---------------------------------------------------------------- formats round-trip


def test_state_dict_round_trip(tiny, x, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(tiny.state_dict(), path)
    loaded = load_model_file(path, arch="tiny_cnn", num_classes=10)
    assert loaded.format == "state_dict" and loaded.arch == "tiny_cnn" and loaded.num_classes == 10
    assert loaded.num_params == sum(p.numel() for p in tiny.parameters())
    assert loaded.probe["output_shape"] == [2, 10] and loaded.probe["finite"] is True
    _assert_frozen_teacher(loaded)
    _assert_same_outputs(loaded.model, tiny, x)


def test_safetensors_round_trip(tiny, x, tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_file(tiny.state_dict(), str(path))
    loaded = load_model_file(path, arch="tiny_cnn", num_classes=10)
    assert loaded.format == "safetensors"
    _assert_same_outputs(loaded.model, tiny, x)


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_round_trip(tiny, x, tmp_path, how):
    path = tmp_path / f"tiny_{how}.pt"  # .pt on purpose: the content decides, not the extension
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(tiny) if how == "script" else torch.jit.trace(tiny, x[:2])
    scripted.save(str(path))
    loaded = load_model_file(path, num_classes=10)
    assert loaded.format == "torchscript" and loaded.arch is None
    _assert_frozen_teacher(loaded)
    _assert_same_outputs(loaded.model, tiny, x)


def test_export_round_trip(tiny, x, pt2_file):
    loaded = load_model_file(pt2_file)
    assert loaded.format == "export" and loaded.num_classes == 10
    loaded.model.eval()  # ExportedProgram.module() alone refuses eval(); the wrapper must not
    loaded.model.train()
    _assert_same_outputs(loaded.model, tiny, x)


def test_export_with_fixed_batch_is_refused_with_a_hint(tiny, tmp_path):
    path = tmp_path / "fixed.pt2"
    torch.export.save(torch.export.export(tiny, (torch.rand(2, 3, 32, 32),)), path)
    with pytest.raises(ModelLoadError, match="dynamic batch dimension"):
        load_model_file(path)


def test_num_classes_is_inferred_from_the_head(tiny, tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(tiny.state_dict(), path)
    assert load_model_file(path, arch="tiny_cnn").num_classes == 10


def test_normalisation_is_applied_before_the_model(tiny, x, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(tiny.state_dict(), path)
    loaded = load_model_file(path, arch="tiny_cnn", normalize="cifar10")
    mean, std = parse_normalize("cifar10")
    assert loaded.normalize == (mean, std)
    assert isinstance(loaded.model, Normalized)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), tiny((x - m) / s))


# ---------------------------------------------------------------- checkpoint containers


def _containers(sd: dict) -> dict[str, object]:
    prefixed = {f"module.{k}": v for k, v in sd.items()}
    trades = {**sd, "sub_block1.layer.0.conv1.weight": torch.zeros(3, 3, 3, 3)}
    return {
        "module_prefix": prefixed,
        "nested_list": {"state_dict": [sd, sd], "err": 0.5, "epoch": 3},
        "under_model": {"model": prefixed, "epoch": 1},
        "under_net": {"net": sd},
        "model_state_dict": {"model_state_dict": sd, "optimizer": {"lr": 0.1}},
        "tuple_cascade": (sd, sd),
        "trades_sub_block": trades,
    }


@pytest.mark.parametrize("kind", list(_containers({})))
def test_state_dict_containers(tiny, x, tmp_path, kind):
    path = tmp_path / f"{kind}.pth"
    torch.save(_containers(tiny.state_dict())[kind], path)
    loaded = load_model_file(path, arch="tiny_cnn", num_classes=10)
    _assert_same_outputs(loaded.model, tiny, x)


def test_legacy_non_zip_format_loads(tiny, x, tmp_path):
    path = tmp_path / "legacy.pth"
    torch.save({"state_dict": [tiny.state_dict()]}, path, _use_new_zipfile_serialization=False)
    loaded = load_model_file(path, arch="tiny_cnn")
    _assert_same_outputs(loaded.model, tiny, x)


def test_container_without_tensors_names_its_keys(tmp_path):
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "acc": 0.5}, path)
    with pytest.raises(ModelLoadError, match="no state dict found.*'epoch'"):
        load_model_file(path, arch="tiny_cnn")


# ---------------------------------------------------------------- mismatches


def test_head_mismatch_names_both_class_counts(tiny, tmp_path):
    path = tmp_path / "tiny10.pt"
    torch.save(tiny.state_dict(), path)
    with pytest.raises(ModelLoadError, match="checkpoint has 10 output classes but the dataset has 100"):
        load_model_file(path, arch="tiny_cnn", num_classes=100)


def test_wrong_arch_names_the_keys(tiny, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(tiny.state_dict(), path)
    with pytest.raises(ModelLoadError) as info:
        load_model_file(path, arch="cnn_a", num_classes=10)
    message = str(info.value)
    assert "does not fit architecture 'cnn_a'" in message
    assert "missing keys 0.weight" in message and "unexpected keys conv1.weight" in message


def test_state_dict_needs_an_arch(tiny, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(tiny.state_dict(), path)
    with pytest.raises(ModelLoadError, match="architecture.*known:.*tiny_cnn"):
        load_model_file(path)
    with pytest.raises(ModelLoadError, match="no_such_net.*tiny_cnn"):
        load_model_file(path, arch="no_such_net")


def test_scripted_model_with_other_class_count(tiny, tmp_path):
    path = tmp_path / "s.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(tiny).save(str(path))
    with pytest.raises(ModelLoadError, match=r"outputs \(2, 10\) but the dataset has 100 classes"):
        load_model_file(path, num_classes=100)


def test_unknown_format_name(tiny, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(tiny.state_dict(), path)
    with pytest.raises(ConfigError, match="unknown model format"):
        load_model_file(path, arch="tiny_cnn", fmt="onnx")


# ---------------------------------------------------------------- files that must not run or load


def _carrier_files(marker: Path, tmp_path: Path) -> dict[str, Path]:
    obj = {"state_dict": _CodeCarrier(marker)}
    files = {"zip": tmp_path / "zip.pt", "legacy": tmp_path / "legacy.pth", "pickle": tmp_path / "raw.pkl"}
    torch.save(obj, files["zip"])
    torch.save(obj, files["legacy"], _use_new_zipfile_serialization=False)
    with files["pickle"].open("wb") as f:
        pickle.dump(obj, f, protocol=2)
    return files


@pytest.mark.parametrize("kind", ["zip", "legacy", "pickle"])
@pytest.mark.parametrize("fmt", ["auto", "state_dict"])
def test_code_carrying_pickle_is_refused_and_never_runs(tmp_path, kind, fmt):
    marker = tmp_path / "marker.txt"
    path = _carrier_files(marker, tmp_path)[kind]
    with pytest.raises(ModelLoadError, match="refused: the file contains pickled Python objects"):
        load_model_file(path, arch="tiny_cnn", fmt=fmt)
    assert not marker.exists()
    # Control: the payload is live; an unsafe load would have run it.
    with path.open("rb") as f:
        if kind == "pickle":
            pickle.load(f)
        else:
            torch.load(f, weights_only=False)
    assert marker.read_text() == "pwned"


def _rewrite_pt2(src: Path, dst: Path, edits: dict[str, Callable[[bytes], bytes]]) -> None:
    """Copy a .pt2 archive, replacing some records (named without the archive's top folder)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            record = info.filename.split("/", 1)[1]
            zout.writestr(info.filename, edits[record](data) if record in edits else data)


def _edit_program(change: Callable[[dict], None]) -> Callable[[bytes], bytes]:
    def edit(data: bytes) -> bytes:
        doc = json.loads(data)
        change(doc)
        return json.dumps(doc).encode()

    return edit


def test_export_archive_with_pickled_sample_inputs_is_refused(pt2_file, tmp_path):
    marker = tmp_path / "marker.txt"
    buf = io.BytesIO()
    torch.save((_CodeCarrier(marker),), buf)
    evil = tmp_path / "evil.pt2"
    _rewrite_pt2(pt2_file, evil, {"data/sample_inputs/model.pt": lambda _: buf.getvalue()})
    with pytest.raises(ModelLoadError, match="refused"):
        load_model_file(evil)
    assert not marker.exists()
    with pytest.raises(Exception):  # noqa: B017 - control: torch's own loader falls back to full unpickling
        torch.export.load(evil)
    assert marker.exists()


def test_export_archive_with_guard_code_is_refused(pt2_file, tmp_path):
    marker = tmp_path / "marker.txt"
    guard = f"__import__('pathlib').Path({str(marker)!r}).touch() is None"
    evil = tmp_path / "guards.pt2"
    _rewrite_pt2(
        pt2_file, evil, {"models/model.json": _edit_program(lambda d: d.update(guards_code=[guard]))}
    )
    with pytest.raises(ModelLoadError, match="guard code"):
        load_model_file(evil)
    assert not marker.exists()
    torch.export.load(evil).module()(torch.rand(2, 3, 32, 32))  # control: torch would run it
    assert marker.exists()


def test_export_archive_calling_a_non_aten_function_is_refused(pt2_file, tmp_path):
    def change(doc: dict) -> None:
        doc["graph_module"]["graph"]["nodes"][0]["target"] = "torch.save"

    evil = tmp_path / "odd.pt2"
    _rewrite_pt2(pt2_file, evil, {"models/model.json": _edit_program(change)})
    with pytest.raises(ModelLoadError, match="not a standard ATen operator"):
        load_model_file(evil)


def test_export_archive_with_code_in_a_symbolic_size_is_refused(pt2_file, tmp_path):
    marker = tmp_path / "marker.txt"
    expr = f"__import__('pathlib').Path({str(marker)!r}).touch() or Symbol('s77', integer=True)"

    def change(doc: dict) -> None:
        doc["graph_module"]["graph"]["tensor_values"]["x"]["sizes"][0]["as_expr"]["expr_str"] = expr

    evil = tmp_path / "sym.pt2"
    _rewrite_pt2(pt2_file, evil, {"models/model.json": _edit_program(change)})
    with pytest.raises(ModelLoadError, match="not plain arithmetic"):
        load_model_file(evil)
    assert not marker.exists()
    try:  # control: torch parses sizes with sympy.sympify, an eval
        torch.export.load(evil)
    except Exception:
        pass
    assert marker.exists()


def test_rewritten_but_unchanged_archive_still_loads(pt2_file, tmp_path):
    copy = tmp_path / "copy.pt2"
    _rewrite_pt2(pt2_file, copy, {})
    assert load_model_file(copy).num_classes == 10


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("random.pt", random.Random(0).randbytes(2048)),
        ("random.bin", b"\x80" + random.Random(1).randbytes(2048)),
        ("notes.txt", b"these are not weights\n"),
        ("notes.pt", b"these are not weights\n"),
        ("empty.pth", b""),
    ],
)
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_non_model_files_are_rejected(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ModelLoadError):
        load_model_file(path, arch="tiny_cnn")


def test_zip_that_is_not_a_model_is_rejected(tmp_path):
    path = tmp_path / "data.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(ModelLoadError):
        load_model_file(path, arch="tiny_cnn")


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model_file(tmp_path / "nope.pt", arch="tiny_cnn")


# ---------------------------------------------------------------- third-party checkpoints


REAL = {
    "abcrown_cifar10_resnet4b_adv2px.pth": "abcrown_resnet4b",
    "abcrown_sdp_cifar_cnn_a_adv.model": "cnn_a",
    "abcrown_oval_cifar_wide_kw.pth": "cnn_a",
    "convex_adversarial_cifar_small_8px.pth": "cnn_a",
}


@pytest.mark.parametrize(("filename", "arch"), sorted(REAL.items()))
def test_real_checkpoints_load(shared_dir, filename, arch):
    path = shared_dir / "weights" / filename
    if not path.exists():
        pytest.skip(f"{path} is absent")
    known = KNOWN_CHECKPOINTS[filename]
    loaded = load_model_file(path, arch=arch, num_classes=10, normalize=(known.mean, known.std))
    assert loaded.format == "state_dict" and loaded.probe["output_shape"] == [2, 10]
    _assert_frozen_teacher(loaded)


def test_real_checkpoint_is_accurate_on_real_images(shared_dir):
    """End to end: the right weights, key mapping and normalisation give the published accuracy."""
    from core.data import load_dataset

    path = shared_dir / "weights" / "abcrown_cifar10_resnet4b_adv2px.pth"
    if not path.exists() or not (shared_dir / "data" / "cifar-10-batches-py-partial").exists():
        pytest.skip("shared weights or data absent")
    loaded = load_model_file(path, arch="abcrown_resnet4b", num_classes=10, normalize="cifar10")
    test = load_dataset("cifar10-partial", shared_dir / "data", val_size=0).test
    with torch.no_grad():
        pred = loaded.model(test.x.float() / 255).argmax(1)
    accuracy = (pred == test.y).float().mean().item()
    assert 0.75 < accuracy < 0.80  # SOURCES.md: 77.29% on these 1017 images


# ---------------------------------------------------------------- wrapper, parser, probe


def test_normalized_math():
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    wrapped = Normalized(nn.Identity(), mean, std)
    x = torch.rand(2, 3, 4, 4)
    expected = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(wrapped(x), expected)
    assert list(wrapped.parameters()) == []


def test_parse_normalize():
    assert parse_normalize("0.4914,0.4822,0.4465;0.2471,0.2435,0.2616") == (
        (0.4914, 0.4822, 0.4465),
        (0.2471, 0.2435, 0.2616),
    )
    assert parse_normalize("CIFAR100")[0] == (0.5071, 0.4865, 0.4409)
    for bad in ["", "imagenet", "0.5,0.5;0.5", "a,b,c;d,e,f", "0.5;0", "0.5;0.5;0.5"]:
        with pytest.raises(ConfigError):
            parse_normalize(bad)


class _Returns(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], object]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> object:
        return self.fn(x)


def test_probe_reports_and_checks():
    probe = probe_model(create_model("tiny_cnn", 10), 10)
    assert probe["output_shape"] == [2, 10] and probe["finite"] and probe["seconds"] >= 0
    with pytest.raises(ModelLoadError, match="dataset has 100 classes"):
        probe_model(create_model("tiny_cnn", 10), 100)
    with pytest.raises(ModelLoadError, match="failed on a"):
        probe_model(create_model("cnn_a", 10), 10, input_shape=(3, 28, 28))
    with pytest.raises(ModelLoadError, match="not finite"):
        probe_model(_Returns(lambda x: torch.full((x.shape[0], 10), float("nan"))), 10)
    with pytest.raises(ModelLoadError, match="not a tensor"):
        probe_model(_Returns(lambda x: (x.sum(), x)), 10)
