"""`DELETE /devicecontrol/bulkoperations/{id}?cancelPending=true` (extension, README "Cancel that
reaches the device"): the bulk operation is cancelled as always, and its PENDING children (each
device's latest attempt) fail "Cancelled by <user>" in batches after the stop committed; without the
parameter (or `false`) the children keep their status, as the spec says."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from bulkops import services as bulk_services
from bulkops.models import BulkOperation
from devicecontrol import services as dc_services
from devicecontrol.models import Operation
from devicecontrol.realtime import registered_events
from tests.bulkops.conftest import (
    BULK,
    Fleet,
    advance,
    children,
    counted_progress,
    create_bulk,
    get_bulk,
    make_fleet,
    reload,
)
from tests.devicecontrol.conftest import call
from tests.factories import Clients
from tests.helpers import assert_error, run_together

pytestmark = pytest.mark.django_db


def statuses(bulk: BulkOperation) -> list[tuple[int, str, str | None, bool]]:
    return list(
        Operation.objects.filter(bulk_operation_id=bulk.pk)
        .order_by("pk")
        .values_list("pk", "status", "failure_reason", "superseded")
    )


def started(fleet: Fleet) -> tuple[BulkOperation, dict[str, Operation]]:
    """A bulk operation over six devices, IN_PROGRESS with five children created: one EXECUTING,
    one SUCCESSFUL, one FAILED and retried (its retry PENDING), two PENDING."""
    bulk = create_bulk(fleet.group)
    advance(4.5)
    executing, successful, retried, pending, last = children(bulk)
    dc_services.operation_update(operation_id=executing.pk, data={"status": "EXECUTING"})
    dc_services.operation_update(operation_id=successful.pk, data={"status": "SUCCESSFUL"})
    dc_services.operation_update(operation_id=retried.pk, data={"status": "FAILED"})
    retry = dc_services.operation_retry(operation=Operation.objects.get(pk=retried.pk))
    return bulk, {
        "executing": executing,
        "successful": successful,
        "retried": retried,
        "retry": retry,
        "pending": pending,
        "last": last,
    }


def delete(client: Any, bulk: BulkOperation, query: str = "", **headers: Any) -> Any:
    return call(client, "DELETE", f"{BULK}/{bulk.pk}{query}", **headers)


def test_cancel_pending_fails_the_pending_latest_attempts(
    bapi: Clients, django_capture_on_commit_callbacks: Callable[..., Any]
) -> None:
    fleet = make_fleet(6)
    bulk, ops = started(fleet)
    outside = dc_services.operation_create(device=fleet.devices[3], data={"c8y_Restart": {}})

    with django_capture_on_commit_callbacks() as callbacks:
        response = delete(bapi["bulk_admin"], bulk, "?cancelPending=true")

    assert response.status_code == 204, response.content
    after = {pk: (status, reason) for pk, status, reason, _ in statuses(bulk)}
    reason = "Cancelled by bulk_admin"
    assert after == {
        ops["executing"].pk: ("EXECUTING", None),
        ops["successful"].pk: ("SUCCESSFUL", None),
        ops["retried"].pk: ("FAILED", None),
        ops["retry"].pk: ("FAILED", reason),
        ops["pending"].pk: ("FAILED", reason),
        ops["last"].pk: ("FAILED", reason),
    }
    assert Operation.objects.get(pk=outside.pk).status == "PENDING"  # not a child
    cancelled = sorted([ops["retry"].pk, ops["pending"].pk, ops["last"].pk])
    events = registered_events(callbacks)
    assert [(e.action, e.operation_id) for e in events] == [("UPDATE", pk) for pk in cancelled]
    assert all(isinstance(e.data, dict) and e.data["failureReason"] == reason for e in events)
    state = get_bulk(bapi["bulk_reader"], bulk.pk)
    assert (state["status"], state["generalStatus"]) == ("DELETED", "CANCELED")
    assert state["progress"] == counted_progress(bulk)
    assert state["progress"] == {
        "pending": 0,
        "executing": 1,
        "successful": 1,
        "failed": 3,
        "all": 5,
    }


@pytest.mark.parametrize("query", ["", "?cancelPending=false"])
def test_without_cancel_pending_the_children_keep_their_status(
    bapi: Clients, query: str, django_capture_on_commit_callbacks: Callable[..., Any]
) -> None:
    bulk, _ = started(make_fleet(6))
    before = statuses(bulk)

    with django_capture_on_commit_callbacks() as callbacks:
        response = delete(bapi["bulk_admin"], bulk, query)

    assert response.status_code == 204
    assert statuses(bulk) == before
    assert registered_events(callbacks) == []
    assert reload(bulk).status == "DELETED"


@pytest.mark.parametrize(
    "value",
    # Exactly `true` or `false`, once: an empty, differently spelt or repeated value is refused
    # (an empty one used to be a plain cancel, a repetition the last value).
    [
        "yes",
        "1",
        "TRUEE",
        "on",
        "",
        "TRUE",
        "True",
        "%20true",
        "true%20",
        "true&cancelPending=false",
    ],
)
def test_a_bad_cancel_pending_is_422_and_changes_nothing(
    bapi: Clients, value: str, row_counts: Callable[[], dict[str, int]]
) -> None:
    bulk, _ = started(make_fleet(6))
    bapi.prepare("bulk_admin")
    before, counts = statuses(bulk), row_counts()

    response = delete(bapi["bulk_admin"], bulk, f"?cancelPending={value}")

    body = assert_error(response, 422)
    assert "cancelPending" in body["message"]
    assert statuses(bulk) == before
    assert row_counts() == counts
    assert reload(bulk).status == "IN_PROGRESS"


def test_cancel_pending_of_a_completed_bulk_cancels_its_pending_children_only(
    bapi: Clients, fleet: Fleet
) -> None:
    bulk = create_bulk(fleet.group, creationRamp=0)
    advance(0)  # every child created: COMPLETED, the children still PENDING
    first = children(bulk)[0]
    dc_services.operation_update(operation_id=first.pk, data={"status": "EXECUTING"})
    assert reload(bulk).status == "COMPLETED"
    # Without the parameter it stays the spec's 422.
    assert_error(delete(bapi["bulk_admin"], bulk), 422, "devicecontrol/Invalid Data")

    response = delete(bapi["bulk_admin"], bulk, "?cancelPending=true")

    assert response.status_code == 204
    assert reload(bulk).status == "COMPLETED"
    assert [(status, reason) for _, status, reason, _ in statuses(bulk)] == [
        ("EXECUTING", None),
        ("FAILED", "Cancelled by bulk_admin"),
        ("FAILED", "Cancelled by bulk_admin"),
    ]
    state = get_bulk(bapi["bulk_reader"], bulk.pk)
    assert state["generalStatus"] == "EXECUTING_WITH_ERRORS"
    assert state["progress"] == counted_progress(bulk)
    # A DELETED one likewise (cancelled before without the parameter).
    again = delete(bapi["bulk_admin"], bulk, "?cancelPending=true")
    assert again.status_code == 204
    assert reload(bulk).status == "COMPLETED"


def test_cancel_pending_of_a_cancelled_bulk_cancels_what_is_left(bapi: Clients) -> None:
    bulk, ops = started(make_fleet(6))
    assert delete(bapi["bulk_admin"], bulk).status_code == 204
    assert Operation.objects.get(pk=ops["pending"].pk).status == "PENDING"

    assert delete(bapi["bulk_admin"], bulk, "?cancelPending=true").status_code == 204

    assert reload(bulk).status == "DELETED"
    assert Operation.objects.get(pk=ops["pending"].pk).status == "FAILED"
    assert not Operation.objects.filter(bulk_operation_id=bulk.pk, status="PENDING").exists()


def test_unknown_bulk_is_404_with_cancel_pending(bapi: Clients) -> None:
    assert_error(call(bapi["bulk_admin"], "DELETE", f"{BULK}/999999?cancelPending=true"), 404)


@pytest.mark.parametrize(
    ("who", "path", "status"),
    [
        ("bulk_admin", "999999", 404),  # an unknown ID first, whatever the parameter
        ("bulk_admin", "%20{id}", 404),  # an ID with a space names nothing
        ("bulk_reader", "{id}", 403),  # then the role
        ("nobody", "{id}", 403),
    ],
)
def test_the_refusals_come_in_order_before_a_bad_cancel_pending(
    bapi: Clients, who: str, path: str, status: int, row_counts: Callable[[], dict[str, int]]
) -> None:
    bulk, _ = started(make_fleet(6))
    bapi.prepare(who)
    before, counts = statuses(bulk), row_counts()
    target = path.format(id=bulk.pk)

    assert_error(call(bapi[who], "DELETE", f"{BULK}/{target}?cancelPending=yes"), status)
    assert statuses(bulk) == before
    assert row_counts() == counts
    assert reload(bulk).status == "IN_PROGRESS"


@pytest.mark.parametrize(
    ("raw", "content_type", "status"),
    [
        ("[garbage", "application/json", 400),
        ("x", "text/plain", 415),
        ("[1]", "application/json", 422),
    ],
)
def test_a_bad_body_on_delete_is_refused_and_cancels_nothing(
    bapi: Clients, raw: str, content_type: str, status: int
) -> None:
    bulk, _ = started(make_fleet(6))
    before = statuses(bulk)

    response = call(
        bapi["bulk_admin"],
        "DELETE",
        f"{BULK}/{bulk.pk}?cancelPending=true",
        raw=raw,
        content_type=content_type,
    )

    assert_error(response, status)
    assert statuses(bulk) == before
    assert reload(bulk).status == "IN_PROGRESS"


def test_a_stale_if_match_is_412_and_cancels_nothing(bapi: Clients) -> None:
    bulk, _ = started(make_fleet(6))
    stale = call(bapi["bulk_reader"], "GET", f"{BULK}/{bulk.pk}")["ETag"]
    bulk_services.bulk_operation_update(bulk_operation_id=bulk.pk, data={"note": "changed"})
    before = statuses(bulk)

    response = delete(bapi["bulk_admin"], bulk, "?cancelPending=true", HTTP_IF_MATCH=stale)

    assert_error(response, 412)
    assert statuses(bulk) == before
    assert reload(bulk).status == "IN_PROGRESS"
    assert reload(bulk).pending_fail is None  # nothing marked for the sweep either


def test_while_the_ramp_runs_only_created_children_are_cancelled_and_no_more_come(
    bapi: Clients,
) -> None:
    fleet = make_fleet(6)
    bulk = create_bulk(fleet.group)
    advance(1.5)  # two of five created
    assert len(children(bulk)) == 2

    assert delete(bapi["bulk_admin"], bulk, "?cancelPending=true").status_code == 204
    advance(60)

    assert [(status, reason) for _, status, reason, _ in statuses(bulk)] == [
        ("FAILED", "Cancelled by bulk_admin")
    ] * 2
    assert get_bulk(bapi["bulk_reader"], bulk.pk)["progress"] == counted_progress(bulk)


@pytest.mark.django_db(transaction=True)
def test_cancel_pending_racing_agents_loses_no_report(bapi: Clients) -> None:
    """Agents taking children while the bulk is cancelled: each child is either taken first (and
    stays EXECUTING with the agent's fragment) or cancelled first (and the agent's later PUT
    wins, as any PUT may move a FAILED operation); progress still matches the children."""
    fleet = make_fleet(6)
    bulk = create_bulk(fleet.group, creationRamp=0)
    advance(0)
    pks = [op.pk for op in children(bulk)]
    client = bapi["bulk_admin"]

    def work(index: int) -> Any:
        if index == 0:
            return delete(client, bulk, "?cancelPending=true").status_code
        for pk in pks[index - 1 :: 2]:
            data = {"status": "EXECUTING", "c8y_Taken": {"by": index}}
            dc_services.operation_update(operation_id=pk, data=data)
        return "done"

    results = run_together(work, 3)

    assert results == [204, "done", "done"]
    for op in Operation.objects.filter(pk__in=pks):
        assert op.status == "EXECUTING"
        assert "c8y_Taken" in op.fragments
    assert get_bulk(bapi["bulk_reader"], bulk.pk)["progress"] == counted_progress(bulk)
