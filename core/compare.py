"""Is one model's robust accuracy significantly different from another's on the same examples?

Two accuracies with overlapping 95% intervals can still differ significantly, because both models were
measured on the same images: what matters is the examples on which they disagree. McNemar's exact test
(``core.stats.mcnemar_exact_p``) reads exactly that from the rows' per-example correctness bits:
``b`` examples A gets right and B wrong, ``c`` the reverse. Rows are compared only when they were
evaluated on the same examples (equal ``examples.sha256`` and n); anything else is refused, as are rows
from reports written before the bits existed.

``python -m core compare A.json B.json`` takes evaluation reports (``python -m core evaluate``),
distillation reports (``final`` best/last) and several-student reports (``--student NAME``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.errors import ConfigError, DataError
from core.stats import decode_bits, mcnemar_compare

CHECKPOINTS = ("best", "last")
MAX_REPORT_BYTES = 256 * 1024 * 1024  # a report of 12 rows of n=1,000,000 is a few MB; this is far above


def load_report(path: str | os.PathLike) -> dict[str, Any]:
    """A report.json, size-checked before it is read; DataError naming the file when it is not one."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"report {p.name!r} does not exist or is not a file")
    size = p.stat().st_size
    if size > MAX_REPORT_BYTES:
        raise DataError(f"report {p.name!r} is {size} bytes, above the {MAX_REPORT_BYTES} a report may have")
    try:
        report = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"report {p.name!r} is not JSON: {type(exc).__name__}") from None
    if not isinstance(report, dict):
        raise DataError(f"report {p.name!r} is not a JSON object")
    return report


def report_rows(report: dict[str, Any], *, checkpoint: str = "best", student: str | None = None,
                label: str = "report") -> list[dict[str, Any]]:
    """The evaluation rows of one model in a report: an evaluation's ``rows``, a distillation's
    ``final[checkpoint]``, or a several-student report's ``students[student].final[checkpoint]``
    (``student`` is ignored for a report of one model, so one name can serve a mixed pair)."""
    if checkpoint not in CHECKPOINTS:
        raise ConfigError(f"checkpoint must be one of {', '.join(CHECKPOINTS)}, got {checkpoint!r}")
    if isinstance(report.get("students"), dict):
        names = list(report["students"])
        if student is None and len(names) == 1:
            student = names[0]
        if student is None:
            raise ConfigError(f"{label} has several students ({', '.join(names)}): choose one with --student")
        if student not in report["students"]:
            raise ConfigError(f"{label} has no student {student!r}; it has: {', '.join(names)}")
        report = report["students"][student]
    if isinstance(report.get("final"), dict):
        final = report["final"].get(checkpoint)
        if not isinstance(final, dict):
            raise DataError(f"{label} has no {checkpoint!r} checkpoint evaluation")
        rows = final.get("rows")
    else:
        rows = report.get("rows")
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "attack" in r for r in rows):
        raise DataError(f"{label} holds no evaluation rows (neither 'rows' nor 'final')")
    return rows


def compare_rows(a: dict[str, Any], b: dict[str, Any], *, a_label: str = "A",
                 b_label: str = "B") -> dict[str, Any]:
    """McNemar's exact test on two rows of one attack: ``core.stats.mcnemar_compare``'s fields plus the
    attack, each side's eps and the examples' fingerprint."""
    for label, row in ((a_label, a), (b_label, b)):
        if not row.get("correct_bits") or not isinstance(row.get("examples"), dict):
            raise DataError(f"{label}'s {row.get('attack')} row has no per-example correctness bits (a "
                            "report written before they were recorded): re-run its evaluation")
    ea, eb = a["examples"], b["examples"]
    if int(a["n"]) != int(b["n"]) or ea.get("sha256") != eb.get("sha256"):
        raise DataError(f"{a_label} and {b_label} were evaluated on different examples (n {a['n']} vs "
                        f"{b['n']}, fingerprint {str(ea.get('sha256'))[:12]} vs "
                        f"{str(eb.get('sha256'))[:12]}): a per-example comparison needs the same images in "
                        "the same order")
    n = int(a["n"])
    try:
        bits_a, bits_b = decode_bits(a["correct_bits"], n), decode_bits(b["correct_bits"], n)
    except ValueError as exc:
        raise DataError(f"{a['attack']}: {exc}") from None
    result = mcnemar_compare(bits_a, bits_b)
    return {"attack": a["attack"], "a_eps": a.get("eps"), "b_eps": b.get("eps"), **result,
            "examples_sha256": ea["sha256"]}


def compare_row_lists(a_rows: Sequence[dict[str, Any]], b_rows: Sequence[dict[str, Any]], *,
                      attack: str | None = None, a_label: str = "A",
                      b_label: str = "B") -> list[dict[str, Any]]:
    """One comparison per attack present in both (or only ``attack``), in A's order."""
    a_by, b_by = {r["attack"]: r for r in a_rows}, {r["attack"]: r for r in b_rows}
    if attack is not None:
        missing = [label for label, rows in ((a_label, a_by), (b_label, b_by)) if attack not in rows]
        if missing:
            raise ConfigError(f"attack {attack!r} is not in {' and '.join(missing)} (A has: "
                              f"{', '.join(a_by) or 'none'}; B has: {', '.join(b_by) or 'none'})")
        names = [attack]
    else:
        names = [name for name in a_by if name in b_by]
        if not names:
            raise DataError(f"{a_label} and {b_label} have no attack in common")
    return [compare_rows(a_by[name], b_by[name], a_label=a_label, b_label=b_label) for name in names]


def verdict(result: dict[str, Any]) -> str:
    return "significant at 5%" if result["significant_at_5pct"] else "not significant at 5%"


def format_comparison(result: dict[str, Any], a_label: str = "A", b_label: str = "B") -> str:
    """One line: both accuracies with their 95% intervals, the discordant counts, the p-value, the verdict."""
    def acc(value: float, interval: Sequence[float]) -> str:
        return f"{value:.2%} [{interval[0]:.2%}, {interval[1]:.2%}]"

    return (f"{result['attack']}: {a_label} {acc(result['a_acc'], result['a_ci95'])}  {b_label} "
            f"{acc(result['b_acc'], result['b_ci95'])}  diff {100 * result['diff']:+.2f} pts  "
            f"n={result['n']}  only {a_label} right: {result['b']}  only {b_label} right: {result['c']}  "
            f"p={result['p_value']:.4g}  {verdict(result)}")
