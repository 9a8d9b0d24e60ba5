"""The command line's grammar: every subcommand, flag and value parser of ``python -m core``.

Kept apart from ``core/cli.py`` (what each command does) so that a reader finds every flag in one place.
Parsing errors raise ``UsageError``; ``core.cli.main`` prints them as one ``error:`` line.
"""

from __future__ import annotations

import argparse
import json
from fractions import Fraction
from typing import Any, NoReturn


class UsageError(Exception):
    """argparse's complaint, raised instead of printed so that ``main`` prints it as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


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

    m = sub.add_parser("models", help="list the architectures")
    m.add_argument("--json", action="store_true")
    t = sub.add_parser("methods", help="list the training methods and their defaults")
    t.add_argument("--json", action="store_true")
    return parser
