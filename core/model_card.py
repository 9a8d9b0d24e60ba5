"""The model card of a trained student: ``model_card.json`` and ``model_card.md`` next to ``report.json``.

Everything in the card is read from the run's report (and the export records in it), never recomputed,
so the card's numbers are the report's numbers (tests/unit/test_model_card.py checks it). What the card
adds is what a reader needs to trust or re-check them: the threat model, each accuracy's 95% Wilson
interval, the worst class (its accuracy, n and interval), the sha256 of every exported file, and the
commands that re-run the evaluation elsewhere.

Re-checking (``distill-client job verify``): a local figure agrees with the card's when it lies inside
the card's 95% interval. On the CPU with the same images, eps, seed and batch size the figures are
expected to be equal; across devices or library versions attacks may move a few examples, which the
interval allows for.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any

from core.files import write_json, write_text
from core.stats import wilson_interval

CARD_JSON = "model_card.json"
CARD_MD = "model_card.md"
CARD_SCHEMA = "rd-model-card/1"
# The PyTorch export a re-check evaluates (gradient attacks need PyTorch), in order of preference.
RECHECK_FORMATS = ("export", "torchscript")


def build_card(report: dict[str, Any], *, job_id: str | None = None,
               student: str | None = None) -> dict[str, Any]:
    """The card of one student from its report (``report["exports"]`` holds the export records)."""
    config = report.get("config") or {}
    train_config = report.get("train_config") or {}
    dataset = report.get("dataset") or {}
    finals = report.get("final") or {}
    # the attacks' eps (the clean row has 0); the config's when only clean accuracy was measured
    eps = next((float(r["eps"]) for f in finals.values() for r in f.get("rows", []) if r.get("eps")),
               float(config.get("eps") or 8 / 255))
    history = report.get("history") or []
    evaluation = {which: _evaluation(finals[which]) for which in ("best", "last") if which in finals}
    exports = {which: [_export_row(r) for r in records]
               for which, records in (report.get("exports") or {}).items()}
    card: dict[str, Any] = {
        "schema": CARD_SCHEMA,
        "job_id": job_id or config.get("job_id"),
        "student": student,
        "model": {"arch": config.get("student"), "num_classes": dataset.get("num_classes"),
                  "input_range": "[0,1]", "mean": None, "std": None,
                  "note": "the exported programs take images in [0,1]; any normalisation is inside them"},
        "threat_model": {"norm": "Linf", "eps": eps, "eps_times_255": round(eps * 255, 4)},
        "dataset": {"name": dataset.get("name"), "image_shape": dataset.get("image_shape"),
                    "train": dataset.get("train"), "validation": dataset.get("val"),
                    "validation_use": dataset.get("val_note"), "test": dataset.get("test"),
                    "test_n_evaluated": _test_n(evaluation), "note": dataset.get("note")},
        "teacher": _teacher(report.get("teacher")),
        "method": {"name": config.get("method"), "method_params": config.get("method_params"),
                   "resolved": train_config, "config": config, "recipe": report.get("recipe")},
        "training": {"device": train_config.get("device"), "epochs_run": len(history),
                     "seconds": round(sum(float(h.get("seconds") or 0.0) for h in history), 3),
                     "job_seconds": report.get("seconds"), "best_selected_on": report.get("best_selected_on"),
                     "resumed_from_epoch": report.get("resumed_from_epoch")},
        "evaluation": evaluation,
        "sanity": {"ordering_ok": {w: e["ordering_ok"] for w, e in evaluation.items()},
                   "degenerate_student": bool(report.get("degenerate_student")),
                   "student_check": report.get("student_check")},
        "warnings": list(report.get("warnings") or []),
        "versions": report.get("versions") or {},
        "exports": exports,
        "recheck": _recheck(config, evaluation, exports, job_id or config.get("job_id"), student),
    }
    return card


def write_card(report: dict[str, Any], out_dir: str | os.PathLike, *, job_id: str | None = None,
               student: str | None = None) -> dict[str, Any]:
    """Write ``model_card.json`` and ``model_card.md`` into ``out_dir``; return the card."""
    card = build_card(report, job_id=job_id, student=student)
    out = Path(out_dir)
    write_json(card, out / CARD_JSON)
    write_text(out / CARD_MD, render_markdown(card))
    return card


def _evaluation(final: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for row in final.get("rows", []):
        n = int(row["n"])
        correct = round(float(row["accuracy"]) * n)
        low, high = wilson_interval(correct, n)
        rows.append({"attack": row["attack"], "eps": row.get("eps"), "settings": row.get("settings") or {},
                     "accuracy": row["accuracy"], "correct": correct, "n": n,
                     "interval95": [round(low, 6), round(high, 6)], "seconds": row.get("seconds"),
                     "worst_class": row.get("worst_class")})
    return {"epoch": final.get("epoch"), "same_as_last": bool(final.get("same_as_last")), "rows": rows,
            "ordering_ok": final.get("ordering_ok"), "warnings": list(final.get("warnings") or [])}


def _test_n(evaluation: dict[str, Any]) -> int | None:
    return next((r["n"] for e in evaluation.values() for r in e["rows"]), None)


def _teacher(info: dict[str, Any] | None) -> dict[str, Any] | None:
    if not info:
        return None
    keys = ("id", "file", "sha256", "format", "arch", "num_classes", "params", "normalize", "check")
    out = {k: info.get(k) for k in keys if k in info}
    if info.get("evaluation"):
        out["evaluation"] = _evaluation(info["evaluation"])
    return out


def _export_row(record: dict[str, Any]) -> dict[str, Any]:
    row = dict(record)
    row["file"] = os.path.basename(str(record.get("file") or "")) or None
    ref, got = record.get("clean_accuracy"), record.get("reference_clean_accuracy")
    row["clean_accuracy_equal"] = None if ref is None or got is None else ref == got
    return row


def _recheck(config: dict[str, Any], evaluation: dict[str, Any], exports: dict[str, list[dict[str, Any]]],
             job_id: str | None, student: str | None) -> dict[str, Any]:
    """The commands that re-run the card's evaluation on the user's machine."""
    best = evaluation.get("best") or {}
    rows = best.get("rows") or []
    attacks = ",".join(r["attack"] for r in rows)
    n = rows[0]["n"] if rows else None
    eps = next((float(r["eps"]) for r in rows if r.get("eps")), None)
    ok = {r["format"]: r["file"] for r in exports.get("best", []) if r.get("ok") and r.get("file")}
    model = next((ok[f] for f in RECHECK_FORMATS if f in ok), None)
    command = None
    if model and rows:
        dataset = config.get("dataset") or "cifar10"
        parts = ["python", "-m", "core", "evaluate", "--model", model, "--dataset", dataset,
                 "--data-root", "DATA_ROOT" if dataset != "npz" else "YOUR_DATA.npz", "--attacks", attacks,
                 "--n-examples", str(n), "--eps", repr(eps), "--seed", str(config.get("seed", 0)),
                 "--batch-size", str(config.get("eval_batch_size", 256)), "--device", "cpu",
                 "--out", "recheck.json"]
        if dataset == "npz":  # the job's test split: without x_test, its seeded 20%, not the whole file
            parts.insert(-2, "--job-test-split")
        command = shlex.join(parts)
    verify = f"distill-client job verify {job_id} --data-root DATA_ROOT" if job_id else None
    if verify and student:
        verify += f" --student {student}"
    return {"evaluate_command": command, "verify_command": verify, "model_file": model,
            "attacks": [r["attack"] for r in rows], "n": n, "eps": eps, "seed": config.get("seed", 0),
            "batch_size": config.get("eval_batch_size", 256),
            "agreement": "a local accuracy agrees when it lies in the card's 95% interval; on the CPU with "
                         "the same images, seed and batch size it is expected to be equal"}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def render_markdown(card: dict[str, Any]) -> str:
    """The card as Markdown, for people; ``model_card.json`` holds the same facts for programs."""
    tm, ds, tr = card["threat_model"], card["dataset"], card["training"]
    title = card["model"]["arch"] + (f" ({card['student']})" if card.get("student") else "")
    lines = [f"# Model card: {title}", ""]
    if card.get("job_id"):
        lines += [f"Job `{card['job_id']}`.", ""]
    lines += ["## Threat model", "",
              f"- L-inf, eps = {tm['eps']:.6g} ({tm['eps_times_255']:g}/255); inputs in [0,1]", "",
              "## Dataset", "",
              f"- {ds['name']}, images {ds['image_shape']}",
              f"- train: {ds['train']}; validation: {ds['validation']} ({ds['validation_use']})",
              f"- test: {ds['test']}, of which {ds['test_n_evaluated']} evaluated", ""]
    teacher = card.get("teacher")
    lines += ["## Teacher", ""]
    if teacher:
        lines += [f"- {teacher.get('id') or teacher.get('file')}: format {teacher.get('format')}, "
                  f"arch {teacher.get('arch')}, {teacher.get('params')} parameters",
                  f"- sha256 `{teacher.get('sha256')}`"]
        check = teacher.get("check") or {}
        if check:
            lines.append(f"- check before training: clean accuracy {_pct(check.get('accuracy'))} on "
                         f"{check.get('n')} {check.get('split', '')} images")
        if teacher.get("evaluation"):
            lines += ["", "Teacher's own robustness:", ""] + _table(teacher["evaluation"]["rows"])
    else:
        lines.append("- none (the method trains without a teacher)")
    lines += ["", "## Method and training", "",
              f"- method {card['method']['name']}, trained on {tr['device']} for {tr['epochs_run']} epochs "
              f"in {tr['seconds']:.1f} s; best checkpoint selected on {tr['best_selected_on']}",
              *[f"- recipe {rec['name']}: " + "; ".join(f"{k} = {v['value']} ({v['source']}: {v['why']})"
                                                         for k, v in rec["values"].items())
                for rec in [card["method"].get("recipe")] if rec],
              "", "Every resolved hyper-parameter:", "", "```json",
              json.dumps(card["method"]["resolved"], indent=2, sort_keys=True), "```", ""]
    lines += ["## Evaluation", ""]
    for which, ev in card["evaluation"].items():
        same = " (the same weights as last)" if ev["same_as_last"] else ""
        lines += [f"### {which} (epoch {ev['epoch']}){same}", ""] + _table(ev["rows"])
        lines += ["", f"Sanity ordering (clean >= weaker >= stronger attacks): "
                      f"{'ok' if ev['ordering_ok'] else 'VIOLATED'}", ""]
    lines += ["## Warnings", ""]
    lines += [f"- {w}" for w in card["warnings"]] or ["- none"]
    lines += ["", "## Exported files", "",
              "| checkpoint | format | file | sha256 | check |", "|---|---|---|---|---|"]
    for which, records in card["exports"].items():
        for r in records:
            if r.get("ok"):
                equal = "equal" if r.get("clean_accuracy_equal") else "DIFFERENT"
                check = (f"max abs diff {r.get('max_abs_diff')} (tolerance {r.get('tolerance')}); "
                         f"clean accuracy {_pct(r.get('clean_accuracy'))} vs PyTorch "
                         f"{_pct(r.get('reference_clean_accuracy'))} on {r.get('n')} test images: {equal}")
                lines.append(f"| {which} | {r['format']} | {r['file']} | `{r.get('sha256')}` | {check} |")
            else:
                lines.append(f"| {which} | {r['format']} | not exported | | {r.get('error')} |")
    lines += ["", "## Versions", ""] + [f"- {k} {v}" for k, v in sorted(card["versions"].items())]
    rc = card["recheck"]
    lines += ["", "## Re-check these numbers", ""]
    if rc.get("verify_command"):
        lines += ["```", rc["verify_command"], "```", ""]
    if rc.get("evaluate_command"):
        lines += ["or, with the downloaded file:", "", "```", rc["evaluate_command"], "```", ""]
    lines += [rc["agreement"] + ".", ""]
    return "\n".join(lines)


def _table(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| attack | settings | accuracy | 95% interval | n | worst class | seconds |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        settings = ", ".join(f"{k}={v}" for k, v in sorted(r["settings"].items())) or "-"
        low, high = r["interval95"]
        out.append(f"| {r['attack']} | {settings} | {_pct(r['accuracy'])} | {_pct(low)} - {_pct(high)} | "
                   f"{r['n']} | {_worst(r.get('worst_class'))} | {r['seconds']} |")
    return out


def _worst(worst: dict[str, Any] | None) -> str:
    """'class 3: 41.00% (35.2% - 47.1%, n=100)'; 'n/a' for a report written before classes were counted."""
    if not worst:
        return "n/a"
    low, high = worst["ci95"]
    return (f"class {worst['class']}: {_pct(worst['accuracy'])} ({_pct(low)} - {_pct(high)}, "
            f"n={worst['n']})")
