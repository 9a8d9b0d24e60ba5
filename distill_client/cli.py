"""Drive the robust distillation service from the command line (``distill-client``).

A thin layer over the client library (``distill_client.Client``). It needs only httpx and pydantic
(tqdm, when installed, draws the progress bar), so a laptop can drive a GPU server::

    distill-client run teacher.pt --arch resnet18 --normalize cifar10 --dataset cifar10 \\
        --student tiny_cnn --epochs 5 --out results/

The server and key come from ``--url``/``--key``, else ``RD_API_URL``/``RD_API_KEY``, else
``http://127.0.0.1:8000`` and the key ``scripts/serve.sh`` wrote to ``var/dev-api-key``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO

import httpx
from pydantic import BaseModel

from distill_client.client import Client
from distill_client.errors import ApiError, DistillError
from distill_client.models import JobOut, Report, TeacherOut
from distill_client.progress import ProgressView, describe, fmt_metric
from distill_client.transport import DEFAULT_URL
from distill_client.verify import SUFFIXES, WHICH, TorchMissing, verify_job


def watch(
    client: Client,
    job_id: str,
    *,
    progress: bool = True,
    out: TextIO | None = None,
    poll_s: float = 1.0,
    timeout: float | None = None,
) -> JobOut:
    """Wait for the job, showing the bar and its events as they come; the finished job."""
    view = ProgressView(out or sys.stderr, enabled=progress)
    after = 0

    def on_update(job: JobOut) -> None:
        nonlocal after
        for event in client.jobs.iter_events(job_id, after=after):
            after = event.id
            line = describe(event)
            if line:
                view.line(line)
        view.update(job)

    try:
        return client.jobs.wait(job_id, poll_s=poll_s, timeout=timeout, on_update=on_update)
    finally:
        view.close()


def _method_params(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs; values are read as JSON when they parse (2, 0.5, true, [1,2]), else text."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--method-param wants key=value, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def job_body(args: argparse.Namespace, teacher_id: str | None) -> dict[str, Any]:
    archs = [a.strip() for a in args.student.split(",") if a.strip()]
    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    students = None
    if len(archs) > 1 or len(methods) > 1:  # one job, one data pass, one teacher forward per batch
        params = _method_params(args.method_param)
        students = [{"student": a, "method": m, "method_params": params} for a in archs for m in methods]
    return {
        "students": students,
        "teacher_id": teacher_id,
        "student": archs[0] if archs else args.student,
        "method": methods[0] if methods else args.method,
        "dataset": args.dataset,
        "epochs": args.epochs,
        "eps": args.eps,
        "batch_size": args.batch_size,
        "train_subset": args.train_subset,
        "val_size": args.val_size,
        "seed": args.seed,
        "method_params": _method_params(args.method_param),
        "attacks": args.attacks.split(",") if args.attacks else None,
        "n_eval": args.n_eval,
        "device": args.device,
        "allow_degenerate": args.allow_degenerate,
        # Guardrail settings the server defaults when they are not sent.
        **{
            key: getattr(args, key)
            for key in ("lr", "warmup_epochs", "collapse_patience", "teacher_claimed_accuracy", "recipe",
                        "teacher_precision")
            if getattr(args, key) is not None
        },
    }


def _add_teacher_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", type=Path, help="TorchScript, torch.export (.pt2), state_dict or safetensors file")
    p.add_argument("--arch", help="architecture name (needed for state_dict / safetensors)")
    p.add_argument("--normalize", help="input normalisation: 'cifar10', 'cifar100' or 'm1,m2,m3;s1,s2,s3'")
    p.add_argument("--format", default="auto")
    p.add_argument("--num-classes", type=int)
    p.add_argument("--name")


def _add_job_options(p: argparse.ArgumentParser, *, teacher: bool) -> None:
    if teacher:
        p.add_argument("--teacher", help="teacher id (from 'teacher upload')")
    p.add_argument("--student", default="resnet18", help="architecture; several (a,b) train in one pass")
    p.add_argument("--method", default="rslad", help="method; several (a,b): every student with every method")
    p.add_argument("--epochs", type=int)
    p.add_argument("--eps", type=float, help="L-inf radius for images in [0, 1] (8/255 = 0.0314)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--train-subset", type=int)
    p.add_argument("--val-size", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method-param", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--attacks", help="comma-separated, e.g. clean,fgsm,pgd_sat,aa")
    p.add_argument("--n-eval", type=int, help="evaluate on the first N test images")
    p.add_argument("--device", default="auto")
    p.add_argument("--lr", type=float, help="learning rate (default 0.1 x batch-size/128)")
    p.add_argument("--warmup-epochs", type=int, help="linear lr warm-up epochs")
    p.add_argument("--recipe", choices=("auto", "reference"), help="settings for the budget (default auto)")
    p.add_argument("--teacher-precision", choices=("auto", "fp32", "bf16"), help="the teacher's forward")
    p.add_argument("--collapse-patience", type=int, help="epochs at chance before a warning (default 3)")
    p.add_argument(
        "--allow-degenerate", action="store_true", help="keep a student at chance level (flagged), not fail"
    )
    p.add_argument("--teacher-claimed-accuracy", type=float, help="the teacher's known clean accuracy")
    p.add_argument("--idempotency-key")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill-client", description=__doc__.split("\n")[0])
    parser.add_argument("--url", default=os.environ.get("RD_API_URL", DEFAULT_URL))
    parser.add_argument(
        "--key",
        default=os.environ.get("RD_API_KEY"),
        help="API key (default: RD_API_KEY, else var/dev-api-key)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    sub = parser.add_subparsers(dest="command", required=True)

    teacher = sub.add_parser("teacher", help="teacher models").add_subparsers(dest="action", required=True)
    upload = teacher.add_parser("upload", help="upload a teacher model file")
    _add_teacher_options(upload)
    upload.add_argument("--dataset", help="dataset it was trained on (sets the number of classes)")
    teacher.add_parser("list", help="list teachers")

    dataset = sub.add_parser("dataset", help="datasets").add_subparsers(dest="action", required=True)
    dupload = dataset.add_parser("upload", help="upload an .npz dataset (x, y, optional x_test, y_test)")
    dupload.add_argument("file", type=Path)
    dupload.add_argument("--name")
    dataset.add_parser("list", help="builtin and uploaded datasets")

    job = sub.add_parser("job", help="distillation jobs").add_subparsers(dest="action", required=True)
    create = job.add_parser("create", help="queue a job")
    _add_job_options(create, teacher=True)
    create.add_argument("--dataset", required=True, help="builtin name (cifar10, ...) or uploaded dataset id")
    create.add_argument("--watch", action="store_true", help="then watch it until it finishes")
    for action, text in (
        ("watch", "live progress until the job finishes"),
        ("get", "the job as JSON"),
        ("cancel", "ask a job to stop"),
        ("report", "the robustness report as JSON"),
        ("metrics", "per-epoch metrics as JSON"),
        ("events", "the event log as JSON"),
    ):
        job.add_parser(action, help=text).add_argument("job_id")
    download = job.add_parser("download", help="download the student weights and the report")
    download.add_argument("job_id")
    download.add_argument("--out", type=Path, required=True)
    download.add_argument("--name", action="append", help="only this artifact (repeatable)")
    download.add_argument("--format", choices=list(SUFFIXES),
                          help="only the student in this format (export = torch.export .pt2)")
    download.add_argument("--which", choices=list(WHICH), default="best", help="with --format: which student")
    download.add_argument("--student", help="with --format: the student's name in a several-student job")
    verify = job.add_parser("verify", help="re-run the model card's attacks locally (needs torch)")
    verify.add_argument("job_id")
    verify.add_argument("--data-root", required=True, type=Path, help="your copy of the dataset")
    verify.add_argument("--which", choices=list(WHICH), default="best")
    verify.add_argument("--student", help="the student's name in a several-student job")
    verify.add_argument("--out", type=Path, default=Path("verify"),
                        help="where the files go (default ./verify)")
    verify.add_argument("--device", default="cpu", help="cpu (the default: the card's numbers) or cuda")

    run = sub.add_parser("run", help="upload a teacher, create a job, watch it, download the results")
    _add_teacher_options(run)
    _add_job_options(run, teacher=False)
    run.add_argument("--dataset", required=True)
    run.add_argument("--out", type=Path, required=True)
    return parser


def _default_key() -> str | None:
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        path = Path(os.environ.get("RD_VAR_DIR", base / "var")) / "dev-api-key"
        if path.is_file():
            return path.read_text().strip()
    return None


def _print_json(obj: Any) -> None:
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    elif isinstance(obj, list):
        obj = [o.model_dump(mode="json") if isinstance(o, BaseModel) else o for o in obj]
    print(json.dumps(obj, indent=2))


def final_lines(job: JobOut) -> None:
    """What the guardrails found, last on the terminal, where a user looks when the job ends."""
    if job.teacher_accuracy is not None:
        print(f"teacher: {job.teacher_accuracy:.1%} clean accuracy on the check images", file=sys.stderr)
    for message in job.warnings:
        print(f"warning: {message}", file=sys.stderr)
    if job.degenerate_student:
        print(
            "DEGENERATE STUDENT: the best checkpoint is no better than guessing; its robust numbers are "
            "meaningless (kept because of allow_degenerate)",
            file=sys.stderr,
        )


def finish(job: JobOut) -> int:
    """The findings, and the exit code: 0 for a job that succeeded."""
    final_lines(job)
    if job.status == "succeeded":
        return 0
    error = f": {job.error}" if job.error else ""
    print(f"job {job.id} {job.status}{error}", file=sys.stderr)
    return 1


def summary(report: Report) -> str:
    """The best checkpoint's accuracy under each attack, on one line."""
    best = (report.final or {}).get("best")
    if best is None:
        return ""
    shown = ", ".join(f"{r.attack} {fmt_metric(r.accuracy)}" for r in best.rows)
    return f"best student (epoch {best.epoch}): {shown}" if shown else ""


def _upload(client: Client, args: argparse.Namespace) -> TeacherOut:
    return client.teachers.upload(
        args.file,
        arch=args.arch,
        normalize=args.normalize,
        dataset=args.dataset,
        format=args.format,
        num_classes=args.num_classes,
        name=args.name,
    )


def _as_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _verify(client: Client, args: argparse.Namespace) -> int:
    """0 when every local figure agrees with the card, 1 when one does not, 2 without torch."""
    try:
        result = verify_job(client, args.job_id, args.data_root, _as_dir(args.out), which=args.which,
                            student=args.student, device=args.device)
    except TorchMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in result.lines():
        print(line)
    return 0 if result.agrees else 1


def _run(args: argparse.Namespace, client: Client) -> int:
    progress = not args.quiet
    if args.command == "teacher":
        _print_json(client.teachers.list() if args.action == "list" else _upload(client, args))
        return 0
    if args.command == "dataset":
        if args.action == "list":
            _print_json(client.datasets.list())
        else:
            _print_json(client.datasets.upload(args.file, name=args.name))
        return 0
    if args.command == "job":
        jobs = client.jobs
        if args.action == "create":
            job = jobs.create(job_body(args, args.teacher), idempotency_key=args.idempotency_key)
            print(job.id if args.watch else job.model_dump_json(indent=2))
            return finish(watch(client, job.id, progress=progress)) if args.watch else 0
        if args.action == "watch":
            return finish(watch(client, args.job_id, progress=progress))
        if args.action == "download" and args.format:
            print(jobs.download_student(args.job_id, _as_dir(args.out), format=args.format,
                                        which=args.which, student=args.student))
            return 0
        if args.action == "verify":
            return _verify(client, args)
        if args.action == "download":
            names = args.name or [a.name for a in jobs.artifacts(args.job_id)]
            if not names:
                print(f"job {args.job_id} has no files yet", file=sys.stderr)
                return 1
            for path in jobs.download(args.job_id, _as_dir(args.out), names=names):
                print(path)
            return 0
        if args.action == "report":  # the whole report.json, every key
            _print_json(jobs.report(args.job_id).model_dump(mode="json", exclude_unset=True))
            return 0
        reader = {
            "get": jobs.get,
            "cancel": jobs.cancel,
            "metrics": jobs.metrics,
            "events": lambda i: list(jobs.iter_events(i)),
        }[args.action]
        _print_json(reader(args.job_id))
        return 0
    # run: the whole path in one go
    teacher = _upload(client, args)
    print(
        f"teacher {teacher.id}: {teacher.format} {teacher.arch or ''}, {teacher.num_params:,} parameters",
        file=sys.stderr,
    )
    job = client.jobs.create(job_body(args, teacher.id), idempotency_key=args.idempotency_key)
    print(f"job {job.id} queued", file=sys.stderr)
    job = watch(client, job.id, progress=progress)
    if job.status != "succeeded":
        return finish(job)
    for path in client.jobs.download(job.id, _as_dir(args.out)):
        print(path)
    line = summary(client.jobs.report(job.id))
    if line:
        print(line, file=sys.stderr)
    final_lines(job)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    key = args.key or _default_key()
    if not key:
        print(
            "error: no API key: pass --key, set RD_API_KEY, or start the server with scripts/serve.sh",
            file=sys.stderr,
        )
        return 2
    try:
        with Client(args.url, key) as client:
            return _run(args, client)
    except ApiError as exc:
        print(f"error: {exc.detail} (HTTP {exc.status})", file=sys.stderr)
        return 1
    except DistillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"error: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted (the job keeps running on the server)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
