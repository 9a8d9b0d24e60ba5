"""Which recipe gives the most robust student for a budget: methods x recipes x budgets x seeds.

For every (budget, seed) one several-student pass of the real pipeline (``core.pipeline``) trains every
(student, method, recipe) from the same teacher on the same batches, then evaluates each on the same first
``--n-eval`` test images. A method that both recipes resolve to the same settings at a budget is trained
once (recipe 'both'). Every report is kept under ``--out``/budget{E}-seed{S}/ (a pass whose report.json
exists is not run again). The table: clean / PGD / AA accuracy with 95% Wilson intervals, and McNemar's
exact test (``core.compare``) of each student against the best teacher-free baseline (SAT, TRADES, MART)
of the same pass on the same images, for the last attack (AA when run).

    python -m bench.recipe_study --out runs/recipes --budgets 5,15 --seeds 0,1 \\
        --methods sat,trades,rslad,ard,iad --n-eval 500            # the study (hours on a CPU)
    python -m bench.recipe_study --smoke --out /tmp/recipe-smoke   # 1 epoch, 64 images: checks it runs
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from core.compare import compare_rows
from core.config import DistillConfig
from core.methods import METHODS
from core.stats import wilson_interval

SHARED = Path(__file__).resolve().parents[2] / "shared"  # the read-only data and weights beside the project
TEACHER = str(SHARED / "weights" / "abcrown_sdp_cifar_cnn_a_adv.model")
NORMALIZE = "0.4914,0.4824,0.4467;0.2471,0.2435,0.2616"
BASELINES = ("sat", "trades", "mart")  # teacher-free robust training: what distillation must beat
# "METHOD+igdm" in --methods: METHOD with the IGDM term at the weight of IGDM's published scripts;
# "METHOD@auto" (or @reference): that method under one recipe only.
IGDM_WEIGHT = 20.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for every pass's reports")
    p.add_argument("--budgets", default="5,15", help="epochs, comma-separated")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--methods", default="sat,trades,rslad,ard,iad")
    p.add_argument("--recipes", default="auto,reference")
    p.add_argument("--students", default="conv_small", help="student architectures, comma-separated")
    p.add_argument("--attacks", default="clean,pgd_trades,aa")
    p.add_argument("--n-eval", type=int, default=500, help="evaluate on the first N test images")
    p.add_argument("--train-subset", type=int, default=4000)
    p.add_argument("--val-size", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--eps", type=float, default=2 / 255)
    p.add_argument("--attack-steps", type=int, default=None, help="training attack steps (default: method's)")
    p.add_argument("--teacher", default=TEACHER)
    p.add_argument("--teacher-arch", default="cnn_a")
    p.add_argument("--teacher-normalize", default=NORMALIZE)
    p.add_argument("--dataset", default="cifar10-partial")
    p.add_argument("--data-root", default=str(SHARED / "data"))
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--table-only", action="store_true",
                   help="train nothing: the table of every pass already under --out")
    p.add_argument("--smoke", action="store_true",
                   help="1 epoch, 64 training images, 32 evaluation images, no AutoAttack, 1 attack step")
    args = p.parse_args(argv)
    if args.smoke:
        args.budgets, args.train_subset, args.n_eval, args.val_size = "1", 64, 32, 16
        args.batch_size, args.attack_steps = 32, 1
        args.attacks = ",".join(a for a in args.attacks.split(",") if a != "aa") or "clean"
    return args


def _list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def student_specs(args: argparse.Namespace, epochs: int) -> list[dict[str, Any]]:
    """Every (student, method, recipe), with methods both recipes resolve alike trained once ('both')."""
    specs = []
    for arch in _list(args.students):
        for entry in _list(args.methods):
            variant, _, only = entry.partition("@")  # "METHOD@auto": that method under one recipe only
            method, _, addon = variant.partition("+")
            has_steps = "steps" in METHODS[method].defaults
            params: dict[str, Any] = {"steps": args.attack_steps} if args.attack_steps and has_steps else {}
            if addon == "igdm":
                params["igdm_weight"] = IGDM_WEIGHT
            elif addon:
                raise SystemExit(f"unknown add-on {addon!r} in {variant!r} (known: igdm)")
            resolved = {}
            for recipe in _list(args.recipes):
                cfg = DistillConfig(method=method, method_params=params, epochs=epochs,
                                    batch_size=args.batch_size, eps=args.eps, recipe=recipe)
                resolved[recipe] = cfg.build_method().params
            recipes = [only] if only else _list(args.recipes)
            if only and only not in resolved:
                raise SystemExit(f"{entry!r}: recipe {only!r} is not one of --recipes {args.recipes}")
            if len(recipes) > 1 and all(resolved[r] == resolved[recipes[0]] for r in recipes):
                recipes = ["both"]
            for recipe in recipes:
                specs.append({"student": arch, "method": method,
                              "name": f"{arch}-{variant.replace('+', '_')}-{recipe}",
                              "recipe": "reference" if recipe == "both" else recipe, "method_params": params})
    return specs


def run_pass(args: argparse.Namespace, epochs: int, seed: int) -> dict[str, Any]:
    """One several-student pass (or its report, when it already ran)."""
    from core.pipeline import run_distillation

    out = args.out / f"budget{epochs}-seed{seed}"
    if (out / "report.json").is_file():
        report = json.loads((out / "report.json").read_text())
        if "aa" in _list(args.attacks):
            add_autoattack_on_best(args, report, out)
        return report
    train_attacks = [a for a in _list(args.attacks) if a != "aa"] or ["clean"]
    cfg = DistillConfig(teacher_path=args.teacher, teacher_arch=args.teacher_arch,
                        teacher_normalize=args.teacher_normalize or None, dataset=args.dataset,
                        data_root=args.data_root, epochs=epochs, batch_size=args.batch_size, eps=args.eps,
                        train_subset=args.train_subset, val_size=args.val_size, seed=seed,
                        attacks=train_attacks, n_eval=args.n_eval, device=args.device, exports=[],
                        allow_degenerate=True, students=student_specs(args, epochs))
    print(f"pass: {epochs} epochs, seed {seed}, {len(cfg.students or [])} students -> {out}", flush=True)
    report = run_distillation(cfg, out)
    if "aa" in _list(args.attacks):
        add_autoattack_on_best(args, report, out)
    return report


def add_autoattack_on_best(args: argparse.Namespace, report: dict[str, Any], out: Path) -> None:
    """AutoAttack on each student's best checkpoint only (its most expensive attack, not spent on 'last'),
    on the same first n test images as the pass's other rows; kept in ``NAME/aa_best.json``."""
    from core.pipeline import run_evaluation

    for name, student in report["students"].items():
        path = out / name / "aa_best.json"
        if path.is_file():
            row = json.loads(path.read_text())
        else:
            print(f"AutoAttack: {name} (best checkpoint)", flush=True)
            result = run_evaluation(out / name / "student_best.pt", arch=student["config"]["student"],
                                    dataset=args.dataset, data_root=args.data_root, attacks=["aa"],
                                    n_examples=args.n_eval, eps=args.eps, device=args.device)
            row = result["rows"][0]
            path.write_text(json.dumps(row))
        rows = student["final"]["best"]["rows"]
        rows[:] = [r for r in rows if r["attack"] != "aa"] + [row]


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    n = int(row["n"])
    low, high = row.get("ci95") or wilson_interval(round(float(row["accuracy"]) * n), n)
    return f"{100 * float(row['accuracy']):.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def pass_rows(report: dict[str, Any], epochs: int, seed: int, attacks: list[str]) -> list[dict[str, Any]]:
    """One table row per student of a pass, with its verdict against the pass's best baseline."""
    students = report["students"]
    rows_of = {name: {r["attack"]: r for r in s["final"]["best"]["rows"]} for name, s in students.items()}
    key = attacks[-1]
    baselines = [n for n, s in students.items() if s["train_config"]["method"] in BASELINES]
    best = max(baselines, key=lambda n: float(rows_of[n][key]["accuracy"]), default=None)
    out = []
    for name, s in students.items():
        method = s["train_config"]["method"]
        arch, variant, recipe = name.rsplit("-", 2)
        method = variant.replace("_", "+") if variant.endswith("_igdm") else method
        verdict = "-"
        if best is not None and name != best:
            verdict = _verdict(rows_of[best][key], rows_of[name][key],
                               f"vs {students[best]['train_config']['method']}")
        elif name == best:
            verdict = "best baseline"
        rslad = f"{arch}-rslad-auto"
        vs_rslad = ("-" if rslad not in rows_of or name == rslad
                    else _verdict(rows_of[rslad][key], rows_of[name][key], "vs rslad auto"))
        reference = f"{arch}-{variant}-reference"
        vs_reference = ("-" if recipe != "auto" or reference not in rows_of
                        else _verdict(rows_of[reference][key], rows_of[name][key], "vs reference"))
        out.append({"budget": epochs, "seed": seed, "student": arch, "name": name, "method": method,
                    "recipe": recipe,
                    "cells": [_cell(rows_of[name].get(a)) for a in attacks], "verdict": verdict,
                    "vs_rslad": vs_rslad, "auto_vs_reference": vs_reference,
                    "degenerate": bool(s.get("degenerate_student"))})
    return out


def _verdict(a: dict[str, Any], b: dict[str, Any], label: str) -> str:
    """B against A on the same examples: the difference, McNemar's p, and whether it is significant."""
    r = compare_rows(a, b, a_label="a", b_label="b")
    return (f"{100 * r['diff']:+.1f} pts {label}, p={r['p_value']:.3g}"
            f"{' (significant)' if r['significant_at_5pct'] else ''}")


def markdown(rows: list[dict[str, Any]], attacks: list[str]) -> str:
    labels = {"clean": "clean", "pgd_trades": "PGD", "pgd_sat": "PGD_SAT", "aa": "AA"}
    head = ["budget", "seed", "student", "method", "recipe", *(labels.get(a, a) for a in attacks),
            f"vs best baseline ({labels.get(attacks[-1], attacks[-1])}, McNemar)", "vs RSLAD (auto)",
            "auto vs reference"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        flag = " (degenerate)" if r["degenerate"] else ""
        cells = [str(r["budget"]), str(r["seed"]), r["student"], r["method"], r["recipe"] + flag, *r["cells"],
                 r["verdict"], r["vs_rslad"], r["auto_vs_reference"]]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("\naccuracy % [95% Wilson interval] on the same first n test images per pass; best "
                 "checkpoint; p: McNemar's exact test, two-sided, against the pass's best of "
                 f"{', '.join(BASELINES)}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    attacks = _list(args.attacks)
    rows: list[dict[str, Any]] = []
    if args.table_only:
        for epochs, seed, path in _finished_passes(args.out):
            report = json.loads(path.read_text())
            if "aa" in attacks:
                add_autoattack_on_best(args, report, path.parent)
            rows += pass_rows(report, epochs, seed, attacks)
    else:
        for epochs in (int(b) for b in _list(args.budgets)):
            for seed in (int(s) for s in _list(args.seeds)):
                rows += pass_rows(run_pass(args, epochs, seed), epochs, seed, attacks)
    table = markdown(rows, attacks)
    print(table)
    (args.out / "table.md").write_text(table + "\n")
    result = {"rows": rows, "attacks": attacks, "table": table}
    (args.out / "study.json").write_text(json.dumps(result, indent=2))
    return result


def _finished_passes(out: Path) -> list[tuple[int, int, Path]]:
    """(budget, seed, report path) of every pass under ``out`` that wrote its report, longest budget first."""
    found = []
    for path in out.glob("budget*-seed*/report.json"):
        budget, _, seed = path.parent.name.removeprefix("budget").partition("-seed")
        found.append((int(budget), int(seed), path))
    return sorted(found, key=lambda item: (-item[0], item[1]))


if __name__ == "__main__":
    main()
