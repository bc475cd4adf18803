"""Dates in the operator UI: rendered with seconds and zone ("2026-12-03 08:40:56 UTC") on every
admin page, and shown by deviceplatform/static/deviceplatform/dates.js in the browser's zone with
the UTC text on hover (Debian's Chromium through Playwright, as tests/browser does)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from django.conf import settings
from django.test import Client
from django.urls import reverse
from django.utils import formats
from playwright.sync_api import sync_playwright

from inventory.services import managed_object_create
from tests.browser.conftest import chromium_executable

SCRIPT = Path(settings.BASE_DIR) / "deviceplatform" / "static" / "deviceplatform" / "dates.js"
WHEN = datetime(2026, 12, 3, 8, 40, 56, tzinfo=UTC)


def test_datetimes_format_with_seconds_and_zone() -> None:
    assert formats.date_format(WHEN, "DATETIME_FORMAT") == "2026-12-03 08:40:56 UTC"


@pytest.mark.django_db
def test_admin_pages_show_seconds_and_zone_and_load_the_date_script(admin_client: Client) -> None:
    device = managed_object_create(owner="alice", data={"name": "Clock"}, now=WHEN)

    listing = admin_client.get(reverse("admin:inventory_managedobject_changelist")).content
    page = admin_client.get(
        reverse("admin:inventory_managedobject_change", args=[device.pk])
    ).content

    for html in (listing.decode(), page.decode()):
        assert "2026-12-03 08:40:56 UTC" in html
        assert "deviceplatform/dates" in html  # the script, under its (hashed) static name


def test_the_script_shows_local_time_with_utc_on_hover_also_for_live_updates() -> None:
    html = """<html><body>
      <table><tr><td class="field-created">2026-12-03 08:40:56 UTC</td>
      <td class="other">2026-12-03 08:40:56 UTC and more</td></tr></table>
      <textarea>2026-12-03 08:40:56 UTC</textarea>
      <div id="live"></div>
    </body></html>"""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_executable())
        try:
            context = browser.new_context(timezone_id="Asia/Kolkata", locale="en-US")
            page = context.new_page()
            page.set_content(html)
            page.add_script_tag(content=SCRIPT.read_text())
            cell = page.locator("td.field-created time")
            assert cell.text_content() == "2026-12-03 14:10:56 GMT+5:30"
            assert cell.get_attribute("title") == "2026-12-03 08:40:56 UTC"
            assert cell.get_attribute("datetime") == "2026-12-03T08:40:56.000Z"
            # Only whole dates are rewritten; form fields never are.
            assert page.locator("td.other").inner_html() == "2026-12-03 08:40:56 UTC and more"
            assert page.locator("textarea").input_value() == "2026-12-03 08:40:56 UTC"
            # Text a live update puts on the page later is shown in the local zone too.
            page.evaluate("document.getElementById('live').textContent = '2026-12-31 23:59:59 UTC'")
            live = page.locator("#live time")
            live.wait_for()
            assert live.text_content() == "2027-01-01 05:29:59 GMT+5:30"
        finally:
            browser.close()
