"""deviceplatform/static/deviceplatform/live.js in Chromium: an area marked `data-live-src` polls its
URL, swaps the cells the answer names (markup or text), leaves the others alone, stops on
`"done": true`, reports a failing endpoint and recovers from it. The page and the endpoint are
answered by Playwright's request routing and the timers run on Playwright's clock, so each poll
happens exactly when the test advances time. The admin endpoints themselves are tested with their
apps (tests/bulkops/test_admin_live.py); the whole loop against a server in tests/browser."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, Route, expect, sync_playwright

from tests.browser.conftest import chromium_executable

SCRIPT = Path(__file__).resolve().parents[2] / "deviceplatform/static/deviceplatform/live.js"
ORIGIN = "http://live.test"
PAGE = """<!doctype html><html><head><script src="/live.js" defer></script></head><body>
<div id="area" data-live-src="/values?ids=1" data-live-interval="2">
  <p id="indicator" data-live-indicator></p>
  <span id="bar" data-live-key="progress-1">old bar</span>
  <span id="status" data-live-key="status-1">ACTIVE</span>
  <span id="other" data-live-key="other-1">untouched</span>
</div></body></html>"""


class Endpoint:
    """The live URL: answers the queued bodies in turn (an int is an HTTP error status)."""

    def __init__(self) -> None:
        self.answers: list[dict[str, Any] | int] = []
        self.calls = 0

    def __call__(self, route: Route) -> None:
        self.calls += 1
        answer = self.answers.pop(0) if self.answers else {"values": {}, "done": False}
        if isinstance(answer, int):
            route.fulfill(status=answer, body="{}", content_type="application/json")
        else:
            route.fulfill(status=200, body=json.dumps(answer), content_type="application/json")


@pytest.fixture
def live_page() -> Iterator[tuple[Page, Endpoint]]:
    endpoint = Endpoint()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_executable())
        try:
            page = browser.new_page()
            page.clock.install()
            page.route(
                f"{ORIGIN}/", lambda route: route.fulfill(body=PAGE, content_type="text/html")
            )
            page.route(
                f"{ORIGIN}/live.js",
                lambda route: route.fulfill(
                    body=SCRIPT.read_text(), content_type="application/javascript"
                ),
            )
            page.route(f"{ORIGIN}/values?ids=1", endpoint)
            page.goto(f"{ORIGIN}/")
            yield page, endpoint
        finally:
            browser.close()


def poll(page: Page, endpoint: Endpoint, until: Callable[[], None]) -> None:
    """Let the interval (2 s) pass once and wait for what the answer changes."""
    calls = endpoint.calls
    page.clock.run_for(2000)
    until()
    assert endpoint.calls == calls + 1


def test_cells_take_the_values_the_endpoint_names_and_the_others_stay(
    live_page: tuple[Page, Endpoint],
) -> None:
    page, endpoint = live_page
    expect(page.locator("#area")).to_have_attribute("data-live-status", "live")
    assert endpoint.calls == 0  # the page was rendered fresh: the first poll waits an interval

    endpoint.answers.append(
        {
            "values": {
                "progress-1": {"html": '<b class="seg">2/4</b>'},
                "status-1": {"text": "<IN_PROGRESS>"},
                "unknown-9": {"text": "ignored"},
            },
            "done": False,
        }
    )
    poll(page, endpoint, lambda: expect(page.locator("#bar b.seg")).to_have_text("2/4"))

    expect(page.locator("#status")).to_have_text("<IN_PROGRESS>")  # text, not markup
    expect(page.locator("#other")).to_have_text("untouched")
    expect(page.locator("#indicator")).to_contain_text("Live: updated")

    endpoint.answers.append({"values": {"progress-1": {"html": "4/4"}}, "done": False})
    poll(page, endpoint, lambda: expect(page.locator("#bar")).to_have_text("4/4"))


def test_done_stops_the_polling(live_page: tuple[Page, Endpoint]) -> None:
    page, endpoint = live_page
    endpoint.answers.append({"values": {"status-1": {"text": "COMPLETED"}}, "done": True})

    poll(page, endpoint, lambda: expect(page.locator("#status")).to_have_text("COMPLETED"))

    expect(page.locator("#area")).to_have_attribute("data-live-status", "done")
    expect(page.locator("#indicator")).to_contain_text("Finished")
    page.clock.run_for(60_000)
    page.evaluate("() => new Promise((resolve) => setTimeout(resolve, 0))")
    assert endpoint.calls == 1


def test_a_failing_endpoint_is_reported_and_retried_later(
    live_page: tuple[Page, Endpoint],
) -> None:
    page, endpoint = live_page
    endpoint.answers += [500, {"values": {"status-1": {"text": "IN_PROGRESS"}}, "done": False}]

    poll(
        page,
        endpoint,
        lambda: expect(page.locator("#area")).to_have_attribute("data-live-status", "error"),
    )
    expect(page.locator("#indicator")).to_contain_text("HTTP 500")
    expect(page.locator("#status")).to_have_text("ACTIVE")

    # The retry waits twice the interval, then the area is live again.
    page.clock.run_for(2000)
    assert endpoint.calls == 1
    poll(page, endpoint, lambda: expect(page.locator("#status")).to_have_text("IN_PROGRESS"))
    expect(page.locator("#area")).to_have_attribute("data-live-status", "live")
