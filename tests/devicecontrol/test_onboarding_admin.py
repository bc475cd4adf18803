"""The admin's "New device requests": the list, registering through the add form, "Accept" through
the same service as REST (with a history entry naming the operator), delete as reject."""

from __future__ import annotations

import pytest
from django.contrib.admin.models import CHANGE, LogEntry
from django.test import Client
from django.urls import reverse

from devicecontrol import services
from devicecontrol.models import NewDeviceRequest
from deviceplatform.models import User
from deviceplatform.services import user_upsert
from tests.helpers import shown_messages

pytestmark = pytest.mark.django_db

CHANGELIST = reverse("admin:devicecontrol_newdevicerequest_changelist")
ADD = reverse("admin:devicecontrol_newdevicerequest_add")


def pending(device_id: str) -> NewDeviceRequest:
    services.new_device_request_create(device_id=device_id, owner="operator")
    services.device_credentials_poll(device_id=device_id, security_token=None)
    return NewDeviceRequest.objects.get(device_id=device_id)


def test_the_list_shows_every_stage(admin_client: Client) -> None:
    services.new_device_request_create(device_id="waiting-1", owner="operator")
    pending("pending-1")
    pending("issued-1")
    services.new_device_request_accept(
        device_id="issued-1", status="ACCEPTED", accepted_by="operator"
    )
    services.device_credentials_poll(device_id="issued-1", security_token=None)

    response = admin_client.get(CHANGELIST)

    assert response.status_code == 200
    assert [row.device_id for row in response.context["cl"].result_list] == [
        "issued-1",
        "pending-1",
        "waiting-1",
    ]
    page = response.content.decode()
    for text in ("WAITING_FOR_CONNECTION", "PENDING_ACCEPTANCE", "ACCEPTED", "operator"):
        assert text in page
    for column in ("last polled", "accepted by", "accepted at", "credentials issued at"):
        assert column in page.lower()
    filtered = admin_client.get(CHANGELIST, {"status__exact": "PENDING_ACCEPTANCE"})
    assert [row.device_id for row in filtered.context["cl"].result_list] == ["pending-1"]
    searched = admin_client.get(CHANGELIST, {"q": "issued"})
    assert [row.device_id for row in searched.context["cl"].result_list] == ["issued-1"]
    detail = admin_client.get(
        reverse(
            "admin:devicecontrol_newdevicerequest_change",
            args=[filtered.context["cl"].result_list[0].pk],
        )
    )
    assert detail.status_code == 200


def test_register_through_the_add_form(admin_client: Client) -> None:
    response = admin_client.post(ADD, {"device_id": "form-1", "security_token": "tok-1"})

    assert response.status_code == 302, response.content[:2000]
    request = NewDeviceRequest.objects.get()
    assert (request.device_id, request.status, request.owner) == (
        "form-1",
        "WAITING_FOR_CONNECTION",
        "root-admin",
    )
    assert request.has_security_token
    assert "tok-1" not in request.security_token_digest


@pytest.mark.parametrize(
    ("device_id", "message"),
    [("bad id", "whitespace"), ("FORM-2", "exists already"), ("person", "not a device user")],
)
def test_the_add_form_shows_the_service_refusals(
    admin_client: Client, device_id: str, message: str
) -> None:
    services.new_device_request_create(device_id="form-2", owner="operator")
    user_upsert(username="device_person", password="x", roles=["ROLE_INVENTORY_READ"])

    response = admin_client.post(ADD, {"device_id": device_id})

    assert response.status_code == 200
    assert message in str(response.context["adminform"].form.errors)
    assert NewDeviceRequest.objects.count() == 1


def test_accept_action_uses_the_service_and_writes_history(admin_client: Client) -> None:
    ready = pending("ready-1")
    services.new_device_request_create(device_id="early-1", owner="operator")
    early = NewDeviceRequest.objects.get(device_id="early-1")

    response = admin_client.post(
        CHANGELIST,
        {"action": "accept_requests", "_selected_action": [ready.pk, early.pk]},
        follow=True,
    )

    messages = shown_messages(response)
    assert any("Accepted 1 request(s): ready-1" in message for message in messages), messages
    assert any(
        "Could not accept early-1" in message and "has not asked for credentials yet" in message
        for message in messages
    ), messages
    ready.refresh_from_db()
    early.refresh_from_db()
    assert (ready.status, ready.accepted_by) == ("ACCEPTED", "root-admin")
    assert ready.accepted_at is not None
    assert early.status == "WAITING_FOR_CONNECTION"
    [entry] = LogEntry.objects.filter(object_id=str(ready.pk))
    assert entry.action_flag == CHANGE
    assert entry.user == User.objects.get(username="root-admin")
    assert "Accepted by root-admin" in entry.get_change_message()
    assert not LogEntry.objects.filter(object_id=str(early.pk)).exists()

    # Accepting again is refused as REST refuses it, and writes no history.
    again = admin_client.post(
        CHANGELIST, {"action": "accept_requests", "_selected_action": [ready.pk]}, follow=True
    )
    assert any("ACCEPTED already" in message for message in shown_messages(again))
    assert LogEntry.objects.filter(object_id=str(ready.pk)).count() == 1


def test_delete_rejects(admin_client: Client) -> None:
    first = pending("reject-1")
    second = pending("reject-2")
    services.new_device_request_create(device_id="keep-1", owner="operator")

    one = admin_client.post(
        reverse("admin:devicecontrol_newdevicerequest_delete", args=[first.pk]), {"post": "yes"}
    )
    assert one.status_code == 302
    bulk = admin_client.post(
        CHANGELIST,
        {"action": "delete_selected", "_selected_action": [second.pk], "post": "yes"},
    )
    assert bulk.status_code == 302
    assert list(NewDeviceRequest.objects.values_list("device_id", flat=True)) == ["keep-1"]
