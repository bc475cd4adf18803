"""The bulk operations admin's rollout (issue 14 item 8, the admin half): state, wave, current rate
and reason on the list, the change page and the live endpoint; Pause / Resume / Abort buttons on
the change page and Pause / Resume actions on the list, all through the services, with history."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.admin.models import CHANGE, LogEntry
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import reverse

from bulkops import services
from bulkops.models import BulkOperation, BulkStatus
from tests.bulkops.conftest import T0, create_bulk, make_fleet, reload
from tests.helpers import shown_messages

pytestmark = pytest.mark.django_db

CHANGELIST = reverse("admin:bulkops_bulkoperation_changelist")


def change_url(bulk: BulkOperation) -> str:
    return reverse("admin:bulkops_bulkoperation_change", args=[bulk.pk])


def button_url(bulk: BulkOperation, action: str) -> str:
    return reverse(f"admin:bulkops_bulkoperation_{action}", args=[bulk.pk])


@pytest.fixture
def waved() -> BulkOperation:
    """Four targets at 30 per minute in two waves; the first wave created and waiting."""
    fleet = make_fleet(4)
    bulk = create_bulk(
        fleet.group,
        creationRamp=0,
        rolloutConfig={"maximumPerMinute": 30},
        waves=[{"size": 2}, {"percentage": 100}],
    )
    services.bulk_operations_advance(now=T0 + timedelta(seconds=10))
    return reload(bulk)


def test_the_change_page_shows_the_rollout_and_pause_and_abort_buttons(
    admin_client: Client,
) -> None:
    fleet = make_fleet(3)
    bulk = create_bulk(
        fleet.group, creationRamp=0, rolloutConfig={"maximumPerMinute": 30}, waves=[{"size": 3}]
    )
    page = admin_client.get(change_url(bulk)).content.decode()
    assert '<strong class="bulk-rollout-state">RUNNING</strong> · wave 1 of 1 · 30/min' in page
    assert f'formaction="{button_url(bulk, "pause")}">Pause</button>' in page
    assert f'formaction="{button_url(bulk, "abort")}">Abort</button>' in page
    assert "Resume</button>" not in page
    assert '<form id="bulk-rollout-actions" method="post">' in page
    assert "&quot;maximumPerMinute&quot;: 30" in page


def test_a_waiting_wave_shows_on_the_list_and_live(
    admin_client: Client, waved: BulkOperation
) -> None:
    page = admin_client.get(CHANGELIST).content.decode()
    assert f'data-live-key="rollout-{waved.pk}"' in page
    assert "WAITING_FOR_WAVE</strong> · wave 1 of 2" in page
    live = admin_client.get(reverse("admin:bulkops_bulkoperation_live") + f"?ids={waved.pk}").json()
    assert "WAITING_FOR_WAVE" in live["values"][f"rollout-{waved.pk}"]["html"]


def test_pause_then_resume_buttons_go_through_the_services_with_history(
    admin_client: Client,
) -> None:
    fleet = make_fleet(3)
    bulk = create_bulk(fleet.group, creationRamp=1)
    response = admin_client.post(button_url(bulk, "pause"), follow=True)
    assert f"Bulk operation {bulk.pk} paused." in shown_messages(response)
    row = reload(bulk)
    assert (row.rollout_state, row.rollout_reason, row.next_due_at) == (
        "PAUSED",
        "Paused by root-admin",
        None,
    )
    page = response.content.decode()
    assert 'PAUSED</strong> · <span class="bulk-rollout-reason">Paused by root-admin</span>' in page
    assert f'formaction="{button_url(bulk, "resume")}">Resume</button>' in page
    # Twice: refused by the service, shown, nothing changes.
    response = admin_client.post(button_url(bulk, "pause"), follow=True)
    assert any(m.startswith("Not paused: ") for m in shown_messages(response))
    response = admin_client.post(button_url(bulk, "resume"), follow=True)
    assert f"Bulk operation {bulk.pk} resumed." in shown_messages(response)
    assert reload(bulk).rollout_state == "RUNNING"
    history = list(
        LogEntry.objects.filter(object_id=str(bulk.pk), action_flag=CHANGE)
        .order_by("pk")
        .values_list("change_message", flat=True)
    )
    assert history == ["Paused by root-admin.", "Resumed by root-admin."]


def test_the_abort_button_cancels(admin_client: Client) -> None:
    fleet = make_fleet(2)
    bulk = create_bulk(fleet.group, creationRamp=1)
    response = admin_client.post(button_url(bulk, "abort"), follow=True)
    assert f"Bulk operation {bulk.pk} aborted." in shown_messages(response)
    assert reload(bulk).status == BulkStatus.DELETED
    page = response.content.decode()
    assert "bulk-rollout-button" not in page  # nothing left to pause or abort


def test_buttons_want_post_and_the_change_permission(
    admin_client: Client, django_user_model: type
) -> None:
    fleet = make_fleet(2)
    bulk = create_bulk(fleet.group, creationRamp=1)
    assert admin_client.get(button_url(bulk, "pause")).status_code == 405
    viewer = django_user_model.objects.create_user(username="viewer", password="pw", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_bulkoperation"))
    client = Client()
    client.force_login(viewer)
    assert client.post(button_url(bulk, "pause")).status_code == 403
    assert "bulk-rollout-button" not in client.get(change_url(bulk)).content.decode()
    assert reload(bulk).rollout_state is None
    missing = reverse("admin:bulkops_bulkoperation_pause", args=[987654321])
    assert admin_client.post(missing).status_code == 404


def test_pause_and_resume_actions_on_the_list(admin_client: Client) -> None:
    fleet = make_fleet(2)
    running = create_bulk(fleet.group, creationRamp=1)
    done = create_bulk(fleet.group, creationRamp=0)
    services.bulk_operations_advance(now=T0)
    assert reload(done).status == BulkStatus.COMPLETED
    response = admin_client.post(
        CHANGELIST, {"action": "pause", "_selected_action": [running.pk, done.pk]}, follow=True
    )
    shown = shown_messages(response)
    assert f"Paused 1 bulk operation(s): {running.pk}." in shown
    assert any(m.startswith(f"Skipped 1 bulk operation(s): {done.pk} (") for m in shown)
    assert reload(running).rollout_state == "PAUSED"
    response = admin_client.post(
        CHANGELIST, {"action": "resume", "_selected_action": [running.pk]}, follow=True
    )
    assert f"Resumed 1 bulk operation(s): {running.pk}." in shown_messages(response)
    assert reload(running).rollout_state == "RUNNING"
