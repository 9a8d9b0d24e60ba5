"""End to end through the CLI on real data: a third party's robust CIFAR-10 CNN distilled
into a small student.

The teacher (alpha-beta-CROWN's CNN-A-Adv, PGD-trained at 2/255) is a good teacher at eps 2/255, so the
run uses 2/255. To fit in a couple of CPU minutes the student is tiny_cnn, trained for 8 epochs on 4000
real training images, with a 3-step inner attack and batch-mean KLs (the reference's B x C mean makes
the gradient 10x smaller, which only 300 epochs make up for).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.data import load_dataset
from core.models import create_model

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TEACHER = "weights/abcrown_sdp_cifar_cnn_a_adv.model"
NORMALIZE = "0.4914,0.4824,0.4467;0.2471,0.2435,0.2616"
N_EVAL, VAL_SIZE, EPS = 200, 500, 2 / 255


def test_distill_rslad_from_a_real_robust_teacher(shared_dir: Path, tmp_path: Path) -> None:
    if (
        not (shared_dir / TEACHER).is_file()
        or not (shared_dir / "data" / "cifar-10-batches-py-partial").is_dir()
    ):
        pytest.skip("the shared teacher or CIFAR-10 images are missing")
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "core",
        "distill",
        "--teacher",
        f"../shared/{TEACHER}",
        "--teacher-arch",
        "cnn_a",
        "--teacher-normalize",
        NORMALIZE,
        "--student",
        "tiny_cnn",
        "--method",
        "rslad",
        "--recipe",  # the reference recipe with batchmean set by hand: the linear-rule lr below
        "reference",
        "--method-param",
        "kl_reduction=batchmean",
        "--method-param",
        "steps=3",
        "--dataset",
        "cifar10-partial",
        "--data-root",
        "../shared/data",
        "--epochs",
        "8",
        "--batch-size",
        "32",
        "--eps",
        "2/255",
        "--train-subset",
        "4000",
        "--val-size",
        str(VAL_SIZE),
        "--seed",
        "0",
        "--device",
        "cpu",
        "--attacks",
        "clean,fgsm,pgd_sat,cw_inf",
        "--n-eval",
        str(N_EVAL),
        "--evaluate-teacher",
        "--out",
        str(out),
    ]
    # One thread: on a shared 2-core machine, several 2-thread processes spin-wait on each other (10x slower).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "epoch 8/8" in proc.stderr and "best (ep" in proc.stdout

    report = json.loads((out / "report.json").read_text())
    assert report["dataset"]["train"] == 4000 and report["dataset"]["val"] == VAL_SIZE
    assert "not on the test set" in report["dataset"]["val_note"]
    history = report["history"]
    assert [m["epoch"] for m in history] == list(range(1, 9))
    assert all(m["val_robust_acc"] <= m["val_clean_acc"] for m in history)
    # RSLAD milestones (215, 260, 285) of 300 epochs, scaled to 8: (6, 7); batch 32 scales lr 0.1 to 0.025.
    assert [m["lr"] for m in history] == pytest.approx([0.025] * 6 + [0.0025] + [0.00025])
    assert report["train_config"]["lr_rule"] == "linear: 0.1 x 32/128"
    assert report["teacher"]["check"]["passed"] and report["teacher"]["check"]["accuracy"] > 0.55
    assert report["degenerate_student"] is False

    final = report["final"]
    best_epoch = max(history, key=lambda m: m["val_robust_acc"])["epoch"]  # first epoch with the maximum
    assert final["best"]["epoch"] == best_epoch and final["last"]["epoch"] == 8
    for which in ("best", "last"):
        rows = {r["attack"]: r for r in final[which]["rows"]}
        assert list(rows) == ["clean", "fgsm", "pgd_sat", "cw_inf"]
        assert all(r["n"] == N_EVAL for r in rows.values())
        assert all(r["eps"] == pytest.approx(EPS) for name, r in rows.items() if name != "clean")
        assert final[which]["ordering_ok"], final[which]["warnings"]
        assert all(r["accuracy"] <= rows["clean"]["accuracy"] for r in rows.values())
    assert final["last"]["rows"][0]["accuracy"] >= 0.2  # it learnt something: chance is 10%

    teacher = {r["attack"]: r["accuracy"] for r in report["teacher"]["evaluation"]["rows"]}
    assert teacher["clean"] > 0.55 and 0.35 < teacher["pgd_sat"] < teacher["clean"]  # 66.7% / 52.0% on 1017

    # The saved weights are a plain state dict of the registry model and reproduce the reported accuracy.
    model = create_model("tiny_cnn", 10)
    model.load_state_dict(
        torch.load(out / "student_best.pt", map_location="cpu", weights_only=True), strict=True
    )
    test = load_dataset("cifar10-partial", shared_dir / "data", val_size=VAL_SIZE, seed=0).test
    x, y = test.x[:N_EVAL].float() / 255, test.y[:N_EVAL]
    with torch.no_grad():
        accuracy = int((model.eval()(x).argmax(1) == y).sum()) / N_EVAL
    assert accuracy == pytest.approx(final["best"]["rows"][0]["accuracy"], abs=1e-9)
