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

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

try:
    from tests.integration.conftest_worker import Stack, WorkerServices, start_stack, worker_services
except ImportError:  # pytest's default import mode puts this folder itself on sys.path
    from conftest_worker import Stack, WorkerServices, start_stack, worker_services  # type: ignore[no-redef]

__all__ = ["worker_services"]  # a fixture: imported so that pytest finds it

pytestmark = [
    pytest.mark.integration,
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.timeout(600),
]

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "test-output" / "screenshots"
README_IMAGE = REPO / "docs" / "img" / "dashboard-job.png"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT_S = 45  # a page showing what the API answered: generous on 2 busy cores, not a speed target
JOB_S = 300  # the whole job on the worker
EPOCHS = 3
CLASSES = 4
STUDENTS = [("tiny-sat", "sat"), ("tiny-trades", "trades")]  # two tiny_cnn students, one pass over the data


def _browser_paths() -> tuple[str, str]:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if shutil.which(p) is None]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} not installed: run scripts/setup.sh as root "
            "(apt-get install chromium chromium-driver)"
        )
    return CHROMIUM, CHROMEDRIVER


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
            for proc in RESTARTED:
                _stop_group(proc)
            RESTARTED.clear()


RESTARTED: list[subprocess.Popen[bytes]] = []  # API processes a test started again (stopped with the stack)


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL for the process group (the API and its model-checking process)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def _kill_api(stack: Stack) -> None:
    """SIGKILL the API process and its group: its event streams drop mid-job, as in a crash."""
    current = RESTARTED[-1] if RESTARTED else stack.api
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(current.pid, signal.SIGKILL)
    current.wait(timeout=10)


def _start_api_again(stack: Stack) -> None:
    """The API again on the same port, with the same settings."""
    port = urlsplit(_base(stack)).port
    with open(stack.root / "api-again.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "api.app:create_app", "--host", "127.0.0.1",
             "--port", str(port), "--log-level", "warning"],
            cwd=REPO, env=stack.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    RESTARTED.append(proc)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, (stack.root / "api-again.log").read_text()[-3000:]
        with contextlib.suppress(Exception):
            if stack.client.http.get("/healthz", timeout=2).status_code == 200:
                return
        time.sleep(0.3)
    raise AssertionError("the API did not start again")


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Any]:
    """Headless Chromium that can reach 127.0.0.1 only (every other host resolves to nothing)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = _browser_paths()
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never try to download a driver
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1600",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--proxy-server=http://127.0.0.1:9",
        "--proxy-bypass-list=127.0.0.1",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    downloads = tmp_path / "downloads"  # the test's tmp_path: the files a test downloads land here
    downloads.mkdir()
    options.add_experimental_option(
        "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    )
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    try:
        yield driver
    finally:
        driver.quit()


def _key(stack: Stack) -> str:
    return str(stack.client.http.headers["Authorization"]).removeprefix("Bearer ")


def _base(stack: Stack) -> str:
    return str(stack.client.http.base_url).rstrip("/")


def _other_tenant_key(stack: Stack) -> str:
    from service.auth import create_api_key
    from service.db import make_engine, make_session_factory, session_scope

    engine = make_engine(stack.database_url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            return create_api_key(session, f"other-{stack.queue}")
    finally:
        engine.dispose()


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


# ---------------------------------------------------------------- browser helpers


def _wait(driver: Any, predicate: Any, what: str, timeout: float = WAIT_S) -> Any:
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(
        driver, timeout, poll_frequency=0.1, ignored_exceptions=[StaleElementReferenceException]
    )
    try:
        return wait.until(predicate)
    except TimeoutException:
        shot = SCREENSHOTS / f"timeout-{int(time.time())}.png"
        driver.save_screenshot(str(shot))
        raise AssertionError(
            f"timed out after {timeout:g} s waiting for {what} (screenshot {shot})"
        ) from None


def _css(driver: Any, selector: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, selector)


def _all(driver: Any, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return list(driver.find_elements(By.CSS_SELECTOR, selector))


def _text(driver: Any, selector: str) -> str:
    """The rendered text of the first match ("" for none), read in one step: views re-render."""
    script = "const e = document.querySelector(arguments[0]); return e ? e.innerText.trim() : '';"
    return str(driver.execute_script(script, selector))


def _fill(driver: Any, selector: str, value: str) -> None:
    field = _css(driver, selector)
    field.clear()
    field.send_keys(value)


def _fixed(x: float, sign: bool = False) -> str:
    """``x.toFixed(1)`` as the page's JavaScript writes it: the exact binary value, ties away from zero
    (Python's format rounds ties to even: 6.25 -> "6.2" where the page shows "6.3")."""
    from decimal import ROUND_HALF_UP, Decimal

    text = str(Decimal(x).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP))
    return f"+{text}" if sign and x >= 0 else text


def _screenshot(driver: Any, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


def _sign_in(driver: Any, base: str, key: str) -> None:
    driver.get(f"{base}/")  # redirected to /ui/
    _wait(driver, lambda d: _all(d, "#api-key") or _all(d, "#sign-out"), "the page")
    if not _all(driver, "#api-key"):
        _css(driver, "#sign-out").click()
    _wait(driver, lambda d: _all(d, "#api-key"), "the sign-in form")
    _fill(driver, "#api-key", key)
    _css(driver, "#sign-in button[type=submit]").click()
    _wait(driver, lambda d: _all(d, "#jobs-body"), "the jobs page after signing in")


def _upload(driver: Any, form: str, file: Path, fields: dict[str, str]) -> str:
    """Send an upload form; returns the status line once the API kept the file."""
    _css(driver, f"#{form}-file").send_keys(str(file))
    for name, value in fields.items():
        element = _css(driver, f"#{form}-{name}")
        if element.tag_name == "select":
            from selenium.webdriver.support.ui import Select

            Select(element).select_by_value(value)
        else:
            _fill(driver, f"#{form}-{name}", value)
    _css(driver, f"#{form}-submit").click()
    _wait(
        driver,
        lambda d: _text(d, f"#{form}-status").startswith("Kept") or _text(d, f"#{form}-error"),
        f"the {form} to finish",
    )
    assert not _text(driver, f"#{form}-error"), _text(driver, f"#{form}-error")
    return _text(driver, f"#{form}-status")


def _requests_sent(driver: Any) -> list[tuple[str, dict[str, str]]]:
    """(URL, headers) of every request the page sent, from the DevTools network log (drained by the
    call)."""
    sent: list[tuple[str, dict[str, str]]] = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            request = message["params"]["request"]
            sent.append((request["url"], {k.lower(): v for k, v in request.get("headers", {}).items()}))
    return sent


def _check_the_browser(driver: Any, base: str, key: str, sent: list[tuple[str, dict[str, str]]]) -> None:
    """Nothing left the machine, the key was never in a URL or a cookie, no CSP rule was broken."""
    urls = [url for url, _ in sent]
    local = urlsplit(base).netloc
    away = [u for u in urls if urlsplit(u).scheme not in ("data", "blob") and urlsplit(u).netloc != local]
    assert away == [], f"the dashboard reached off the machine: {away}"
    assert any(urlsplit(u).path == "/ui/vendor/uPlot.iife.min.js" for u in urls), "uPlot was not loaded"
    assert not [u for u in urls if key in u], "the API key appeared in a URL"
    assert driver.get_cookies() == []
    csp = [e["message"] for e in driver.get_log("browser") if "Content Security Policy" in e["message"]]
    assert csp == [], csp


# ---------------------------------------------------------------- the scenarios


def _new_job(driver: Any, dataset_id: str, values: dict[str, str], several: bool = False) -> None:
    """Fill the form (one tiny_cnn trained with SAT, or the ``STUDENTS``) and send it."""
    from selenium.webdriver.support.ui import Select

    if not _all(driver, "#new-job-form"):
        _css(driver, "#new-job").click()
    _wait(driver, lambda d: _css(d, "#new-job-form").get_attribute("data-ready") == "true", "the job form")
    Select(_css(driver, "#f-dataset")).select_by_value(dataset_id)
    Select(_css(driver, "#f-teacher_id")).select_by_value("")
    Select(_css(driver, "#f-device")).select_by_value("cpu")
    _fill(driver, "#students .student-row input[name=student]", "tiny_cnn")
    _fill(driver, "#students .student-row input[name=method]", "sat")
    if several:
        _css(driver, "#add-student").click()
        _wait(driver, lambda d: len(_all(d, "#students .student-row")) == 2, "a second student row")
        for row, (name, method) in zip(_all(driver, "#students .student-row"), STUDENTS, strict=True):
            for field, value in (("student", "tiny_cnn"), ("method", method), ("name", name)):
                box = row.find_element("css selector", f"input[name={field}]")
                box.clear()
                box.send_keys(value)
    for name, value in values.items():
        _fill(driver, f"#f-{name}", value)
    for box in _all(driver, "#f-attacks input"):  # clean and fgsm only
        if box.is_selected() != (box.get_attribute("value") in ("clean", "fgsm")):
            box.click()
    for box in _all(driver, "#f-exports input"):  # no exports: the table is what is checked here
        if box.is_selected():
            box.click()
    if not _css(driver, "input[name=allow_degenerate]").is_selected():
        _css(driver, "input[name=allow_degenerate]").click()
    _css(driver, "#submit-job").click()


def test_a_job_made_in_the_form_runs_live_to_its_evaluation_table(
    stack: Stack, browser: Any, tmp_path: Path
) -> None:
    from core.stats import wilson_interval

    base, key = _base(stack), _key(stack)
    sent: list[tuple[str, dict[str, str]]] = []
    browser.get(f"{base}/")
    _wait(browser, lambda d: _all(d, "#api-key"), "the sign-in form")
    assert urlsplit(browser.current_url).path == "/ui/"
    _screenshot(browser, "sign-in")
    _sign_in(browser, base, key)
    stored = browser.execute_script("return [localStorage.length, sessionStorage.getItem('rd-api-key')]")
    assert stored == [0, key], "the key belongs in this tab's sessionStorage only"

    # Uploads through the pages' forms (multipart, with an upload progress bar).
    browser.get(f"{base}/ui/#/datasets")
    _wait(browser, lambda d: _all(d, "#dataset-upload-file"), "the datasets page")
    _upload(browser, "dataset-upload", _dataset_file(tmp_path), {"name": "colours"})
    datasets = stack.client.datasets.list().uploaded
    assert [d.name for d in datasets] == ["colours"]
    dataset_id = datasets[0].id
    _wait(browser, lambda d: _all(d, f"#datasets-body tr[data-id='{dataset_id}']"), "the dataset's row")
    _screenshot(browser, "datasets")

    browser.get(f"{base}/ui/#/teachers")
    _wait(browser, lambda d: _all(d, "#teacher-upload-file"), "the teachers page")
    _upload(
        browser,
        "teacher-upload",
        _teacher_file(tmp_path),
        {"name": "tiny", "arch": "tiny_cnn", "format": "state_dict", "num_classes": str(CLASSES)},
    )
    teachers = stack.client.teachers.list()
    assert [(t.name, t.arch, t.num_classes) for t in teachers] == [("tiny", "tiny_cnn", CLASSES)]
    _wait(browser, lambda d: _all(d, f"#teachers-body tr[data-id='{teachers[0].id}']"), "the teacher's row")
    _screenshot(browser, "teachers")

    # Bad values: the API's messages appear next to the fields they name, and no job is made.
    browser.get(f"{base}/ui/#/jobs")
    _wait(browser, lambda d: _all(d, "#new-job"), "the jobs page")
    _new_job(browser, dataset_id, {"epochs": "0", "eps": "2"})
    _wait(browser, lambda d: _text(d, "[data-error-for=epochs]"), "the epochs message")
    epochs_msg, eps_msg = _text(browser, "[data-error-for=epochs]"), _text(browser, "[data-error-for=eps]")
    assert "greater than or equal to 1" in epochs_msg, epochs_msg
    assert "less than or equal to 0.5" in eps_msg, eps_msg
    assert stack.client.http.get("/v1/jobs").json()["items"] == []
    _screenshot(browser, "job-form-errors")

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
    )
    _wait(browser, lambda d: "#/jobs/" in d.current_url, "the new job's page")
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
        charts = _all(browser, "[data-chart=accuracy]")
        if charts:
            epochs = int(charts[0].get_attribute("data-epochs") or 0)
            if not readings or readings[-1] != epochs:
                readings.append(epochs)
            if epochs >= 1 and not restarted and stack.client.jobs.get(job_id).status == "running":
                sent += _requests_sent(browser)
                _kill_api(stack)
                _wait(browser, lambda d: "event stream" in _text(d, "#job-error"), "the dropped stream")
                _start_api_again(stack)
                restarted = True
        if _all(browser, "#job-status [data-status=succeeded], #job-status [data-status=failed]"):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the job did not finish in {JOB_S} s: {stack.worker_log()}")
    status = browser.execute_script("return document.querySelector('#job-status .badge').dataset.status")
    assert status == "succeeded", (_text(browser, "#job-error"), stack.worker_log())
    _wait(
        browser,
        lambda d: int(_css(d, "[data-chart=accuracy]").get_attribute("data-epochs")) == EPOCHS,
        "every epoch on the chart",
    )
    readings.append(EPOCHS)
    print("the accuracy chart's epochs, as read while the job ran:", readings)
    assert readings == sorted(readings) and len(set(readings)) >= 2, readings
    assert restarted, f"the job finished before the API could be restarted: {readings}"
    assert _text(browser, "#job-error") == "", "the page still says the stream is down"
    sent += _requests_sent(browser)
    streams = [headers for url, headers in sent if urlsplit(url).path == f"/v1/jobs/{job_id}/events"]
    assert len(streams) >= 2 and "last-event-id" not in streams[0], streams
    resumed_from = [int(h["last-event-id"]) for h in streams[1:]]
    last_event = stack.client.jobs.events(job_id, limit=1000).items[-1].id
    assert resumed_from and all(0 < i <= last_event for i in resumed_from), (resumed_from, last_event)
    assert all(h["authorization"] == f"Bearer {key}" for h in streams)
    metrics = stack.client.jobs.metrics(job_id)
    assert [m.epoch for m in metrics] == [1, 2, 3]
    for chart in ("loss", "accuracy", "lr"):
        assert int(_css(browser, f"[data-chart={chart}]").get_attribute("data-points")) >= EPOCHS, chart
        assert _all(browser, f"[data-chart={chart}] canvas"), f"the {chart} chart was not drawn"
    series = _css(browser, "[data-chart=accuracy]").get_attribute("data-series").split("|")
    assert series == [f"{name} val {kind}" for name, _ in STUDENTS for kind in ("clean", "robust")], series

    # The evaluation table, once the report exists: the report's accuracies and 95% intervals.
    _wait(browser, lambda d: len(_all(d, "table.evaluation tr[data-attack]")) == 8, "the evaluation tables")
    report = stack.client.jobs.report(job_id)
    assert report.students is not None and sorted(report.students) == [name for name, _ in STUDENTS]
    for name, part in report.students.items():
        assert part.final is not None
        for which in ("best", "last"):
            for row in part.final[which].rows:
                where = f"[data-student={name}] tr[data-checkpoint={which}][data-attack={row.attack}] td"
                shown = [c.text.strip() for c in _all(browser, f"table.evaluation{where}")]
                extra = row.model_extra or {}
                low, high = extra.get("ci95") or wilson_interval(round(row.accuracy * row.n), row.n)
                assert shown[2] == f"{_fixed(100 * row.accuracy)}%", (name, which, row.attack, shown)
                assert shown[3] == f"{_fixed(100 * low)}% – {_fixed(100 * high)}%", (
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
        shown = [c.text.strip() for c in _all(browser, where)]
        assert shown[2] == f"{_fixed(100 * result['diff'], sign=True)} pts", shown
        assert shown[4] == ("yes" if result["significant_at_5pct"] else "no"), shown
    names = {a.name for a in stack.client.jobs.artifacts(job_id)}
    _wait(
        browser,
        lambda d: {b.get_attribute("data-artifact") for b in _all(d, "[data-artifact]")} == names,
        "the job's files",
    )
    # A download (fetched with the key in the header, handed over as a Blob) and the model card.
    _css(browser, "[data-artifact='report.json']").click()
    saved = tmp_path / "downloads" / "report.json"
    _wait(browser, lambda d: saved.is_file() and saved.stat().st_size > 0, "the downloaded report")
    assert saved.read_bytes() == stack.client.http.get(f"/v1/jobs/{job_id}/artifacts/report.json").content
    cards = sorted(n for n in names if n.endswith("model_card.md"))
    assert cards, names
    _css(browser, f"[data-model-card='{cards[-1]}']").click()
    _wait(browser, lambda d: _css(d, "#model-card").get_attribute("textContent"), "the model card")
    card = stack.client.http.get(f"/v1/jobs/{job_id}/artifacts/{cards[-1]}").text
    assert _css(browser, "#model-card").get_attribute("textContent") == card
    browser.execute_script("window.scrollTo(0, 0)")
    page = _screenshot(browser, "job")
    if os.environ.get("RD_UPDATE_SCREENSHOTS") == "1":
        README_IMAGE.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(page, README_IMAGE)

    # The jobs list shows it; then the job page at phone size, without sideways scrolling.
    browser.get(f"{base}/ui/#/jobs")
    _wait(
        browser,
        lambda d: _all(d, f"#jobs-body tr[data-job-id='{job_id}'] [data-status=succeeded]"),
        "the job in the list",
    )
    row = _text(browser, f"#jobs-body tr[data-job-id='{job_id}']")
    assert "tiny_cnn" in row and "sat" in row and "colours" in row, row
    _screenshot(browser, "jobs")
    sent += _requests_sent(browser)
    browser.set_window_size(390, 844)
    browser.get(f"{base}/ui/#/jobs/{job_id}")
    _wait(browser, lambda d: len(_all(d, "table.evaluation tr[data-attack]")) == 8, "the phone-size job page")
    width = browser.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1], f"the page is wider than the phone's screen: {width}"
    _screenshot(browser, "job-phone")
    browser.execute_script("document.querySelector('[data-chart=accuracy]').scrollIntoView()")
    _screenshot(browser, "job-phone-charts")
    sent += _requests_sent(browser)

    # Delete the (unused) teacher from its page, confirming the browser's dialog.
    browser.set_window_size(1280, 1600)
    browser.get(f"{base}/ui/#/teachers")
    teacher_id = teachers[0].id
    _wait(browser, lambda d: _all(d, f"[data-delete='{teacher_id}']"), "the teacher's delete button")
    _css(browser, f"[data-delete='{teacher_id}']").click()
    _wait(browser, lambda d: d.switch_to.alert, "the confirmation").accept()
    _wait(browser, lambda d: "Nothing uploaded" in _text(d, "#teachers-body"), "the teacher gone")
    assert stack.client.teachers.list() == []
    sent += _requests_sent(browser)
    _check_the_browser(browser, base, key, sent)


def test_another_tenants_job_is_not_found_and_the_owner_cancels_it(stack: Stack, browser: Any) -> None:
    from selenium.webdriver.support.ui import Select

    base, key = _base(stack), _key(stack)
    long_job = {"dataset": "cifar10-partial", "method": "natural", "student": "tiny_cnn", "epochs": 50}
    job = stack.client.http.post("/v1/jobs", json={**long_job, "device": "cpu"})
    assert job.status_code == 201, job.text
    job_id = job.json()["id"]

    browser.get(f"{base}/ui/")
    _wait(browser, lambda d: _all(d, "#api-key"), "the sign-in form")
    _fill(browser, "#api-key", "rd_not-a-key")
    _css(browser, "#sign-in button[type=submit]").click()
    _wait(browser, lambda d: _text(d, "#sign-in-error"), "the refusal")
    assert "not accepted" in _text(browser, "#sign-in-error")

    other = _other_tenant_key(stack)
    _sign_in(browser, base, other)
    _wait(browser, lambda d: "No jobs" in _text(d, "#jobs-body"), "the other tenant's empty list")
    browser.get(f"{base}/ui/#/jobs/{job_id}")
    _wait(browser, lambda d: _all(d, "#not-found"), "the not-found page")
    assert "Job not found" in _text(browser, "#not-found")
    assert f"job '{job_id}' not found" in _text(browser, "#not-found")

    # The owner sees it on the same page, and cancels it there.
    _sign_in(browser, base, key)
    browser.get(f"{base}/ui/#/jobs/{job_id}")
    _wait(browser, lambda d: _all(d, "#cancel-job") and _css(d, "#cancel-job").is_displayed(), "Cancel")
    _css(browser, "#cancel-job").click()
    _wait(browser, lambda d: _all(d, "#job-status [data-status=cancelled]"), "the job cancelled", JOB_S)
    assert stack.client.jobs.get(job_id).status == "cancelled"
    assert not _css(browser, "#cancel-job").is_displayed()
    sent = _requests_sent(browser)
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
    _wait(browser, lambda d: _all(d, "#page-size"), "the jobs page")
    Select(_css(browser, "#page-size")).select_by_value("10")

    def shown(d: Any) -> list[str]:
        rows = "return [...document.querySelectorAll('#jobs-body tr[data-job-id]')].map(r => r.dataset.jobId)"
        return list(d.execute_script(rows))

    _wait(browser, lambda d: shown(d) == newest_first[:10], "the first page of 10")
    assert _css(browser, "#newer").get_attribute("disabled") is not None
    _css(browser, "#older").click()
    _wait(browser, lambda d: shown(d) == newest_first[10:20], "the second page")
    assert _css(browser, "#older").get_attribute("disabled") is not None
    _css(browser, "#newer").click()
    _wait(browser, lambda d: shown(d) == newest_first[:10], "the first page again")
    # The filter leaves the 11 cancelled jobs out (the first test's job is the one that succeeded).
    Select(_css(browser, "#status-filter")).select_by_value("succeeded")
    succeeded = [j.id for j in stack.client.jobs.list(status="succeeded")]
    _wait(browser, lambda d: shown(d) == succeeded and "job(s)" in _text(d, "#jobs-info"), "succeeded only")
    assert _text(browser, "#jobs-info").endswith(f"{len(succeeded)} job(s)")
    sent += _requests_sent(browser)
    for each in (key, other):
        _check_the_browser(browser, base, each, sent)


def test_the_pages_need_no_key_and_carry_a_strict_policy(stack: Stack) -> None:
    """Every file the page loads comes from /ui/ with the same policy; nothing else is served from there."""
    import re

    import httpx

    with httpx.Client(base_url=_base(stack), timeout=10) as anonymous:
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
