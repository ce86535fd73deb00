"""A minimal W3C WebDriver client for headless Chromium (Debian's chromium + chromium-driver).

Only what the dashboard test needs: open a page, run a script, take a screenshot. It speaks
the WebDriver JSON protocol to `chromedriver` on 127.0.0.1 with the standard library, so the
browser test needs no extra Python dependency.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

# Flags for a closed network: no background connections that would be refused, no sandbox
# (we run as root in CI), no GPU.
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
]


def available() -> bool:
    return CHROMIUM is not None and CHROMEDRIVER is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Browser:
    def __init__(self, base: str, session: str) -> None:
        self._base = base
        self._session = session

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            f"{self._base}/session/{self._session}{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.loads(resp.read())["value"]

    def open(self, url: str) -> None:
        self._call("POST", "/url", {"url": url})

    def run(self, script: str, *args: Any) -> Any:
        return self._call("POST", "/execute/sync", {"script": script, "args": list(args)})

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self._call("GET", "/screenshot")))

    def wait_for(self, what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
        """Poll `check` until it returns something truthy; bounded by `timeout` seconds."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            last = check()
            if last:
                return last
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


@contextlib.contextmanager
def browser() -> Iterator[Browser]:
    """A headless Chromium driven through a private chromedriver on a loopback port."""
    assert CHROMIUM and CHROMEDRIVER, "chromium and chromium-driver are not installed"
    port = _free_port()
    driver = subprocess.Popen(
        [CHROMEDRIVER, f"--port={port}", "--allowed-ips=127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    profile = tempfile.mkdtemp(prefix="cluster-chromium-")
    session = ""
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{base}/status", timeout=2) as resp:
                    if json.loads(resp.read())["value"].get("ready"):
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("chromedriver did not start within 30s")
            time.sleep(0.1)
        caps = {
            "capabilities": {
                "alwaysMatch": {
                    "goog:chromeOptions": {
                        "binary": CHROMIUM,
                        "args": [*CHROMIUM_ARGS, f"--user-data-dir={profile}"],
                    }
                }
            }
        }
        req = urllib.request.Request(
            f"{base}/session",
            data=json.dumps(caps).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            session = json.loads(resp.read())["value"]["sessionId"]
        yield Browser(base, session)
    finally:
        if session:
            with contextlib.suppress(Exception):
                urllib.request.urlopen(
                    urllib.request.Request(f"{base}/session/{session}", method="DELETE"),
                    timeout=10,
                )
        driver.terminate()
        try:
            driver.wait(timeout=10)
        except subprocess.TimeoutExpired:
            driver.kill()
        shutil.rmtree(profile, ignore_errors=True)
