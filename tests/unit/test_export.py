"""Exported students (core.export): every format loads with plain torch / onnxruntime in a process that
imports no project module and matches the state dict; failures are recorded, not raised; exported files
evaluate to the same accuracies as the state dict; ONNX refuses gradient attacks with a clear message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from core import export as export_module
from core.cli import main
from core.errors import ConfigError
from core.export import FORMATS, export_student, student_metadata
from core.models import create_model
from core.pipeline import run_evaluation
from core.teachers import load_model_file

# tiny_cnn has BatchNorm, conv_small is plain conv + linear, abcrown_resnet2b has residual blocks.
ARCHS = ("tiny_cnn", "conv_small", "abcrown_resnet2b")
N_IMAGES = 6  # a batch size other than the exporters' example batch of 2

PLAIN_LOADER = textwrap.dedent("""
    import json, sys
    import onnxruntime as ort
    import torch
    from safetensors import safe_open

    results = {}
    for case in json.load(open(sys.argv[1])):
        x = torch.load(case["images"], weights_only=True)
        reference = torch.load(case["reference"], weights_only=True)
        state = torch.load(case["state_dict"], weights_only=True)
        runs = {
            "torchscript": torch.jit.load(case["torchscript"]).eval(),
            "export": torch.export.load(case["export"]).module(),
        }
        session = ort.InferenceSession(case["onnx"], providers=["CPUExecutionProvider"])
        runs["onnx"] = lambda t: torch.from_numpy(session.run(None, {"images": t.numpy()})[0])
        diffs, one = {}, {}
        with torch.no_grad():
            for name, run in runs.items():
                diffs[name] = float((run(x) - reference).abs().max())
                one[name] = float((run(x[:1]) - reference[:1]).abs().max())
        with safe_open(case["safetensors"], framework="pt") as f:
            meta = f.metadata()
            same = sorted(f.keys()) == sorted(state)
            same = same and all(torch.equal(f.get_tensor(k), state[k]) for k in state)
        results[case["arch"]] = {"diffs": diffs, "batch_of_one": one, "metadata": meta, "weights_equal": same}
    results["core_imported"] = any(m == "core" or m.startswith("core.") for m in sys.modules)
    print(json.dumps(results))
""")


def _student(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(arch, 10).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each architecture exported once into its own folder, with its images and reference logits."""
    root = tmp_path_factory.mktemp("exports")
    cases = []
    for arch in ARCHS:
        model = _student(arch)
        images = torch.rand(N_IMAGES, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        labels = torch.arange(N_IMAGES) % 10
        folder = root / arch
        meta = student_metadata(arch, 10, eps=8 / 255, method="rslad", job_id="job-1",
                                teacher_sha256="ab" * 32)
        records = export_student(model, folder, "student_best", metadata=meta, images=images, labels=labels)
        with torch.no_grad():
            reference = model(images)
        torch.save(images, folder / "images.pt")
        torch.save(reference, folder / "reference.pt")
        torch.save(model.state_dict(), folder / "state_dict.pt")
        cases.append({"arch": arch, "records": records, "meta": meta, "folder": folder, "model": model})
    return cases


def test_every_format_round_trips_with_plain_libraries(exported, tmp_path):
    for case in exported:
        records = {r["format"]: r for r in case["records"]}
        assert list(records) == list(FORMATS)
        for fmt, r in records.items():
            assert r["ok"], (case["arch"], fmt, r["error"])
            assert r["error"] is None and r["max_abs_diff"] <= r["tolerance"] == 1e-4
            assert r["clean_accuracy"] == r["reference_clean_accuracy"] and r["n"] == N_IMAGES
            path = case["folder"] / r["file"]
            assert r["bytes"] == path.stat().st_size
            assert r["sha256"] == export_module.sha256_file(path)
            assert r["dynamic_batch"] is True
        assert not [p.name for p in case["folder"].iterdir() if p.name.startswith(".")]  # no partial files
    listing = [{
        "arch": case["arch"],
        **{fmt: str(case["folder"] / export_module.export_file_name("student_best", fmt)) for fmt in FORMATS},
        **{k: str(case["folder"] / f"{k}.pt") for k in ("images", "reference", "state_dict")},
    } for case in exported]
    (tmp_path / "cases.json").write_text(json.dumps(listing))
    (tmp_path / "plain_loader.py").write_text(PLAIN_LOADER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "plain_loader.py", "cases.json"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results.pop("core_imported") is False
    for case in exported:
        got = results[case["arch"]]
        for fmt in ("torchscript", "export", "onnx"):
            assert got["diffs"][fmt] <= 1e-4, (case["arch"], fmt, got)
            assert got["batch_of_one"][fmt] <= 1e-4, (case["arch"], fmt, got)
        assert got["weights_equal"] is True
        assert got["metadata"] == case["meta"]
        assert got["metadata"]["architecture"] == case["arch"] and got["metadata"]["input_range"] == "[0, 1]"


def test_the_project_loader_reads_every_exported_format(exported):
    case = exported[0]
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        expected = case["model"](x)
    for fmt in FORMATS:
        path = case["folder"] / export_module.export_file_name("student_best", fmt)
        loaded = load_model_file(path, num_classes=10, allow_onnx=True)  # no arch: the metadata names it
        assert loaded.format == fmt
        params = sum(p.numel() for p in case["model"].parameters())
        # ONNX counts its initializers, with BatchNorm folded into the convolutions.
        assert loaded.num_params == params if fmt != "onnx" else 0 < loaded.num_params <= params
        with torch.no_grad():
            assert float((loaded.model(x) - expected).abs().max()) <= 1e-4
    with pytest.raises(ConfigError, match="unknown model format 'onnx'"):  # never a teacher upload format
        load_model_file(case["folder"] / "student_best.onnx", fmt="onnx")


def test_a_format_that_fails_is_recorded_not_raised(tmp_path, monkeypatch):
    def broken_exporter(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::frobnicate' to ONNX opset 17 is not supported")

    def drifting_loader(*args, **kwargs):
        return lambda x: torch.zeros(x.shape[0], 10)

    monkeypatch.setitem(export_module._EXPORTERS, "onnx", broken_exporter)
    monkeypatch.setitem(export_module._LOADERS, "torchscript", drifting_loader)
    images, labels = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    records = {r["format"]: r for r in export_student(_student("tiny_cnn"), tmp_path, "s", metadata={},
                                                      images=images, labels=labels)}
    onnx, script = records["onnx"], records["torchscript"]
    assert onnx["ok"] is False
    assert onnx["error"].startswith("export failed: RuntimeError: Exporting the operator 'aten::frobnicate'")
    assert script["ok"] is False and "outputs differ from PyTorch's by" in script["error"]
    for r in (onnx, script):
        assert r["file"] is None and r["sha256"] is None
    assert records["safetensors"]["ok"] and records["export"]["ok"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.pt2", "s.safetensors"]  # failed files removed


def test_bad_arguments_raise_before_any_file_is_written(tmp_path):
    model, images, labels = _student("tiny_cnn"), torch.rand(2, 3, 32, 32), torch.tensor([0, 1])
    with pytest.raises(ConfigError, match="distinct names"):
        export_student(model, tmp_path, "s", metadata={}, images=images, labels=labels, formats=["tflite"])
    with pytest.raises(ConfigError, match="strings to strings"):
        export_student(model, tmp_path, "s", metadata={"eps": 0.03}, images=images, labels=labels)
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        export_student(model, tmp_path, "s", metadata={}, images=images * 255, labels=labels)
    with pytest.raises(ConfigError, match="plain file name"):
        export_student(model, tmp_path, "../s", metadata={}, images=images, labels=labels)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def exported_cli(shared_dir, tmp_path_factory):
    """A student state dict exported by ``python -m core export`` on the real CIFAR-10 test images."""
    root = tmp_path_factory.mktemp("cli")
    torch.save(_student("tiny_cnn", seed=3).state_dict(), root / "student_best.pt")
    code = main(["export", "--model", str(root / "student_best.pt"), "--arch", "tiny_cnn",
                 "--num-classes", "10", "--dataset", "cifar10-partial", "--data-root",
                 str(shared_dir / "data"), "--n-check", "64", "--prefix", "student_best",
                 "--out", str(root / "out")])
    return root, code


def test_cli_export_writes_checked_files_and_records(exported_cli, capsys):
    root, code = exported_cli
    assert code == 0
    records = json.loads((root / "out" / "exports.json").read_text())
    assert [r["format"] for r in records] == list(FORMATS) and all(r["ok"] for r in records)
    assert all(r["n"] == 64 for r in records)
    assert all((root / "out" / r["file"]).is_file() for r in records)


def test_exported_files_evaluate_to_the_state_dicts_accuracies(exported_cli, shared_dir):
    root, _ = exported_cli
    common = {"dataset": "cifar10-partial", "data_root": str(shared_dir / "data"), "n_examples": 48,
              "eps": 8 / 255, "seed": 0, "device": "cpu"}
    attacks = ["clean", "fgsm", "pgd_sat"]

    def accuracies(path: Path, **kwargs) -> list[tuple[str, float, int]]:
        report = run_evaluation(path, attacks=kwargs.pop("attacks", attacks), **common, **kwargs)
        return [(r["attack"], r["accuracy"], r["n"]) for r in report["rows"]]

    reference = accuracies(root / "student_best.pt", arch="tiny_cnn")
    assert accuracies(root / "out" / "student_best.torchscript.pt") == reference
    assert accuracies(root / "out" / "student_best.pt2") == reference
    assert accuracies(root / "out" / "student_best.safetensors") == reference
    assert accuracies(root / "out" / "student_best.onnx", attacks=["clean"]) == reference[:1]


def test_onnx_with_a_gradient_attack_says_it_needs_a_pytorch_format(exported_cli, shared_dir, capsys):
    root, _ = exported_cli
    message = "gradient attacks need a PyTorch format (.pt2, .torchscript.pt, .safetensors); ONNX supports"
    onnx_file = root / "out" / "student_best.onnx"
    with pytest.raises(ConfigError) as raised:
        run_evaluation(onnx_file, attacks=["clean", "fgsm"], dataset="cifar10-partial",
                       data_root=str(shared_dir / "data"), n_examples=8)
    assert message in str(raised.value)
    code = main(["evaluate", "--model", str(onnx_file), "--dataset", "cifar10-partial", "--data-root",
                 str(shared_dir / "data"), "--attacks", "clean,pgd_sat", "--out", str(root / "r.json")])
    assert code == 2 and message in capsys.readouterr().err
    # The model itself refuses too, whoever calls it with a gradient-needing attack.
    from core.evaluate import evaluate_model

    onnx_model = load_model_file(root / "out" / "student_best.onnx", allow_onnx=True).model
    with pytest.raises(ConfigError, match="ONNX supports attacks=clean"):
        evaluate_model(onnx_model, torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]), ["clean", "fgsm"])


README_ONNX_EXAMPLE = textwrap.dedent("""
    import pickle, sys

    import numpy as np
    import onnxruntime as ort

    with open(sys.argv[1], "rb") as f:  # CIFAR-10's test_batch, the official pickle format
        test = pickle.load(f, encoding="latin1")
    images = test["data"][:64].reshape(-1, 3, 32, 32).astype(np.float32) / 255  # NCHW in [0, 1]
    labels = np.array(test["labels"][:64])

    session = ort.InferenceSession(sys.argv[2], providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"images": images})[0]
    print(np.mean(logits.argmax(1) == labels))
    assert "torch" not in sys.modules
""")


def test_the_readme_onnx_example_gives_the_recorded_clean_accuracy(exported_cli, shared_dir, tmp_path):
    root, _ = exported_cli
    record = next(r for r in json.loads((root / "out" / "exports.json").read_text()) if r["format"] == "onnx")
    (tmp_path / "example.py").write_text(README_ONNX_EXAMPLE)
    test_batch = shared_dir / "data" / "cifar-10-batches-py-partial" / "test_batch"
    proc = subprocess.run([sys.executable, "example.py", str(test_batch), str(root / "out" / record["file"])],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.split()[-1]) == record["clean_accuracy"]


def test_a_model_that_only_exports_for_one_batch_size_is_recorded_as_fixed(tmp_path, monkeypatch):
    real_export = torch.export.export

    def no_dynamic_batch(model, args, **kwargs):
        if kwargs.get("dynamic_shapes") is not None:
            raise RuntimeError("Constraints violated (batch)!")
        return real_export(model, args, **kwargs)

    monkeypatch.setattr(torch.export, "export", no_dynamic_batch)
    images, labels = torch.rand(3, 3, 32, 32), torch.tensor([0, 1, 2])
    (record,) = export_student(_student("conv_small"), tmp_path, "s", metadata={}, images=images,
                               labels=labels, formats=["export"])
    assert record["ok"] and record["dynamic_batch"] is False and record["n"] == 3
    program = torch.export.load(tmp_path / "s.pt2").module()
    assert program(images[:1]).shape == (1, 10)
