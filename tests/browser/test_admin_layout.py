"""The admin's lists on a 1280x900 screen with the navigation and filter sidebars open (the default):
the bulk operations list needs no horizontal scrolling and shows every row's status, progress and
rollout inside the viewport, with the longest values the list can show (EXECUTING_WITH_ERRORS,
WAITING_FOR_WAVE, a pause reason, a ramp error, a re-run of failures, a long group name). The
bulk operation's change page and the operations list fit too."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from bulkops import services
from bulkops.models import BulkOperation
from devicecontrol.models import OperationStatus
from devicecontrol.services import operation_update
from tests.browser.conftest import log_in
from tests.bulkops.conftest import T0, children, create_bulk, make_fleet, make_group
from tests.simulator.conftest import Platform

pytestmark = [
    pytest.mark.django_db(transaction=True),
    # aiocometd-ng's own aiohttp calls (the simulator's fixtures import it)
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

SCREEN = {"width": 1280, "height": 900}
# The widths of the page's area that holds the list (scrolls sideways when the table is wider)
# and of the document, and where each row's watched cells are.
LAYOUT = """() => {
    const results = document.querySelector('#changelist .results');
    const box = (element) => {
        const rect = element.getBoundingClientRect();
        return {left: rect.left, right: rect.right};
    };
    const cells = {};
    for (const key of ['status', 'progress', 'rollout']) {
        cells[key] = Array.from(document.querySelectorAll(`[data-live-key^="${key}-"]`))
            .map((cell) => box(cell.closest('td, th') || cell));
    }
    return {
        results: results && {scroll: results.scrollWidth, client: results.clientWidth,
                             ...box(results)},
        document: {scroll: document.documentElement.scrollWidth,
                   client: document.documentElement.clientWidth},
        cells,
    };
}"""


@pytest.fixture
def bulk_rows(transactional_db: None) -> list[BulkOperation]:
    """Bulk operations whose cells are as wide as they get, in a state the server's scheduler
    leaves alone (due in 2031 or later, or waiting for a wave)."""
    fleet = make_fleet(4)
    long_group = make_group(*fleet.devices, name="Pumping stations north-east region, batch 7")
    # Waves at a rate: the first wave created, WAITING_FOR_WAVE.
    waved = create_bulk(
        fleet.group,
        creationRamp=0,
        rolloutConfig={"maximumPerMinute": 30},
        waves=[{"size": 2}, {"percentage": 100}],
    )
    services.bulk_operations_advance(now=T0 + timedelta(seconds=10))
    # All created at once, one failed, the others PENDING: EXECUTING_WITH_ERRORS.
    erring = create_bulk(long_group, creationRamp=0, startDate="2031-03-01T12:00:30.000Z")
    services.bulk_operations_advance(now=T0 + timedelta(seconds=30))
    operation_update(
        operation_id=children(erring)[0].pk, data={"status": OperationStatus.FAILED}, now=T0
    )
    # The re-run of its failures, paused (a reason) with a ramp error recorded.
    rerun = services.bulk_operation_create(
        data={
            "failedParentId": str(erring.pk),
            "startDate": "2099-06-01T08:30:00.000Z",
            "creationRamp": 12.5,
            "operationPrototype": {"c8y_Restart": {}},
        },
        now=T0,
    )
    services.bulk_operation_pause(bulk_operation_id=rerun.pk, by="console-operator")
    failing = create_bulk(long_group, startDate="2099-06-01T08:30:00.000Z")
    BulkOperation.objects.filter(pk=failing.pk).update(
        ramp_error='IntegrityError: duplicate key value violates unique constraint "devicecontrol_'
        'operation_one_latest_attempt" DETAIL: Key (device_id, bulk_operation_id)=(12, 34)',
        ramp_error_count=3,
        ramp_error_at=T0,
    )
    return [waved, erring, rerun, failing]


def layout(page: Page) -> dict[str, Any]:
    result: dict[str, Any] = page.evaluate(LAYOUT)
    return result


def test_the_bulk_operations_list_fits_a_1280_px_screen(
    bulk_rows: list[BulkOperation], page: Page, console: Platform
) -> None:
    page.set_viewport_size(SCREEN)
    log_in(page)
    page.goto("/admin/bulkops/bulkoperation/")
    expect(page.locator("#result_list tbody tr")).to_have_count(len(bulk_rows))
    expect(page.locator("#result_list")).to_contain_text("EXECUTING_WITH_ERRORS")
    expect(page.locator("#result_list")).to_contain_text("WAITING_FOR_WAVE")
    expect(page.locator("#result_list .bulk-ramp-error")).to_have_count(1)

    shown = layout(page)
    results = shown["results"]
    assert results["scroll"] <= results["client"], shown  # no horizontal scrolling
    assert shown["document"]["scroll"] <= shown["document"]["client"], shown
    for key in ("status", "progress", "rollout"):
        assert len(shown["cells"][key]) == len(bulk_rows), (key, shown)
        for cell in shown["cells"][key]:
            # Inside the list's area (it cuts off what overflows it) and the viewport.
            assert results["left"] <= cell["left"], (key, shown)
            assert cell["right"] <= results["right"], (key, shown)
            assert cell["right"] <= SCREEN["width"], (key, shown)


def test_a_bulk_operations_page_and_the_operations_list_fit_a_1280_px_screen(
    bulk_rows: list[BulkOperation], page: Page, console: Platform
) -> None:
    page.set_viewport_size(SCREEN)
    log_in(page)
    for bulk in bulk_rows:
        page.goto(f"/admin/bulkops/bulkoperation/{bulk.pk}/change/")
        expect(page.locator(f'[data-live-key="rollout-{bulk.pk}"]')).to_be_visible()
        shown = layout(page)
        assert shown["document"]["scroll"] <= shown["document"]["client"], (bulk.pk, shown)
        for key in ("status", "progress", "rollout"):
            for cell in shown["cells"][key]:
                assert cell["right"] <= SCREEN["width"], (bulk.pk, key, shown)

    page.goto("/admin/devicecontrol/operation/")
    expect(page.locator("#result_list tbody tr").first).to_be_visible()
    shown = layout(page)
    results = shown["results"]
    assert results["scroll"] <= results["client"], shown
    assert shown["document"]["scroll"] <= shown["document"]["client"], shown
