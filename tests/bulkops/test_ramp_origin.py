"""The schedule's origin (README "Bulk operations from the admin" / docs/api/bulkoperations.md):
the later of `startDate` and the moment the bulk operation became visible, the end of the
POST's transaction, not the moment the request began. Storing 100,000 targets takes seconds; a
schedule that started before them was already late at the commit and caught up in a burst."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from django.db import connection, transaction
from django.utils import timezone

from bulkops import services
from bulkops.models import BulkOperation, BulkOperationTarget
from tests.bulkops.conftest import T0, advance, bulk_data, children, make_fleet


def _waiting_on_targets() -> bool:
    table = BulkOperationTarget._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = %s::regclass", [table]
        )
        return cursor.fetchone()[0] > 0


@pytest.mark.django_db(transaction=True)
def test_an_implicit_start_is_the_moment_the_bulk_operation_became_visible() -> None:
    """The POST is held while storing its targets (another transaction locks their table): its
    schedule starts once they are stored, so the ramp runs at its pace from then, not late."""
    if connection.vendor != "postgresql":
        pytest.skip("table locks: PostgreSQL only")
    fleet = make_fleet(4)
    holding, release = threading.Event(), threading.Event()
    created: list[BulkOperation] = []
    errors: list[BaseException] = []

    def hold() -> None:
        try:
            with transaction.atomic(), connection.cursor() as cursor:
                table = BulkOperationTarget._meta.db_table
                cursor.execute(f'LOCK TABLE "{table}" IN EXCLUSIVE MODE')
                holding.set()
                release.wait(30)
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    def create() -> None:
        try:
            # A startDate in the past: the start is the creation's moment (Cumulocity's rule).
            data = bulk_data(fleet.group, startDate="2020-01-01T00:00:00Z", creationRamp=10)
            created.append(services.bulk_operation_create(data=data))
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(30)
    creator = threading.Thread(target=create)
    creator.start()
    deadline = time.monotonic() + 30
    while not _waiting_on_targets() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _waiting_on_targets()  # the POST waits to store its targets
    released = timezone.now()
    release.set()
    holder.join(30)
    creator.join(30)
    assert errors == []
    (bulk,) = created
    assert bulk.creation_time < released  # the request began before ...
    assert bulk.effective_start >= released  # ... its schedule, which starts once visible
    assert bulk.next_due_at == bulk.effective_start
    # At the configured pace from then: positions 0 and 1 (due at +0 s and +10 s) by +15 s.
    assert advance(15, base=bulk.effective_start) == 2
    assert advance(19.999, base=bulk.effective_start) == 0
    assert advance(20, base=bulk.effective_start) == 1


@pytest.mark.django_db
def test_an_explicit_future_start_date_stays_the_origin() -> None:
    fleet = make_fleet(3)
    data = bulk_data(fleet.group, startDate="2031-03-01T12:00:30Z", creationRamp=10)
    bulk = services.bulk_operation_create(data=data, now=T0)
    assert bulk.effective_start == T0 + timedelta(seconds=30)
    assert advance(29.999) == 0
    assert advance(30) == 1
    assert len(children(bulk)) == 1


@pytest.mark.django_db
def test_a_late_ramp_still_catches_up_from_the_origin() -> None:
    """Cumulocity's rule once visible: a ramp run that comes late creates every child due."""
    fleet = make_fleet(3)
    data = bulk_data(fleet.group, startDate="2020-01-01T00:00:00Z", creationRamp=10)
    bulk = services.bulk_operation_create(data=data, now=T0)
    assert bulk.effective_start == T0
    assert advance(25) == 3
