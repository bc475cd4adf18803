"""The operator console as an operator uses it, in headless Chromium against a real server, with
the fleet simulator's agents executing what is sent: log in, the admin's stylesheets applied, an
operation sent from a device's page (its status following live), a bulk operation created from
the admin and its progress bar moving on its page and on the list while both stay loaded."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import pytest
from playwright.sync_api import Frame, Locator, Page, Response, expect

from tests.browser.conftest import BROWSER_ZONE_NAME, BROWSER_ZONE_OFFSET, OPERATOR, log_in
from tests.simulator.conftest import WAIT, Admin, Platform, Simulation
from tests.simulator.test_simulator import group_id

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
FLEET_SIZE = 4  # the agent and its three child devices


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


def assert_local_times(area: Locator, at_least: int) -> None:
    """Each date and time in `area` shows in the browser's zone, its UTC original as the title."""
    times = area.locator("time[data-utc]")
    assert times.count() >= at_least, area.inner_html()
    for shown in times.all():
        utc = shown.get_attribute("title")
        assert utc is not None
        assert utc == shown.get_attribute("data-utc"), utc
        moment = datetime.strptime(utc.replace("UTC", "+0000"), "%Y-%m-%d %H:%M:%S %z")
        local = (moment + BROWSER_ZONE_OFFSET).strftime("%Y-%m-%d %H:%M:%S")
        assert shown.inner_text() == f"{local} {BROWSER_ZONE_NAME}", (utc, shown.inner_text())


@contextmanager
def watched(page: Page) -> Iterator[None]:
    """The page stays the same document throughout the block: no navigation, no reload."""
    navigations: list[str] = []

    def navigated(frame: Frame) -> None:
        if frame == page.main_frame:
            navigations.append(frame.url)

    page.on("framenavigated", navigated)
    page.evaluate("() => { window.stillTheSamePage = true; }")
    try:
        yield
    finally:
        page.remove_listener("framenavigated", navigated)
    assert navigations == [], navigations
    assert page.evaluate("() => window.stillTheSamePage === true"), "the page was reloaded"


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


def test_the_operator_sends_an_operation_and_watches_a_bulk_operation_complete(
    page: Page, console: Platform, operator_api: Admin, fleet: Simulation
) -> None:
    # One simulated agent with three child devices, all in the simulator's group. It is stopped
    # while the operator sends the first operation, so the page surely shows it waiting.
    fleet.start(agents=1, children=3, delay=0.5)
    fleet.wait_connected(1)
    assert fleet.stop() == 0
    device_id = operator_api.by_serial("sim-0001-c01")
    group = group_id(operator_api)
    log_in(page)

    # --- one operation, from the device's page ------------------------------------------------
    page.goto(f"/admin/inventory/managedobject/{device_id}/change/")
    page.locator("#operations").get_by_role("link", name="Send operation").click()
    page.check("input[name=template][value=c8y_Firmware]")
    page.fill("#id_firmware_name", "pump-firmware")
    page.fill("#id_firmware_version", "2.0.0")
    page.fill("#id_firmware_url", "http://firmware.example/pump-2.0.0.bin")
    page.get_by_role("button", name="Send").click()

    expect(page).to_have_url(re.compile(rf"/admin/inventory/managedobject/{device_id}/change/"))
    expect(page.locator(".messagelist .success")).to_contain_text("Sent operation")
    row = page.locator("#operations tr[data-operation]").first
    operation_id = row.get_attribute("data-operation")
    assert operation_id
    expect(row).to_contain_text("c8y_Firmware")
    # Its status moves on the page while the operator watches: PENDING until the agent is back
    # (the restarted simulator takes what waits for it), then SUCCESSFUL, without a reload.
    status = row.locator(".operation-status")
    with watched(page):
        expect(status).to_have_text("PENDING")
        fleet.start(agents=1, children=3, delay=0.5)
        expect(status).to_have_text("SUCCESSFUL", timeout=WAIT * 1000)
    # Its times, the status change's among them (replaced by the live update), are shown in the
    # browser's zone with the UTC time on hover.
    assert_local_times(row, at_least=2)
    # The agent got it through the same service as REST: routed, and executed.
    sent = operator_api.finished(operation_id)
    assert sent["status"] == "SUCCESSFUL", sent
    assert sent["deviceId"] == device_id
    assert sent["c8y_Firmware"] == {
        "name": "pump-firmware",
        "version": "2.0.0",
        "url": "http://firmware.example/pump-2.0.0.bin",
    }
    assert operator_api.device(device_id)["c8y_Firmware"]["version"] == "2.0.0"

    # --- a bulk operation over the group, previewed, then confirmed ----------------------------
    page.goto("/admin/bulkops/bulkoperation/add/")
    page.get_by_label("The devices of a group").check()
    page.fill("#id_group", group)
    page.select_option("#id_template", "c8y_Restart")
    page.fill("#id_creation_ramp", "1.5")
    page.get_by_role("button", name="Preview").click()
    expect(page.locator(".bulk-preview-count")).to_have_text(str(FLEET_SIZE))
    expect(page.locator(".bulk-preview-duration")).to_be_visible()
    page.get_by_role("button", name=re.compile(r"^Create bulk operation for 4 device")).click()
    expect(page).to_have_url(re.compile(r"/admin/bulkops/bulkoperation/\d+/change/"))
    bulk_id = page.url.rstrip("/").split("/")[-2]

    # --- its progress, moving while its page and the list (another tab) stay loaded -----------
    listing = page.context.new_page()
    listing.goto("/admin/bulkops/bulkoperation/")
    bar = f'[data-live-key="progress-{bulk_id}"] .bulk-progress-text'
    texts = {"its page": page.locator(bar), "the list": listing.locator(bar)}
    done = f"{FLEET_SIZE}/{FLEET_SIZE}"
    with watched(page), watched(listing):
        seen = {where: [text.inner_text()] for where, text in texts.items()}
        deadline = time.monotonic() + WAIT
        while any(values[-1] != done for values in seen.values()):
            assert time.monotonic() < deadline, f"progress stopped at {seen}"
            page.wait_for_timeout(200)
            for where, text in texts.items():
                if (current := text.inner_text()) != seen[where][-1]:
                    seen[where].append(current)
    for where, values in seen.items():
        assert values[0] != done, f"{where} showed the bulk operation finished already: {values}"
    expect(listing.locator(f'[data-live-key="status-{bulk_id}"]')).to_have_text("COMPLETED")
    expect(page.locator(f'[data-live-key="status-{bulk_id}"]')).to_have_text("COMPLETED")
    expect(page.locator(f'[data-live-key="general-{bulk_id}"]')).to_have_text("SUCCESSFUL")
    # The live line's time as the admin's dates: 24-hour, seconds, the browser's zone.
    finished = re.compile(
        rf"^Finished: nothing left to change \(\d\d:\d\d:\d\d {re.escape(BROWSER_ZONE_NAME)}\)$"
    )
    expect(page.locator("[data-live-indicator]")).to_have_text(finished)
    bulk = operator_api.get(f"/devicecontrol/bulkoperations/{bulk_id}")
    assert (bulk["status"], bulk["generalStatus"]) == ("COMPLETED", "SUCCESSFUL"), bulk
    assert bulk["progress"]["successful"] == FLEET_SIZE, bulk
    assert bulk["operationPrototype"]["c8y_Restart"] == {}, bulk
    assert bulk["groupId"] == group, bulk
