"""A report's accuracy tables and comparison verdicts as terminal text (the CLI's output)."""

from __future__ import annotations

from typing import Any


def accuracy_cell(row: dict[str, Any]) -> str:
    """'61.20% [58.14, 64.17]': the accuracy and its 95% Wilson interval (computed for older reports)."""
    from core.stats import rounded_interval

    n = int(row["n"])
    low, high = row.get("ci95") or rounded_interval(round(float(row["accuracy"]) * n), n)
    return f"{float(row['accuracy']):.2%} [{100 * low:.2f}, {100 * high:.2f}]"


def worst_cell(row: dict[str, Any]) -> str:
    worst = row.get("worst_class")
    return "-" if not worst else f"{worst['class']}: {float(worst['accuracy']):.2%} (n={worst['n']})"


def accuracy_table(columns: dict[str, list[dict[str, Any]]]) -> str:
    """Rows: attacks; per column (e.g. best / last): accuracy [95% interval], then the worst class."""
    names: list[str] = []
    for rows in columns.values():
        names += [r["attack"] for r in rows if r["attack"] not in names]
    lookup = {c: {r["attack"]: r for r in rows} for c, rows in columns.items()}
    n = next((r["n"] for rows in columns.values() for r in rows), None)
    cells = {c: {name: (accuracy_cell(r), worst_cell(r)) for name, r in lookup[c].items()} for c in columns}
    width = max(len("attack"), *(len(n) for n in names))
    cw = {c: max(len(c), *(len(v[0]) for v in cells[c].values())) for c in columns}
    ww = {c: max(len("worst class"), *(len(v[1]) for v in cells[c].values())) for c in columns}
    head = [f"{'attack':<{width}}"]
    for c in columns:
        head += [f"{c:>{cw[c]}}", f"{'worst class':<{ww[c]}}"]
    lines = ["  ".join(head).rstrip()]
    for name in names:
        line = [f"{name:<{width}}"]
        for c in columns:
            acc, worst = cells[c].get(name, ("-", "-"))
            line += [f"{acc:>{cw[c]}}", f"{worst:<{ww[c]}}"]
        lines.append("  ".join(line).rstrip())
    lines.append(f"(accuracy [95% Wilson interval, %] on n={n} test images; worst class: its accuracy and n)")
    return "\n".join(lines)


def comparison_lines(comparisons: dict[str, Any]) -> list[str]:
    """The several-student verdicts: each student against the reference, per attack."""
    from core.compare import format_comparison

    out = [f"comparisons ({comparisons['checkpoint']} checkpoints, against {comparisons['reference']}; "
           f"{comparisons['test']}):"]
    for r in comparisons.get("results", []):
        if "error" in r:
            out.append(f"  {r['student']}: not compared: {r['error']}")
        else:
            out.append("  " + format_comparison(r, r["reference"], r["student"]))
    return out
