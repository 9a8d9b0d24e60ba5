"""The model card (core/model_card.py) and the exports every run produces (core/student_outputs.py).

A real tiny ``run_distillation`` (tiny_cnn on small synthetic images, CPU, one epoch) writes the card;
the card's numbers are compared with the report's, its export hashes with the files, and its intervals
with a hand-computed Wilson interval. A format that fails to export is named in the card, not fatal.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from core import export
from core.config import DistillConfig
from core.errors import ConfigError
from core.model_card import CARD_JSON, CARD_MD
from core.pipeline import run_distillation
from core.stats import wilson_interval

FORMATS = ("safetensors", "torchscript", "export", "onnx")


@pytest.fixture(scope="module")
def colours(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Learnable 16x16 images: a colour per class plus noise; 400 train, 100 test."""
    rng = np.random.default_rng(0)
    y = np.arange(500) % 4
    x = rng.uniform(40, 215, size=(4, 3))[y][:, None, None, :] + rng.normal(0, 60, size=(500, 16, 16, 3))
    x = np.clip(x, 0, 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("data") / "colours.npz"
    np.savez(path, x=x[:400], y=y[:400], x_test=x[400:], y_test=y[400:])
    return path


def _config(data: Path, **kw: Any) -> DistillConfig:
    base: dict[str, Any] = dict(student="tiny_cnn", method="natural", dataset="npz", data_root=str(data),
                                epochs=2, batch_size=32, val_size=100, attacks=["clean", "fgsm"], n_eval=60,
                                device="cpu", amp=False, job_id="job-0123", allow_degenerate=True)
    base.update(kw)
    return DistillConfig(**base)


@pytest.fixture(scope="module")
def run(colours: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    run_distillation(_config(colours), out)
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_wilson_interval_matches_a_hand_computed_case() -> None:
    # 8 of 10, z = 1.96: centre (0.8 + 0.19208) / 1.38416 = 0.71676, half 0.22647 -> [0.4902, 0.9433]
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(10, 10)[1] == 1.0
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_card_numbers_equal_the_report(run: Path) -> None:
    report = json.loads((run / "report.json").read_text())
    card = json.loads((run / CARD_JSON).read_text())
    for which in ("best", "last"):
        rows = report["final"][which]["rows"]
        card_rows = card["evaluation"][which]["rows"]
        assert [r["attack"] for r in card_rows] == [r["attack"] for r in rows] == ["clean", "fgsm"]
        for mine, theirs in zip(card_rows, rows, strict=True):
            for key in ("accuracy", "n", "seconds", "eps", "settings"):
                assert mine[key] == theirs[key], (which, key)
            correct = round(theirs["accuracy"] * theirs["n"])
            assert mine["interval95"] == pytest.approx(list(wilson_interval(correct, theirs["n"])), abs=1e-6)
            assert mine["interval95"][0] <= mine["accuracy"] <= mine["interval95"][1]
        assert card["sanity"]["ordering_ok"][which] == report["final"][which]["ordering_ok"]
    assert card["warnings"] == report["warnings"]
    assert card["versions"] == report["versions"] and "torch" in card["versions"]
    assert card["method"]["resolved"] == report["train_config"]
    assert card["threat_model"] == {"norm": "Linf", "eps": pytest.approx(8 / 255), "eps_times_255": 8.0}
    ds = card["dataset"]
    assert (ds["train"], ds["validation"], ds["test"], ds["test_n_evaluated"]) == (300, 100, 100, 60)
    assert "validation" in ds["validation_use"]
    assert card["training"]["device"] == "cpu" and card["training"]["epochs_run"] == 2
    assert card["job_id"] == "job-0123" and card["teacher"] is None
    assert card["exports"] == {which: [{**r, "clean_accuracy_equal": r["clean_accuracy"] ==
                                        r["reference_clean_accuracy"]} for r in report["exports"][which]]
                               for which in ("best", "last")}
    md = (run / CARD_MD).read_text()
    for row in card["evaluation"]["best"]["rows"]:
        assert f"| {row['attack']} |" in md and f"{100 * row['accuracy']:.2f}%" in md
    assert "distill-client job verify job-0123" in md
    rc = card["recheck"]["evaluate_command"]
    assert "--model student_best.pt2" in rc and "--attacks clean,fgsm" in rc and "--n-examples 60" in rc
    assert "--seed 0" in rc and f"--eps {8 / 255!r}" in rc


def test_every_export_is_a_checked_file_with_its_hash_in_the_card(run: Path, colours: Path) -> None:
    card = json.loads((run / CARD_JSON).read_text())
    md = (run / CARD_MD).read_text()
    for which in ("best", "last"):
        records = card["exports"][which]
        assert [r["format"] for r in records] == list(FORMATS)
        for r in records:
            assert r["ok"], r
            path = run / "exports" / r["file"]
            assert r["file"].startswith(f"student_{which}.")
            assert _sha256(path) == r["sha256"] and path.stat().st_size == r["bytes"]
            assert r["max_abs_diff"] <= r["tolerance"] and r["clean_accuracy_equal"] is True
            assert r["sha256"] in md
    # the .pt2 program gives the report's clean accuracy on the evaluated images (no project code)
    report = json.loads((run / "report.json").read_text())
    program = torch.export.load(str(run / "exports" / "student_best.pt2")).module()
    data = np.load(colours)
    x = torch.from_numpy(data["x_test"][:60]).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(data["y_test"][:60]).long()
    with torch.no_grad():
        accuracy = (program(x).argmax(1) == y).float().mean().item()
    assert accuracy == pytest.approx(report["final"]["best"]["rows"][0]["accuracy"], abs=1e-9)


def test_a_format_that_fails_is_named_in_the_card(colours: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any) -> bool:
        raise RuntimeError("this operator has no ONNX symbolic")

    monkeypatch.setitem(export._EXPORTERS, "onnx", broken)
    report = run_distillation(_config(colours, epochs=1, attacks=["clean"]), tmp_path)
    onnx = [r for r in report["exports"]["best"] if r["format"] == "onnx"][0]
    assert onnx["ok"] is False and "no ONNX symbolic" in onnx["error"] and onnx["file"] is None
    card = json.loads((tmp_path / CARD_JSON).read_text())
    assert [r for r in card["exports"]["best"] if r["format"] == "onnx"][0]["error"] == onnx["error"]
    md = (tmp_path / CARD_MD).read_text()
    assert "| best | onnx | not exported |" in md and "no ONNX symbolic" in md
    assert not list((tmp_path / "exports").glob("*.onnx"))
    assert (tmp_path / "exports" / "student_best.pt2").is_file()  # the other formats are still there


def test_exports_setting_is_validated_and_can_turn_exports_off(colours: Path, tmp_path: Path) -> None:
    assert DistillConfig().exports == list(FORMATS)
    for bad in (["onnx", "tflite"], "onnx", ["onnx", "onnx"]):
        with pytest.raises(ConfigError, match="export"):
            _config(colours, exports=bad).validate()
    report = run_distillation(_config(colours, epochs=1, attacks=["clean"], exports=[]), tmp_path)
    assert report["exports"] == {"best": [], "last": []}
    assert not (tmp_path / "exports").exists()
    card = json.loads((tmp_path / CARD_JSON).read_text())
    assert card["exports"] == {"best": [], "last": []} and card["recheck"]["evaluate_command"] is None


def test_several_students_each_get_exports_and_a_card(colours: Path, tmp_path: Path) -> None:
    cfg = _config(colours, epochs=1, attacks=["clean"], exports=["export"],
                  students=[{"student": "tiny_cnn", "method": "natural", "name": "a"},
                            {"student": "tiny_cnn", "method": "natural", "name": "b"}])
    report = run_distillation(cfg, tmp_path)
    for name in ("a", "b"):
        assert (tmp_path / name / "exports" / "student_best.pt2").is_file()
        card = json.loads((tmp_path / name / CARD_JSON).read_text())
        assert card["student"] == name
        records = report["students"][name]["exports"]["best"]
        assert card["exports"]["best"][0]["sha256"] == records[0]["sha256"]
        assert f"--student {name}" in card["recheck"]["verify_command"]


def test_the_teacher_is_described_with_its_check_and_robustness(colours: Path, tmp_path: Path) -> None:
    from core.models import create_model

    torch.manual_seed(1)
    teacher = tmp_path / "teacher.pt"
    torch.save(create_model("tiny_cnn", 4).state_dict(), teacher)
    cfg = _config(colours, teacher_path=str(teacher), teacher_arch="tiny_cnn", method="rslad", epochs=1,
                  method_params={"steps": 1}, attacks=["clean", "fgsm"], evaluate_teacher=True,
                  exports=["safetensors"])
    report = run_distillation(cfg, tmp_path / "out")
    card = json.loads((tmp_path / "out" / CARD_JSON).read_text())
    t = card["teacher"]
    assert t["sha256"] == _sha256(teacher) == report["teacher"]["sha256"]
    assert (t["format"], t["arch"], t["params"]) == ("state_dict", "tiny_cnn", report["teacher"]["params"])
    assert t["check"] == report["teacher"]["check"]
    assert [r["accuracy"] for r in t["evaluation"]["rows"]] == [
        r["accuracy"] for r in report["teacher"]["evaluation"]["rows"]]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "exports" / "student_best.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["teacher_sha256"] == t["sha256"] and meta["job_id"] == "job-0123"
    assert meta["method"] == "rslad" and meta["architecture"] == "tiny_cnn"
    md = (tmp_path / "out" / CARD_MD).read_text()
    assert t["sha256"] in md and "Teacher's own robustness" in md
