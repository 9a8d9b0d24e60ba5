"""Debian's headless Chromium, kept on this machine, for the browser tests (``/docs``, the dashboard).

Every host but 127.0.0.1 resolves to nothing and anything that would still go out meets a proxy on a
closed port, so a page that needs a CDN fails here instead of passing on a connected machine. The
DevTools network and console logs are kept for the tests to read. A missing Chromium or driver fails the
test, naming the fix; it is never skipped.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def browser_paths() -> tuple[str, str]:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if shutil.which(p) is None]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} not installed: run scripts/setup.sh as root "
            "(apt-get install chromium chromium-driver)"
        )
    return CHROMIUM, CHROMEDRIVER


def start_offline_chromium(downloads: Path | None = None) -> Any:
    """A Selenium driver of headless Chromium that reaches loopback only; downloads (if given) land in
    ``downloads``. The caller sets SE_OFFLINE=true first (Selenium Manager must never fetch a driver) and
    quits the driver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = browser_paths()
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
    if downloads is not None:
        options.add_experimental_option(
            "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
        )
    return webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
