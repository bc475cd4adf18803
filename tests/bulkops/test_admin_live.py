"""Live progress in the admin: the bulk operations list and change page mark their moving cells
(status, general status, progress bar, counters, child links, next due time, ramp error) with
`data-live-key`, and the `live/` endpoint answers the same cells as they are now, in one query,
plus whether anything can still change; deviceplatform/live.js polls it and swaps them in."""

from __future__ import annotations

import html
import re
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import reverse

from bulkops.models import BulkOperation
from bulkops.services import bulk_operations_advance, bulk_progress_fold
from devicecontrol.models import OperationStatus
from tests.bulkops import test_admin
from tests.bulkops.test_admin import T0, children, new_bulk, new_devices, new_group, set_status

pytestmark = pytest.mark.django_db

LIVE = reverse("admin:bulkops_bulkoperation_live")
CHANGELIST = reverse("admin:bulkops_bulkoperation_changelist")
# The fixtures of the admin's tests: an agent, and running, completed and scheduled bulk operations.
agent, running = test_admin.agent, test_admin.running
completed, scheduled = test_admin.completed, test_admin.scheduled
KEYS = ("status", "general", "progress", "counters", "children", "due", "ramp-error", "rollout")


def live(client: Client, *bulks: BulkOperation) -> dict[str, Any]:
    response = client.get(LIVE, {"ids": ",".join(str(bulk.pk) for bulk in bulks)})
    assert response.status_code == 200, response.content
    assert "no-store" in response["Cache-Control"]
    return response.json()


def test_the_pages_mark_their_moving_cells_and_poll_the_endpoint(
    admin_client: Client, running: BulkOperation, scheduled: BulkOperation
) -> None:
    page = admin_client.get(CHANGELIST).content.decode()

    src = re.search(r'data-live-src="([^"]+)"', page)
    assert src is not None
    assert html.unescape(src.group(1)) == f"{LIVE}?ids={scheduled.pk},{running.pk}"
    assert "deviceplatform/live." in page  # the script, through the static manifest
    for bulk in (running, scheduled):
        for key in ("status", "general", "progress", "ramp-error"):
            assert f'data-live-key="{key}-{bulk.pk}"' in page

    change = admin_client.get(
        reverse("admin:bulkops_bulkoperation_change", args=[running.pk])
    ).content.decode()
    src = re.search(r'data-live-src="([^"]+)"', change)
    assert src is not None
    assert html.unescape(src.group(1)) == f"{LIVE}?ids={running.pk}"
    for key in KEYS:
        assert f'data-live-key="{key}-{running.pk}"' in change
    assert "data-live-indicator" in change


def test_the_endpoint_answers_what_the_page_shows_and_follows_the_children(
    admin_client: Client, running: BulkOperation
) -> None:
    page = admin_client.get(
        reverse("admin:bulkops_bulkoperation_change", args=[running.pk])
    ).content.decode()
    first = live(admin_client, running)

    assert set(first["values"]) == {f"{key}-{running.pk}" for key in KEYS}
    for key in KEYS:
        value = first["values"][f"{key}-{running.pk}"]["html"]
        assert f'<span data-live-key="{key}-{running.pk}">{value}</span>' in page
    assert first["done"] is False
    assert first["values"][f"general-{running.pk}"]["html"] == "EXECUTING_WITH_ERRORS"
    assert 'title="successful: 1"' in first["values"][f"progress-{running.pk}"]["html"]

    # The PENDING child succeeds, the EXECUTING one too: the endpoint sees it at once (the
    # deltas are not folded yet), as the page would only on a reload.
    for operation in children(running).values():
        if operation.status == OperationStatus.PENDING:
            set_status(operation, OperationStatus.EXECUTING)
        if operation.status in (OperationStatus.PENDING, OperationStatus.EXECUTING):
            set_status(operation, OperationStatus.SUCCESSFUL)
    moved = live(admin_client, running)["values"]

    assert 'title="successful: 3"' in moved[f"progress-{running.pk}"]["html"]
    assert "<tr><th>successful</th><td>3</td></tr>" in moved[f"counters-{running.pk}"]["html"]
    assert "SUCCESSFUL (3)" in moved[f"children-{running.pk}"]["html"]
    assert moved[f"status-{running.pk}"]["html"] == "IN_PROGRESS"

    # The last target is created (it succeeds): the bulk operation is over, polling can stop.
    bulk_operations_advance(now=T0 + timedelta(seconds=45))
    [last] = [op for op in children(running).values() if op.status == OperationStatus.PENDING]
    set_status(last, OperationStatus.EXECUTING)
    set_status(last, OperationStatus.SUCCESSFUL)
    bulk_progress_fold()
    over = live(admin_client, running)

    assert over["values"][f"status-{running.pk}"]["html"] == "COMPLETED"
    assert over["values"][f"general-{running.pk}"]["html"] == "FAILED"
    assert over["done"] is True


def test_done_only_when_nothing_can_change(
    admin_client: Client,
    running: BulkOperation,
    completed: BulkOperation,
    scheduled: BulkOperation,
) -> None:
    assert live(admin_client, completed)["done"] is True
    assert live(admin_client, scheduled)["done"] is False
    assert live(admin_client, completed, running)["done"] is False
    assert live(admin_client)["done"] is True  # an empty page
    # Cancelled, but children still PENDING/EXECUTING: they still move.
    admin_client.post(CHANGELIST, {"action": "cancel", "_selected_action": [running.pk]})
    cancelled = live(admin_client, running)
    assert cancelled["values"][f"general-{running.pk}"]["html"] == "CANCELED"
    assert cancelled["done"] is False


def test_one_query_for_a_page_of_bulk_operations(
    admin_client: Client, agent: Any, django_assert_max_num_queries: Any
) -> None:
    devices = new_devices(3, agent)
    group = new_group("Fleet", devices)
    bulks = [new_bulk(group, ramp=i % 2) for i in range(40)]
    bulk_operations_advance(now=T0 + timedelta(seconds=1))
    admin_client.get(LIVE, {"ids": str(bulks[0].pk)})  # the session is read once

    # Session, user, the bulk operations with their progress and group names.
    with django_assert_max_num_queries(3):
        answer = live(admin_client, *bulks)

    assert len(answer["values"]) == 40 * len(KEYS)


@pytest.mark.parametrize(
    "ids",
    ["x", "1,,a", "-1", "1.5", "99999999999999999999", ",".join(["1"] * 201)],
)
def test_bad_ids_are_a_422_in_the_error_shape(admin_client: Client, ids: str) -> None:
    response = admin_client.get(LIVE, {"ids": ids})

    assert response.status_code == 422
    body = response.json()
    assert body["error"] == "bulkops/Invalid Data"
    assert "ids must be up to 200 bulk operation IDs" in body["message"]
    assert "info" in body


def test_unknown_ids_are_left_out(admin_client: Client, scheduled: BulkOperation) -> None:
    answer = live(admin_client, scheduled, BulkOperation(pk=987654321))

    assert set(answer["values"]) == {f"{key}-{scheduled.pk}" for key in KEYS}


def test_the_endpoint_needs_the_view_permission(client: Client, scheduled: BulkOperation) -> None:
    anonymous = client.get(LIVE, {"ids": scheduled.pk})
    assert anonymous.status_code == 302
    assert anonymous["Location"].startswith(reverse("admin:login"))

    staff = get_user_model().objects.create_user("staff", password="x", is_staff=True)
    client.force_login(staff)
    refused = client.get(LIVE, {"ids": scheduled.pk})
    assert refused.status_code == 403
    assert refused.json()["error"] == "security/Forbidden"

    staff.user_permissions.add(Permission.objects.get(codename="view_bulkoperation"))
    assert client.get(LIVE, {"ids": scheduled.pk}).status_code == 200
