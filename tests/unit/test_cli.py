"""The command line: user mistakes end in one 'error:' line and exit 2, a tiny run writes its report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from core.cli import main
from core.models import create_model

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(1)
    y = np.arange(64) % 2
    x = np.clip(rng.normal(80 + 100 * y[:, None, None, None], 30, size=(64, 8, 8, 3)), 0, 255).astype(
        np.uint8
    )
    path = tmp_path_factory.mktemp("data") / "two.npz"
    np.savez(path, x=x[:48], y=y[:48], x_test=x[48:], y_test=y[48:])
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "core", *args], cwd=REPO, capture_output=True, text=True, env=env, timeout=120
    )


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


def test_unknown_method_in_a_subprocess(npz: Path, tmp_path: Path) -> None:
    proc = run_cli(
        "distill",
        "--method",
        "rslax",
        "--dataset",
        "npz",
        "--data-root",
        str(npz),
        "--out",
        str(tmp_path / "out"),
    )
    assert proc.returncode == 2
    assert "rslax" in one_error_line(proc.stderr) and "rslad" in proc.stderr


def test_methods_lists_rslad() -> None:
    proc = run_cli("methods")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("natural") and "\nrslad " in proc.stdout and "215,260,285" in proc.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--method", "rslad"], "--teacher"),  # a teacher method, no teacher
        (["--method", "sat", "--eps", "abc"], "8/255"),  # not a number
        (["--method", "sat", "--eps", "2"], "eps"),  # 2 is not in (0, 1]
        (["--method", "sat", "--epochs", "0"], "--epochs"),
        (["--method", "sat", "--method-param", "steps=-1"], "steps"),
        (["--method", "sat", "--method-param", "stepz=1"], "stepz"),
        (["--method", "sat", "--attacks", "clean,pgd"], "pgd"),
        (["--method", "sat", "--student", "resnet19"], "resnet19"),
        (["--method", "sat", "--dataset", "imagenet"], "imagenet"),
        (["--method", "rslad", "--teacher", "/nonexistent/teacher.pt"], "teacher.pt"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(
    npz: Path, tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], expected: str
) -> None:
    code = main(["distill", "--dataset", "npz", "--data-root", str(npz), "--out", str(tmp_path / "o"), *args])
    assert code == 2
    assert expected in one_error_line(capsys.readouterr().err)


def test_missing_data_root_and_flags(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert (
        main(
            [
                "distill",
                "--method",
                "sat",
                "--dataset",
                "cifar10-partial",
                "--data-root",
                str(tmp_path / "nowhere"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "nowhere" in one_error_line(capsys.readouterr().err)
    assert main(["distill", "--method", "sat", "--out", str(tmp_path / "o")]) == 2  # --data-root missing
    assert "--data-root" in one_error_line(capsys.readouterr().err)
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(tmp_path / "none.pt"),
                "--data-root",
                str(tmp_path),
                "--attacks",
                "clean",
                "--out",
                str(tmp_path / "r.json"),
            ]
        )
        == 2
    )
    one_error_line(capsys.readouterr().err)


def test_interrupt_exits_130(
    monkeypatch: pytest.MonkeyPatch, npz: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import core.pipeline

    def interrupted(*args: object, **kwargs: object) -> dict:
        raise KeyboardInterrupt

    monkeypatch.setattr(core.pipeline, "run_distillation", interrupted)
    assert (
        main(
            [
                "distill",
                "--method",
                "sat",
                "--dataset",
                "npz",
                "--data-root",
                str(npz),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 130
    )
    err = capsys.readouterr().err
    assert "cancelled" in err and "Traceback" not in err


def test_tiny_distill_writes_report_and_resumes(
    npz: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    args = [
        "distill",
        "--method",
        "sat",
        "--method-param",
        "steps=1",
        "--student",
        "tiny_cnn",
        "--dataset",
        "npz",
        "--data-root",
        str(npz),
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--eps",
        "8/255",
        "--val-size",
        "8",
        "--attacks",
        "clean,fgsm",
        "--n-eval",
        "8",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "epoch 2/2" in captured.err and "best (ep" in captured.out and "fgsm" in captured.out
    assert "worst class" in captured.out and "95% Wilson interval" in captured.out
    report = json.loads((out / "report.json").read_text())
    assert len(report["history"]) == 2 and report["config"]["eps"] == pytest.approx(8 / 255)
    assert all(len(h["val_clean_ci95"]) == 2 and h["val_n"] > 0 for h in report["history"])
    assert [r["attack"] for r in report["final"]["last"]["rows"]] == ["clean", "fgsm"]
    assert report["final"]["best"]["epoch"] in (1, 2) and report["final"]["last"]["epoch"] == 2
    model = create_model("tiny_cnn", 2)
    model.load_state_dict(torch.load(out / "student_best.pt", weights_only=True), strict=True)

    assert main(args) == 0  # everything trained already: resumes at the end and only evaluates again
    captured = capsys.readouterr()
    assert "resuming from" in captured.err and "epoch 1/2" not in captured.err
    again = json.loads((out / "report.json").read_text())
    assert again["resumed_from_epoch"] == 2

    def accuracies(r: dict) -> list:
        return [
            (k, row["attack"], row["accuracy"]) for k in ("best", "last") for row in r["final"][k]["rows"]
        ]

    assert accuracies(again) == accuracies(report)


def test_several_methods_train_in_one_pass(npz: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "multi"
    args = ["distill", "--method", "sat,trades", "--method-param", "steps=1",
            "--method-param", "trades.beta=3", "--method-param", "rslad.steps=7", "--student", "tiny_cnn",
            "--dataset", "npz", "--data-root", str(npz), "--epochs", "1", "--batch-size", "16",
            "--val-size", "8", "--attacks", "clean", "--n-eval", "8", "--device", "cpu", "--out", str(out)]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "tiny_cnn-sat best" in captured.out and "tiny_cnn-trades last" in captured.out
    assert "tiny_cnn-trades: epoch 1/1" in captured.err
    report = json.loads((out / "report.json").read_text())
    assert list(report["students"]) == ["tiny_cnn-sat", "tiny_cnn-trades"]
    for name in report["students"]:
        assert (out / name / "student_best.pt").is_file() and (out / name / "report.json").is_file()
    params = {n: r["train_config"]["method_params"] for n, r in report["students"].items()}
    assert params["tiny_cnn-trades"]["beta"] == 3 and params["tiny_cnn-sat"]["steps"] == 1
    assert "beta" not in params["tiny_cnn-sat"]
    comparisons = report["comparisons"]  # no rslad student: the first student is the reference
    assert comparisons["reference"] == "tiny_cnn-sat" and comparisons["checkpoint"] == "best"
    (versus,) = comparisons["results"]
    assert versus["student"] == "tiny_cnn-trades" and versus["attack"] == "clean" and versus["n"] == 8
    assert {"a_acc", "b_acc", "diff", "b", "c", "p_value", "significant_at_5pct"} <= set(versus)
    assert "comparisons (best checkpoints, against tiny_cnn-sat" in captured.out
    assert "significant at 5%" in captured.out

    assert main([*args[:-1], str(tmp_path / "o2"), "--method-param", "rsald.steps=1"]) == 2
    assert "'rsald' is not a method" in one_error_line(capsys.readouterr().err)


def test_numbers_and_params_parse_fractions() -> None:
    from core.cli import parse_fraction, parse_param

    assert parse_fraction("8/255") == pytest.approx(8 / 255)
    assert parse_fraction("0.5/255") == pytest.approx(0.5 / 255)
    assert parse_param("step_size=0.5/255") == ("step_size", pytest.approx(0.5 / 255))
    assert parse_param("milestones=[10,15]") == ("milestones", [10, 15])
    assert parse_param("soft_labels=adversarial") == ("soft_labels", "adversarial")


def test_evaluate_uses_the_whole_npz_without_x_test(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The seeded 80/20 split of an npz without x_test is for training; evaluating a model reads it all
    (``--job-test-split`` evaluates the 20% a distillation job held out, to re-check that job)."""
    rng = np.random.default_rng(2)
    y = np.arange(40) % 2
    x = rng.integers(0, 256, size=(40, 8, 8, 3), dtype=np.uint8)
    data = tmp_path / "only_x.npz"
    np.savez(data, x=x, y=y)
    torch.manual_seed(0)
    weights = tmp_path / "tiny.pt"
    torch.save(create_model("tiny_cnn", 2).state_dict(), weights)
    common = ["evaluate", "--model", str(weights), "--arch", "tiny_cnn", "--dataset", "npz", "--data-root",
              str(data), "--attacks", "clean", "--device", "cpu"]
    assert main([*common, "--out", str(tmp_path / "whole.json")]) == 0
    whole = json.loads((tmp_path / "whole.json").read_text())
    assert whole["rows"][0]["n"] == 40 and whole["dataset"]["test"] == 40
    assert "worst class" in capsys.readouterr().out
    assert main([*common, "--job-test-split", "--out", str(tmp_path / "job.json")]) == 0
    job = json.loads((tmp_path / "job.json").read_text())
    assert job["rows"][0]["n"] == 8
    assert job["rows"][0]["examples"]["sha256"] != whole["rows"][0]["examples"]["sha256"]
