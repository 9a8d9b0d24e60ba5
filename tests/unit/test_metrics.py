"""Prometheus metrics on the embedded stack (SQLite, folder broker and store): the text format, labels that
hold no tenant data, RD_METRICS=off and RD_METRICS_PORT, the job metrics read from the database, the
worker's meter, and alert rules that name only metrics the service exposes."""

from __future__ import annotations

import io
import re
import socket
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import yaml
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from api.app import create_app
from service.auth import create_api_key
from service.metrics import JobMetricsCollector
from service.models import ApiKey, Job, Tenant
from service.settings import Settings
from worker.metrics import JobMeter, make_instruments

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS = REPO / "deploy" / "prometheus"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> tuple[Samples, dict[str, str]]:
    """Samples by (name, sorted labels), and each family's type."""
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _settings(root: Path, **overrides: Any) -> Settings:
    data = root / "data"
    for folder in ("cifar-10-batches-py-partial", "cifar-100-python-partial"):
        (data / folder).mkdir(parents=True, exist_ok=True)
        (data / folder / "batches.meta").write_bytes(b"x")
    return Settings(var_dir=root / "var", data_root=data, **overrides)


class Recorder:
    def __init__(self) -> None:
        self.enqueued: list[str] = []

    def enqueue(self, job_id: str) -> None:
        self.enqueued.append(job_id)


@pytest.fixture
def app(tmp_path: Path) -> Any:
    queue = Recorder()
    return create_app(_settings(tmp_path), enqueue=queue.enqueue, revoke=lambda job_id: None)


@pytest.fixture
def client(app: Any) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


def _key(app: Any, tenant: str) -> str:
    with app.state.session_factory() as session:
        key = create_api_key(session, tenant)
        session.commit()
    return key


def scrape(client: TestClient) -> Samples:
    r = client.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=")
    return parse(r.text)[0]


def test_requests_are_labelled_by_route_template_never_by_path(app: Any, client: TestClient) -> None:
    key = _key(app, "alice-corp")
    auth = {"Authorization": f"Bearer {key}"}
    job_id = "0123456789abcdef0123456789abcdef"
    before = scrape(client)
    assert client.get("/v1/teachers", headers=auth).status_code == 200
    assert client.get(f"/v1/jobs/{job_id}", headers=auth).status_code == 404
    assert client.get(f"/v1/jobs/{job_id}", headers=auth).status_code == 404
    assert client.get(f"/secret-{job_id}/alice-corp").status_code == 404
    assert client.post("/v1/jobs", headers=auth, json={"epochs": "many"}).status_code == 422
    assert client.get("/v1/teachers").status_code == 401
    after = scrape(client)

    def requests(**labels: str) -> float:
        return moved(before, after, "rd_http_requests_total", **labels)

    assert requests(route="/v1/teachers", method="GET", status="200") == 1
    assert requests(route="/v1/teachers", method="GET", status="401") == 1
    assert requests(route="/v1/jobs/{job_id}", method="GET", status="404") == 2
    assert requests(route="unmatched", method="GET", status="404") == 1
    assert requests(route="/v1/jobs", method="POST", status="422") == 1
    assert value(after, "rd_http_request_duration_seconds_count", route="/v1/jobs/{job_id}", method="GET",
                 status="404") == 2
    # The scrape itself is not counted (so counters move only with the traffic they describe).
    assert not [k for k in after if ("route", "/metrics") in k[1]]
    with app.state.session_factory() as session:
        tenant_id = session.scalar(sa.select(Tenant.id))
        prefix = session.scalar(sa.select(ApiKey.prefix))
    secrets = [job_id, "alice-corp", key, tenant_id, prefix, "secret-"]
    labels = {v for _, pairs in after for _, v in pairs}
    assert not [v for v in labels for s in secrets if s and s in v]
    assert value(after, "rd_event_streams_open") == 0


def test_uploads_and_jobs_from_the_database(app: Any, client: TestClient) -> None:
    import torch

    from core.models import create_model

    auth = {"Authorization": f"Bearer {_key(app, 'alice')}"}
    buf = io.BytesIO()
    torch.save(create_model("tiny_cnn", 10).state_dict(), buf)
    content = buf.getvalue()
    before = scrape(client)
    r = client.post("/v1/teachers", headers=auth, files={"file": ("teacher.pt", content)},
                    data={"arch": "tiny_cnn", "dataset": "cifar10-partial"})
    assert r.status_code == 201, r.text
    body = {"teacher_id": r.json()["id"], "student": "tiny_cnn", "dataset": "cifar10-partial", "epochs": 1}
    for _ in range(3):
        assert client.post("/v1/jobs", headers=auth, json=body).status_code == 201
    after = scrape(client)
    assert moved(before, after, "rd_upload_bytes_total", kind="teacher") == len(content)
    assert moved(before, after, "rd_uploads_total", kind="teacher") == 1
    assert moved(before, after, "rd_upload_bytes_total", kind="dataset") == 0
    assert value(after, "rd_jobs", status="queued") == 3
    assert value(after, "rd_jobs", status="succeeded") == 0
    assert value(after, "rd_metrics_source_up", source="database") == 1
    assert value(after, "rd_metrics_source_up", source="broker") == 1
    assert ("rd_queue_depth", ()) in after
    assert value(after, "rd_job_oldest_queued_seconds") >= 0

    # Two jobs end (one after a lost worker): the histograms and counters follow their timestamps.
    with app.state.session_factory() as session:
        first, second, _ = session.scalars(sa.select(Job).order_by(Job.created_at)).all()
        for job, status, waited, ran in ((first, "succeeded", 4.0, 100.0), (second, "failed", 50.0, 4000.0)):
            job.status, job.attempts = status, 2
            job.started_at = job.created_at + timedelta(seconds=waited)
            job.finished_at = job.started_at + timedelta(seconds=ran)
        second.lost_workers = 1
        session.commit()
    done = scrape(client)
    assert value(done, "rd_jobs", status="queued") == 1
    assert value(done, "rd_jobs", status="succeeded") == value(done, "rd_jobs", status="failed") == 1
    assert value(done, "rd_job_duration_seconds_count", status="succeeded") == 1
    assert value(done, "rd_job_duration_seconds_sum", status="succeeded") == pytest.approx(100.0, abs=1e-3)
    assert value(done, "rd_job_duration_seconds_bucket", status="succeeded", le="60.0") == 0
    assert value(done, "rd_job_duration_seconds_bucket", status="succeeded", le="120.0") == 1
    assert value(done, "rd_job_duration_seconds_bucket", status="failed", le="3600.0") == 0
    assert value(done, "rd_job_duration_seconds_bucket", status="failed", le="+Inf") == 1
    assert value(done, "rd_job_queue_wait_seconds_count") == 2
    assert value(done, "rd_job_queue_wait_seconds_sum") == pytest.approx(54.0, abs=1e-3)
    assert value(done, "rd_job_queue_wait_seconds_bucket", le="5.0") == 1
    assert value(done, "rd_job_attempts_total") == 4
    assert value(done, "rd_job_lost_workers_total") == 1
    assert value(done, "rd_job_failed_attempts_total") == 0


def test_metrics_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RD_METRICS", "off")
    assert Settings().metrics is False
    monkeypatch.setenv("RD_METRICS", "on")
    assert Settings().metrics is True
    app = create_app(_settings(tmp_path, metrics=False), enqueue=lambda job_id: None)
    with TestClient(app) as client:
        assert client.get("/metrics").status_code == 404
        assert client.get("/healthz").status_code == 200
    assert app.state.metrics is None


def test_metrics_on_a_port_of_their_own(tmp_path: Path) -> None:
    port = free_port()
    app = create_app(_settings(tmp_path, metrics_port=port, metrics_host="127.0.0.1"), enqueue=lambda j: None)
    url = f"http://127.0.0.1:{port}/metrics"
    with TestClient(app) as client:
        assert client.get("/metrics").status_code == 404  # not on the API's own port
        assert client.get("/healthz").status_code == 200
        r = httpx.get(url, timeout=10)
        assert r.status_code == 200
        samples, _ = parse(r.text)
        assert value(samples, "rd_http_requests_total", route="/healthz", method="GET", status="200") == 1
        assert value(samples, "rd_http_requests_total", route="unmatched", method="GET", status="404") == 1
        assert value(samples, "rd_jobs", status="queued") == 0
    with pytest.raises(httpx.ConnectError):  # the server stopped with the app
        httpx.get(url, timeout=5)


def test_a_database_that_does_not_answer_leaves_the_scrape_standing(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there: the connection is refused
    settings = _settings(tmp_path, database_url=f"postgresql+psycopg://rd@127.0.0.1:{port}/rd",
                         metrics_timeout_s=1.0)
    registry = CollectorRegistry(auto_describe=False)
    collector = JobMetricsCollector(settings)
    registry.register(collector)
    try:
        samples, _ = parse(generate_latest(registry).decode())
    finally:
        collector.close()
    assert value(samples, "rd_metrics_source_up", source="database") == 0
    assert value(samples, "rd_metrics_source_up", source="broker") == 1
    assert not [k for k in samples if k[0] == "rd_jobs"]


def _worker_samples(registry: CollectorRegistry) -> Samples:
    return parse(generate_latest(registry).decode())[0]


def test_worker_meter_counts_images_attacks_and_outcomes() -> None:
    registry = CollectorRegistry()
    instruments = make_instruments(registry)
    meter = JobMeter(lambda: instruments)
    meter.batch_size = 32
    seen: dict[str, float] = {}

    def attempt() -> str:
        seen["busy"] = value(_worker_samples(registry), "rd_worker_busy")
        for epoch in (1, 2):
            for step in (1, 3, 4):  # the pipeline skips reports within a second of the last one
                meter.on_event({"type": "progress", "epoch": epoch, "epochs": 2, "step": step, "steps": 4})
        meter.on_event({"type": "status", "status": "evaluating"})
        for checkpoint in ("best", "last"):
            for attack in ("clean", "fgsm", "made-up"):
                for done in (50, 100):
                    meter.on_event({"type": "progress", "phase": "evaluating", "checkpoint": checkpoint,
                                    "attack": attack, "done": done, "total": 100})
        return "succeeded"

    assert meter.ran(attempt) == "succeeded"
    meter.not_run()
    samples = _worker_samples(registry)
    assert seen["busy"] == 1 and value(samples, "rd_worker_busy") == 0
    assert value(samples, "rd_worker_train_images_total") == 2 * 4 * 32
    assert value(samples, "rd_worker_eval_seconds_count", attack="clean") == 2
    assert value(samples, "rd_worker_eval_seconds_count", attack="fgsm") == 2
    assert value(samples, "rd_worker_eval_seconds_count", attack="other") == 2  # never a free-form name
    assert value(samples, "rd_worker_attempts_total", outcome="succeeded") == 1
    assert value(samples, "rd_worker_attempts_total", outcome="not_run") == 1
    assert value(samples, "rd_worker_device", type="cpu") == 0  # set while the job ran


def test_worker_meter_never_fails_the_job() -> None:
    def broken() -> Any:
        raise RuntimeError("no metrics folder")

    meter = JobMeter(broken)
    meter.batch_size = 8
    meter.on_event({"type": "progress", "epoch": 1, "epochs": 1, "step": 1, "steps": 1})
    assert meter.ran(lambda: "failed") == "failed"


CHILD = """
from worker.metrics import make_instruments
m = make_instruments(None)
m.busy.inc()  # and exits without saying so, like a SIGKILLed pool child
m.train_images.inc({images})
m.eval_seconds.labels("clean").observe(0.2)
m.attempts.labels("succeeded").inc()
"""


def test_worker_parent_sums_its_children_and_folds_the_exited_ones(tmp_path: Path) -> None:
    """Real child processes write the multiprocess files; the parent's collector serves their sum, counts
    none of them as busy once they have exited, and folds their files into one archive per type."""
    import os
    import subprocess
    import sys

    from worker.metrics import _LiveCollector

    folder = tmp_path / "prom"
    folder.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder), "PYTHONPATH": str(REPO)}
    env.pop("RD_WORKER_METRICS_PORT", None)

    def child(images: int) -> None:
        subprocess.run([sys.executable, "-c", CHILD.format(images=images)], env=env, check=True, cwd=REPO)

    collector = _LiveCollector(folder)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)

    def served() -> Samples:
        return _worker_samples(registry)

    for images in (64, 128):
        child(images)
    assert len(list(folder.glob("counter_*.db"))) == 2
    first = served()
    assert value(first, "rd_worker_train_images_total") == 192
    assert value(first, "rd_worker_eval_seconds_count", attack="clean") == 2
    assert value(first, "rd_worker_attempts_total", outcome="succeeded") == 2
    assert value(first, "rd_worker_busy") == 0
    assert sorted(p.name for p in folder.iterdir()) == ["counter_exited.db", "histogram_exited.db"]
    assert served() == first  # folding twice counts nothing twice
    child(256)
    again = served()
    assert value(again, "rd_worker_train_images_total") == 448
    assert value(again, "rd_worker_eval_seconds_bucket", attack="clean", le="0.5") == 3
    assert value(again, "rd_worker_eval_seconds_sum", attack="clean") == pytest.approx(0.6)
    assert sorted(p.name for p in folder.iterdir()) == ["counter_exited.db", "histogram_exited.db"]


# ---------------------------------------------------------------- Prometheus's configuration

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
            "offset"}


def metric_names(expr: str) -> set[str]:
    """The series an expression selects: identifiers that are not functions, keywords or labels."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        rest = expr[match.end():].lstrip()
        if match.group() not in KEYWORDS and not rest.startswith("(") and not match.group()[0].isdigit():
            names.add(match.group())
    return names


def exposed_names(text: str) -> set[str]:
    """Every series name the exposition can hold, histograms and counters with their suffixes."""
    _, types = parse(text)
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
                "gauge": ("",)}
    return {name + suffix for name, kind in types.items() for suffix in suffixes.get(kind, ("",))}


def test_alert_rules_name_only_exposed_metrics(client: TestClient) -> None:
    registry = CollectorRegistry()
    make_instruments(registry)
    exposed = exposed_names(client.get("/metrics").text) | exposed_names(generate_latest(registry).decode())
    exposed.add("up")  # Prometheus's own, per target
    rules = [r for g in yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"] for r in g["rules"]]
    assert len(rules) >= 3
    for rule in rules:
        assert {"alert", "expr"} <= set(rule) and rule["alert"].isidentifier(), rule
        names = metric_names(rule["expr"])
        assert names, rule
        assert names <= exposed, (rule["alert"], names - exposed)
    assert metric_names('max(increase(rd_x_count{status="failed"}[1h])) by (le) >= 3') == {"rd_x_count"}


def test_prometheus_scrapes_the_ports_compose_configures() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert "/etc/prometheus/alerts.yml" in config["rule_files"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    api_port = services["api"]["environment"]["RD_METRICS_PORT"]
    assert jobs["rd-api"]["static_configs"][0]["targets"] == [f"api:{api_port}"]
    worker = jobs["rd-worker"]["dns_sd_configs"][0]
    assert worker["names"] == ["worker"]
    assert str(worker["port"]) == services["worker"]["environment"]["RD_WORKER_METRICS_PORT"]
    # The metrics port is for Prometheus only: the API publishes its own port, not this one.
    assert all(api_port not in str(p) for p in services["api"]["ports"])
