"""What a wrong password costs (issue 10, fault campaign item 6): one request pays for at most one
failed password check however many handshakes it holds, and failed checks are limited per username
and per client address, shared through Redis between server processes, with a cheap refusal (429,
or a failed handshake with advice) that checks no password. Password checks are counted by a
counting copy of the MD5 hasher the test users are stored with (`tests/hashers.py`).

The suite runs with the limiter off (tests/conftest.py); these tests turn it on."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from django.test import Client, override_settings

from deviceplatform.api import auth_throttle
from deviceplatform.api.auth_throttle import MemoryCounters, client_address, get_counters
from tests.hashers import counting_hasher
from tests.helpers import PASSWORD, assert_error, basic
from tests.realtime.bayeux import LpBayeux, WsBayeux, handshake_message
from tests.servers import Servers, launch  # noqa: F401  (fixture)

pytestmark = pytest.mark.django_db


def token(login: str, password: str) -> str:
    return base64.b64encode(f"{login}:{password}".encode()).decode()


def handshake(login: str, password: str, id: int = 1) -> dict[str, Any]:  # noqa: A002
    return handshake_message(
        None, id=str(id), ext={"com.cumulocity.authn": {"token": token(login, password)}}
    )


@pytest.fixture
def limits(settings: Any) -> Iterator[Any]:
    """The limiter on, with fresh counters (in Redis under this run's prefix when REDIS_URL is
    set, as in the test runs), and cleared again afterwards."""
    settings.AUTH_FAILURES_PER_USER = 3
    settings.AUTH_FAILURES_PER_ADDRESS = 0
    settings.AUTH_FAILURE_WINDOW_SECONDS = 60
    get_counters().clear()
    yield settings
    get_counters().clear()


@pytest.fixture
def hashes(settings: Any) -> Any:
    return counting_hasher(settings)


# --- one check per request ---------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_a_long_polling_body_of_many_wrong_handshakes_checks_one_password(
    make_user: Any, hashes: Any
) -> None:
    from channels.db import database_sync_to_async

    await database_sync_to_async(make_user)("victim")
    same = [handshake("t100/victim", "wrong", i) for i in range(50)]
    varied = [handshake("t100/victim", f"wrong-{i}", i) for i in range(50)]

    replies = await LpBayeux().request(same)
    assert hashes.checks == 1
    replies += await LpBayeux().request(varied)

    assert hashes.checks == 2  # one per request, whatever the passwords
    assert {r["error"] for r in replies} == {"403::Handshake denied"}
    assert [r["id"] for r in replies] == [str(i) for i in range(50)] * 2


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_a_websocket_frame_of_many_wrong_handshakes_checks_one_password(
    make_user: Any, hashes: Any
) -> None:
    from channels.db import database_sync_to_async

    await database_sync_to_async(make_user)("victim")
    await database_sync_to_async(make_user)("reader")
    async with WsBayeux() as ws:
        replies = await ws.request([handshake("t100/victim", f"w{i}", i) for i in range(40)])
        checks_after_one_frame = hashes.checks
        # A later frame is a request of its own, and a right password still works.
        [good] = await ws.request([handshake("t100/reader", PASSWORD)])

    assert checks_after_one_frame == 1
    assert {r["error"] for r in replies} == {"403::Handshake denied"}
    assert good["successful"] is True


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_many_right_handshakes_in_one_body_check_the_password_once(
    make_user: Any, hashes: Any
) -> None:
    from channels.db import database_sync_to_async

    await database_sync_to_async(make_user)("fleet")
    replies = await LpBayeux().request([handshake("t100/fleet", PASSWORD, i) for i in range(20)])

    assert [r["successful"] for r in replies] == [True] * 20
    assert hashes.checks == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_the_authorization_header_and_a_handshake_relying_on_it_check_once(
    make_user: Any, hashes: Any
) -> None:
    from channels.db import database_sync_to_async

    await database_sync_to_async(make_user)("header")
    lp = LpBayeux(Authorization=basic("t100/header"))
    [reply] = await lp.request([handshake_message(None)])

    assert reply["successful"] is True
    assert hashes.checks == 1


# --- failed checks are limited ------------------------------------------------------------------


def test_rest_failures_per_username_are_refused_unchecked_after_the_limit(
    make_user: Any, limits: Any, hashes: Any
) -> None:
    make_user("victim")
    make_user("bystander")
    wrong = Client(HTTP_AUTHORIZATION=basic("t100/victim", "wrong"))
    for _ in range(3):
        assert_error(wrong.get("/platform"), 401, "security/Unauthorized")
    assert hashes.checks == 3

    limited = [wrong.get("/platform") for _ in range(5)]
    right = Client(HTTP_AUTHORIZATION=basic("t100/victim")).get("/platform")
    other = Client(HTTP_AUTHORIZATION=basic("t100/bystander")).get("/platform")

    for response in [*limited, right]:
        body = assert_error(response, 429, "security/tooManyRequests")
        assert body["message"].startswith("Too many failed authentications; try again in ")
        assert 1 <= int(response["Retry-After"]) <= 60
    assert hashes.checks == 3 + 1  # no check while limited; the bystander's is the one more
    assert other.status_code == 200


def test_credentials_verified_before_still_work_while_the_username_is_limited(
    make_user: Any, limits: Any, hashes: Any
) -> None:
    """A device keeps working while someone hammers its username: its password, verified once
    in this process, is recognised without a hash and without asking the limiter."""
    make_user("device-1")
    device = Client(HTTP_AUTHORIZATION=basic("t100/device-1"))
    assert device.get("/platform").status_code == 200
    attacker = Client(HTTP_AUTHORIZATION=basic("device-1", "guess"))
    statuses = [attacker.get("/platform").status_code for _ in range(5)]

    assert statuses == [401, 401, 401, 429, 429]
    assert device.get("/platform").status_code == 200
    assert hashes.checks == 1 + 3


@pytest.mark.django_db(transaction=True)  # the threads read the users over their own connections
def test_concurrent_slow_checks_from_one_address_stay_within_its_limit(
    make_user: Any, limits: Any, hashes: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight wrong passwords for eight users from one address arrive at once, each check slow:
    a slow check is counted before it runs, so the address's budget (9, weight 3: three slow
    checks) holds; counted after, all eight would have passed the test first."""
    import threading
    import time

    from django.db import connection

    from deviceplatform.api.auth_throttle import TooManyFailures
    from deviceplatform.api.authentication import authenticate_credentials
    from deviceplatform.models import User

    limits.AUTH_FAILURES_PER_USER = 0
    limits.AUTH_FAILURES_PER_ADDRESS = 9
    limits.AUTH_SLOW_FAILURE_WEIGHT = 3
    for index in range(8):
        make_user(f"slow-{index}")
    original = User.check_password

    def slow_check(user: Any, raw_password: str) -> bool:
        time.sleep(0.2)  # every thread arrives while the first ones check
        return original(user, raw_password)

    monkeypatch.setattr(User, "check_password", slow_check)
    barrier = threading.Barrier(8)
    outcomes: dict[int, str] = {}

    def attempt(index: int) -> None:
        barrier.wait()
        try:
            user = authenticate_credentials(f"slow-{index}", "wrong", client="203.0.113.10")
            outcomes[index] = "refused" if user is None else "in"
        except TooManyFailures:
            outcomes[index] = "limited"
        finally:
            connection.close()

    threads = [threading.Thread(target=attempt, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(outcomes.values()) == ["limited"] * 5 + ["refused"] * 3
    assert hashes.checks == 3


def test_a_right_slow_password_is_not_counted_as_a_failure(
    make_user: Any, limits: Any, hashes: Any
) -> None:
    """The slow check counted before it ran is taken back when the password was right: with a
    limit of one failure per user, logins keep working in every (new) process."""
    from deviceplatform.api.authentication import password_cache

    limits.AUTH_FAILURES_PER_USER = 1
    make_user("person")
    for _ in range(3):
        password_cache._entries.clear()  # a process that has not verified it yet
        assert Client(HTTP_AUTHORIZATION=basic("t100/person")).get("/platform").status_code == 200
    assert hashes.checks == 3
    wrong = Client(HTTP_AUTHORIZATION=basic("t100/person", "wrong"))
    assert [wrong.get("/platform").status_code for _ in range(2)] == [401, 429]


def test_failures_per_address_limit_many_usernames(make_user: Any, limits: Any) -> None:
    limits.AUTH_FAILURES_PER_USER = 0
    limits.AUTH_FAILURES_PER_ADDRESS = 4
    limits.AUTH_SLOW_FAILURE_WEIGHT = 1  # every failure counts one (weights: the next test)
    for index in range(6):
        make_user(f"user-{index}")

    def attempt(index: int, address: str) -> int:
        client = Client(HTTP_AUTHORIZATION=basic(f"user-{index}", "wrong"), REMOTE_ADDR=address)
        return client.get("/platform").status_code

    assert [attempt(i, "203.0.113.7") for i in range(6)] == [401] * 4 + [429] * 2
    assert attempt(5, "198.51.100.1") == 401  # another address is counted apart
    unknown = Client(HTTP_AUTHORIZATION=basic("nobody-at-all", "x"), REMOTE_ADDR="203.0.113.7")
    assert unknown.get("/platform").status_code == 429  # unknown names count and are refused


def test_slow_hash_failures_weigh_more_against_the_address(
    make_user: Any, limits: Any, hashes: Any
) -> None:
    """A failed check against a slow hash (anything but the device hash: PBKDF2 in production,
    the counting MD5 here) counts AUTH_SLOW_FAILURE_WEIGHT against the address, so one address
    gets a third as many slow checks; a device-hash failure and the per-user count stay at one."""
    from deviceplatform.hashers import device_password_hash
    from deviceplatform.models import User
    from deviceplatform.services import generate_password

    limits.AUTH_FAILURES_PER_USER = 100  # counted, never reached here
    limits.AUTH_FAILURES_PER_ADDRESS = 9
    limits.AUTH_SLOW_FAILURE_WEIGHT = 3
    limits.PASSWORD_HASHERS = [
        *limits.PASSWORD_HASHERS,
        "deviceplatform.hashers.DevicePasswordHasher",
    ]
    for index in range(4):
        make_user(f"person-{index}")
        device = make_user(f"device_w-{index}", groups=["devices"])
        User.objects.filter(pk=device.pk).update(password=device_password_hash(generate_password()))

    def attempt(login: str, address: str) -> int:
        client = Client(HTTP_AUTHORIZATION=basic(login, "wrong"), REMOTE_ADDR=address)
        return client.get("/platform").status_code

    slow = [attempt(f"person-{i % 4}", "203.0.113.8") for i in range(5)]
    fast = [attempt(f"device_w-{i % 4}", "203.0.113.9") for i in range(11)]

    assert slow == [401] * 3 + [429] * 2  # 3 slow checks x 3 = the address's 9
    assert hashes.checks == 3
    assert fast == [401] * 9 + [429] * 2
    # Each checked username was charged one, not the weight: person-0 was checked once (its
    # second try was refused unchecked), so with a per-user limit of 2 it gets one more check.
    limits.AUTH_FAILURES_PER_USER = 2
    assert attempt("person-0", "198.51.100.2") == 401
    assert attempt("person-0", "198.51.100.3") == 429


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_a_limited_handshake_is_a_cheap_bayeux_failure_with_advice(
    make_user: Any, limits: Any, hashes: Any
) -> None:
    from channels.db import database_sync_to_async

    await database_sync_to_async(make_user)("victim")
    replies = []
    for attempt in range(5):
        [reply] = await LpBayeux().request([handshake("t100/victim", f"wrong-{attempt}")])
        replies.append(reply)
    async with WsBayeux() as ws:
        [socketed] = await ws.request([handshake("t100/victim", PASSWORD)])
    header = await LpBayeux(Authorization=basic("t100/victim", "again")).post(
        [handshake_message(None)]
    )

    assert [r["error"] for r in replies[:3]] == ["403::Handshake denied"] * 3
    for reply in [*replies[3:], socketed]:
        assert reply["successful"] is False
        assert reply["error"].startswith("429::Too many failed authentications")
        assert reply["advice"]["reconnect"] == "handshake"
        assert 1000 <= reply["advice"]["interval"] <= 60_000
    assert_error(header, 429, "security/tooManyRequests")
    assert int(header["Retry-After"]) >= 1
    assert hashes.checks == 3


def test_the_operation_wait_endpoint_is_limited_too(limits: Any) -> None:
    client = Client(HTTP_AUTHORIZATION=basic("t100/nobody", "x"))
    responses = [
        client.post("/devicecontrol/operations/wait?timeout=0", {}, content_type="application/json")
        for _ in range(4)
    ]
    assert [r.status_code for r in responses] == [401, 401, 401, 429]
    assert_error(responses[-1], 429, "security/tooManyRequests")


def test_the_window_ends_and_the_count_starts_again() -> None:
    now = [1000.0]
    counters = MemoryCounters(clock=lambda: now[0])
    limited = [("u:x", 2)]

    counters.record(limited, window=60)
    now[0] += 30
    counters.record(limited, window=60)  # the window started with the first failure
    assert counters.wait(limited) == pytest.approx(30)
    now[0] += 29.5
    assert counters.wait(limited) == pytest.approx(0.5)
    now[0] += 0.5
    assert counters.wait(limited) == 0
    counters.record(limited, window=60)
    assert counters.wait(limited) == 0  # one failure in the new window


def test_memory_counters_reserve_within_the_limits_and_refund() -> None:
    """The per-process counters (no REDIS_URL) reserve and refund as the Redis script does."""
    now = [1000.0]
    counters = MemoryCounters(clock=lambda: now[0])
    pair = [("u:x", 10), ("a:1", 9)]

    assert [counters.reserve(pair, 60, [1, 3]) for _ in range(4)] == [0, 0, 0, pytest.approx(60)]
    counters.refund(pair, [1, 3])  # a right password: 2 and 6 left, one more fits
    now[0] += 10
    assert counters.reserve(pair, 60, [1, 3]) == 0
    assert counters.reserve(pair, 60, [1, 3]) == pytest.approx(50)  # the first window's end
    now[0] += 50
    counters.refund(pair, [1, 3])  # the window ended meanwhile: nothing to take back
    assert counters.reserve(pair, 60, [1, 3]) == 0


def test_memory_counters_stay_bounded_under_a_flood_of_names() -> None:
    now = [0.0]
    counters = MemoryCounters(clock=lambda: now[0], max_keys=100)
    for index in range(1000):
        counters.record([(f"u:{index}", 1)], window=60)
    assert len(counters._entries) == 100
    assert counters.wait([("u:999", 1)]) == pytest.approx(60)


def test_redis_counters_expire_with_the_window(limits: Any) -> None:
    if not limits.REDIS_URL:
        pytest.skip("needs REDIS_URL")
    limits.AUTH_FAILURE_WINDOW_SECONDS = 7
    auth_throttle.record_failure("Someone", "192.0.2.1")
    client = redis.Redis.from_url(limits.REDIS_URL)
    key = f"{limits.AUTH_FAILURE_PREFIX}:u:someone"
    try:
        assert int(client.get(key)) == 1
        assert 0 < client.pttl(key) <= 7000
        auth_throttle.record_failure("SOMEONE", None)  # names count case-insensitively
        assert int(client.get(key)) == 2
        assert client.get(f"{limits.AUTH_FAILURE_PREFIX}:a:192.0.2.1") is None  # per-address off
    finally:
        client.close()


def test_an_unreachable_redis_never_locks_anyone_out(
    make_user: Any, limits: Any, hashes: Any
) -> None:
    """The limiter fails open: with its Redis gone, passwords are checked as without it."""
    from tests.servers import free_port

    make_user("alice")
    with override_settings(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0"):  # nobody listens
        statuses = [
            Client(HTTP_AUTHORIZATION=basic("t100/alice", "wrong")).get("/platform").status_code
            for _ in range(5)
        ]
        right = Client(HTTP_AUTHORIZATION=basic("t100/alice")).get("/platform")

    assert statuses == [401] * 5
    assert right.status_code == 200


def test_client_address_behind_a_proxy(settings: Any) -> None:
    meta = {"REMOTE_ADDR": "127.0.0.1", "HTTP_X_FORWARDED_FOR": "10.9.9.9, 203.0.113.5"}
    settings.USE_X_FORWARDED_FOR = False
    assert client_address(meta) == "127.0.0.1"  # the header is the client's word
    settings.USE_X_FORWARDED_FOR = True
    assert client_address(meta) == "203.0.113.5"  # the address our proxy appended
    assert client_address({"REMOTE_ADDR": "127.0.0.1"}) == "127.0.0.1"


def test_a_proxy_not_trusted_is_named_in_the_log_once(
    settings: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Behind a proxy with USE_X_FORWARDED_FOR off, every client shares the proxy's failure count:
    the operator is told once per process. A client on the internet sending the header itself, or
    a trusted proxy, is no reason to."""
    monkeypatch.setattr(auth_throttle, "_proxy_warned", auth_throttle.threading.Event())
    proxied = {"REMOTE_ADDR": "10.0.0.7", "HTTP_X_FORWARDED_FOR": "203.0.113.5"}
    settings.USE_X_FORWARDED_FOR = True
    with caplog.at_level("WARNING", logger="deviceplatform.api.auth_throttle"):
        client_address(proxied)
        settings.USE_X_FORWARDED_FOR = False
        client_address({"REMOTE_ADDR": "8.8.8.8", "HTTP_X_FORWARDED_FOR": "1.2.3.4"})
        client_address({"REMOTE_ADDR": "10.0.0.7"})  # not forwarded
        assert caplog.records == []
        client_address(proxied)
        client_address(proxied)
    (record,) = caplog.records
    assert "10.0.0.7" in record.getMessage()
    assert "USE_X_FORWARDED_FOR" in record.getMessage()


def test_a_request_through_an_untrusted_proxy_warns_through_the_api(
    client: Any, settings: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auth_throttle, "_proxy_warned", auth_throttle.threading.Event())
    settings.USE_X_FORWARDED_FOR = False
    with caplog.at_level("WARNING", logger="deviceplatform.api.auth_throttle"):
        response = client.get(
            "/inventory/managedObjects",
            HTTP_AUTHORIZATION=basic("nobody", "wrong"),
            HTTP_X_FORWARDED_FOR="203.0.113.5",
            REMOTE_ADDR="127.0.0.1",
        )
    assert response.status_code == 401
    assert any("USE_X_FORWARDED_FOR is off" in r.getMessage() for r in caplog.records)


# --- shared between processes ---------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_failures_on_one_server_process_count_on_another(
    launch: Servers,  # noqa: F811
    make_user: Any,
    limits: Any,
) -> None:
    """Two uvicorn processes sharing Redis: the failures one saw refuse the attempt on the other."""
    if not limits.REDIS_URL:
        pytest.skip("needs REDIS_URL")
    import http.client

    make_user("victim")
    env = {
        "AUTH_FAILURES_PER_USER": "3",
        "AUTH_FAILURES_PER_ADDRESS": "0",
        "AUTH_FAILURE_PREFIX": limits.AUTH_FAILURE_PREFIX,
    }
    first = launch.start("uvicorn", **env)
    second = launch.start("gunicorn", **env)

    def get(port: int) -> tuple[int, dict[str, Any]]:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            connection.request(
                "GET", "/platform", headers={"Authorization": basic("t100/victim", "wrong")}
            )
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        finally:
            connection.close()

    statuses = [get(first.port)[0] for _ in range(3)]
    status, body = get(second.port)

    assert statuses == [401, 401, 401]
    assert status == 429
    assert body["error"] == "security/tooManyRequests"
