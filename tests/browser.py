"""A real headless Chromium for the tests, driven over the W3C WebDriver protocol of ``chromedriver``.

No client library is needed: chromedriver listens on a free loopback port and is spoken to with plain
HTTP (``urllib``). :func:`render_page` opens a local file, reports every image's ``naturalWidth``, the
browser console's messages and the page height, and saves a screenshot. The driver, and the browser it
started, are stopped (session deleted, process ended by its PID) whatever happens.
"""
from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

CHROME_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", "--window-size=1280,900"]


def browser_missing() -> str | None:
    """Why the browser tests cannot run here (None when they can)."""
    for exe in ("chromium", "chromedriver"):
        if shutil.which(exe) is None:
            return f"'{exe}' is not installed (Debian packages chromium and chromium-driver)"
    return None


@dataclass
class PageCheck:
    images: list[dict] = field(default_factory=list)
    """``{src_start, complete, naturalWidth}`` per ``<img>``."""
    console: list[dict] = field(default_factory=list)
    """Browser log entries ``{level, message}`` (SEVERE = console.error or a failed load)."""
    height: int = 0
    screenshot: Path | None = None

    @property
    def errors(self) -> list[dict]:
        return [c for c in self.console if c.get("level") == "SEVERE"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(base: str, method: str, path: str, body: dict | None = None, timeout: float = 60) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"{}")


def _wait_ready(base: str, proc: subprocess.Popen, timeout: float = 20) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"chromedriver exited with code {proc.returncode}")
        try:
            if _call(base, "GET", "/status", timeout=2)["value"].get("ready"):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("chromedriver did not become ready")


_PROBE = ("return {images: Array.from(document.images).map(i => ({src_start: i.src.slice(0, 30), "
          "complete: i.complete, naturalWidth: i.naturalWidth})), height: document.documentElement.scrollHeight};")


def render_page(page: Path, screenshot: Path) -> PageCheck:
    """Open ``page`` in headless Chromium; return its images, console log and a full-height screenshot."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    proc = subprocess.Popen(["chromedriver", f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    session = None
    try:
        _wait_ready(base, proc)
        caps = {"browserName": "chrome", "goog:loggingPrefs": {"browser": "ALL"},
                "goog:chromeOptions": {"binary": shutil.which("chromium"),
                                       "args": CHROME_ARGS + [f"--user-data-dir={profile}"]}}
        session = _call(base, "POST", "/session", {"capabilities": {"alwaysMatch": caps}})["value"]["sessionId"]
        s = f"/session/{session}"
        _call(base, "POST", f"{s}/url", {"url": page.resolve().as_uri()})
        probe = _call(base, "POST", f"{s}/execute/sync", {"script": _PROBE, "args": []})["value"]
        height = int(probe["height"])
        _call(base, "POST", f"{s}/window/rect", {"width": 1280, "height": min(max(height + 40, 900), 16000)})
        png = _call(base, "GET", f"{s}/screenshot")["value"]
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        screenshot.write_bytes(base64.b64decode(png))
        console = _call(base, "POST", f"{s}/se/log", {"type": "browser"})["value"]
        return PageCheck(probe["images"], console, height, screenshot)
    finally:
        if session is not None:
            try:
                _call(base, "DELETE", f"/session/{session}", timeout=20)
            except OSError:
                pass
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(profile, ignore_errors=True)
