"""Download a job's student in a chosen format, and re-check its model card on this machine.

``student_artifact`` names the file a job hands out for each format; ``verify_job`` downloads the model
card and the student (a PyTorch program: ``.pt2``, else TorchScript, since gradient attacks need
PyTorch) and re-runs the card's attacks with the card's settings (n, eps, seed, batch size) on the
user's copy of the test set.

Agreement (decided here, stated in every card): a local accuracy agrees with the card's when it lies
inside the card's 95% Wilson interval. On the CPU with the same images, seed and batch size the two are
expected to be equal (``exact`` says whether they are); another device or library version may move a
few examples, which the interval allows for.

torch and the project's ``core`` package are imported only inside ``verify_job``: the client library
itself installs and runs without them (``TorchMissing`` says what to install).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill_client.errors import DistillError

SUFFIXES = {"export": ".pt2", "torchscript": ".torchscript.pt", "onnx": ".onnx",
            "safetensors": ".safetensors", "state_dict": ".pt"}
WHICH = ("best", "last")
CARD_JSON = "model_card.json"
# The formats verify can attack (gradients need PyTorch), in order of preference.
VERIFY_FORMATS = ("export", "torchscript")


class TorchMissing(DistillError):
    """verify needs torch (and the project's ``core`` package) on this machine."""


def student_artifact(fmt: str, which: str = "best", student: str | None = None) -> str:
    """The artifact name of a job's student: ``student_best.onnx``, ``NAME.student_last.pt2``, ..."""
    if fmt not in SUFFIXES:
        raise DistillError(f"unknown format {fmt!r}; use one of {', '.join(SUFFIXES)}")
    if which not in WHICH:
        raise DistillError(f"which must be best or last, got {which!r}")
    name = f"student_{which}{SUFFIXES[fmt]}"
    return f"{student}.{name}" if student else name


def card_artifact(student: str | None = None) -> str:
    return f"{student}.{CARD_JSON}" if student else CARD_JSON


@dataclass
class VerifyRow:
    attack: str
    card_accuracy: float
    local_accuracy: float
    interval95: tuple[float, float]
    n: int

    @property
    def agrees(self) -> bool:
        low, high = self.interval95
        return low - 1e-9 <= self.local_accuracy <= high + 1e-9

    @property
    def exact(self) -> bool:
        return round(self.card_accuracy * self.n) == round(self.local_accuracy * self.n)


@dataclass
class VerifyResult:
    job_id: str
    which: str
    model_file: str
    rows: list[VerifyRow] = field(default_factory=list)

    @property
    def agrees(self) -> bool:
        return bool(self.rows) and all(r.agrees for r in self.rows)

    def lines(self) -> list[str]:
        """The card's figure and the local one side by side."""
        out = [f"job {self.job_id}, {self.which} student ({self.model_file}):",
               f"{'attack':<12} {'card':>8} {'local':>8}  {'card 95% interval':<20} verdict"]
        for r in self.rows:
            verdict = "equal" if r.exact else ("within the interval" if r.agrees else "DISAGREES")
            interval = f"[{r.interval95[0]:.2%}, {r.interval95[1]:.2%}]"
            out.append(f"{r.attack:<12} {r.card_accuracy:>8.2%} {r.local_accuracy:>8.2%}  "
                       f"{interval:<20} {verdict}")
        out.append("verified: the local figures agree with the card" if self.agrees else
                   "NOT verified: a local figure lies outside the card's 95% interval")
        return out


def _import_core() -> Any:
    try:
        import torch  # noqa: F401

        from core.pipeline import run_evaluation
    except ImportError as exc:
        raise TorchMissing(
            f"verify re-runs the attacks locally and needs torch and this project's core package ({exc}); "
            "install the project (pip install -e . in its checkout) or compare with the card by hand"
        ) from exc
    return run_evaluation


def verify_job(client: Any, job_id: str, data_root: str | Path, dest: str | Path, *, which: str = "best",
               student: str | None = None, device: str = "cpu") -> VerifyResult:
    """Download the card and the student into ``dest`` and re-run the card's evaluation locally."""
    run_evaluation = _import_core()
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    card_path = client.jobs.download_artifact(job_id, card_artifact(student), dest)
    card = json.loads(Path(card_path).read_text())
    evaluation = (card.get("evaluation") or {}).get(which)
    if not evaluation or not evaluation.get("rows"):
        raise DistillError(f"the model card of job {job_id} has no evaluation of the {which} student")
    ok = {r["format"] for r in (card.get("exports") or {}).get(which, []) if r.get("ok")}
    fmt = next((f for f in VERIFY_FORMATS if f in ok), None)
    if fmt is None:
        raise DistillError(f"job {job_id} has no PyTorch export of the {which} student (.pt2 or TorchScript) "
                           "to attack; see the card's exports")
    model_path = client.jobs.download_artifact(job_id, student_artifact(fmt, which, student), dest)
    rows = evaluation["rows"]
    rc = card.get("recheck") or {}
    eps = next((float(r["eps"]) for r in rows if r.get("eps")), float(card["threat_model"]["eps"]))
    config = (card.get("method") or {}).get("config") or {}
    local = run_evaluation(model_path, dataset=config.get("dataset") or "cifar10", data_root=str(data_root),
                           attacks=[r["attack"] for r in rows], n_examples=int(rows[0]["n"]), eps=eps,
                           device=device, fmt=fmt, batch_size=int(rc.get("batch_size") or 256),
                           seed=int(rc.get("seed") or 0), job_test_split=True)
    by_attack = {r["attack"]: r for r in local["rows"]}
    result = VerifyResult(job_id, which, Path(model_path).name)
    for r in rows:
        got = by_attack[r["attack"]]
        result.rows.append(VerifyRow(r["attack"], float(r["accuracy"]), float(got["accuracy"]),
                                     (float(r["interval95"][0]), float(r["interval95"][1])), int(r["n"])))
    return result
