"""Wilson intervals, McNemar's exact test, the correctness bits, and ``python -m core compare``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from core import stats
from core.cli import main
from core.compare import compare_rows, report_rows
from core.multi import student_comparisons
from core.stats import (
    decode_bits,
    encode_bits,
    history_with_intervals,
    mcnemar_compare,
    mcnemar_exact_p,
    wilson_interval,
)

SHA = "ab" * 32


def test_wilson_40_of_50_against_the_formula_by_hand() -> None:
    # p = 0.8, n = 50, z = 1.959963984540054, z^2 = 3.841458820694124
    # centre = (0.8 + 3.841458820694124 / 100) / (1 + 3.841458820694124 / 50)
    #        = 0.83841458820694124 / 1.0768291764
    # half = z * sqrt(0.16 / 50 + 3.841458820694124 / 10000) / 1.0768291764
    centre = 0.83841458820694124 / 1.07682917641388248
    half = 1.959963984540054 * math.sqrt(0.0032 + 0.0003841458820694124) / 1.07682917641388248
    low, high = wilson_interval(40, 50)
    assert low == pytest.approx(centre - half, abs=1e-12) and high == pytest.approx(centre + half, abs=1e-12)
    assert low == pytest.approx(0.6696, abs=1e-4) and high == pytest.approx(0.8876, abs=1e-4)


def test_history_validation_accuracies_carry_their_interval() -> None:
    history = [{"epoch": 1, "loss": 1.0, "val_clean_acc": 0.8, "val_robust_acc": 0.5},
               {"epoch": 2, "loss": 0.9, "val_clean_acc": float("nan")}]
    out = history_with_intervals(history, 50)
    assert out[0]["val_n"] == 50 and out[0]["val_clean_ci95"] == [0.669629, 0.887562]  # 40/50, as above
    assert out[0]["val_robust_ci95"] == [round(v, 6) for v in wilson_interval(25, 50)]
    assert "val_clean_ci95" not in out[1] and "val_robust_ci95" not in out[1]  # nothing measured
    assert "val_n" not in history[0]  # the trainer's own history is left as it was
    assert history_with_intervals(history, 0) == history  # no validation split, no interval


def test_mcnemar_exact_against_hand_computation() -> None:
    # b=1, c=9: P(X <= 1) for X ~ Bin(10, 1/2) is (1 + 10) / 1024; two-sided doubles it
    assert mcnemar_exact_p(1, 9) == 2 * (1 + 10) / 1024 == 0.021484375
    assert mcnemar_exact_p(9, 1) == 0.021484375
    assert mcnemar_exact_p(7, 7) == 1.0 and mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(0, 5) == 2 / 32 and mcnemar_exact_p(0, 6) == 2 / 64
    with pytest.raises(ValueError):
        mcnemar_exact_p(-1, 3)


def test_mcnemar_large_cases_against_a_math_comb_sum(monkeypatch: pytest.MonkeyPatch) -> None:
    b, c = 1420, 1580
    n = b + c
    by_comb = 2 * sum(math.comb(n, i) for i in range(b + 1)) / 2**n
    assert mcnemar_exact_p(b, c) == pytest.approx(by_comb, rel=1e-12)
    monkeypatch.setattr(stats, "EXACT_LIMIT", 0)  # the log-space sum used past EXACT_LIMIT pairs
    assert mcnemar_exact_p(b, c) == pytest.approx(by_comb, rel=1e-9)
    assert 0.001 < by_comb < 0.01


def test_bits_round_trip_and_size() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 7, 8, 9, 1000, 10_000):
        bits = rng.random(n) < 0.5
        assert decode_bits(encode_bits(bits), n).tolist() == bits.tolist()
    assert len(encode_bits(np.ones(10_000, dtype=bool))) == math.ceil(1250 / 3) * 4  # 1,250 bytes
    with pytest.raises(ValueError):
        decode_bits(encode_bits(np.ones(9, dtype=bool)), 20)
    with pytest.raises(ValueError):
        decode_bits("not base64!", 8)


def test_mcnemar_compare_counts_the_discordant_pairs() -> None:
    a = np.array([1, 1, 1, 0, 0, 1, 0, 1], dtype=bool)
    b = np.array([1, 0, 1, 1, 1, 1, 1, 0], dtype=bool)
    r = mcnemar_compare(a, b)
    assert (r["b"], r["c"], r["n"]) == (2, 3, 8)
    assert r["a_acc"] == 5 / 8 and r["b_acc"] == 6 / 8 and r["diff"] == pytest.approx(1 / 8)
    assert r["p_value"] == mcnemar_exact_p(2, 3) == 1.0 and r["significant_at_5pct"] is False


def bits_pair(b: int, c: int, both: int = 50, neither: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """A right and B wrong on b examples, the reverse on c, both right on ``both``, both wrong on the rest."""
    a = [True] * both + [True] * b + [False] * c + [False] * neither
    bb = [True] * both + [False] * b + [True] * c + [False] * neither
    return np.array(a), np.array(bb)


def make_row(attack: str, bits: np.ndarray, sha: str = SHA) -> dict:
    n, correct = int(bits.size), int(bits.sum())
    return {"attack": attack, "accuracy": correct / n, "n": n, "correct": correct,
            "ci95": stats.rounded_interval(correct, n), "eps": 0.0 if attack == "clean" else 8 / 255,
            "settings": {}, "seconds": 0.0, "examples": {"n": n, "sha256": sha, "order": "first n"},
            "correct_bits": encode_bits(bits)}


def write(path: Path, report: dict) -> str:
    path.write_text(json.dumps(report))
    return str(path)


@pytest.fixture()
def reports(tmp_path: Path) -> tuple[str, str]:
    a_clean, b_clean = bits_pair(3, 5)
    a_aa, b_aa = bits_pair(1, 9)
    a = {"final": {"best": {"epoch": 3, "rows": [make_row("clean", a_clean), make_row("aa", a_aa)]},
                   "last": {"epoch": 3, "rows": [make_row("clean", a_clean), make_row("aa", a_aa)]}}}
    b = {"rows": [make_row("clean", b_clean), make_row("aa", b_aa)]}  # an evaluation report
    return write(tmp_path / "a.json", a), write(tmp_path / "b.json", b)


def test_compare_cli_says_significant_and_not(reports: tuple[str, str],
                                               capsys: pytest.CaptureFixture) -> None:
    a, b = reports
    assert main(["compare", a, b]) == 0
    out = capsys.readouterr().out.splitlines()
    clean = next(line for line in out if line.startswith("clean:"))
    aa = next(line for line in out if line.startswith("aa:"))
    assert "only A right: 3" in clean and "only B right: 5" in clean and "not significant at 5%" in clean
    assert "only A right: 1" in aa and "only B right: 9" in aa and "p=0.02148" in aa
    assert "not significant" not in aa and "significant at 5%" in aa
    assert "[" in aa and "n=100" in aa

    assert main(["compare", a, b, "--attack", "aa", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    (result,) = data["comparisons"]
    assert (result["attack"], result["b"], result["c"]) == ("aa", 1, 9)
    assert result["p_value"] == 0.021484375 and result["significant_at_5pct"] is True
    assert result["a_acc"] == 0.51 and result["b_acc"] == 0.59 and result["diff"] == pytest.approx(0.08)
    assert result["a_ci95"] == stats.rounded_interval(51, 100)


def error_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_compare_refuses_other_examples_and_old_reports(tmp_path: Path, reports: tuple[str, str],
                                                        capsys: pytest.CaptureFixture) -> None:
    a, _ = reports
    bits = bits_pair(1, 9)[1]
    other = write(tmp_path / "other.json", {"rows": [make_row("aa", bits, sha="cd" * 32)]})
    assert main(["compare", a, other]) == 2
    assert "different examples" in error_line(capsys)
    shorter = write(tmp_path / "short.json", {"rows": [make_row("aa", bits[:90])]})
    assert main(["compare", a, shorter]) == 2
    assert "different examples" in error_line(capsys)
    old_row = {k: v for k, v in make_row("aa", bits).items() if k not in ("correct_bits", "examples")}
    old = write(tmp_path / "old.json", {"rows": [old_row]})
    assert main(["compare", a, old]) == 2
    assert "no per-example correctness bits" in error_line(capsys)
    assert main(["compare", a, str(tmp_path / "missing.json")]) == 2
    assert "does not exist" in error_line(capsys)
    assert main(["compare", a, a, "--attack", "pgd_sat"]) == 2
    assert "'pgd_sat' is not in" in error_line(capsys)


def test_compare_picks_students_and_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a_bits, b_bits = bits_pair(0, 12)
    single = {"final": {"best": {"rows": [make_row("clean", a_bits)]},
                        "last": {"rows": [make_row("clean", b_bits)]}}}
    multi = write(tmp_path / "multi.json", {"students": {"x": single, "y": single}})
    assert main(["compare", multi, multi]) == 2
    assert "choose one with --student" in error_line(capsys)
    assert main(["compare", multi, multi, "--student", "z"]) == 2
    assert "no student 'z'" in error_line(capsys)
    assert main(["compare", multi, multi, "--student", "x", "--student-b", "y", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["comparisons"][0]["p_value"] == 1.0
    result = compare_rows(report_rows(single)[0], report_rows(single, checkpoint="last")[0])
    assert (result["b"], result["c"], result["significant_at_5pct"]) == (0, 12, True)


def test_student_comparisons_use_the_rslad_student_as_reference() -> None:
    ref_bits, other_bits = bits_pair(2, 14)

    def student(method: str, bits: np.ndarray) -> dict:
        return {"config": {"method": method}, "final": {"best": {"rows": [make_row("aa", bits)]}}}

    reports = {"r18-sat": student("sat", other_bits), "r18-rslad": student("rslad", ref_bits),
               "r18-ard": student("ard", ref_bits)}
    section = student_comparisons(reports)
    assert section["reference"] == "r18-rslad" and section["checkpoint"] == "best"
    by_student = {r["student"]: r for r in section["results"]}
    assert set(by_student) == {"r18-sat", "r18-ard"}
    assert (by_student["r18-sat"]["b"], by_student["r18-sat"]["c"]) == (2, 14)
    assert by_student["r18-sat"]["significant_at_5pct"] is True
    ard = by_student["r18-ard"]
    assert (ard["b"], ard["c"], ard["p_value"], ard["significant_at_5pct"]) == (0, 0, 1.0, False)
    no_rslad = student_comparisons({"a": student("sat", ref_bits), "b": student("trades", other_bits)})
    assert no_rslad["reference"] == "a" and [r["student"] for r in no_rslad["results"]] == ["b"]
    old_rows = [{"attack": "aa", "accuracy": 0.5, "n": 4}]
    old = {"config": {"method": "sat"}, "final": {"best": {"rows": old_rows}}}
    broken = student_comparisons({"a": student("sat", ref_bits), "b": old})
    assert "no per-example correctness bits" in broken["results"][0]["error"]


def test_model_card_shows_the_worst_class_and_the_client_reads_the_larger_rows() -> None:
    from core.model_card import build_card, render_markdown
    from distill_client.models import Report

    bits = bits_pair(1, 9)[0]
    row = {**make_row("aa", bits), "worst_class": {"class": 3, "accuracy": 0.25, "n": 12, "correct": 3,
                                                   "ci95": stats.rounded_interval(3, 12)},
           "per_class": {"3": {"accuracy": 0.25, "n": 12, "correct": 3}}}
    report = {"config": {"student": "resnet18", "method": "rslad", "dataset": "npz", "seed": 0},
              "dataset": {"name": "npz", "num_classes": 10}, "final": {"best": {"epoch": 2, "rows": [row]}},
              "exports": {"best": [{"format": "export", "ok": True, "file": "student_best.pt2"}]},
              "comparisons": {"reference": "a", "results": []}}
    card = build_card(report, job_id="job-1")
    assert card["evaluation"]["best"]["rows"][0]["worst_class"]["class"] == 3
    assert card["evaluation"]["best"]["rows"][0]["interval95"] == row["ci95"]
    md = render_markdown(card)
    low, high = row["worst_class"]["ci95"]
    assert "| worst class |" in md and f"class 3: 25.00% ({100 * low:.2f}% - {100 * high:.2f}%, n=12)" in md
    assert "--job-test-split" in card["recheck"]["evaluate_command"]  # an npz job's own test split
    parsed = Report.model_validate(report)
    assert parsed.final["best"].rows[0].ci95 == row["ci95"]
    assert parsed.final["best"].rows[0].worst_class["class"] == 3 and parsed.comparisons["reference"] == "a"
    assert parsed.model_dump()["final"]["best"]["rows"][0]["correct_bits"] == row["correct_bits"]
