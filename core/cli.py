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
from typing import Any, NoReturn

from core.errors import Cancelled, ConfigError, UserError

EXIT_USER, EXIT_CANCELLED = 2, 130


class _UsageError(Exception):
    """argparse's complaint, raised instead of printed so that ``main`` prints it as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{message} (see {self.prog} --help)")


def _number(text: str) -> float:
    """'8/255', '0.5/255' or '0.0314' -> float; ValueError otherwise."""
    top, slash, bottom = text.strip().partition("/")
    return float(Fraction(top) / Fraction(bottom)) if slash else float(Fraction(top))


def parse_fraction(text: str) -> float:
    """'8/255' or '0.0314' -> float."""
    try:
        return _number(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number or fraction like 8/255: {text!r}") from None


def parse_param(text: str) -> tuple[str, Any]:
    """'steps=2' -> ('steps', 2): values are JSON (numbers, lists, true/null), a fraction, or a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        try:
            value = _number(raw)
        except (ValueError, ZeroDivisionError):
            value = raw
    return key.strip(), value


def parse_list(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list of names")
    return items


def int_at_least(minimum: int):
    """An argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


positive_int, non_negative_int = int_at_least(1), int_at_least(0)


DATASET_HELP = "cifar10, cifar100, cifar10-partial, cifar100-partial or npz"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m core", description="Robust knowledge distillation (RSLAD, baselines).")
    sub = parser.add_subparsers(dest="command", metavar="{distill,evaluate,compare,export,models,methods}")
    sub.required = True

    d = sub.add_parser("distill", help="train a student from a teacher and evaluate it",
                       description="Train a student with a method (RSLAD by default), keep the best "
                                   "checkpoint by validation PGD-20 accuracy, evaluate best and last on the "
                                   "test set.")
    d.add_argument("--teacher", metavar="PATH", help="teacher model file (omit for teacher-free methods)")
    d.add_argument("--teacher-arch", metavar="NAME", help="architecture of a state-dict teacher")
    d.add_argument("--teacher-normalize", metavar="MEAN;STD",
                   help="normalisation the teacher expects, e.g. '0.4914,0.4822,0.4465;0.2471,0.2435,0.2616' "
                        "or cifar10 / cifar100 (quote it: ';' ends a shell command)")
    d.add_argument("--teacher-format", default="auto",
                   help="auto, torchscript, export, state_dict or safetensors")
    d.add_argument("--student", default="resnet18", metavar="NAME[,NAME...]",
                   help="student architecture (python -m core models); several, comma-separated, are "
                        "trained in one pass over the data sharing each teacher forward (DIR/ARCH-METHOD/)")
    d.add_argument("--method", default="rslad", metavar="NAME[,NAME...]",
                   help="training method (python -m core methods); several: every student with every method")
    d.add_argument("--method-param", action="append", default=[], type=parse_param, metavar="KEY=VALUE",
                   help="override a method hyper-parameter, e.g. steps=5 or milestones=[10,15]; "
                        "METHOD.KEY=VALUE for one method only (rslad.kl_reduction=batchmean); repeatable")
    d.add_argument("--dataset", default="cifar10", help=DATASET_HELP)
    d.add_argument("--data-root", required=True, metavar="PATH", help="folder (or .npz file) with the data")
    d.add_argument("--epochs", type=positive_int, help="default: the method's (RSLAD 300); milestones scale")
    d.add_argument("--batch-size", type=positive_int, default=128)
    d.add_argument("--lr", type=parse_fraction, metavar="LR",
                   help="learning rate (default: 0.1 x batch-size/128, the linear rule; 0.1 at batch 128)")
    d.add_argument("--warmup-epochs", type=non_negative_int, metavar="N",
                   help="linear lr warm-up over N epochs (default: off, or min(5, epochs/10) when the "
                        "linear rule raises the lr for a batch above 128)")
    d.add_argument("--collapse-patience", type=non_negative_int, default=3, metavar="N",
                   help="warn after N epochs with train and validation accuracy at chance and a flat loss "
                        "(default 3; 0: off)")
    d.add_argument("--allow-degenerate", action="store_true",
                   help="keep a student (or teacher) at chance level instead of failing; the report flags it")
    d.add_argument("--teacher-claimed-accuracy", type=parse_fraction, metavar="FRACTION",
                   help="the teacher's known clean accuracy (e.g. 0.67): measured well below it is a warning")
    d.add_argument("--eps", type=parse_fraction, help="L-inf budget for training and evaluation, e.g. 8/255")
    d.add_argument("--train-subset", type=positive_int, metavar="N", help="train on the first N images only")
    d.add_argument("--val-size", type=non_negative_int, default=1000,
                   help="held-out training images for choosing the best checkpoint (default 1000)")
    d.add_argument("--seed", type=non_negative_int, default=0)
    d.add_argument("--deterministic", action="store_true", help="deterministic algorithms (slower)")
    d.add_argument("--device", default="auto", help="auto, cpu or cuda")
    d.add_argument("--no-amp", dest="amp", action="store_const", const=False, default=None,
                   help="train in fp32 (default: bf16 autocast where the hardware supports it)")
    d.add_argument("--teacher-precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="the teacher's forward: auto = bf16 where native and amp is on, else fp32 "
                        "(--no-amp runs the teacher in fp32 too)")
    d.add_argument("--recipe", choices=("auto", "reference"), default="auto",
                   help="reference: the methods' published settings; auto (default): the same, adjusted for "
                        "short runs (python -m core methods lists the rules); explicit settings win")
    d.add_argument("--no-channels-last", dest="channels_last", action="store_const", const=False,
                   default=None, help="keep the contiguous memory format (default: channels_last with amp)")
    d.add_argument("--attacks", type=parse_list, metavar="A,B,...",
                   default=["clean", "fgsm", "pgd_sat", "pgd_trades", "cw_inf", "aa"],
                   help="evaluation attacks (default clean,fgsm,pgd_sat,pgd_trades,cw_inf,aa)")
    d.add_argument("--n-eval", type=positive_int, metavar="N", help="evaluate on the first N test images")
    d.add_argument("--eval-batch-size", type=positive_int, default=256)
    d.add_argument("--evaluate-teacher", action="store_true", help="also evaluate the teacher (Table 2)")
    d.add_argument("--out", required=True, metavar="DIR",
                   help="output folder; resumes when it holds a checkpoint.pt")
    d.set_defaults(func=cmd_distill)

    e = sub.add_parser("evaluate", help="evaluate a model file under attacks")
    e.add_argument("--model", required=True, metavar="PATH")
    e.add_argument("--arch", metavar="NAME", help="architecture of a state-dict model")
    e.add_argument("--normalize", metavar="MEAN;STD")
    e.add_argument("--format", default="auto")
    e.add_argument("--dataset", default="cifar10", help=DATASET_HELP)
    e.add_argument("--data-root", required=True, metavar="PATH")
    e.add_argument("--attacks", type=parse_list, required=True, metavar="A,B,...")
    e.add_argument("--n-examples", type=positive_int, metavar="N")
    e.add_argument("--eps", type=parse_fraction, default=8 / 255)
    e.add_argument("--batch-size", type=positive_int, default=256)
    e.add_argument("--seed", type=non_negative_int, default=0)
    e.add_argument("--device", default="auto")
    e.add_argument("--job-test-split", action="store_true",
                   help="npz without x_test: evaluate the seeded 20%% a distillation job with this --seed "
                        "held out (to re-check its numbers) instead of the whole file")
    e.add_argument("--out", required=True, metavar="report.json")
    e.set_defaults(func=cmd_evaluate)

    c = sub.add_parser("compare", help="is model B's accuracy significantly different from A's? "
                                       "(McNemar's exact test on the same test examples)")
    c.add_argument("report_a", metavar="A.json", help="a report.json (evaluate, distill or several students)")
    c.add_argument("report_b", metavar="B.json")
    c.add_argument("--attack", metavar="NAME", help="only this attack (default: every attack in both)")
    c.add_argument("--checkpoint", choices=("best", "last"), default="best",
                   help="which checkpoint of a distillation report (default best)")
    c.add_argument("--student", metavar="NAME", help="the student of a several-student report (A, and B "
                                                     "unless --student-b)")
    c.add_argument("--student-b", metavar="NAME", help="B's student when it differs from A's")
    c.add_argument("--json", action="store_true", help="print the comparisons as JSON")
    c.set_defaults(func=cmd_compare)

    x = sub.add_parser("export", help="export a student to safetensors, TorchScript, .pt2 and ONNX, "
                                      "each checked against the model on test images")
    x.add_argument("--model", required=True, metavar="PATH", help="the student (state dict or safetensors)")
    x.add_argument("--arch", metavar="NAME", help="its architecture (python -m core models)")
    x.add_argument("--num-classes", type=positive_int, metavar="C", help="checked against the dataset's")
    x.add_argument("--formats", type=parse_list, metavar="F,...", help="default: all of "
                   "safetensors,torchscript,export,onnx")
    x.add_argument("--dataset", default="cifar10", help=DATASET_HELP)
    x.add_argument("--data-root", required=True, metavar="PATH")
    x.add_argument("--n-check", type=positive_int, default=256, metavar="N",
                   help="test images the exports are checked on (at most 10000)")
    x.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed |logit difference|")
    x.add_argument("--prefix", default="student", help="file names: PREFIX.onnx, PREFIX.pt2, ...")
    x.add_argument("--eps", type=parse_fraction, help="recorded in the safetensors metadata")
    x.add_argument("--method", help="recorded in the safetensors metadata")
    x.add_argument("--out", required=True, metavar="DIR")
    x.set_defaults(func=cmd_export)

    m = sub.add_parser("models", help="list the architectures")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_models)
    t = sub.add_parser("methods", help="list the training methods and their defaults")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_methods)
    return parser


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _accuracy_cell(row: dict[str, Any]) -> str:
    """'61.20% [58.14, 64.17]': the accuracy and its 95% Wilson interval (computed for older reports)."""
    from core.stats import rounded_interval

    n = int(row["n"])
    low, high = row.get("ci95") or rounded_interval(round(float(row["accuracy"]) * n), n)
    return f"{float(row['accuracy']):.2%} [{100 * low:.2f}, {100 * high:.2f}]"


def _worst_cell(row: dict[str, Any]) -> str:
    worst = row.get("worst_class")
    return "-" if not worst else f"{worst['class']}: {float(worst['accuracy']):.2%} (n={worst['n']})"


def _accuracy_table(columns: dict[str, list[dict[str, Any]]]) -> str:
    """Rows: attacks; per column (e.g. best / last): accuracy [95% interval], then the worst class."""
    names: list[str] = []
    for rows in columns.values():
        names += [r["attack"] for r in rows if r["attack"] not in names]
    lookup = {c: {r["attack"]: r for r in rows} for c, rows in columns.items()}
    n = next((r["n"] for rows in columns.values() for r in rows), None)
    cells = {c: {name: (_accuracy_cell(r), _worst_cell(r)) for name, r in lookup[c].items()} for c in columns}
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


def _comparison_lines(comparisons: dict[str, Any]) -> list[str]:
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
        print(_accuracy_table(columns))
        print()
    if report.get("teacher") and report["teacher"].get("evaluation"):
        print("teacher:")
        print(_accuracy_table({"teacher": report["teacher"]["evaluation"]["rows"]}))
        print()
    if report.get("comparisons") and report["comparisons"].get("results"):
        print("\n".join(_comparison_lines(report["comparisons"])))
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
    print(_accuracy_table({Path(args.model).name[:14]: report["rows"]}))
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = None
    try:
        args = parser.parse_args(argv)
        return args.func(args)
    except _UsageError as exc:
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
