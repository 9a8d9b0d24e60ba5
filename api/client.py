"""A small Python client for the service, and the ``distill-client`` command built on it.

It needs only httpx and tqdm (no torch), so a laptop can drive a GPU server::

    distill-client run teacher.pt --arch resnet18 --normalize cifar10 --dataset cifar10 \\
        --student tiny_cnn --epochs 5 --out results/

The server and key come from ``--url``/``--key``, else ``RD_API_URL``/``RD_API_KEY``, else
``http://127.0.0.1:8000`` and the key ``scripts/serve.sh`` wrote to ``var/dev-api-key``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
RESULT_FILES = ("student_best.pt", "student_last.pt", "report.json")
# Metrics worth a place on the progress bar, in the order shown.
BAR_METRICS = (
    ("loss", "loss"),
    ("train_acc", "train"),
    ("val_clean_acc", "val_clean"),
    ("val_robust_acc", "val_robust"),
)


class ApiError(RuntimeError):
    """The server said no; ``detail`` is its one-line reason."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status, self.detail = status, detail


def _raise_for(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        detail = response.json().get("detail", response.text)
    except (ValueError, AttributeError):
        detail = response.text or response.reason_phrase
    raise ApiError(response.status_code, str(detail))


def _fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _fmt_metric(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


class DistillClient:
    """One API key against one server. Every method returns the server's JSON as plain dicts."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers=headers,
            timeout=timeout,
            transport=transport,
            follow_redirects=False,
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> DistillClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.http.request(method, path, **kwargs)
        _raise_for(response)
        return response.json()

    # ----- uploads -------------------------------------------------------------------------------------

    def upload_teacher(
        self,
        path: str | os.PathLike,
        *,
        arch: str | None = None,
        normalize: str | None = None,
        dataset: str | None = None,
        format: str = "auto",
        num_classes: int | None = None,
        name: str | None = None,
    ) -> dict[str, Any]:
        """Upload a model file; the server loads and probes it before keeping it."""
        fields = {
            "arch": arch,
            "normalize": normalize,
            "dataset": dataset,
            "format": format,
            "num_classes": num_classes,
            "name": name,
        }
        data = {k: str(v) for k, v in fields.items() if v is not None}
        path = Path(path)
        with open(path, "rb") as f:
            return self._json(
                "POST",
                "/v1/teachers",
                data=data,
                files={"file": (path.name, f, "application/octet-stream")},
                timeout=None,
            )

    def upload_dataset(self, path: str | os.PathLike, *, name: str | None = None) -> dict[str, Any]:
        """Upload an .npz with x, y (and optionally x_test, y_test)."""
        path = Path(path)
        with open(path, "rb") as f:
            return self._json(
                "POST",
                "/v1/datasets",
                data={"name": name} if name else {},
                files={"file": (path.name, f, "application/octet-stream")},
                timeout=None,
            )

    # ----- jobs ------------------------------------------------------------------------------------------

    def create_job(self, *, idempotency_key: str | None = None, **params: Any) -> dict[str, Any]:
        """Queue a job (fields of the API's JobCreate; None values are left to the server).

        An idempotency key is always sent, so a retried request can never queue the job twice.
        """
        body = {k: v for k, v in params.items() if v is not None}
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        return self._json("POST", "/v1/jobs", json=body, headers=headers)

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/jobs/{job_id}")

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/jobs/{job_id}/cancel")

    def metrics(self, job_id: str) -> list[dict[str, Any]]:
        return self._json("GET", f"/v1/jobs/{job_id}/metrics")["items"]

    def events(self, job_id: str, after: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        """Events with an id above ``after``, oldest first (one page)."""
        page = self._json("GET", f"/v1/jobs/{job_id}/events", params={"after": after, "limit": limit})
        return page["items"]

    def iter_events(self, job_id: str, after: int = 0) -> Iterator[dict[str, Any]]:
        """Every stored event after ``after``, following the pages."""
        while True:
            items = self.events(job_id, after=after, limit=1000)
            yield from items
            if len(items) < 1000:
                return
            after = items[-1]["id"]

    def report(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/jobs/{job_id}/report")

    def artifacts(self, job_id: str) -> list[dict[str, Any]]:
        return self._json("GET", f"/v1/jobs/{job_id}/artifacts")["items"]

    def download_artifact(self, job_id: str, name: str, dest: str | os.PathLike) -> Path:
        """Stream one artifact to ``dest`` (a folder or a file path) and check its sha256."""
        dest = Path(dest)
        path = dest / name if dest.is_dir() or str(dest).endswith(os.sep) else dest
        path.parent.mkdir(parents=True, exist_ok=True)
        expected = {a["name"]: a["sha256"] for a in self.artifacts(job_id)}.get(name)
        digest = hashlib.sha256()
        tmp = path.with_name(path.name + ".part")
        with self.http.stream("GET", f"/v1/jobs/{job_id}/artifacts/{name}", timeout=None) as response:
            if not response.is_success:
                response.read()
                _raise_for(response)
            with open(tmp, "wb") as f:
                for chunk in response.iter_bytes(1 << 20):
                    digest.update(chunk)
                    f.write(chunk)
        if expected and digest.hexdigest() != expected:
            tmp.unlink(missing_ok=True)
            raise ApiError(502, f"{name}: downloaded sha256 {digest.hexdigest()} != recorded {expected}")
        os.replace(tmp, path)
        return path

    def download_all(self, job_id: str, out_dir: str | os.PathLike) -> list[Path]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        return [self.download_artifact(job_id, a["name"], out) for a in self.artifacts(job_id)]

    def wait(
        self,
        job_id: str,
        *,
        poll_s: float = 1.0,
        timeout: float | None = None,
        progress: bool = True,
        out: Any = None,
    ) -> dict[str, Any]:
        """Poll until the job finishes; with ``progress`` a live tqdm bar, epoch metrics and warnings.

        Returns the final job. Raises TimeoutError after ``timeout`` seconds (the job keeps running).
        """
        from tqdm import tqdm

        started = time.monotonic()
        after = 0
        bar = tqdm(
            total=100,
            unit="%",
            dynamic_ncols=True,
            disable=not progress,
            file=out or sys.stderr,
            bar_format="{desc} {percentage:3.0f}%|{bar}| [{elapsed}]{postfix}",
        )
        try:
            while True:
                job = self.get_job(job_id)
                for event in self.iter_events(job_id, after):
                    after = event["id"]
                    line = self._describe(event)
                    if line and progress:
                        bar.write(line, file=out or sys.stderr)
                self._update_bar(bar, job)
                if job["status"] in TERMINAL:
                    return job
                if timeout is not None and time.monotonic() - started > timeout:
                    raise TimeoutError(f"job {job_id} still {job['status']} after {timeout:g} s")
                time.sleep(poll_s)
        finally:
            bar.close()

    @staticmethod
    def _update_bar(bar: Any, job: dict[str, Any]) -> None:
        p = job.get("progress") or {}
        fraction = 1.0 if job["status"] == "succeeded" else float(p.get("fraction") or 0.0)
        bar.n = round(100 * min(max(fraction, 0.0), 1.0), 1)
        bar.set_description_str(f"{job['id'][:8]} {job['status']}")
        parts = []
        if p.get("phase") == "evaluating":  # the fraction is the evaluation's own, from 0 again
            who = f"{p['student']} " if p.get("student") else ""
            parts.append(f"eval {who}{p.get('checkpoint') or '?'} {p.get('attack') or '?'}")
            if p.get("total"):
                parts.append(f"{p.get('done') or 0}/{p['total']}")
        else:
            if p.get("epochs"):
                parts.append(f"epoch {p.get('epoch') or 0}/{p['epochs']}")
            if p.get("steps"):
                parts.append(f"step {p.get('step') or 0}/{p['steps']}")
        metrics = job.get("latest_metrics") or {}
        parts += [
            f"{label} {_fmt_metric(metrics[k])}" for k, label in BAR_METRICS if metrics.get(k) is not None
        ]
        if job["status"] in ("running", "evaluating") and p.get("eta_s") is not None:
            parts.append(f"eta {_fmt_seconds(p['eta_s'])}")
        bar.set_postfix_str(" ".join(parts), refresh=False)
        bar.refresh()

    @staticmethod
    def _describe(event: dict[str, Any]) -> str | None:
        """One line for events a person wants to see scroll by."""
        kind, payload = event["type"], event.get("payload") or {}
        if kind == "metrics":
            m = payload.get("metrics") or {}
            shown = " ".join(f"{k}={_fmt_metric(m[k])}" for k, _ in BAR_METRICS if m.get(k) is not None)
            return f"epoch {payload.get('epoch')}/{payload.get('epochs') or '?'}: {shown}"
        if kind == "status":
            error = f" ({payload['error']})" if payload.get("error") else ""
            return f"status: {payload.get('status')}{error}"
        if kind in ("warning", "info"):
            return f"{kind}: {payload.get('message')}"
        if kind == "resume":
            return f"resumed (attempt {payload.get('attempt')}) from epoch {payload.get('checkpoint_epoch')}"
        return None


# ---------------------------------------------------------------- the command line


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


def _job_body(args: argparse.Namespace, teacher_id: str | None) -> dict[str, Any]:
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
            for key in ("lr", "warmup_epochs", "collapse_patience", "teacher_claimed_accuracy")
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
    print(json.dumps(obj, indent=2))


def _final_lines(job: dict[str, Any]) -> None:
    """What the guardrails found, last on the terminal, where a user looks when the job ends."""
    if job.get("teacher_accuracy") is not None:
        print(f"teacher: {job['teacher_accuracy']:.1%} clean accuracy on the check images", file=sys.stderr)
    for message in job.get("warnings") or []:
        print(f"warning: {message}", file=sys.stderr)
    if job.get("degenerate_student"):
        print(
            "DEGENERATE STUDENT: the best checkpoint is no better than guessing; its robust numbers are "
            "meaningless (kept because of allow_degenerate)",
            file=sys.stderr,
        )


def _finish(client: DistillClient, job: dict[str, Any]) -> int:
    _final_lines(job)
    if job["status"] == "succeeded":
        return 0
    error = f": {job['error']}" if job.get("error") else ""
    print(f"job {job['id']} {job['status']}{error}", file=sys.stderr)
    return 1


def _summary(report: dict[str, Any]) -> str:
    """The best checkpoint's accuracy under each attack, on one line."""
    best = (report.get("final") or {}).get("best") or {}
    shown = ", ".join(f"{r.get('attack')} {_fmt_metric(r.get('accuracy'))}" for r in best.get("rows") or [])
    return f"best student (epoch {best.get('epoch')}): {shown}" if shown else ""


def _upload(client: DistillClient, args: argparse.Namespace) -> dict[str, Any]:
    return client.upload_teacher(
        args.file,
        arch=args.arch,
        normalize=args.normalize,
        dataset=args.dataset,
        format=args.format,
        num_classes=args.num_classes,
        name=args.name,
    )


def _run(args: argparse.Namespace, client: DistillClient) -> int:
    progress = not args.quiet
    if args.command == "teacher":
        if args.action == "list":
            _print_json(client._json("GET", "/v1/teachers")["items"])
            return 0
        _print_json(_upload(client, args))
        return 0
    if args.command == "dataset":
        if args.action == "list":
            _print_json(client._json("GET", "/v1/datasets"))
            return 0
        _print_json(client.upload_dataset(args.file, name=args.name))
        return 0
    if args.command == "job":
        if args.action == "create":
            job = client.create_job(idempotency_key=args.idempotency_key, **_job_body(args, args.teacher))
            print(job["id"] if args.watch else json.dumps(job, indent=2))
            return _finish(client, client.wait(job["id"], progress=progress)) if args.watch else 0
        if args.action == "watch":
            return _finish(client, client.wait(args.job_id, progress=progress))
        if args.action == "download":
            names = args.name or [a["name"] for a in client.artifacts(args.job_id)]
            if not names:
                print(f"job {args.job_id} has no files yet", file=sys.stderr)
                return 1
            for name in names:
                print(client.download_artifact(args.job_id, name, _as_dir(args.out)))
            return 0
        reader = {
            "get": client.get_job,
            "cancel": client.cancel,
            "report": client.report,
            "metrics": client.metrics,
            "events": lambda i: list(client.iter_events(i)),
        }[args.action]
        _print_json(reader(args.job_id))
        return 0
    # run: the whole path in one go
    teacher = _upload(client, args)
    print(
        f"teacher {teacher['id']}: {teacher['format']} {teacher.get('arch') or ''}, "
        f"{teacher['num_params']:,} parameters",
        file=sys.stderr,
    )
    job = client.create_job(idempotency_key=args.idempotency_key, **_job_body(args, teacher["id"]))
    print(f"job {job['id']} queued", file=sys.stderr)
    job = client.wait(job["id"], progress=progress)
    if job["status"] != "succeeded":
        return _finish(client, job)
    for path in client.download_all(job["id"], _as_dir(args.out)):
        print(path)
    line = _summary(client.report(job["id"]))
    if line:
        print(line, file=sys.stderr)
    _final_lines(job)
    return 0


def _as_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


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
        with DistillClient(args.url, key) as client:
            return _run(args, client)
    except ApiError as exc:
        print(f"error: {exc.detail} (HTTP {exc.status})", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"error: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted (the job keeps running on the server)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
