"""distill_client.verify: the artifact names of each format, and when a local figure agrees with the
card's (inside its 95% interval; "equal" when the same number of images is classified correctly)."""

from __future__ import annotations

import pytest

from distill_client.errors import DistillError
from distill_client.verify import VerifyResult, VerifyRow, student_artifact


def test_student_artifact_names() -> None:
    assert student_artifact("onnx") == "student_best.onnx"
    assert student_artifact("export", "last") == "student_last.pt2"
    assert student_artifact("torchscript", student="a") == "a.student_best.torchscript.pt"
    assert student_artifact("state_dict") == "student_best.pt"
    with pytest.raises(DistillError, match="unknown format"):
        student_artifact("tflite")
    with pytest.raises(DistillError, match="best or last"):
        student_artifact("onnx", "middle")


def test_agreement_is_inside_the_cards_interval() -> None:
    same = VerifyRow("clean", 0.5, 0.5, (0.4, 0.6), 100)
    near = VerifyRow("fgsm", 0.3, 0.32, (0.22, 0.4), 100)
    far = VerifyRow("pgd_sat", 0.3, 0.45, (0.22, 0.4), 100)
    assert same.agrees and same.exact and near.agrees and not near.exact and not far.agrees
    good = VerifyResult("j", "best", "student_best.pt2", [same, near])
    assert good.agrees and good.lines()[-1].startswith("verified")
    assert "equal" in good.lines()[2] and "within the interval" in good.lines()[3]
    bad = VerifyResult("j", "best", "student_best.pt2", [same, far])
    assert not bad.agrees and "DISAGREES" in bad.lines()[3] and bad.lines()[-1].startswith("NOT verified")
    assert not VerifyResult("j", "best", "x").agrees  # nothing compared is not a verification
