"""The benchmark scripts run end to end at absurdly small sizes (nothing here is about speed)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
TINY = ["--threads", "1", "--seed", "0", "--device", "cpu"]


@pytest.fixture(autouse=True)
def _repo_on_path_and_threads():
    """bench/ is run as ``python -m bench.X`` from the repo root; keep torch's thread count as it was."""
    threads = torch.get_num_threads()
    sys.path.insert(0, str(REPO))
    try:
        yield
    finally:
        sys.path.remove(str(REPO))
        torch.set_num_threads(threads)


def bench(name: str):
    return importlib.import_module(f"bench.{name}")


def test_train_step_runs_and_fp32_matches_reference(tmp_path, capsys):
    out = tmp_path / "train_step.json"
    result = bench("train_step").main([
        "--students", "tiny_cnn", "--teacher", "tiny_cnn", "--batch-size", "4", "--warmup", "1",
        "--steps", "1", "--peak-size", "64", "--check-exact", "--exact-student", "tiny_cnn",
        "--exact-teacher", "tiny_cnn", "--exact-batch-size", "4", "--exact-steps", "2",
        "--json", str(out), *TINY])
    row = result["rows"][0]
    assert row["student"] == "tiny_cnn" and row["step_flops"] > 0
    exact = result["exact"]
    assert len(exact["reference"]) == len(exact["ours_fp32"]) == len(exact["ours_levers"]) == 2
    # Same math in fp32 on the same batches and start noise: the loss curves agree (not a timing).
    assert exact["fp32_equal"], exact
    assert json.loads(out.read_text())["rows"][0]["student"] == "tiny_cnn"
    printed = capsys.readouterr().out
    assert "ratio ours/reference" in printed and "of the measured" in printed
    assert "levers within noise" in printed or "levers NOT within noise" in printed


def test_epoch_runs(capsys):
    result = bench("epoch").main([
        "--students", "tiny_cnn", "--teacher", "tiny_cnn", "--n-train", "8", "--n-val", "4",
        "--batch-size", "4", "--val-batch-size", "4", "--num-workers", "0", *TINY])
    row = result["rows"][0]
    assert row["ours_metrics"]["val_robust_acc"] is not None
    assert "ratio reference/ours" in capsys.readouterr().out


def test_evaluate_runs(capsys):
    result = bench("evaluate").main([
        "--model", "tiny_cnn", "--n", "4", "--batch-sizes", "2,4", "--naive-batch-size", "4",
        "--attacks", "clean,fgsm,pgd_sat,cw_inf", *TINY])
    assert set(result["accuracy"]) == {"ours, batch 2", "ours, batch 4", "naive, batch 4"}
    assert set(result["accuracy"]["naive, batch 4"]) == {"clean", "fgsm", "pgd_sat", "cw_inf"}
    printed = capsys.readouterr().out
    assert "ratio naive/ours" in printed and "robust accuracy identical" in printed


def test_multi_student_runs(capsys):
    result = bench("multi_student").main([
        "--students", "tiny_cnn,tiny_cnn", "--teacher", "tiny_cnn", "--batch-size", "4", "--steps", "1",
        "--warmup", "0", *TINY])
    assert result["summary"]["one_pass"]["teacher_forwards"] == 1
    assert result["summary"]["separate"]["teacher_forwards"] == 2
    assert "ratio separate/one-pass" in capsys.readouterr().out


def test_method_cost_runs(capsys):
    result = bench("method_cost").main([
        "--student", "tiny_cnn", "--teacher", "tiny_cnn", "--batch-size", "4", "--attack-steps", "1",
        "--steps", "1", "--warmup", "0", *TINY])
    assert [r["method"] for r in result["rows"]] == ["rslad", "adaad", "absld", "rslad+igdm", "adaad+igdm"]
    assert result["rows"][0]["cost_vs_rslad"] == 1.0
    assert "adaad / rslad step time" in capsys.readouterr().out


def test_recipe_study_smoke(tmp_path, capsys):
    """Two methods x two recipes, one epoch on a tiny synthetic set: every report is kept and the table
    has a McNemar verdict against the baseline of the same pass."""
    import numpy as np

    from core.models import create_model

    rng = np.random.default_rng(0)
    y = np.arange(120) % 2
    x = np.clip(rng.normal(80 + 100 * y[:, None, None, None], 30, size=(120, 8, 8, 3)), 0, 255)
    np.savez(tmp_path / "two.npz", x=x[:80].astype(np.uint8), y=y[:80], x_test=x[80:].astype(np.uint8),
             y_test=y[80:])
    torch.manual_seed(0)
    torch.save(create_model("tiny_cnn", 2).state_dict(), tmp_path / "teacher.pt")
    result = bench("recipe_study").main([
        "--smoke", "--out", str(tmp_path / "out"), "--seeds", "0", "--methods", "sat,rslad",
        "--students", "tiny_cnn", "--teacher", str(tmp_path / "teacher.pt"), "--teacher-arch", "tiny_cnn",
        "--teacher-normalize", "", "--dataset", "npz", "--data-root", str(tmp_path / "two.npz"),
        "--device", "cpu", "--threads", "1"])
    names = [r["name"] for r in result["rows"]]
    # SAT resolves alike under both recipes at 1 epoch (trained once); RSLAD's KL differs (trained twice)
    assert names == ["tiny_cnn-sat-both", "tiny_cnn-rslad-auto", "tiny_cnn-rslad-reference"]
    assert result["attacks"] == ["clean", "pgd_trades"]
    report = json.loads((tmp_path / "out" / "budget1-seed0" / "report.json").read_text())
    kl = {n: s["recipe"]["values"]["kl_reduction"]["value"] for n, s in report["students"].items()
          if n.startswith("tiny_cnn-rslad")}
    assert kl == {"tiny_cnn-rslad-auto": "batchmean", "tiny_cnn-rslad-reference": "reference"}
    assert result["rows"][0]["verdict"] == "best baseline" and "p=" in result["rows"][1]["verdict"]
    assert "| budget | seed |" in capsys.readouterr().out and (tmp_path / "out" / "table.md").is_file()
    # RSLAD auto is paired with RSLAD reference, and every student with RSLAD auto
    assert "vs reference, p=" in result["rows"][1]["auto_vs_reference"]
    assert "vs rslad auto, p=" in result["rows"][0]["vs_rslad"]
    # the table of the passes already run, rebuilt without training anything
    again = bench("recipe_study").main(["--smoke", "--out", str(tmp_path / "out"), "--table-only"])
    assert again["table"] == result["table"]
