"""The operator console as an operator uses it, in headless Chromium against a real server, with
the fleet simulator's agents executing what is sent: log in, the admin's stylesheets applied, an
operation sent from a device's page, a bulk operation created from the admin and its progress
bar moving while the page stays loaded."""

from __future__ import annotations

from typing import Any

import pytest
from playwright.sync_api import Page, Response, expect

from tests.browser.conftest import OPERATOR, log_in
from tests.simulator.conftest import Platform

pytestmark = [
    pytest.mark.django_db(transaction=True),
    # aiocometd-ng's own aiohttp calls (the simulator's fixtures import it)
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

# What the admin's base.css does to a page, read back from the browser: its custom properties are
# defined and the header is painted with one of them.
STYLE_PROBE = """() => {
    const root = getComputedStyle(document.documentElement);
    const header = document.querySelector('#header');
    return {
        headerBg: root.getPropertyValue('--header-bg').trim(),
        painted: header ? getComputedStyle(header).backgroundColor : null,
        sheets: Array.from(document.styleSheets).map(s => ({
            href: s.href, rules: s.cssRules.length,
        })),
    };
}"""
TRANSPARENT = "rgba(0, 0, 0, 0)"


def assert_styled(page: Page, stylesheets: list[Response]) -> None:
    """Every stylesheet the page linked came back 200 as CSS, and the browser applied them."""
    assert stylesheets, "the page loaded no stylesheet"
    for response in stylesheets:
        assert response.status == 200, response.url
        assert response.headers["content-type"].startswith("text/css"), response.url
    probe: dict[str, Any] = page.evaluate(STYLE_PROBE)
    linked = [sheet for sheet in probe["sheets"] if sheet["href"]]
    assert linked, probe
    assert all(sheet["rules"] > 0 for sheet in linked), probe
    assert probe["headerBg"], probe
    assert probe["painted"] not in (None, TRANSPARENT), probe


def test_the_operator_logs_in_to_a_styled_admin(page: Page, console: Platform) -> None:
    stylesheets: list[Response] = []

    def loaded(response: Response) -> None:
        if response.request.resource_type == "stylesheet":
            stylesheets.append(response)

    page.on("response", loaded)

    log_in(page)
    assert_styled(page, stylesheets)
    expect(page.locator("#site-name")).to_be_visible()
    expect(page.locator("#user-tools")).to_contain_text(OPERATOR)

    # Each app's list pages are reachable and styled from the index, logged in.
    for model in ("managedobject", "operation", "bulkoperation"):
        stylesheets.clear()
        page.locator(f"tr.model-{model} th a").first.click()
        expect(page.locator("#changelist")).to_be_visible()
        assert_styled(page, stylesheets)
        page.go_back()
