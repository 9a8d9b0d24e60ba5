"""``python -m core distill|evaluate|compare|export|models|methods``: the library from a shell.

A user's mistake ends in one line ``error: ...`` on stderr and exit code 2, never a traceback; a cancel
(Ctrl-C) ends with exit code 130. Progress goes to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any

from core.cli_args import UsageError, build_parser, parse_fraction, parse_list, parse_param
from core.errors import Cancelled, ConfigError, UserError
from core.report_tables import accuracy_table, comparison_lines

EXIT_USER, EXIT_CANCELLED = 2, 130


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def cmd_distill(args: argparse.Namespace) -> int:
    from core.pipeline import DistillConfig, run_distillation
    from core.progress import ProgressPrinter

    archs, methods = parse_list(args.student), parse_list(args.method)
    students = None
    if len(archs) > 1 or len(methods) > 1:
        students = [{"student": a, "method": m} for a in archs for m in methods]
    cfg = DistillConfig(
        teacher_path=args.teacher, teacher_arch=args.teacher_arch, teacher_format=args.teacher_format,
        teacher_normalize=args.teacher_normalize, student=archs[0], method=methods[0],
        dataset=args.dataset, data_root=args.data_root,
        epochs=args.epochs, batch_size=args.batch_size, eps=args.eps, train_subset=args.train_subset,
        val_size=args.val_size, seed=args.seed, deterministic=args.deterministic, device=args.device,
        amp=args.amp, channels_last=args.channels_last, attacks=args.attacks, n_eval=args.n_eval,
        eval_batch_size=args.eval_batch_size, evaluate_teacher=args.evaluate_teacher, lr=args.lr,
        warmup_epochs=args.warmup_epochs, collapse_patience=args.collapse_patience,
        allow_degenerate=args.allow_degenerate, teacher_claimed_accuracy=args.teacher_claimed_accuracy,
        teacher_precision=args.teacher_precision, recipe=args.recipe)
    if students:
        cfg.students = [{**s, "method_params": _params_for(s["method"], args.method_param)} for s in students]
    else:
        cfg.method_params = _params_for(methods[0], args.method_param)
    cfg.validate()
    out = Path(args.out)
    if any(out.glob("**/checkpoint.pt")):
        _err(f"resuming from the checkpoint(s) in {out}")
    printer = ProgressPrinter(sys.stderr)
    try:
        report = run_distillation(cfg, out, on_event=printer)
    finally:
        printer.close()
    singles = report["students"] if students else {"": report}
    for name, single in singles.items():
        final = single["final"]
        prefix = f"{name} " if name else ""
        columns = {f"{prefix}best (ep {final['best']['epoch']})": final["best"]["rows"],
                   f"{prefix}last (ep {final['last']['epoch']})": final["last"]["rows"]}
        print(accuracy_table(columns))
        print()
    if report.get("teacher") and report["teacher"].get("evaluation"):
        print("teacher:")
        print(accuracy_table({"teacher": report["teacher"]["evaluation"]["rows"]}))
        print()
    if report.get("comparisons") and report["comparisons"].get("results"):
        print("\n".join(comparison_lines(report["comparisons"])))
        print()
    for message in report["warnings"]:
        _err(f"warning: {message}")
    if report.get("degenerate_student"):
        _err("DEGENERATE STUDENT: the best checkpoint is no better than guessing; its numbers are "
             "meaningless (kept because of --allow-degenerate)")
    if students:
        print(f"report: {out / 'report.json'}  students: {', '.join(str(out / n) for n in singles)}")
    else:
        print(f"report: {out / 'report.json'}  weights: {out / 'student_best.pt'}, {out / 'student_last.pt'}")
    return 0


def _params_for(method: str, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``KEY=VALUE`` applies to every method, ``METHOD.KEY=VALUE`` only to that one (later ones win)."""
    from core.methods import METHODS
    out: dict[str, Any] = {}
    for key, value in pairs:
        owner, dot, name = key.rpartition(".")
        if not dot:
            out[key] = value
        elif owner not in METHODS:
            raise ConfigError(f"--method-param {key}: {owner!r} is not a method; known: {', '.join(METHODS)}")
        elif owner == method:
            out[name] = value
    return out


def cmd_evaluate(args: argparse.Namespace) -> int:
    from core.files import write_json
    from core.pipeline import run_evaluation

    report = run_evaluation(args.model, arch=args.arch, normalize=args.normalize, dataset=args.dataset,
                            data_root=args.data_root, attacks=args.attacks, n_examples=args.n_examples,
                            eps=args.eps, device=args.device, fmt=args.format, batch_size=args.batch_size,
                            seed=args.seed, job_test_split=args.job_test_split)
    out = Path(args.out)
    if out.parent != Path(""):
        out.parent.mkdir(parents=True, exist_ok=True)
    write_json(report, out)
    print(accuracy_table({Path(args.model).name[:14]: report["rows"]}))
    for message in report["warnings"]:
        _err(f"warning: {message}")
    print(f"\nreport: {out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Per attack: both accuracies with intervals, the discordant counts, McNemar's p and the verdict."""
    from core.compare import compare_row_lists, format_comparison, load_report, report_rows

    a_name, b_name = str(args.report_a), str(args.report_b)
    a_rows = report_rows(load_report(args.report_a), checkpoint=args.checkpoint, student=args.student,
                         label=f"A ({a_name})")
    b_rows = report_rows(load_report(args.report_b), checkpoint=args.checkpoint,
                         student=args.student_b or args.student, label=f"B ({b_name})")
    results = compare_row_lists(a_rows, b_rows, attack=args.attack, a_label=f"A ({a_name})",
                                b_label=f"B ({b_name})")
    if args.json:
        print(json.dumps({"a": a_name, "b": b_name, "checkpoint": args.checkpoint, "comparisons": results},
                         indent=2))
        return 0
    print(f"A: {a_name}  B: {b_name}  ({args.checkpoint} checkpoint; McNemar exact, two-sided, not mid-p; "
          f"n={results[0]['n']} examples, fingerprint {results[0]['examples_sha256'][:12]})")
    for r in results:
        print(format_comparison(r, "A", "B"))
        if r["a_eps"] != r["b_eps"]:
            print(f"  note: {r['attack']} ran at eps {r['a_eps']:.6g} in A and {r['b_eps']:.6g} in B")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Prints one line per format and writes DIR/exports.json; exit 1 when a format failed its check."""
    from core.export import FORMATS, export_model_file

    records = export_model_file(args.model, args.out, arch=args.arch, dataset=args.dataset,
                                data_root=args.data_root, num_classes=args.num_classes, n_check=args.n_check,
                                formats=args.formats or FORMATS, prefix=args.prefix, tolerance=args.tolerance,
                                eps=args.eps, method=args.method)
    (Path(args.out) / "exports.json").write_text(json.dumps(records, indent=2) + "\n")
    for r in records:
        if r["ok"]:
            print(f"{r['format']:<12} ok   {r['file']}  max|diff| {r['max_abs_diff']:.2g}  clean "
                  f"{r['clean_accuracy']:.2%} (model {r['reference_clean_accuracy']:.2%}, n={r['n']})  "
                  f"sha256 {r['sha256']}")
        else:
            print(f"{r['format']:<12} FAIL {r['error']}")
    print(f"\nrecords: {Path(args.out) / 'exports.json'}")
    return 0 if all(r["ok"] for r in records) else 1


def cmd_models(args: argparse.Namespace) -> int:
    from core.models import list_models

    names = list_models()
    print(json.dumps(names) if args.json else "\n".join(names))
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from core.methods import METHODS, list_methods
    from core.recipes import describe_recipes

    methods = list_methods()
    recipes = {r["method"]: r for r in describe_recipes(METHODS)}
    if args.json:
        print(json.dumps([{**m, "recipes": recipes[m["name"]]} for m in methods], indent=2))
        return 0
    for m in methods:
        teacher = "teacher" if m["needs_teacher"] else "no teacher"
        print(f"{m['name']:<8} ({teacher})  {m['summary']}")
        defaults = "  ".join(f"{k}={_short(v)}" for k, v in m["defaults"].items())
        print(f"         reference: {defaults}")
        rec = recipes[m["name"]]
        if rec["auto_rules"]:
            for rule in rec["auto_rules"]:
                print(f"         auto: {rule['key']}={_short(rule['value'])} when {rule['when']}")
            picks = "  ".join(f"{e} epochs: " + ", ".join(f"{k}={_short(v)}" for k, v in p.items())
                              for e, p in rec["auto_at_epochs"].items())
            print(f"         auto picks  {picks}")
        else:
            print("         auto: the reference's values at every budget")
        if rec["auto_leaves"]:
            print(f"         ({rec['auto_leaves']})")
    return 0


def _short(value: Any) -> str:
    if isinstance(value, float):
        fraction = Fraction(value).limit_denominator(255)
        if fraction.denominator == 255 and abs(float(fraction) - value) < 1e-12:
            return f"{fraction.numerator}/255"
        return f"{value:.4g}"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


COMMANDS = {"distill": cmd_distill, "evaluate": cmd_evaluate, "compare": cmd_compare, "export": cmd_export,
            "models": cmd_models, "methods": cmd_methods}

__all__ = ["COMMANDS", "build_parser", "main", "parse_fraction", "parse_list", "parse_param"]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = None
    try:
        args = parser.parse_args(argv)
        return COMMANDS[args.command](args)
    except UsageError as exc:
        _err(f"error: {exc}")
        return EXIT_USER
    except UserError as exc:
        _err(f"error: {' '.join(str(exc).split())}")
        return EXIT_USER
    except (Cancelled, KeyboardInterrupt) as exc:
        detail = f": {exc}" if str(exc) else ""
        _err(f"cancelled{detail}; run the same command again to resume from the last checkpoint"
             if getattr(args, "command", None) == "distill" else f"cancelled{detail}")
        return EXIT_CANCELLED
