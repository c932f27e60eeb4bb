"""Debian's chromium, headless, driven by chromedriver through selenium, with the network blocked and every
request and console message recorded.

The network is blocked twice over: every host name resolves to nothing (``--host-resolver-rules``) and every
request goes through a proxy on a closed port. Loopback stays reachable (Chrome never proxies it), which the
JupyterLab test needs. A page that needs a CDN then fails visibly instead of silently working on a dev machine.
"""
from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:", "chrome:", "chrome-error:", "devtools:")


def missing_browser() -> str | None:
    """Why the browser tests cannot run here ('' when they can): `.ci/run` installs both packages."""
    for exe in (CHROMIUM, CHROMEDRIVER):
        if not Path(exe).exists() and not shutil.which(Path(exe).name):
            return f"{exe} is missing: apt-get install -y chromium chromium-driver (as .ci/run does)"
    return None


@dataclass
class PageRecord:
    """What one page load did: requests by URL and console messages (level, text)."""

    requests: list[str] = field(default_factory=list)
    console: list[tuple[str, str]] = field(default_factory=list)

    def remote_requests(self, allow_loopback: bool = False) -> list[str]:
        loopback = ("http://127.0.0.1", "ws://127.0.0.1", "http://localhost", "ws://localhost")
        return [u for u in self.requests if not u.startswith(LOCAL_SCHEMES)
                and not (allow_loopback and u.startswith(loopback))]

    def errors(self) -> list[str]:
        return [text for level, text in self.console if level in ("SEVERE", "ERROR")]


def start_chromium(window: tuple[int, int] = (1280, 900)) -> Any:
    """A headless chromium WebDriver with networking blocked and performance + browser logs on."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1, EXCLUDE localhost",
                "--proxy-server=http://127.0.0.1:9", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-default-apps",
                "--disable-features=OptimizationHints,MediaRouter,Translate", f"--window-size={window[0]},{window[1]}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def drain(driver: Any, record: PageRecord | None = None) -> PageRecord:
    """Move the driver's buffered network events and console messages into ``record``."""
    record = record if record is not None else PageRecord()
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            record.requests.append(message["params"]["request"]["url"])
    for entry in driver.get_log("browser"):
        record.console.append((entry["level"], entry["message"]))
    return record


def open_page(driver: Any, url: str, settle_s: float = 0.3) -> PageRecord:
    """Load ``url`` (waits for the load event), let scripts settle, return what the load did."""
    driver.get("about:blank")  # unload the previous page first: a JupyterLab tab polls its server until it goes
    drain(driver)  # forget what the previous page did
    driver.get(url)
    time.sleep(settle_s)
    return drain(driver)


def wait_for(condition: Any, timeout_s: float = 10.0, interval_s: float = 0.1, what: str = "condition") -> Any:
    """Poll ``condition()`` until it returns something truthy; fail with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def iter_lines(record: PageRecord) -> Iterator[str]:
    yield from record.requests
    yield from (f"{level}: {text}" for level, text in record.console)
