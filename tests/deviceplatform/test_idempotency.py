"""`Idempotency-Key` on the creates of operations, bulk operations and managed objects
(deviceplatform/api/idempotency.py): replay, 422 on another body, per user, 4xx not kept, bad
keys, expiry and its sweep, and two concurrent requests with one key creating one object."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import requests
from django.db import connection, transaction
from django.utils import timezone

from bulkops.models import BulkOperation
from devicecontrol.models import Operation
from deviceplatform.api.idempotency import purge_expired
from deviceplatform.models import IdempotencyKey
from deviceplatform.roles import Role
from deviceplatform.scheduler import Scheduler
from inventory.models import ManagedObject
from tests.devicecontrol.conftest import add_child_devices, make_device
from tests.helpers import PASSWORD, run_together

ROLES = [
    Role.INVENTORY_ADMIN,
    Role.DEVICE_CONTROL_ADMIN,
    Role.BULK_OPERATION_ADMIN,
    Role.BULK_OPERATION_READ,
]
MO = "/inventory/managedObjects"
OPS = "/devicecontrol/operations"
BULK = "/devicecontrol/bulkoperations"
JSON = "application/json"


def post(client: Any, path: str, body: Any, key: str | None = None, **extra: Any) -> Any:
    if key is not None:
        extra["HTTP_IDEMPOTENCY_KEY"] = key
    raw = body if isinstance(body, str) else json.dumps(body)
    return client.generic("POST", path, raw, content_type=JSON, HTTP_ACCEPT=JSON, **extra)


@pytest.fixture
def users(make_user: Callable[..., Any], client_for: Callable[..., Any]) -> dict[str, Any]:
    return {name: client_for(make_user(name, roles=ROLES)) for name in ("ann", "ben")}


def agent_with_device() -> tuple[ManagedObject, ManagedObject]:
    agent = make_device("Agent", agent=True)
    device = make_device("Device")
    add_child_devices(agent, device)
    return agent, device


def same_answer(first: Any, again: Any) -> None:
    assert again.status_code == first.status_code == 201
    assert again["Location"] == first["Location"]
    assert again.content == first.content
    assert again["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first


@pytest.mark.django_db
def test_managed_object_same_key_same_body_answers_the_first_result(users: dict) -> None:
    ann = users["ann"]
    first = post(ann, MO, {"name": "Pump", "c8y_IsDevice": {}}, key="k-1")
    # Same JSON, other key order and spacing: the same request.
    again = post(ann, MO, '{ "c8y_IsDevice": {},  "name": "Pump" }', key="k-1")
    same_answer(first, again)
    assert again["Content-Type"] == first["Content-Type"]
    assert ManagedObject.objects.filter(name="Pump").count() == 1


@pytest.mark.django_db
def test_without_the_header_every_post_creates(users: dict) -> None:
    ann = users["ann"]
    answers = [post(ann, MO, {"name": "Plain"}) for _ in range(2)]
    assert [a.status_code for a in answers] == [201, 201]
    assert answers[0]["Location"] != answers[1]["Location"]
    assert "Idempotent-Replayed" not in answers[1]
    assert IdempotencyKey.objects.count() == 0


@pytest.mark.django_db
def test_same_key_other_body_or_path_is_422_and_creates_nothing(users: dict) -> None:
    ann = users["ann"]
    assert post(ann, MO, {"name": "A"}, key="k").status_code == 201
    before = ManagedObject.objects.count()
    for path, body in ((MO, {"name": "B"}), (BULK, {"name": "A"})):
        answer = post(ann, path, body, key="k")
        assert answer.status_code == 422
        error = answer.json()
        assert error["error"] == "undefined/validationError"
        assert "Idempotency-Key 'k' was already used" in error["message"]
        assert set(error) == {"error", "message", "info", "requestId"}
    assert ManagedObject.objects.count() == before


@pytest.mark.django_db
def test_keys_are_per_user(users: dict) -> None:
    first = post(users["ann"], MO, {"name": "Same"}, key="shared")
    other = post(users["ben"], MO, {"name": "Same"}, key="shared")
    assert first.status_code == other.status_code == 201
    assert first["Location"] != other["Location"]
    assert "Idempotent-Replayed" not in other
    assert IdempotencyKey.objects.filter(key="shared").count() == 2


@pytest.mark.django_db
def test_a_failed_create_is_not_remembered(users: dict) -> None:
    ann = users["ann"]
    _agent, device = agent_with_device()
    bad = post(ann, OPS, {"deviceId": "999999999", "c8y_Restart": {}}, key="op")
    assert bad.status_code == 422
    assert IdempotencyKey.objects.count() == 0
    # The corrected request may use the key (4xx answers are not stored).
    good = post(ann, OPS, {"deviceId": str(device.pk), "c8y_Restart": {}}, key="op")
    assert good.status_code == 201
    again = post(ann, OPS, {"deviceId": str(device.pk), "c8y_Restart": {}}, key="op")
    same_answer(good, again)
    assert Operation.objects.filter(device=device).count() == 1


@pytest.mark.django_db
def test_operation_replay_keeps_the_etag_and_the_first_empty_body(users: dict) -> None:
    ann = users["ann"]
    _agent, device = agent_with_device()
    body = json.dumps({"deviceId": str(device.pk), "c8y_Restart": {}})
    # No Accept: Cumulocity's empty-body answer; the replay is that same answer.
    first = ann.generic("POST", OPS, body, content_type=JSON, HTTP_IDEMPOTENCY_KEY="e")
    again = ann.generic(
        "POST", OPS, body, content_type=JSON, HTTP_IDEMPOTENCY_KEY="e", HTTP_ACCEPT=JSON
    )
    assert first.status_code == again.status_code == 201
    assert first.content == again.content == b""
    assert again["ETag"] == first["ETag"]
    assert again["Location"] == first["Location"]
    assert Operation.objects.filter(device=device).count() == 1


@pytest.mark.django_db
def test_bulk_operation_is_created_once(users: dict) -> None:
    ann = users["ann"]
    agent, device = agent_with_device()
    group = make_device("Group", c8y_IsDeviceGroup={})
    from inventory import services as inventory_services
    from inventory.models import Relation

    inventory_services.managed_object_add_children(
        parent=group, relation=Relation.ASSET, children=[device]
    )
    body = {
        "groupId": str(group.pk),
        "startDate": (timezone.now() + timedelta(hours=1)).isoformat(),
        "creationRamp": 1,
        "operationPrototype": {"c8y_Restart": {}},
    }
    first = post(ann, BULK, body, key="bulk-1")
    assert first.status_code == 201, first.content
    again = post(ann, BULK, body, key="bulk-1")
    same_answer(first, again)
    assert BulkOperation.objects.count() == 1


@pytest.mark.django_db
@pytest.mark.parametrize("key", ["", "x" * 256])
def test_empty_or_too_long_key_is_400(users: dict, key: str) -> None:
    answer = post(users["ann"], MO, {"name": "K"}, key=key)
    assert answer.status_code == 400
    assert answer.json()["error"] == "general/badRequest"
    assert "Idempotency-Key must be 1 to 255 characters" in answer.json()["message"]
    assert not ManagedObject.objects.filter(name="K").exists()


@pytest.mark.django_db
@pytest.mark.parametrize("key", ["a\x00b", "a\nb", "\t", "   ", "del\x7f"])
def test_a_blank_key_or_one_with_control_characters_is_400(users: dict, key: str) -> None:
    """NUL was a 500 on PostgreSQL (its text type refuses it); the others were stored as keys."""
    answer = post(users["ann"], MO, {"name": "K"}, key=key)
    assert answer.status_code == 400
    assert answer.json()["error"] == "general/badRequest"
    assert "Idempotency-Key must be printable text" in answer.json()["message"]
    assert not ManagedObject.objects.filter(name="K").exists()


@pytest.mark.django_db
def test_a_255_character_key_is_accepted(users: dict) -> None:
    key = "k" * 255
    first = post(users["ann"], MO, {"name": "Long"}, key=key)
    same_answer(first, post(users["ann"], MO, {"name": "Long"}, key=key))


@pytest.mark.django_db
def test_an_expired_key_is_new_again_and_the_sweep_deletes_expired_keys(
    users: dict, settings: Any
) -> None:
    ann = users["ann"]
    first = post(ann, MO, {"name": "Old"}, key="old")
    assert post(ann, MO, {"name": "Kept"}, key="kept").status_code == 201
    day = timedelta(seconds=settings.IDEMPOTENCY_KEY_TTL_SECONDS)
    IdempotencyKey.objects.filter(key="old").update(created_at=timezone.now() - day)
    # Expired: the same request creates again, and even another body is accepted.
    renewed = post(ann, MO, {"name": "Old"}, key="old")
    assert renewed.status_code == 201
    assert renewed["Location"] != first["Location"]
    assert "Idempotent-Replayed" not in renewed
    assert IdempotencyKey.objects.filter(key="old").count() == 1
    # The sweep deletes what is past the TTL, nothing else.
    IdempotencyKey.objects.filter(key="old").update(created_at=timezone.now() - 2 * day)
    assert purge_expired(now=timezone.now()) == 1
    assert list(IdempotencyKey.objects.values_list("key", flat=True)) == ["kept"]


@pytest.mark.django_db
def test_the_sweep_runs_from_the_beat_schedule(users: dict, settings: Any) -> None:
    post(users["ann"], MO, {"name": "Swept"}, key="swept")
    IdempotencyKey.objects.update(created_at=timezone.now() - timedelta(days=2))
    entry = settings.CELERY_BEAT_SCHEDULE["purge-idempotency-keys"]
    assert entry["task"] == "deviceplatform.tasks.purge_idempotency_keys"
    scheduler = Scheduler({"purge-idempotency-keys": entry})
    assert scheduler.tick(0.0) == []
    assert scheduler.tick(float(entry["schedule"])) == ["purge-idempotency-keys"]
    assert IdempotencyKey.objects.count() == 0


@pytest.mark.django_db
def test_wait_with_a_key_waits_for_the_first_requests_operation(users: dict) -> None:
    ann = users["ann"]
    _agent, device = agent_with_device()
    body = {"deviceId": str(device.pk), "c8y_Restart": {}}
    answers = [post(ann, f"{OPS}/wait?timeout=0", body, key="w") for _ in range(2)]
    assert [a.status_code for a in answers] == [202, 202]
    assert answers[0]["Location"] == answers[1]["Location"]
    assert answers[0].json()["id"] == answers[1].json()["id"]
    assert Operation.objects.filter(device=device).count() == 1


# --- concurrency: real HTTP clients against a live server, each request on its own connection --


class Api:
    def __init__(self, url: str, username: str) -> None:
        self.url, self.auth = url, (f"t100/{username}", PASSWORD)

    def post(self, path: str, body: Any, key: str) -> requests.Response:
        headers = {"Content-Type": JSON, "Accept": JSON, "Idempotency-Key": key}
        return requests.post(
            self.url + path, json=body, headers=headers, auth=self.auth, timeout=60
        )


@pytest.mark.django_db(transaction=True)
def test_concurrent_requests_with_one_key_create_one_object(
    live_server: Any, make_user: Callable[..., Any]
) -> None:
    make_user("ann", roles=ROLES)
    api = Api(live_server.url, "ann")
    count = 6
    answers = run_together(lambda i: api.post(MO, {"name": "Racer"}, key="race"), count)
    assert [a.status_code for a in answers] == [201] * count, answers
    assert len({a.headers["Location"] for a in answers}) == 1
    assert len({a.content for a in answers}) == 1
    assert sum("Idempotent-Replayed" in a.headers for a in answers) == count - 1
    assert ManagedObject.objects.filter(name="Racer").count() == 1


def waiting_backends() -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'"
        )
        return cursor.fetchone()[0]


@pytest.mark.postgresql
@pytest.mark.django_db(transaction=True)
def test_the_second_request_waits_for_the_first_and_answers_its_result(
    live_server: Any, make_user: Callable[..., Any]
) -> None:
    """Both requests are held inside their transactions at once: the first after inserting the
    key's row (its operation's foreign key waits for the device row this test locks), the second
    on the key's unique index. Released, they answer one operation."""
    make_user("ann", roles=ROLES)
    _agent, device = agent_with_device()
    api = Api(live_server.url, "ann")
    body = {"deviceId": str(device.pk), "c8y_Restart": {}}
    answers: list[Any] = [None, None]

    def send(index: int) -> None:
        try:
            answers[index] = api.post(OPS, body, key="held")
        finally:
            connection.close()

    with transaction.atomic():
        ManagedObject.objects.select_for_update().get(pk=device.pk)
        threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while waiting_backends() < 2:
            assert time.monotonic() < deadline, "the two requests never both waited"
            time.sleep(0.05)
        assert IdempotencyKey.objects.count() == 0  # nothing is visible before the commit
    for thread in threads:
        thread.join(timeout=60)
    assert [a.status_code for a in answers] == [201, 201]
    assert answers[0].headers["Location"] == answers[1].headers["Location"]
    assert answers[0].content == answers[1].content
    assert Operation.objects.filter(device=device).count() == 1
