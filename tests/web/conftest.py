"""Fixtures for the web console tests: the demo stack behind ``convlog demo --web``,
a log client on its NATS server, and headless Chromium driven by Playwright.

The browser is the system's Chromium (``apt-get install chromium``; ``.ci/run``
installs it when missing), never a browser Playwright downloads.  Without it
the browser tests are skipped with the reason -- except in CI
(``CI`` or ``CONVLOG_BROWSER_TESTS=required``), where they fail.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from shared.client import LogClient
from tests.support.procs import REPO_ROOT, Proc

T = TypeVar("T")

ARTIFACTS = REPO_ROOT / "tests" / "artifacts" / "web"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None


def browser_required() -> bool:
    return bool(os.environ.get("CI")) or os.environ.get("CONVLOG_BROWSER_TESTS") == "required"


class LoopThread:
    """An event loop in a helper thread with one ``LogClient``: async calls from sync tests
    (Playwright's sync API owns the test thread's loop)."""

    def __init__(self, url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="log-client", daemon=True)
        self.thread.start()
        self.client: LogClient = self.run(LogClient.connect(url, name="web-tests"))

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        try:
            self.run(self.client.close(), timeout=10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


class Demo:
    def __init__(self, proc: Proc, url: str, nats_url: str) -> None:
        self.proc = proc
        self.url = url.rstrip("/")
        self.nats_url = nats_url


@pytest.fixture(scope="module")
def demo_web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    """``convlog demo --web --web-port 0``: the reference scenario played by the rules
    model, then the stack kept up behind the console.  Stopped by PID (SIGTERM: the
    demo stops the console and then the whole stack)."""
    tmp = tmp_path_factory.mktemp("demo-web")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONVLOG_", "OPENAI_"))}
    env["CONVLOG_DATA_DIR"] = str(tmp / "data")
    proc = Proc([sys.executable, "-m", "services.cli.main", "demo", "--web", "--web-port", "0"],
                log_dir=tmp, env=env, name="demo-web")
    proc.start()
    try:
        m = proc.wait_for_line(r"web console: (http://\S+)\s+\(NATS (nats://\S+);", timeout=120)
        yield Demo(proc, m.group(1), m.group(2))
    finally:
        code = proc.terminate(timeout=30)
        print(f"\ndemo --web stopped with exit {code}; its output: {proc.log_path}")
    assert "convlog demo passed" in proc.output(), proc.output()[-3000:]


@pytest.fixture(scope="module")
def log(demo_web: Demo) -> Iterator[LoopThread]:
    lt = LoopThread(demo_web.nats_url)
    try:
        yield lt
    finally:
        lt.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    exe = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if exe is None or sync_playwright is None:
        missing = "chromium (apt-get install -y chromium)" if exe is None else "playwright (pip install playwright)"
        if browser_required():
            pytest.fail(f"browser tests are required here but {missing} is missing")
        pytest.skip(f"no browser for the web console tests: {missing} is not installed "
                    "(.ci/run installs it; these tests run there)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh page (1400x800); JavaScript errors fail the test.

    The page's Content-Security-Policy is bypassed: Playwright's waits evaluate
    strings, which the policy forbids -- and without it, the injection test
    shows that rendering-as-text alone keeps content inert (the policy is a
    second line, checked by the HTTP tests).
    """
    context = browser.new_context(viewport={"width": 1400, "height": 800}, bypass_csp=True)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.set_default_timeout(10_000)
    try:
        yield pg
    finally:
        context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def screenshot(page: Any, name: str) -> Path:
    """Save a full-window screenshot for a reviewer; print where it is."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.png"
    page.screenshot(path=str(path))
    print(f"screenshot: {path}")
    return path
