"""The web page in a real headless Chromium: Debian's `chromium` (installed with apt-get when missing; Playwright's
own browser download is never used), driven by Playwright, against the tiny app under a route prefix."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import deploy

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
REPO = Path(__file__).resolve().parents[2]
# Chromium logs each fetch() that answers 4xx/5xx as a console error; a test that provokes one says which it expects.
FAILED_LOAD = re.compile(r"^Failed to load resource: the server responded with a status of (\d{3})")


def _find_browser() -> str | None:
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


def _install_chromium() -> str:
    """`apt-get install -y chromium`, after `apt-get update` if the package lists are stale; what apt-get said, for
    the failure message."""
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log = []

    def run(*command: str) -> bool:
        try:
            done = subprocess.run([*sudo, *command], capture_output=True, text=True, timeout=900, env=env)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.append(f"$ {' '.join([*sudo, *command])}: {exc}")
            return False
        log.append(f"$ {' '.join([*sudo, *command])}: exit {done.returncode}\n{done.stderr[-2000:]}")
        return done.returncode == 0

    if not run("apt-get", "install", "-y", "chromium"):
        run("apt-get", "update")
        run("apt-get", "install", "-y", "chromium")
    return "\n".join(log)


@pytest.fixture(scope="session")
def chromium_path() -> str:
    """The system Chromium; installed now if missing. No browser fails the tests: they are never skipped."""
    path = _find_browser()
    if path is None:
        log = _install_chromium()
        path = _find_browser()
        if path is None:
            pytest.fail(f"tests/web need a Chromium ({', '.join(BROWSERS)} on PATH), and `apt-get install -y "
                        f"chromium` did not provide one:\n{log}", pytrace=False)
    return path


@pytest.fixture(scope="session")
def browser(chromium_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # As root (containers, CI) Chromium refuses to start inside its sandbox.
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        browser = playwright.chromium.launch(executable_path=chromium_path, args=args)
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Where screenshots go: $ACESTEP_TEST_ARTIFACTS, else <repo>/test-artifacts/."""
    path = Path(os.environ.get("ACESTEP_TEST_ARTIFACTS") or REPO / "test-artifacts").resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def web_app(serve_http, tmp_path_factory) -> str:
    """The tiny-preset app under the route prefix /page (the page's URLs must be relative to work there)."""
    root = tmp_path_factory.mktemp("web")
    args = {"name": "web-test",
            "queue": {"max_running_jobs": 2, "default_duration_s": 2.0, "max_duration_s": 120.0},
            "files": {"output_dir": str(root / "results"), "upload_dir": str(root / "uploads"),
                      "journal_path": str(root / "registry.sqlite3")}}
    return deploy(args, "web-test", "/page", serve_http)


class BrowserLog:
    """A page's console errors and uncaught exceptions; any not expected fails the test."""

    def __init__(self, page):
        self.errors: list[str] = []
        self.expected_statuses: set[int] = set()
        page.on("console", lambda message: message.type == "error" and self.errors.append(message.text))
        page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))

    def expect_status(self, *statuses: int) -> None:
        """Failed loads with these HTTP statuses are the test's doing, not the page's errors."""
        self.expected_statuses.update(statuses)

    def unexpected(self) -> list[str]:
        return [text for text in self.errors
                if not ((m := FAILED_LOAD.match(text)) and int(m.group(1)) in self.expected_statuses)]

    def check(self) -> None:
        assert not self.unexpected(), f"browser console errors: {self.unexpected()}"


@pytest.fixture
def open_page(browser):
    """`open_page(url, init_script=None, **context_options)` -> (page, log): the page at `url` in a fresh context
    (its own sessionStorage), `init_script` run before the page's own. Console errors the test did not expect fail it
    at teardown."""
    contexts, logs = [], []

    def open_(url: str, init_script: str | None = None, **options):
        context = browser.new_context(**{"viewport": {"width": 1280, "height": 900}, **options})
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(120_000)
        logs.append(BrowserLog(page))
        if init_script:
            page.add_init_script(init_script)
        page.goto(url)
        return page, logs[-1]

    yield open_
    for context in contexts:
        context.close()
    for log in logs:
        log.check()
