"""Helpers of the dashboard's browser test (tests/integration/test_dashboard_browser.py): Chromium kept on
this machine (tests/offline_browser.py), reading the pages' DOM in ways that survive re-rendering, and
stopping and starting the API process of a test stack."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

try:
    from tests.integration.conftest_worker import Stack
except ImportError:  # pytest's default import mode puts this folder itself on sys.path
    from conftest_worker import Stack  # type: ignore[no-redef]
from offline_browser import start_offline_chromium  # noqa: F401  (the test starts its browser from here)

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "test-output" / "screenshots"
WAIT_S = 45  # a page showing what the API answered: generous on 2 busy cores, not a speed target


RESTARTED: list[subprocess.Popen[bytes]] = []  # API processes a test started again (stopped with the stack)


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL for the process group (the API and its model-checking process)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def kill_api(stack: Stack) -> None:
    """SIGKILL the API process and its group: its event streams drop mid-job, as in a crash."""
    current = RESTARTED[-1] if RESTARTED else stack.api
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(current.pid, signal.SIGKILL)
    current.wait(timeout=10)


def start_api_again(stack: Stack) -> None:
    """The API again on the same port, with the same settings."""
    port = urlsplit(base_url(stack)).port
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


def api_key(stack: Stack) -> str:
    return str(stack.client.http.headers["Authorization"]).removeprefix("Bearer ")


def base_url(stack: Stack) -> str:
    return str(stack.client.http.base_url).rstrip("/")


def other_tenant_key(stack: Stack) -> str:
    from service.auth import create_api_key
    from service.db import make_engine, make_session_factory, session_scope

    engine = make_engine(stack.database_url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            return create_api_key(session, f"other-{stack.queue}")
    finally:
        engine.dispose()


def wait(driver: Any, predicate: Any, what: str, timeout: float = WAIT_S) -> Any:
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


def find(driver: Any, selector: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, selector)


def find_all(driver: Any, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return list(driver.find_elements(By.CSS_SELECTOR, selector))


def text_of(driver: Any, selector: str) -> str:
    """The rendered text of the first match ("" for none), read in one step: views re-render."""
    script = "const e = document.querySelector(arguments[0]); return e ? e.innerText.trim() : '';"
    return str(driver.execute_script(script, selector))


def fill(driver: Any, selector: str, value: str) -> None:
    field = find(driver, selector)
    field.clear()
    field.send_keys(value)


def fixed(x: float, sign: bool = False) -> str:
    """``x.toFixed(1)`` as the page's JavaScript writes it: the exact binary value, ties away from zero
    (Python's format rounds ties to even: 6.25 -> "6.2" where the page shows "6.3")."""
    from decimal import ROUND_HALF_UP, Decimal

    text = str(Decimal(x).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP))
    return f"+{text}" if sign and x >= 0 else text


def screenshot(driver: Any, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


def sign_in(driver: Any, base: str, key: str) -> None:
    driver.get(f"{base}/")  # redirected to /ui/
    wait(driver, lambda d: find_all(d, "#api-key") or find_all(d, "#sign-out"), "the page")
    if not find_all(driver, "#api-key"):
        find(driver, "#sign-out").click()
    wait(driver, lambda d: find_all(d, "#api-key"), "the sign-in form")
    fill(driver, "#api-key", key)
    find(driver, "#sign-in button[type=submit]").click()
    wait(driver, lambda d: find_all(d, "#jobs-body"), "the jobs page after signing in")


def upload(driver: Any, form: str, file: Path, fields: dict[str, str]) -> str:
    """Send an upload form; returns the status line once the API kept the file."""
    find(driver, f"#{form}-file").send_keys(str(file))
    for name, value in fields.items():
        element = find(driver, f"#{form}-{name}")
        if element.tag_name == "select":
            from selenium.webdriver.support.ui import Select

            Select(element).select_by_value(value)
        else:
            fill(driver, f"#{form}-{name}", value)
    find(driver, f"#{form}-submit").click()
    wait(
        driver,
        lambda d: text_of(d, f"#{form}-status").startswith("Kept") or text_of(d, f"#{form}-error"),
        f"the {form} to finish",
    )
    assert not text_of(driver, f"#{form}-error"), text_of(driver, f"#{form}-error")
    sent = driver.execute_script(f"return document.getElementById('{form}-progress').value")
    assert sent == 1, f"the upload's progress bar ended at {sent}: upload.onprogress never reached the end"
    return text_of(driver, f"#{form}-status")


def requests_sent(driver: Any) -> list[tuple[str, dict[str, str]]]:
    """(URL, headers) of every request the page sent, from the DevTools network log (drained by the
    call)."""
    sent: list[tuple[str, dict[str, str]]] = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            request = message["params"]["request"]
            sent.append((request["url"], {k.lower(): v for k, v in request.get("headers", {}).items()}))
    return sent


def check_the_browser(driver: Any, base: str, key: str, sent: list[tuple[str, dict[str, str]]]) -> None:
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
