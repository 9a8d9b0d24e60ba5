"""What a finished run hands out besides its report: the exported students and the model card.

The best and the last student are exported to every format in ``cfg.exports`` (``core.export``) into
``out/exports/``; the records go into the report (``report["exports"]``) and the card
(``core.model_card``) is written from that report, so the two cannot disagree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from core.config import DistillConfig
from core.data import DatasetBundle
from core.files import finite
from core.model_card import write_card
from core.models import create_model

EXPORTS_DIR = "exports"
# Real test images the exports are checked on (outputs within tolerance, equal clean accuracy).
EXPORT_CHECK_IMAGES = 256


def export_metadata(cfg: DistillConfig, num_classes: int, teacher: dict[str, Any] | None) -> dict[str, str]:
    """The safetensors metadata: enough to use the weights without this project's report. The
    registry students take [0,1] images, so mean/std stay empty."""
    from core.export import student_metadata

    sha = (teacher or {}).get("sha256") or cfg.teacher_sha256
    return student_metadata(cfg.student, num_classes, eps=cfg.eval_eps, method=cfg.method, job_id=cfg.job_id,
                            teacher_sha256=str(sha) if sha else None)


def export_students(cfg: DistillConfig, data: DatasetBundle, out: Path,
                    teacher: dict[str, Any] | None) -> dict[str, list[dict[str, Any]]]:
    """Export ``out/student_best.pt`` and ``out/student_last.pt``; ``{"best": records, "last": records}``.

    A format that fails is a record with ``ok: false`` and its error (``export_student`` never raises
    for one), so the job still succeeds and the card says which format is missing.
    """
    if not cfg.exports:
        return {"best": [], "last": []}
    from core.export import export_student  # lazy: onnx and safetensors load only when exporting

    n = min(EXPORT_CHECK_IMAGES, int(data.test.y.shape[0]))
    x = data.test.x[:n].cpu()
    images = x.float().div(255.0) if x.dtype == torch.uint8 else x.float()  # the [0,1] the exports take
    labels = data.test.y[:n].cpu().long()
    metadata = export_metadata(cfg, data.num_classes, teacher)
    records: dict[str, list[dict[str, Any]]] = {}
    for which in ("best", "last"):
        model = create_model(cfg.student, data.num_classes)
        model.load_state_dict(torch.load(out / f"student_{which}.pt", map_location="cpu", weights_only=True))
        model.eval()
        rows = export_student(model, out / EXPORTS_DIR, f"student_{which}", metadata=metadata, images=images,
                              labels=labels, formats=tuple(cfg.exports))
        records[which] = [finite({**r, "file": Path(str(r["file"])).name if r.get("file") else None})
                          for r in rows]
    return records


def finish_outputs(cfg: DistillConfig, data: DatasetBundle, out: Path, report: dict[str, Any], *,
                   student: str | None = None) -> None:
    """Add the export records to ``report`` (in place) and write the model card next to it."""
    report["exports"] = export_students(cfg, data, out, report.get("teacher"))
    write_card(report, out, job_id=cfg.job_id, student=student)
