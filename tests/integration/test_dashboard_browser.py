"""The web dashboard (``/ui/``) in headless Chromium against the real stack: the API under uvicorn, a Celery
worker, PostgreSQL, Redis and S3.

One scenario does what a user would: signs in with a pasted key, uploads a small synthetic dataset and a
teacher through the pages' upload forms, sends the new-job form with bad values (the API's 422 messages
must appear next to the fields) and then good ones; the job runs on the real worker while its page shows
the curves growing (the chart's epoch count read from the DOM) and then the evaluation table, whose
numbers must be the report's. Another tenant's job id shows "not found". The browser cannot leave the
machine (as in tests/unit/test_docs_offline.py); every request it made must have gone to the API, none may
carry the key in its URL, and the page may break no Content-Security-Policy rule.

Chromium and its driver are Debian's (``scripts/setup.sh`` installs them): missing, the test fails and says
so, like the /docs test; it is never skipped. Screenshots of every page (and the job page at phone size,
390x844) are written to ``test-output/screenshots/``; with ``RD_UPDATE_SCREENSHOTS=1`` the job page's is
also copied to ``docs/img/dashboard-job.png`` for the README.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

try:
    from tests.integration import dashboard_support as dash
    from tests.integration.conftest_worker import Stack, WorkerServices, start_stack, worker_services
except ImportError:  # pytest's default import mode puts this folder itself on sys.path
    import dashboard_support as dash  # type: ignore[no-redef]
    from conftest_worker import Stack, WorkerServices, start_stack, worker_services  # type: ignore[no-redef]

__all__ = ["worker_services"]  # a fixture: imported so that pytest finds it

pytestmark = [
    pytest.mark.integration,
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.timeout(600),
]

README_IMAGE = dash.REPO / "docs" / "img" / "dashboard-job.png"
JOB_S = 300  # the whole job on the worker
EPOCHS = 3
CLASSES = 4
STUDENTS = [("tiny-sat", "sat"), ("tiny-trades", "trades")]  # two tiny_cnn students, one pass over the data


@pytest.fixture(scope="module")
def stack(worker_services: WorkerServices, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with start_stack(worker_services, tmp_path_factory.mktemp("dashboard")) as s:
        library = s.client.http.get("/ui/vendor/uPlot.iife.min.js")
        if library.status_code != 200:  # the npm step of scripts/setup.sh did not run: fail, saying so
            pytest.fail(f"the dashboard's chart library is not served: {library.text}")
        s.start_worker()
        try:
            yield s
        finally:
            for proc in dash.RESTARTED:
                dash.stop_group(proc)
            dash.RESTARTED.clear()


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Any]:
    """Chromium on this machine only; what a test downloads lands in its ``tmp_path / "downloads"``."""
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never try to download a driver
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = dash.start_offline_chromium(downloads)
    try:
        yield driver
    finally:
        driver.quit()


def _dataset_file(folder: Path) -> Path:
    """A learnable synthetic set: the class sets the mean colour, plus noise (uint8 NHWC)."""
    import numpy as np

    rng = np.random.default_rng(0)
    colours = rng.uniform(90, 165, size=(CLASSES, 3))

    def split(n: int) -> tuple[Any, Any]:
        y = rng.integers(0, CLASSES, size=n)
        x = colours[y][:, None, None, :] + rng.normal(0, 30, size=(n, 32, 32, 3))
        return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)

    x, y = split(384)
    x_test, y_test = split(96)
    path = folder / "colours.npz"
    np.savez(path, x=x, y=y, x_test=x_test, y_test=y_test)
    return path


def _teacher_file(folder: Path) -> Path:
    import torch

    from core.models import create_model

    torch.manual_seed(0)
    path = folder / "tiny-teacher.pt"
    torch.save(create_model("tiny_cnn", CLASSES).state_dict(), path)
    return path


# ---------------------------------------------------------------- the scenarios


def _new_job(
    driver: Any, dataset_id: str, values: dict[str, str], several: bool = False, teacher_id: str = ""
) -> None:
    """Fill the form (one tiny_cnn trained with SAT, or the ``STUDENTS``) and send it."""
    from selenium.webdriver.support.ui import Select

    if not dash.find_all(driver, "#new-job-form"):
        dash.find(driver, "#new-job").click()
    dash.wait(
        driver, lambda d: dash.find(d, "#new-job-form").get_attribute("data-ready") == "true", "the job form"
    )
    Select(dash.find(driver, "#f-dataset")).select_by_value(dataset_id)
    Select(dash.find(driver, "#f-teacher_id")).select_by_value(teacher_id)
    Select(dash.find(driver, "#f-device")).select_by_value("cpu")
    dash.fill(driver, "#students .student-row input[name=student]", "tiny_cnn")
    dash.fill(driver, "#students .student-row input[name=method]", "sat")
    if several:
        dash.find(driver, "#add-student").click()
        dash.wait(
            driver, lambda d: len(dash.find_all(d, "#students .student-row")) == 2, "a second student row"
        )
        for row, (name, method) in zip(
            dash.find_all(driver, "#students .student-row"), STUDENTS, strict=True
        ):
            for field, value in (("student", "tiny_cnn"), ("method", method), ("name", name)):
                box = row.find_element("css selector", f"input[name={field}]")
                box.clear()
                box.send_keys(value)
    for name, value in values.items():
        dash.fill(driver, f"#f-{name}", value)
    for box in dash.find_all(driver, "#f-attacks input"):  # clean and fgsm only
        if box.is_selected() != (box.get_attribute("value") in ("clean", "fgsm")):
            box.click()
    for box in dash.find_all(driver, "#f-exports input"):  # no exports: the table is what is checked here
        if box.is_selected():
            box.click()
    if not dash.find(driver, "input[name=allow_degenerate]").is_selected():
        dash.find(driver, "input[name=allow_degenerate]").click()
    dash.find(driver, "#submit-job").click()


def test_a_job_made_in_the_form_runs_live_to_its_evaluation_table(
    stack: Stack, browser: Any, tmp_path: Path
) -> None:
    from core.stats import wilson_interval

    base, key = dash.base_url(stack), dash.api_key(stack)
    sent: list[tuple[str, dict[str, str]]] = []
    browser.get(f"{base}/")
    dash.wait(browser, lambda d: dash.find_all(d, "#api-key"), "the sign-in form")
    assert urlsplit(browser.current_url).path == "/ui/"
    dash.screenshot(browser, "sign-in")
    dash.sign_in(browser, base, key)
    stored = browser.execute_script("return [localStorage.length, sessionStorage.getItem('rd-api-key')]")
    assert stored == [0, key], "the key belongs in this tab's sessionStorage only"

    # Uploads through the pages' forms (multipart, with an upload progress bar).
    browser.get(f"{base}/ui/#/datasets")
    dash.wait(browser, lambda d: dash.find_all(d, "#dataset-upload-file"), "the datasets page")
    dash.upload(browser, "dataset-upload", _dataset_file(tmp_path), {"name": "colours"})
    datasets = stack.client.datasets.list().uploaded
    assert [d.name for d in datasets] == ["colours"]
    dataset_id = datasets[0].id
    dash.wait(
        browser, lambda d: dash.find_all(d, f"#datasets-body tr[data-id='{dataset_id}']"), "the dataset's row"
    )
    dash.screenshot(browser, "datasets")

    browser.get(f"{base}/ui/#/teachers")
    dash.wait(browser, lambda d: dash.find_all(d, "#teacher-upload-file"), "the teachers page")
    dash.upload(
        browser,
        "teacher-upload",
        _teacher_file(tmp_path),
        {"name": "tiny", "arch": "tiny_cnn", "format": "state_dict", "num_classes": str(CLASSES)},
    )
    teachers = stack.client.teachers.list()
    assert [(t.name, t.arch, t.num_classes) for t in teachers] == [("tiny", "tiny_cnn", CLASSES)]
    dash.wait(
        browser,
        lambda d: dash.find_all(d, f"#teachers-body tr[data-id='{teachers[0].id}']"),
        "the teacher's row",
    )
    dash.screenshot(browser, "teachers")

    # Bad values: the API's messages appear next to the fields they name, and no job is made.
    browser.get(f"{base}/ui/#/jobs")
    dash.wait(browser, lambda d: dash.find_all(d, "#new-job"), "the jobs page")
    _new_job(browser, dataset_id, {"epochs": "0", "eps": "2"})
    dash.wait(browser, lambda d: dash.text_of(d, "[data-error-for=epochs]"), "the epochs message")
    epochs_msg, eps_msg = (
        dash.text_of(browser, "[data-error-for=epochs]"),
        dash.text_of(browser, "[data-error-for=eps]"),
    )
    assert "greater than or equal to 1" in epochs_msg, epochs_msg
    assert "less than or equal to 0.5" in eps_msg, eps_msg
    assert stack.client.http.get("/v1/jobs").json()["items"] == []
    dash.screenshot(browser, "job-form-errors")

    # Good values: the form sends the job and opens its page.
    _new_job(
        browser,
        dataset_id,
        {
            "epochs": str(EPOCHS),
            "eps": "8/255",
            "batch_size": "64",
            "val_size": "64",
            "n_eval": "64",
            "method_params": '{"steps": 2}',
        },
        several=True,
        teacher_id=teachers[0].id,  # SAT and TRADES use none: the job warns that it is ignored
    )
    dash.wait(browser, lambda d: "#/jobs/" in d.current_url, "the new job's page")
    job_id = browser.current_url.rsplit("/", 1)[1]
    job = stack.client.jobs.get(job_id)
    assert (job.dataset_id, job.params["epochs"], job.params["attacks"]) == (dataset_id, 3, ["clean", "fgsm"])
    assert [(s["name"], s["method"]) for s in job.params["students"]] == [STUDENTS[0], STUDENTS[1]]

    # The curves grow while the worker trains: the chart's epoch count, read until the job has finished.
    # After the first epoch the API is killed and started again: the page says so, then reconnects with
    # Last-Event-ID and goes on from there.
    readings: list[int] = []
    restarted = False
    deadline = time.monotonic() + JOB_S
    while time.monotonic() < deadline:
        charts = dash.find_all(browser, "[data-chart=accuracy]")
        if charts:
            epochs = int(charts[0].get_attribute("data-epochs") or 0)
            if not readings or readings[-1] != epochs:
                readings.append(epochs)
            if epochs >= 1 and not restarted and stack.client.jobs.get(job_id).status == "running":
                sent += dash.requests_sent(browser)
                dash.kill_api(stack)
                dash.wait(
                    browser, lambda d: "event stream" in dash.text_of(d, "#job-error"), "the dropped stream"
                )
                dash.start_api_again(stack)
                restarted = True
        if dash.find_all(browser, "#job-status [data-status=succeeded], #job-status [data-status=failed]"):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the job did not finish in {JOB_S} s: {stack.worker_log()}")
    status = browser.execute_script("return document.querySelector('#job-status .badge').dataset.status")
    assert status == "succeeded", (dash.text_of(browser, "#job-error"), stack.worker_log())
    dash.wait(
        browser,
        lambda d: int(dash.find(d, "[data-chart=accuracy]").get_attribute("data-epochs")) == EPOCHS,
        "every epoch on the chart",
    )
    readings.append(EPOCHS)
    print("the accuracy chart's epochs, as read while the job ran:", readings)
    assert readings == sorted(readings) and len(set(readings)) >= 2, readings
    assert restarted, f"the job finished before the API could be restarted: {readings}"
    assert dash.text_of(browser, "#job-error") == "", "the page still says the stream is down"
    sent += dash.requests_sent(browser)
    streams = [headers for url, headers in sent if urlsplit(url).path == f"/v1/jobs/{job_id}/events"]
    assert len(streams) >= 2 and "last-event-id" not in streams[0], streams
    resumed_from = [int(h["last-event-id"]) for h in streams[1:]]
    last_event = stack.client.jobs.events(job_id, limit=1000).items[-1].id
    assert resumed_from and all(0 < i <= last_event for i in resumed_from), (resumed_from, last_event)
    assert all(h["authorization"] == f"Bearer {key}" for h in streams)
    metrics = stack.client.jobs.metrics(job_id)
    assert [m.epoch for m in metrics] == [1, 2, 3]
    for chart in ("loss", "accuracy", "lr"):
        assert int(dash.find(browser, f"[data-chart={chart}]").get_attribute("data-points")) >= EPOCHS, chart
        assert dash.find_all(browser, f"[data-chart={chart}] canvas"), f"the {chart} chart was not drawn"
    series = dash.find(browser, "[data-chart=accuracy]").get_attribute("data-series").split("|")
    assert series == [f"{name} val {kind}" for name, _ in STUDENTS for kind in ("clean", "robust")], series

    # The evaluation table, once the report exists: the report's accuracies and 95% intervals.
    dash.wait(
        browser,
        lambda d: len(dash.find_all(d, "table.evaluation tr[data-attack]")) == 8,
        "the evaluation tables",
    )
    report = stack.client.jobs.report(job_id)
    assert report.students is not None and sorted(report.students) == [name for name, _ in STUDENTS]
    for name, part in report.students.items():
        assert part.final is not None
        for which in ("best", "last"):
            for row in part.final[which].rows:
                where = f"[data-student={name}] tr[data-checkpoint={which}][data-attack={row.attack}] td"
                shown = [c.text.strip() for c in dash.find_all(browser, f"table.evaluation{where}")]
                extra = row.model_extra or {}
                low, high = extra.get("ci95") or wilson_interval(round(row.accuracy * row.n), row.n)
                assert shown[2] == f"{dash.fixed(100 * row.accuracy)}%", (name, which, row.attack, shown)
                assert shown[3] == f"{dash.fixed(100 * low)}% – {dash.fixed(100 * high)}%", (
                    name,
                    which,
                    row.attack,
                    shown,
                )
                assert shown[4] == str(row.n) == "64"
    # The report's paired comparison of the two students (McNemar), row by row.
    comparisons = report.model_dump().get("comparisons") or {}
    assert [r["student"] for r in comparisons.get("results", [])] == ["tiny-trades"] * 2, comparisons
    for result in comparisons["results"]:
        where = f"table.comparison tr[data-student={result['student']}][data-attack={result['attack']}] td"
        shown = [c.text.strip() for c in dash.find_all(browser, where)]
        assert shown[2] == f"{dash.fixed(100 * result['diff'], sign=True)} pts", shown
        assert shown[4] == ("yes" if result["significant_at_5pct"] else "no"), shown
    listed = browser.execute_script(
        "return [...document.querySelectorAll('#warnings li')].map(li => li.textContent)"
    )
    warned = stack.client.jobs.get(job_id).warnings
    assert warned and set(warned) <= set(listed), (warned, listed)  # the job's warnings, all shown
    names = {a.name for a in stack.client.jobs.artifacts(job_id)}
    dash.wait(
        browser,
        lambda d: {b.get_attribute("data-artifact") for b in dash.find_all(d, "[data-artifact]")} == names,
        "the job's files",
    )
    # A download (fetched with the key in the header, handed over as a Blob) and the model card.
    dash.find(browser, "[data-artifact='report.json']").click()
    saved = tmp_path / "downloads" / "report.json"
    dash.wait(browser, lambda d: saved.is_file() and saved.stat().st_size > 0, "the downloaded report")
    assert saved.read_bytes() == stack.client.http.get(f"/v1/jobs/{job_id}/artifacts/report.json").content
    cards = sorted(n for n in names if n.endswith("model_card.md"))
    assert cards, names
    dash.find(browser, f"[data-model-card='{cards[-1]}']").click()
    dash.wait(browser, lambda d: dash.find(d, "#model-card").get_attribute("textContent"), "the model card")
    card = stack.client.http.get(f"/v1/jobs/{job_id}/artifacts/{cards[-1]}").text
    assert dash.find(browser, "#model-card").get_attribute("textContent") == card
    browser.execute_script("window.scrollTo(0, 0)")
    page = dash.screenshot(browser, "job")
    if os.environ.get("RD_UPDATE_SCREENSHOTS") == "1":
        README_IMAGE.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(page, README_IMAGE)

    # The jobs list shows it; then the job page at phone size, without sideways scrolling.
    browser.get(f"{base}/ui/#/jobs")
    dash.wait(
        browser,
        lambda d: dash.find_all(d, f"#jobs-body tr[data-job-id='{job_id}'] [data-status=succeeded]"),
        "the job in the list",
    )
    row = dash.text_of(browser, f"#jobs-body tr[data-job-id='{job_id}']")
    assert "tiny_cnn" in row and "sat" in row and "colours" in row, row
    dash.screenshot(browser, "jobs")
    sent += dash.requests_sent(browser)
    browser.set_window_size(390, 844)
    browser.get(f"{base}/ui/#/jobs/{job_id}")
    dash.wait(
        browser,
        lambda d: len(dash.find_all(d, "table.evaluation tr[data-attack]")) == 8,
        "the phone-size job page",
    )
    width = browser.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1], f"the page is wider than the phone's screen: {width}"
    dash.screenshot(browser, "job-phone")
    browser.execute_script("document.querySelector('[data-chart=accuracy]').scrollIntoView()")
    dash.screenshot(browser, "job-phone-charts")
    for view, ready in (
        ("jobs", f"#jobs-body tr[data-job-id='{job_id}']"),
        ("teachers", "#teachers-body tr"),
    ):
        browser.get(f"{base}/ui/#/{view}")
        dash.wait(browser, lambda d, ready=ready: dash.find_all(d, ready), f"the {view} page at phone size")
        width = browser.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1], f"the {view} page is wider than the phone's screen: {width}"
        dash.screenshot(browser, f"{view}-phone")
    sent += dash.requests_sent(browser)

    # Delete the (unused) teacher from its page, confirming the browser's dialog.
    browser.set_window_size(1280, 1600)
    browser.get(f"{base}/ui/#/teachers")
    teacher_id = teachers[0].id
    dash.wait(
        browser, lambda d: dash.find_all(d, f"[data-delete='{teacher_id}']"), "the teacher's delete button"
    )
    dash.find(browser, f"[data-delete='{teacher_id}']").click()
    dash.wait(browser, lambda d: d.switch_to.alert, "the confirmation").accept()
    dash.wait(browser, lambda d: "Nothing uploaded" in dash.text_of(d, "#teachers-body"), "the teacher gone")
    assert stack.client.teachers.list() == []
    sent += dash.requests_sent(browser)
    dash.check_the_browser(browser, base, key, sent)


def test_another_tenants_job_is_not_found_and_the_owner_cancels_it(stack: Stack, browser: Any) -> None:
    from selenium.webdriver.support.ui import Select

    base, key = dash.base_url(stack), dash.api_key(stack)
    long_job = {"dataset": "cifar10-partial", "method": "natural", "student": "tiny_cnn", "epochs": 50}
    job = stack.client.http.post("/v1/jobs", json={**long_job, "device": "cpu"})
    assert job.status_code == 201, job.text
    job_id = job.json()["id"]

    browser.get(f"{base}/ui/")
    dash.wait(browser, lambda d: dash.find_all(d, "#api-key"), "the sign-in form")
    dash.fill(browser, "#api-key", "rd_not-a-key")
    dash.find(browser, "#sign-in button[type=submit]").click()
    dash.wait(browser, lambda d: dash.text_of(d, "#sign-in-error"), "the refusal")
    assert "not accepted" in dash.text_of(browser, "#sign-in-error")

    other = dash.other_tenant_key(stack)
    dash.sign_in(browser, base, other)
    dash.wait(browser, lambda d: "No jobs" in dash.text_of(d, "#jobs-body"), "the other tenant's empty list")
    browser.get(f"{base}/ui/#/jobs/{job_id}")
    dash.wait(browser, lambda d: dash.find_all(d, "#not-found"), "the not-found page")
    assert "Job not found" in dash.text_of(browser, "#not-found")
    assert f"job '{job_id}' not found" in dash.text_of(browser, "#not-found")

    # The owner sees it on the same page, and cancels it there.
    dash.sign_in(browser, base, key)
    browser.get(f"{base}/ui/#/jobs/{job_id}")
    dash.wait(
        browser,
        lambda d: dash.find_all(d, "#cancel-job") and dash.find(d, "#cancel-job").is_displayed(),
        "Cancel",
    )
    dash.find(browser, "#cancel-job").click()
    dash.wait(
        browser, lambda d: dash.find_all(d, "#job-status [data-status=cancelled]"), "the job cancelled", JOB_S
    )
    assert stack.client.jobs.get(job_id).status == "cancelled"
    assert not dash.find(browser, "#cancel-job").is_displayed()
    dash.wait(browser, lambda d: "No report" in dash.text_of(d, "#evaluation"), "the missing report said")
    sent = dash.requests_sent(browser)
    assert [u for u, h in sent if u.endswith(f"/v1/jobs/{job_id}/cancel")], "no cancel request"

    # Paging by the API's cursor and the status filter, on more jobs than a page holds.
    for _ in range(10):
        more = stack.client.http.post("/v1/jobs", json={**long_job, "device": "cpu"})
        assert more.status_code == 201, more.text
        stack.client.jobs.cancel(more.json()["id"])
    deadline = time.monotonic() + JOB_S  # a job the worker had already taken stops at its next check
    while any(j.status != "cancelled" for j in stack.client.jobs.list() if j.method == "natural"):
        assert time.monotonic() < deadline, "the cancelled jobs did not stop"
        time.sleep(0.3)
    newest_first = [j.id for j in stack.client.jobs.list()]
    assert len(newest_first) >= 11  # these 11 (and the first test's)
    browser.get(f"{base}/ui/#/jobs")
    dash.wait(browser, lambda d: dash.find_all(d, "#page-size"), "the jobs page")
    Select(dash.find(browser, "#page-size")).select_by_value("10")

    def shown(d: Any) -> list[str]:
        rows = "return [...document.querySelectorAll('#jobs-body tr[data-job-id]')].map(r => r.dataset.jobId)"
        return list(d.execute_script(rows))

    dash.wait(browser, lambda d: shown(d) == newest_first[:10], "the first page of 10")
    assert dash.find(browser, "#newer").get_attribute("disabled") is not None
    dash.find(browser, "#older").click()
    dash.wait(browser, lambda d: shown(d) == newest_first[10:20], "the second page")
    assert dash.find(browser, "#older").get_attribute("disabled") is not None
    dash.find(browser, "#newer").click()
    dash.wait(browser, lambda d: shown(d) == newest_first[:10], "the first page again")
    # The filter leaves the 11 cancelled jobs out (the first test's job is the one that succeeded).
    Select(dash.find(browser, "#status-filter")).select_by_value("succeeded")
    succeeded = [j.id for j in stack.client.jobs.list(status="succeeded")]
    dash.wait(
        browser,
        lambda d: shown(d) == succeeded and "job(s)" in dash.text_of(d, "#jobs-info"),
        "succeeded only",
    )
    assert dash.text_of(browser, "#jobs-info").endswith(f"{len(succeeded)} job(s)")
    sent += dash.requests_sent(browser)
    for each in (key, other):
        dash.check_the_browser(browser, base, each, sent)


def test_the_pages_need_no_key_and_carry_a_strict_policy(stack: Stack) -> None:
    """Every file the page loads comes from /ui/ with the same policy; nothing else is served from there."""
    import re

    import httpx

    with httpx.Client(base_url=dash.base_url(stack), timeout=10) as anonymous:
        root = anonymous.get("/")
        assert (root.status_code, root.headers["location"]) == (307, "ui/")
        page = anonymous.get("/ui/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        policy = page.headers["content-security-policy"]
        assert "script-src 'self';" in policy and "connect-src 'self';" in policy
        assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
        assert not re.search(r"<script(?![^>]*\bsrc=)", page.text), "an inline script"
        assert not re.search(r"\sstyle=|\son[a-z]+=", page.text), "an inline style or handler"
        loaded = re.findall(r'(?:src|href)="([^"#:]+)"', page.text)
        assert "vendor/uPlot.iife.min.js" in loaded and "app.js" in loaded
        modules = set(loaded)
        for name in sorted(modules):  # the page's files and the modules they import, each from /ui/
            asset = anonymous.get(f"/ui/{name}")
            assert asset.status_code == 200, name
            assert asset.headers["content-security-policy"] == policy, name
            modules |= set(re.findall(r'from "\./([a-z]+\.js)"', asset.text))
        for name in sorted(modules - set(loaded)):
            assert anonymous.get(f"/ui/{name}").status_code == 200, name
        for hidden in ("ui.py", "node_modules/uplot/package.json", "vendor/uPlot.d.ts", "..%2Fapp.py"):
            assert anonymous.get(f"/ui/{hidden}").status_code == 404, hidden
    assert not [p for p in stack.client.http.get("/openapi.json").json()["paths"] if p == "/" or "/ui" in p]
