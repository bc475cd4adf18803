"""Device users in the admin (issue 11 item 3): listed apart from people with the devices they own,
filtered by activity, revoked, restored and rotated through the user services with a history
entry each, and the effect on REST at once; `last_request_at` and `last_login` as Basic auth
writes them. Realtime effects: tests/realtime/test_revoke.py; across processes:
test_device_users_processes.py."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.admin.models import CHANGE, LogEntry
from django.contrib.auth.models import Permission
from django.contrib.contenttypes.models import ContentType
from django.contrib.sessions.models import Session
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone
from rest_framework.test import APIClient

from deviceplatform.api.authentication import password_cache
from deviceplatform.api.credential_cache import shared_credentials
from deviceplatform.models import DeviceUser, User
from deviceplatform.services import (
    bootstrap_user_ensure,
    device_user_provision,
    user_set_active,
    user_upsert,
)
from inventory.models import ManagedObject, Relation
from inventory.services import managed_object_add_children, managed_object_create
from tests.helpers import basic, shown_messages
from tests.inventory.test_admin import form_data

pytestmark = pytest.mark.django_db

PEOPLE = reverse("admin:deviceplatform_user_changelist")
DEVICE_USERS = reverse("admin:deviceplatform_deviceuser_changelist")
CURRENT_USER = "/user/currentUser"


def change_url(user: User) -> str:
    return reverse("admin:deviceplatform_deviceuser_change", args=[user.pk])


def credentials_url(user: User, change: str) -> str:
    return reverse("admin:deviceplatform_deviceuser_credentials", args=[user.pk, change])


def listed(response: Any) -> list[str]:
    assert response.status_code == 200, response.status_code
    return [user.username for user in response.context["cl"].result_list]


def rest(username: str, password: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=basic(f"t100/{username}", password))
    return client


def history(user: User) -> list[tuple[str, str]]:
    """(admin, message) of the change entries about `user`, oldest first."""
    entries = LogEntry.objects.filter(object_id=str(user.pk), action_flag=CHANGE).order_by("pk")
    return [(entry.user.username, entry.change_message) for entry in entries]


def provision(serial: str) -> tuple[User, str]:
    user, password, created = device_user_provision(serial)
    assert created
    return user, password


def agent_with_children(owner: str, name: str, children: int) -> ManagedObject:
    agent = managed_object_create(
        owner=owner, data={"name": name, "c8y_IsDevice": {}, "com_cumulocity_model_Agent": {}}
    )
    kids = [
        managed_object_create(owner=owner, data={"name": f"{name}-{i}", "c8y_IsDevice": {}})
        for i in range(children)
    ]
    if kids:
        managed_object_add_children(parent=agent, relation=Relation.DEVICE, children=kids)
    return agent


# --- the lists -----------------------------------------------------------------------------------


def test_people_and_device_users_are_listed_apart(admin_client: Client, superuser: User) -> None:
    provision("4711")
    provision("4712")
    user_upsert(username="alice", password="x", groups=["readers"])
    # Staff in `devices` is a person (a device is never handed such an account).
    user_upsert(username="operator", password="x", groups=["devices"], is_superuser=True)
    bootstrap_user_ensure("bootstrap-secret")

    people = admin_client.get(PEOPLE)
    devices = admin_client.get(DEVICE_USERS)

    assert sorted(listed(people)) == ["alice", "devicebootstrap", "operator", "root-admin"]
    assert listed(devices) == ["device_4711", "device_4712"]
    page = people.content.decode()
    assert "device bootstrap login: may only ask for device credentials" in page
    # A device user's page lives with the device users only.
    device = User.objects.get(username="device_4711")
    person_page = reverse("admin:deviceplatform_user_change", args=[device.pk])
    assert admin_client.get(person_page).status_code == 302  # "does not exist", to the index
    assert admin_client.get(change_url(device)).status_code == 200


def test_the_device_column_shows_the_agent_first_and_counts_the_others(
    admin_client: Client,
) -> None:
    gateway, _ = provision("gw-1")
    sensor, _ = provision("sensor-1")
    provision("idle-1")
    agent = agent_with_children("device_gw-1", "Gateway", children=2)
    device = managed_object_create(
        owner="DEVICE_SENSOR-1", data={"name": "Probe", "c8y_IsDevice": {}}
    )
    managed_object_create(owner="device_sensor-1", data={"name": "Notes"})  # not a device

    response = admin_client.get(DEVICE_USERS)

    page = response.content.decode()
    agent_page = reverse("admin:inventory_managedobject_change", args=[agent.pk])
    device_page = reverse("admin:inventory_managedobject_change", args=[device.pk])
    objects = reverse("admin:inventory_managedobject_changelist")
    assert f'<a href="{agent_page}">Gateway [{agent.pk}]</a> (agent) + ' in page
    assert f'<a href="{objects}?owner__exact=device_gw-1">2 more</a>' in page
    # No agent: its first device, whatever the case of the owner column.
    assert f'<a href="{device_page}">Probe [{device.pk}]</a> + ' in page
    assert f'<a href="{objects}?owner__exact=device_sensor-1">1 more</a>' in page
    rows = {user.username: user.owned for user in response.context["cl"].result_list}
    assert rows["device_idle-1"] is None
    assert (rows["device_gw-1"].shown.pk, rows["device_gw-1"].count) == (agent.pk, 3)
    assert gateway.pk != sensor.pk

    # The device user's page lists them too.
    detail = admin_client.get(change_url(gateway)).content.decode()
    assert f'<a href="{agent_page}">Gateway [{agent.pk}]</a> (agent)' in detail


def test_the_list_costs_the_same_queries_for_3_or_40_device_users(
    admin_client: Client, django_assert_max_num_queries: Callable[..., Any]
) -> None:
    def build(first: int, last: int) -> None:
        for n in range(first, last):
            provision(f"q{n:03d}")
            agent_with_children(f"device_q{n:03d}", f"Agent {n}", children=2)

    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            assert admin_client.get(DEVICE_USERS).status_code == 200
        return len(captured)

    build(0, 3)
    few = queries()
    build(3, 40)
    many = queries()

    assert many == few, (few, many)
    # Session, admin user, two counts, the page, the owned objects' aggregate, the objects shown.
    with django_assert_max_num_queries(7):
        response = admin_client.get(DEVICE_USERS)
    assert len(listed(response)) == 40


def test_search_by_username_or_serial(admin_client: Client) -> None:
    for serial in ("SN-1001", "SN-1002", "XY-77"):
        provision(serial)

    assert listed(admin_client.get(DEVICE_USERS, {"q": "sn-100"})) == [
        "device_SN-1001",
        "device_SN-1002",
    ]
    assert listed(admin_client.get(DEVICE_USERS, {"q": "device_XY"})) == ["device_XY-77"]
    assert listed(admin_client.get(DEVICE_USERS, {"q": "nobody"})) == []


def test_filters_active_and_not_heard_from(admin_client: Client) -> None:
    now = timezone.now()
    for serial, ago in (("fresh", 10), ("hour", 120), ("day", 48 * 60), ("never", None)):
        user, _ = provision(serial)
        seen = None if ago is None else now - timedelta(minutes=ago)
        User.objects.filter(pk=user.pk).update(last_request_at=seen)
    user_set_active(User.objects.get(username="device_hour").pk, active=False)

    def names(**params: str) -> list[str]:
        return listed(admin_client.get(DEVICE_USERS, params))

    assert names(silent="1h") == ["device_day", "device_hour", "device_never"]
    assert names(silent="24h") == ["device_day", "device_never"]
    assert names(silent="never") == ["device_never"]
    assert names(is_active__exact="0") == ["device_hour"]
    assert names(is_active__exact="1", silent="1h") == ["device_day", "device_never"]


def test_columns_and_no_add(admin_client: Client) -> None:
    user, _ = provision("cols")
    seen = timezone.now() - timedelta(minutes=3)
    User.objects.filter(pk=user.pk).update(last_request_at=seen, last_login=seen)

    response = admin_client.get(DEVICE_USERS)

    headers = re.findall(
        r'<th scope="col" class="(?:sortable )?column-(\w+)', response.content.decode()
    )
    assert headers == [
        "username",
        "devices",
        "is_active",
        "last_request_at",
        "last_login",
        "date_joined",
    ]
    assert reverse("admin:deviceplatform_deviceuser_add") not in response.content.decode()
    assert admin_client.get(reverse("admin:deviceplatform_deviceuser_add")).status_code == 403


# --- revoke, restore, rotate: list actions -------------------------------------------------------


def test_revoke_asks_first_then_disables_with_a_history_entry_and_rest_refuses(
    admin_client: Client, django_capture_on_commit_callbacks: Callable[..., Any]
) -> None:
    first, first_password = provision("rv-1")
    second, _ = provision("rv-2")
    assert rest("device_rv-1", first_password).get(CURRENT_USER).status_code == 200
    selected = {"action": "revoke_credentials", "_selected_action": [first.pk, second.pk]}

    asked = admin_client.post(DEVICE_USERS, selected)

    assert asked.status_code == 200
    assert "Revoke (disable) credentials: are you sure?" in asked.content.decode()
    assert User.objects.filter(pk__in=[first.pk, second.pk], is_active=True).count() == 2
    assert history(first) == []

    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        done = admin_client.post(DEVICE_USERS, {**selected, "confirmed": "yes"})

    assert done.status_code == 302
    assert User.objects.filter(pk__in=[first.pk, second.pk], is_active=True).count() == 0
    assert len(callbacks) == 2  # each user's realtime sessions end on commit
    assert history(first) == [
        ("root-admin", "Revoked credentials: disabled, its requests are refused.")
    ]
    assert history(second) == history(first)
    entry = LogEntry.objects.get(object_id=str(first.pk))
    assert entry.content_type == ContentType.objects.get_for_model(DeviceUser, False)
    assert any("Revoked the credentials of 2 device user(s)" in m for m in shown_messages(done))
    response = rest("device_rv-1", first_password).get(CURRENT_USER)
    assert response.status_code == 401

    # Revoking again skips them and writes no history.
    again = admin_client.post(DEVICE_USERS, {**selected, "confirmed": "yes"})
    assert any("Skipped 2 device user(s) already revoked" in m for m in shown_messages(again))
    assert len(history(first)) == 1


def test_restore_enables_again_with_the_same_password(admin_client: Client) -> None:
    user, password = provision("rs-1")
    active, _ = provision("rs-2")
    user_set_active(user.pk, active=False)
    assert rest("device_rs-1", password).get(CURRENT_USER).status_code == 401

    response = admin_client.post(
        DEVICE_USERS, {"action": "restore_credentials", "_selected_action": [user.pk, active.pk]}
    )

    assert response.status_code == 302
    assert User.objects.get(pk=user.pk).is_active
    assert history(user) == [("root-admin", "Restored credentials: enabled again.")]
    assert history(active) == []
    assert rest("device_rs-1", password).get(CURRENT_USER).status_code == 200
    messages = shown_messages(response)
    assert any("Restored 1 device user(s): device_rs-1." in m for m in messages)
    assert any("Skipped 1 device user(s) already active: device_rs-2." in m for m in messages)


def test_rotate_shows_each_new_password_once_and_the_old_ones_stop_at_once(
    admin_client: Client, django_capture_on_commit_callbacks: Callable[..., Any]
) -> None:
    one, old_one = provision("rt-1")
    two, old_two = provision("rt-2")
    for name, password in (("device_rt-1", old_one), ("device_rt-2", old_two)):
        assert rest(name, password).get(CURRENT_USER).status_code == 200  # cached as verified
    selected = {"action": "rotate_credentials", "_selected_action": [one.pk, two.pk]}
    asked = admin_client.post(DEVICE_USERS, selected)
    assert "Rotate credentials: are you sure?" in asked.content.decode()
    assert User.objects.get(pk=one.pk).password == one.password

    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        response = admin_client.post(DEVICE_USERS, {**selected, "confirmed": "yes"})

    assert response.status_code == 200
    assert "no-store" in response["Cache-Control"]
    assert len(callbacks) == 2
    page = response.content.decode()
    new = dict(
        re.findall(
            r"<code>t100/(device_rt-\d)</code></td>\s*<td><code class=\"new-password\">([^<]+)</code>",
            page,
        )
    )
    assert set(new) == {"device_rt-1", "device_rt-2"}
    assert new["device_rt-1"] != new["device_rt-2"]
    assert rest("device_rt-1", old_one).get(CURRENT_USER).status_code == 401
    assert rest("device_rt-1", new["device_rt-1"]).get(CURRENT_USER).status_code == 200
    assert rest("device_rt-2", new["device_rt-2"]).get(CURRENT_USER).status_code == 200
    message = "Rotated credentials: a new generated password (not recorded)."
    assert history(one) == [("root-admin", message)]
    assert history(two) == [("root-admin", message)]
    # Shown once: in no history entry, no message, no session, no later page.
    for password in new.values():
        assert not LogEntry.objects.filter(change_message__contains=password).exists()
        assert all(password not in m for m in shown_messages(response))
        assert all(password not in s.session_data for s in Session.objects.all())
        assert password not in admin_client.get(change_url(one)).content.decode()
        assert password not in admin_client.get(DEVICE_USERS).content.decode()


def test_rotating_a_revoked_user_keeps_it_revoked(admin_client: Client) -> None:
    user, _ = provision("rt-off")
    user_set_active(user.pk, active=False)

    response = admin_client.post(
        DEVICE_USERS,
        {"action": "rotate_credentials", "_selected_action": [user.pk], "confirmed": "yes"},
    )

    assert "revoked: restore it to let it log in" in response.content.decode()
    (password,) = re.findall(r'class="new-password">([^<]+)<', response.content.decode())
    assert not User.objects.get(pk=user.pk).is_active
    assert rest("device_rt-off", password).get(CURRENT_USER).status_code == 401


# --- the buttons on a device user's page ---------------------------------------------------------


def test_change_page_buttons_confirm_then_change(
    admin_client: Client, django_capture_on_commit_callbacks: Callable[..., Any]
) -> None:
    user, password = provision("btn-1")

    page = admin_client.get(change_url(user)).content.decode()
    assert f'href="{credentials_url(user, "revoke")}"' in page
    assert f'href="{credentials_url(user, "rotate")}"' in page
    assert credentials_url(user, "restore") not in page

    asked = admin_client.get(credentials_url(user, "revoke"))
    assert "Revoke (disable) credentials: are you sure?" in asked.content.decode()
    assert User.objects.get(pk=user.pk).is_active

    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        revoked = admin_client.post(credentials_url(user, "revoke"))

    assert (revoked.status_code, revoked["Location"]) == (302, change_url(user))
    assert len(callbacks) == 1
    assert not User.objects.get(pk=user.pk).is_active
    assert rest("device_btn-1", password).get(CURRENT_USER).status_code == 401
    page = admin_client.get(change_url(user)).content.decode()
    assert f'href="{credentials_url(user, "restore")}"' in page
    assert credentials_url(user, "revoke") not in page

    restored = admin_client.post(credentials_url(user, "restore"))
    assert restored.status_code == 302
    assert rest("device_btn-1", password).get(CURRENT_USER).status_code == 200

    rotated = admin_client.post(credentials_url(user, "rotate"))
    assert rotated.status_code == 200
    assert "no-store" in rotated["Cache-Control"]
    (new,) = re.findall(r'class="new-password">([^<]+)<', rotated.content.decode())
    assert rest("device_btn-1", password).get(CURRENT_USER).status_code == 401
    assert rest("device_btn-1", new).get(CURRENT_USER).status_code == 200
    assert [message for _, message in history(user)] == [
        "Revoked credentials: disabled, its requests are refused.",
        "Restored credentials: enabled again.",
        "Rotated credentials: a new generated password (not recorded).",
    ]


def test_credentials_pages_refuse_unknown_changes_users_and_the_unauthorised(
    client: Client, admin_client: Client
) -> None:
    user, _ = provision("guard-1")
    person = user_upsert(username="alice", password="x")

    assert admin_client.get(credentials_url(user, "explode")).status_code == 404
    # A person is no device user: "does not exist" (redirect to the index), nothing changed.
    assert admin_client.post(credentials_url(person, "revoke")).status_code == 302
    assert User.objects.get(pk=person.pk).is_active

    viewer = user_upsert(username="viewer", password="x")
    viewer.is_staff = True
    viewer.save()
    viewer.user_permissions.add(
        Permission.objects.get(codename="view_deviceuser", content_type__app_label="deviceplatform")
    )
    client.force_login(viewer)
    assert client.get(DEVICE_USERS).status_code == 200
    assert client.post(credentials_url(user, "revoke")).status_code == 403
    refused = client.post(
        DEVICE_USERS,
        {"action": "revoke_credentials", "_selected_action": [user.pk], "confirmed": "yes"},
    )
    assert refused.status_code == 200  # the list again: the action is not offered to a viewer
    assert User.objects.get(pk=user.pk).is_active
    assert history(user) == []


def test_the_people_admin_ends_sessions_when_it_disables_or_deletes(
    admin_client: Client, django_capture_on_commit_callbacks: Callable[..., Any]
) -> None:
    person = user_upsert(username="bob", password="x", groups=["readers"])
    page = reverse("admin:deviceplatform_user_change", args=[person.pk])
    data = form_data(admin_client, page)
    data.pop("is_active", None)
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        response = admin_client.post(page, data)
    assert response.status_code == 302
    assert not User.objects.get(pk=person.pk).is_active
    assert len(callbacks) == 1

    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        admin_client.post(
            reverse("admin:deviceplatform_user_delete", args=[person.pk]), {"post": "yes"}
        )
    assert not User.objects.filter(pk=person.pk).exists()
    assert len(callbacks) == 1


# --- last_request_at and last_login, written by Basic auth ---------------------------------------


def updates_of(captured: CaptureQueriesContext, column: str) -> int:
    return sum(
        1 for q in captured.captured_queries if q["sql"].startswith("UPDATE") and column in q["sql"]
    )


def test_last_request_at_is_written_once_per_interval_not_per_request(settings: Any) -> None:
    settings.AUTH_LAST_REQUEST_INTERVAL_SECONDS = 60
    user, password = provision("lr-1")
    assert User.objects.get(pk=user.pk).last_request_at is None
    client = rest("device_lr-1", password)

    with CaptureQueriesContext(connection) as captured:
        for _ in range(5):
            assert client.get(CURRENT_USER).status_code == 200

    assert updates_of(captured, "last_request_at") == 1
    first = User.objects.get(pk=user.pk).last_request_at
    assert first is not None
    assert timezone.now() - first < timedelta(minutes=1)

    # Once the interval has passed (moved back here, not waited for), the next request writes.
    User.objects.filter(pk=user.pk).update(last_request_at=first - timedelta(seconds=61))
    with CaptureQueriesContext(connection) as captured:
        assert client.get(CURRENT_USER).status_code == 200
        assert client.get(CURRENT_USER).status_code == 200
    assert updates_of(captured, "last_request_at") == 1
    assert User.objects.get(pk=user.pk).last_request_at > first - timedelta(seconds=61)

    # A value in the future (a clock set back) is corrected, not trusted for ever.
    User.objects.filter(pk=user.pk).update(last_request_at=timezone.now() + timedelta(days=1))
    assert client.get(CURRENT_USER).status_code == 200
    assert User.objects.get(pk=user.pk).last_request_at <= timezone.now()

    # A refused request is no sign of life.
    User.objects.filter(pk=user.pk).update(last_request_at=None)
    assert rest("device_lr-1", "wrong").get(CURRENT_USER).status_code == 401
    assert User.objects.get(pk=user.pk).last_request_at is None


def test_interval_zero_writes_every_request(settings: Any) -> None:
    settings.AUTH_LAST_REQUEST_INTERVAL_SECONDS = 0
    _, password = provision("lr-0")
    client = rest("device_lr-0", password)
    with CaptureQueriesContext(connection) as captured:
        for _ in range(3):
            assert client.get(CURRENT_USER).status_code == 200
    assert updates_of(captured, "last_request_at") == 3


def test_last_login_is_written_when_the_password_is_checked_against_its_hash() -> None:
    user, password = provision("ll-1")
    assert User.objects.get(pk=user.pk).last_login is None
    client = rest("device_ll-1", password)

    assert client.get(CURRENT_USER).status_code == 200
    first = User.objects.get(pk=user.pk).last_login
    assert first is not None

    # Verified before in this process: no hash check, no login.
    with CaptureQueriesContext(connection) as captured:
        assert client.get(CURRENT_USER).status_code == 200
    assert updates_of(captured, "last_login") == 0
    assert User.objects.get(pk=user.pk).last_login == first

    # A process that has not verified it (here: the cache emptied) checks the hash: a login.
    User.objects.filter(pk=user.pk).update(last_login=first - timedelta(hours=1))
    password_cache._entries.clear()
    shared_credentials().forget_all()  # with REDIS_URL the other processes' checks count too
    assert client.get(CURRENT_USER).status_code == 200
    assert User.objects.get(pk=user.pk).last_login > first - timedelta(hours=1)

    # A wrong password is no login.
    User.objects.filter(pk=user.pk).update(last_login=None)
    assert rest("device_ll-1", "wrong").get(CURRENT_USER).status_code == 401
    assert User.objects.get(pk=user.pk).last_login is None
