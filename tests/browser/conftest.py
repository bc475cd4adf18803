"""The operator console in a real browser: Debian's Chromium driven by Playwright (its Python
package; no browser of its own is downloaded), against a real server process in the embedded layout
(tests/simulator's `Platform`: the bulk ramp runs on the server's scheduler thread) with the fleet
simulator (`python -m simulator`) as the agents that execute what the operator sends.

Chromium is found as `$CHROMIUM`, else `chromium` on the PATH (`.ci/run` installs Debian's package
when it is missing). Without it these tests fail, naming what to install: they are never skipped.

Tests using these fixtures need `@pytest.mark.django_db(transaction=True)`: the server only sees
committed rows. Playwright's synchronous API keeps an event loop running in the test's thread, so
the database is read and written only before the browser starts (fixtures) or over REST."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from deviceplatform.services import bootstrap_user_ensure
from tests.helpers import PASSWORD
from tests.simulator.conftest import BOOTSTRAP_PASSWORD, Admin, Platform, Simulation

OPERATOR = "console-operator"
OPERATOR_LOGIN = f"t100/{OPERATOR}"
# The browser's time zone: one without daylight saving time, far from UTC, so the admin's dates
# shown in it are told apart from the UTC ones whatever the day.
BROWSER_ZONE = "Asia/Tokyo"
BROWSER_ZONE_OFFSET = timedelta(hours=9)
BROWSER_ZONE_NAME = "GMT+9"  # Chromium's short name for it in en-US
# Bounds a hang of one browser step; never an assertion about speed.
STEP_TIMEOUT_MS = 30_000


def chromium_executable() -> str:
    found = os.environ.get("CHROMIUM") or shutil.which("chromium")
    if not found:
        pytest.fail(
            "The browser tests need Chromium: install Debian's package (apt-get install "
            "chromium; .ci/run does) or set CHROMIUM to its executable"
        )
    return found


@pytest.fixture
def console(
    tmp_path: Path, make_user: Callable[..., Any], transactional_db: None
) -> Iterator[Platform]:
    """A running server whose operator is an admin-UI superuser in the `admins` group (so the
    same login also drives the REST API and the simulator), and the bootstrap login."""
    make_user(OPERATOR, groups=["admins"], superuser=True)
    bootstrap_user_ensure(BOOTSTRAP_PASSWORD)
    server = Platform(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def operator_api(console: Platform) -> Admin:
    """The operator's REST client (Basic auth), to check what the browser did."""
    api = Admin(console.url)
    api.http.auth = (OPERATOR_LOGIN, PASSWORD)
    return api


@pytest.fixture
def fleet(console: Platform, tmp_path: Path) -> Iterator[Simulation]:
    """The fleet simulator against the console's server (not started: `fleet.start(...)`), with
    the operator's login."""
    simulation = Simulation(console, tmp_path)
    original = simulation.command

    def command(*args: str, **options: Any) -> list[str]:
        options.setdefault("user", OPERATOR_LOGIN)
        return original(*args, **options)

    simulation.command = command  # type: ignore[method-assign]
    try:
        yield simulation
    finally:
        simulation.kill()


@pytest.fixture
def browser(console: Platform) -> Iterator[Browser]:
    """Headless Chromium, closed before the server stops and the database is emptied."""
    executable = chromium_executable()
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, headless=True)
        try:
            yield launched
        finally:
            launched.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.stash[CALL_FAILED] = report.failed
    return report


CALL_FAILED = pytest.StashKey[bool]()


@pytest.fixture
def page(
    browser: Browser, console: Platform, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Page]:
    """A fresh browser page (its own cookies) whose relative URLs go to the console's server.
    When the test fails, the page as the browser last showed it is kept for the report: its URL
    and text on stdout, a screenshot and the server's log in the test's temporary directory."""
    context = browser.new_context(base_url=console.url, locale="en-US", timezone_id=BROWSER_ZONE)
    context.set_default_timeout(STEP_TIMEOUT_MS)
    expect.set_options(timeout=STEP_TIMEOUT_MS)
    opened = context.new_page()
    try:
        yield opened
        if request.node.stash.get(CALL_FAILED, False):
            shot = tmp_path / "failed-page.png"
            opened.screenshot(path=str(shot), full_page=True)
            main = opened.locator("#content")
            text = main.inner_text() if main.count() else opened.content()
            print(f"The page at {opened.url} (screenshot {shot}):\n{text[:5000]}")
    finally:
        context.close()


def log_in(page: Page, username: str = OPERATOR, password: str = PASSWORD) -> None:
    """Through the admin's own login form, as an operator does."""
    page.goto("/admin/")
    expect(page).to_have_url(re.compile(r"/admin/login/\?next=/admin/$"))
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.click("input[type=submit]")
    expect(page.locator("#user-tools")).to_contain_text(username)
