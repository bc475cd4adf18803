"""The realtime store (realtime.md §3, §6) and the hub's hold logic (§6.2).

Every test runs against both stores, `RedisStore` on the real Redis (keys under this run's
`REALTIME_PREFIX` plus a per-test suffix) and `MemoryStore`, so the two are held to the same
semantics, the hold-back of batches that arrive out of commit order included (on a clock the test
moves). `Peek` reads each store's raw state (Redis keys; the memory store's dicts) without the
side effects of the store's own reads, which prune expired sessions lazily."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest
import pytest_asyncio
import redis
from django.conf import settings

from deviceplatform.realtime.hub import Hub, new_client_id
from deviceplatform.realtime.store import (
    ENDED,
    GONE,
    HELD,
    REDIS_POOL_SIZE,
    SUPERSEDED,
    Attached,
    MemoryStore,
    Prepared,
    RedisStore,
    Store,
)
from deviceplatform.realtime.subscriptions import subscriptions_matching, variant

pytestmark = pytest.mark.asyncio

QUEUE_LIMIT = 5
MAX_HOLD_MS = 50_000
MAX_INTERVAL_MS = 10_000
BOUND = 30.0  # seconds: a bound for a broken run, not a timing assertion
HOLD_MS = 60_000  # a session's hold: a connect answered within BOUND was woken, not timed out
ORDER_TIMEOUT_MS = 3000  # hold-back of out-of-order batches (on the test's clock)
RECENT = 5  # ms between two numbers of one object: the predecessor may still be on its way


# --- fixtures ------------------------------------------------------------------------------------


class Peek:
    """Raw state of one store, read without going through (and so without changing) the store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.raw = redis.Redis.from_url(store.url) if isinstance(store, RedisStore) else None

    def index(self, channel: str) -> set[str]:
        """The reverse index: sessions an event on subscription `channel` goes to."""
        if self.raw is not None:
            assert isinstance(self.store, RedisStore)
            return {m.decode() for m in self.raw.smembers(f"{self.store.prefix}c:{channel}")}
        assert isinstance(self.store, MemoryStore)
        return set(self.store._index.get(channel, ()))

    def queued(self, cid: str) -> int:
        if self.raw is not None:
            assert isinstance(self.store, RedisStore)
            return int(self.raw.llen(f"{self.store.prefix}q:{cid}"))
        assert isinstance(self.store, MemoryStore)
        session = self.store._sessions.get(cid)
        return len(session.queue) if session is not None else 0

    def traces(self, cid: str) -> bool:
        """Whether anything of session `cid` is left in the store."""
        if self.raw is not None:
            assert isinstance(self.store, RedisStore)
            p = self.store.prefix
            keys = self.raw.exists(f"{p}s:{cid}", f"{p}q:{cid}", f"{p}sub:{cid}")
            return bool(keys) or self.raw.zscore(f"{p}exp", cid) is not None
        assert isinstance(self.store, MemoryStore)
        return cid in self.store._sessions or any(cid in m for m in self.store._index.values())

    def ttl_ms(self, cid: str) -> float:
        """Milliseconds the session has left (negative: expired or gone)."""
        if self.raw is not None:
            assert isinstance(self.store, RedisStore)
            return float(self.raw.pttl(f"{self.store.prefix}s:{cid}"))
        assert isinstance(self.store, MemoryStore)
        session = self.store._sessions.get(cid)
        return -2.0 if session is None else (session.deadline - time.monotonic()) * 1000

    def expires_within(self, cid: str, ms: float) -> bool:
        """Whether the session has at most `ms` left: expiring, or expired already (a slow
        machine may take longer than that between two calls); not one without an expiry."""
        left = self.ttl_ms(cid)
        if self.raw is not None:
            return left == -2 or 0 <= left <= ms  # -2: gone; -1: no expiry
        return left <= ms

    def close(self) -> None:
        if self.raw is not None:
            self.raw.close()


@asynccontextmanager
async def new_store(kind: str, **options: Any) -> AsyncIterator[Store]:
    """A `MemoryStore`, or a `RedisStore` under a prefix of its own, removed afterwards."""
    if kind == "memory":
        yield MemoryStore(QUEUE_LIMIT, **options)
        return
    assert settings.REDIS_URL, "the realtime store tests need the real Redis: set REDIS_URL"
    prefix = f"{settings.REALTIME_PREFIX}:store:{uuid.uuid4().hex[:12]}"
    redis_store = RedisStore(settings.REDIS_URL, prefix, QUEUE_LIMIT, **options)
    try:
        yield redis_store
    finally:
        for client, _ in list(redis_store._async_clients.values()):
            await client.aclose()
        keys = list(redis_store._sync.scan_iter(match=f"{redis_store.prefix}*"))
        if keys:
            redis_store._sync.delete(*keys)
        redis_store._sync.close()


@pytest_asyncio.fixture(params=["redis", "memory"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    async with new_store(request.param) as the_store:
        yield the_store


class Clock:
    """A clock the test moves (seconds), for the hold-back of out-of-order batches."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest_asyncio.fixture(params=["redis", "memory"])
async def ordered(request: pytest.FixtureRequest, clock: Clock) -> AsyncIterator[Store]:
    """A store whose hold-back time is `clock`'s (ORDER_TIMEOUT_MS), running for a minute."""
    async with new_store(request.param, order_timeout_ms=ORDER_TIMEOUT_MS, clock=clock) as store:
        clock.advance(60)
        yield store


@pytest.fixture
def peek(store: Store) -> Iterator[Peek]:
    inspector = Peek(store)
    yield inspector
    inspector.close()


class Wakes:
    """The wake-ups `store.listen` delivers for one hub ID."""

    def __init__(self, hub_id: str) -> None:
        self.hub_id = hub_id
        self.queue: asyncio.Queue[list[str]] = asyncio.Queue()

    async def next(self) -> list[str]:
        return await asyncio.wait_for(self.queue.get(), BOUND)


@pytest_asyncio.fixture
async def listen(store: Store) -> AsyncIterator[Callable[[str], Awaitable[Wakes]]]:
    tasks: list[asyncio.Task[None]] = []

    async def start(hub_id: str) -> Wakes:
        wakes = Wakes(hub_id)
        ready = asyncio.Event()
        tasks.append(asyncio.create_task(store.listen(hub_id, wakes.queue.put_nowait, ready)))
        await asyncio.wait_for(ready.wait(), BOUND)
        return wakes

    yield start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@pytest_asyncio.fixture
async def hub(store: Store) -> AsyncIterator[Hub]:
    the_hub = Hub(store)
    yield the_hub
    await the_hub.close()


# --- helpers -------------------------------------------------------------------------------------


def record(uid: str = "u1", family: str = "realtime", timeout: int = 30_000, interval: int = 0):
    return {
        "family": family,
        "uid": uid,
        "user": f"user-{uid}",
        "timeout": str(timeout),
        "interval": str(interval),
    }


async def new_session(
    store: Store,
    *channels: str,
    uid: str = "u1",
    family: str = "realtime",
    timeout: int = 30_000,
    interval: int = 0,
    ttl_ms: int = 60_000,
    limit: int = 100,
) -> str:
    cid = new_client_id()
    evicted = await store.create_session(
        cid, record(uid, family, timeout, interval), ttl_ms=ttl_ms, limit=limit
    )
    assert evicted == []
    if channels:
        assert await store.subscribe(cid, channels, add=True)
    return cid


async def attach(
    store: Store,
    cid: str,
    *,
    hub: str = "hub-a",
    hold: str = "t1",
    requested_ms: int | None = None,
    immediate: bool = False,
    max_interval_ms: int = MAX_INTERVAL_MS,
) -> Attached | None:
    return await store.attach(
        cid,
        hub=hub,
        token=hold,
        requested_ms=requested_ms,
        max_hold_ms=MAX_HOLD_MS,
        max_interval_ms=max_interval_ms,
        immediate=immediate,
    )


async def connected(store: Store, cid: str, **kwargs: Any) -> None:
    """The first connect of a session: answered at once."""
    first = await attach(store, cid, hold="first", **kwargs)
    assert first is not None
    assert not first.held


async def held(store: Store, cid: str, *, hub: str = "hub-a", hold: str = "t1") -> None:
    """Connect `cid` and hold it on `hub` with token `hold`."""
    await connected(store, cid)
    attached = await attach(store, cid, hub=hub, hold=hold)
    assert attached is not None
    assert attached.held


async def events_of(store: Store, cid: str) -> list[bytes]:
    """The session's queued events, taken by a connect that is not held."""
    attached = await attach(store, cid, hold="take", immediate=True)
    assert attached is not None
    assert not attached.held
    return attached.events


def event(channel: str, n: int) -> Prepared:
    return (f"{channel}#{n}".encode(), subscriptions_matching(channel))


def payloads(channel: str, numbers: Sequence[int]) -> list[bytes]:
    return [event(channel, n)[0] for n in numbers]


async def until(condition: Callable[[], Awaitable[bool]], timeout: float = BOUND) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


async def wait_held(store: Store, cid: str, hub_id: str, *, not_token: str = "") -> str:
    """Wait until a connect of `hub_id` holds `cid` (with a token other than `not_token`)."""
    session: dict[str, str] | None = None

    async def holding() -> bool:
        nonlocal session
        session = await store.get_session(cid)
        assert session is not None
        return session["holder"] == hub_id and session["hold"] not in ("", not_token)

    await until(holding)
    assert session is not None
    return session["hold"]


# --- sessions and the per-user limit -------------------------------------------------------------


async def test_create_session_evicts_the_oldest_beyond_the_limit(store: Store, peek: Peek) -> None:
    a1 = await new_session(store, "/operations/5", limit=3)
    a2 = await new_session(store, "/operations/*", limit=3)
    a3 = await new_session(store, "/operations/5", limit=3)
    agent = await new_session(store, "/5", family="agent", limit=1)  # same user, other family
    other = await new_session(store, "/operations/5", uid="u2", limit=1)  # other user
    assert peek.index("/operations/5") == {a1, a3, other}

    a4 = new_client_id()
    evicted = await store.create_session(a4, record(), ttl_ms=60_000, limit=2)

    assert evicted == [a1, a2]  # oldest first
    for gone in (a1, a2):
        assert await store.get_session(gone) is None
        assert not await store.subscribe(gone, ["/operations/7"], add=True)
        assert await attach(store, gone) is None
        assert await store.subscriptions(gone) == set()
        assert not peek.traces(gone)
    assert peek.index("/operations/5") == {a3, other}
    assert peek.index("/operations/*") == set()
    for kept in (a3, a4, agent, other):
        assert await store.get_session(kept) is not None
    assert await store.subscriptions(a3) == {"/operations/5"}

    # Publishing to the evicted sessions' channels does not bring a queue of theirs back.
    store.publish([event("/operations/5", 1)])
    assert peek.queued(a3) == 1
    assert peek.queued(other) == 1
    assert not peek.traces(a1)
    assert not peek.traces(a2)

    # The other family and the other user have limits of their own.
    assert (
        await store.create_session(new_client_id(), record(family="agent"), ttl_ms=1000, limit=2)
        == []
    )
    assert await store.create_session(new_client_id(), record("u2"), ttl_ms=1000, limit=2) == []
    assert await store.get_session(a3) is not None
    assert await store.get_session(a4) is not None


async def test_session_record_and_removal(store: Store, peek: Peek) -> None:
    cid = await new_session(store, "/operations/5", timeout=1234, interval=55)
    session = await store.get_session(cid)
    assert session == {**record(timeout=1234, interval=55), "holder": "", "hold": ""}
    assert await store.remove_session(cid)
    assert not await store.remove_session(cid)
    assert await store.get_session(cid) is None
    assert not peek.traces(cid)
    assert peek.index("/operations/5") == set()
    assert await store.get_session(new_client_id()) is None


async def test_more_calls_at_once_than_pooled_connections_wait_for_one(store: Store) -> None:
    # 10,000 idle WebSocket clients on one process: thousands of held connects can end in the same
    # second, each with a store call; the Redis store's pool (REDIS_POOL_SIZE connections) must
    # queue them, not fail the calls beyond it (MaxConnectionsError).
    cid = await new_session(store, "/operations/5")
    calls = 12 * REDIS_POOL_SIZE
    sessions = await asyncio.gather(*(store.get_session(cid) for _ in range(calls)))
    assert len(sessions) == calls
    assert all(session is not None and session["family"] for session in sessions)


# --- subscriptions, publishing and queues --------------------------------------------------------


@pytest.mark.parametrize("asynchronous", [False, True], ids=["publish", "apublish"])
async def test_publish_reaches_each_subscribed_session_once(
    store: Store, asynchronous: bool
) -> None:
    both = await new_session(store, "/operations/5", "/operations/*")
    wildcard = await new_session(store, "/operations/*")
    exact = await new_session(store, "/operations/5")
    elsewhere = await new_session(store, "/operations/6", "/5")
    left = await new_session(store, "/operations/5", "/operations/*")
    assert await store.subscribe(left, ["/operations/5", "/operations/*"], add=False)
    half = await new_session(store, "/operations/5", "/operations/*")
    assert await store.subscribe(half, ["/operations/*"], add=False)
    assert await store.subscriptions(both) == {"/operations/5", "/operations/*"}
    assert await store.subscriptions(left) == set()
    assert await store.subscriptions(half) == {"/operations/5"}

    assert subscriptions_matching("/operations/5") == ["/operations/5", "/operations/*"]
    batch = [event("/operations/5", 1)]
    if asynchronous:
        await store.apublish(batch)
    else:
        store.publish(batch)

    expected = payloads("/operations/5", [1])
    assert await events_of(store, both) == expected
    assert await events_of(store, wildcard) == expected
    assert await events_of(store, exact) == expected
    assert await events_of(store, half) == expected
    assert await events_of(store, elsewhere) == []
    assert await events_of(store, left) == []


async def test_an_option_event_reaches_only_the_sessions_holding_its_variant(store: Store) -> None:
    asked = await new_session(store, "/5", variant("/5", "cancelRequests"), family="agent")
    plain = await new_session(store, "/5", family="agent")
    # One step adds the channel and drops its variant: the session asks no more.
    withdrawn = await new_session(store, "/5", variant("/5", "cancelRequests"), family="agent")
    assert await store.subscribe(
        withdrawn, ["/5"], add=True, drop=[variant("/5", "cancelRequests")]
    )
    assert await store.subscriptions(withdrawn) == {"/5"}
    assert subscriptions_matching("/5", "cancelRequests") == ["/5#cancelRequests"]
    assert subscriptions_matching("/operations/5", "x") == ["/operations/5#x", "/operations/*#x"]

    store.publish(
        [
            (b"new", subscriptions_matching("/5")),
            (b"request", subscriptions_matching("/5", "cancelRequests")),
        ]
    )

    assert await events_of(store, asked) == [b"new", b"request"]  # once each
    assert await events_of(store, plain) == [b"new"]
    assert await events_of(store, withdrawn) == [b"new"]
    # An unsubscribe may drop the variants with the channel.
    assert await store.subscribe(asked, ["/5"], add=False, drop=[variant("/5", "cancelRequests")])
    assert await store.subscriptions(asked) == set()


async def test_queue_keeps_the_newest_events_up_to_the_limit(store: Store, peek: Peek) -> None:
    cid = await new_session(store, "/operations/*")
    store.publish([event("/operations/5", n) for n in range(8)])  # one batch
    assert peek.queued(cid) == QUEUE_LIMIT
    assert await events_of(store, cid) == payloads("/operations/5", range(3, 8))

    for start in (10, 13, 16):  # several batches
        await store.apublish([event("/operations/5", n) for n in range(start, start + 3)])
    assert peek.queued(cid) == QUEUE_LIMIT
    assert await events_of(store, cid) == payloads("/operations/5", range(14, 19))


async def test_events_keep_their_order_within_and_across_batches(store: Store) -> None:
    cid = await new_session(store, "/operations/*", "/7")
    store.publish([event("/operations/5", 0), event("/7", 1), event("/operations/6", 2)])
    await store.apublish([event("/operations/5", 3)])
    store.publish([event("/7", 4)])
    assert await events_of(store, cid) == [
        b"/operations/5#0",
        b"/7#1",
        b"/operations/6#2",
        b"/operations/5#3",
        b"/7#4",
    ]
    assert await events_of(store, cid) == []  # taken


async def test_subscribing_an_unknown_session_fails(store: Store, peek: Peek) -> None:
    cid = new_client_id()
    assert not await store.subscribe(cid, ["/operations/5"], add=True)
    assert not await store.subscribe(cid, ["/operations/5"], add=False)
    assert peek.index("/operations/5") == set()
    assert not peek.traces(cid)


# --- attach ----------------------------------------------------------------------------------------


async def test_first_attach_is_immediate_and_marks_the_session_connected(store: Store) -> None:
    cid = await new_session(store, timeout=30_000, interval=250)
    session = await store.get_session(cid)
    assert session is not None
    assert "connected" not in session

    first = await attach(store, cid)

    assert first == Attached(
        held=False, events=[], hold_ms=30_000, interval_ms=250, timeout_ms=30_000
    )
    session = await store.get_session(cid)
    assert session is not None
    assert session["connected"] == "1"
    assert session["hold"] == ""


@pytest.mark.parametrize(
    ("requested", "hold"),
    [(None, 30_000), (1234, 1234), (MAX_HOLD_MS + 1, MAX_HOLD_MS), (10**9, MAX_HOLD_MS)],
)
async def test_later_attach_holds_for_the_requested_or_session_time(
    store: Store, peek: Peek, requested: int | None, hold: int
) -> None:
    cid = await new_session(store, timeout=30_000, interval=250)
    await connected(store, cid)

    started = time.monotonic()
    attached = await attach(store, cid, hub="hub-b", hold="t2", requested_ms=requested)

    assert attached == Attached(
        held=True, events=[], hold_ms=hold, interval_ms=250, timeout_ms=30_000
    )
    session = await store.get_session(cid)
    assert session is not None
    assert (session["holder"], session["hold"]) == ("hub-b", "t2")
    # The session lives for the hold plus the interval plus the reconnect grace, less the time
    # since the attach set that (measured: a loaded machine may take a while).
    life = hold + 250 + MAX_INTERVAL_MS
    left = peek.ttl_ms(cid)
    elapsed_ms = (time.monotonic() - started) * 1000
    assert life - elapsed_ms - 1 <= left <= life


async def test_session_timeout_above_the_cap_is_capped(store: Store) -> None:
    cid = await new_session(store, timeout=MAX_HOLD_MS * 3)
    await connected(store, cid)
    attached = await attach(store, cid)
    assert attached is not None
    assert attached.held
    assert attached.hold_ms == MAX_HOLD_MS
    assert attached.timeout_ms == MAX_HOLD_MS * 3


@pytest.mark.parametrize(
    ("requested", "immediate", "hold"), [(0, False, 0), (None, True, 30_000), (2000, True, 2000)]
)
async def test_attach_with_timeout_zero_or_immediate_is_not_held(
    store: Store, requested: int | None, immediate: bool, hold: int
) -> None:
    cid = await new_session(store, timeout=30_000)
    await connected(store, cid)
    attached = await attach(store, cid, requested_ms=requested, immediate=immediate)
    assert attached == Attached(
        held=False, events=[], hold_ms=hold, interval_ms=0, timeout_ms=30_000
    )
    session = await store.get_session(cid)
    assert session is not None
    assert session["hold"] == ""


async def test_attach_with_queued_events_returns_them_without_holding(store: Store) -> None:
    cid = await new_session(store, "/operations/5", timeout=30_000, interval=100)
    await connected(store, cid)
    store.publish([event("/operations/5", 1), event("/operations/5", 2)])

    attached = await attach(store, cid, hold="t2")

    assert attached == Attached(
        held=False,
        events=payloads("/operations/5", [1, 2]),
        hold_ms=30_000,
        interval_ms=100,
        timeout_ms=30_000,
    )
    session = await store.get_session(cid)
    assert session is not None
    assert session["hold"] == ""
    again = await attach(store, cid, hold="t3")  # the queue was taken: this one holds
    assert again is not None
    assert again.held
    assert again.events == []


async def test_attach_of_an_unknown_session(store: Store, peek: Peek) -> None:
    cid = new_client_id()
    assert await attach(store, cid) is None
    assert not peek.traces(cid)


# --- drain and release -----------------------------------------------------------------------------


async def test_drain_gives_the_holder_its_events(store: Store) -> None:
    cid = await new_session(store, "/operations/5")
    await held(store, cid, hold="t1")
    assert await store.drain(cid, "t1", release=False) == (HELD, [])

    store.publish([event("/operations/5", 1)])
    assert await store.drain(cid, "t1", release=False) == (HELD, payloads("/operations/5", [1]))
    assert await store.drain(cid, "t1", release=False) == (HELD, [])
    session = await store.get_session(cid)
    assert session is not None
    assert session["hold"] == "t1"

    store.publish([event("/operations/5", 2)])
    assert await store.drain(cid, "t1", release=True) == (HELD, payloads("/operations/5", [2]))
    session = await store.get_session(cid)
    assert session is not None
    assert session["hold"] == ""
    assert await store.drain(cid, "t1", release=True) == (SUPERSEDED, [])  # no longer its hold


async def test_drain_after_another_attach_is_superseded(store: Store) -> None:
    cid = await new_session(store, "/operations/5")
    await held(store, cid, hub="hub-a", hold="t1")
    attached = await attach(store, cid, hub="hub-b", hold="t2")
    assert attached is not None
    assert attached.held

    store.publish([event("/operations/5", 1)])

    assert await store.drain(cid, "t1", release=True) == (SUPERSEDED, [])  # takes nothing
    assert await store.drain(cid, "t2", release=True) == (HELD, payloads("/operations/5", [1]))


async def test_drain_after_remove_says_the_session_ended_to_its_holder_only(store: Store) -> None:
    cid = await new_session(store, "/operations/5")
    await held(store, cid, hold="t1")
    store.publish([event("/operations/5", 1)])
    assert await store.remove_session(cid)
    assert await store.drain(cid, "t1", release=True) == (ENDED, [])  # queued events go with it
    assert await store.drain(cid, "t1", release=False) == (ENDED, [])
    assert await store.drain(cid, "t0", release=True) == (GONE, [])  # not the hold it ended


async def test_drain_of_an_expired_or_never_held_session_is_gone(store: Store) -> None:
    idle = await new_session(store)
    await connected(store, idle)
    assert await store.remove_session(idle)  # removed while nobody held it
    assert await store.drain(idle, "", release=True) == (GONE, [])
    assert await store.drain(new_client_id(), "t1", release=True) == (GONE, [])  # never existed
    expiring = await new_session(store)
    await held(store, expiring, hold="t1")
    await store.release(expiring, "t1", ttl_ms=1)
    await asyncio.sleep(0.05)
    await store.sweep()
    assert await store.drain(expiring, "t1", release=True) == (GONE, [])


async def test_release_clears_only_the_matching_hold(store: Store) -> None:
    cid = await new_session(store)
    await held(store, cid, hub="hub-a", hold="t1")

    await store.release(cid, "t2")
    session = await store.get_session(cid)
    assert session is not None
    assert (session["holder"], session["hold"]) == ("hub-a", "t1")

    await store.release(cid, "t1")
    session = await store.get_session(cid)
    assert session is not None
    assert session["hold"] == ""
    attached = await attach(store, cid, hold="t3")  # the next connect holds normally
    assert attached is not None
    assert attached.held

    await store.release(new_client_id(), "t1")  # unknown session: nothing happens


async def test_release_with_ttl_shortens_the_sessions_life(store: Store, peek: Peek) -> None:
    cid = await new_session(store)
    await held(store, cid, hold="t1")
    await store.release(cid, "other", ttl_ms=50)  # not its hold: the deadline stays
    assert peek.ttl_ms(cid) > 30_000
    session = await store.get_session(cid)
    assert session is not None
    assert session["hold"] == "t1"

    await store.release(cid, "t1", ttl_ms=80)
    assert peek.expires_within(cid, 80)

    async def gone() -> bool:
        return await store.get_session(cid) is None

    await until(gone)
    assert await attach(store, cid) is None

    # A session nobody holds gets the shorter life too (a WebSocket closed between connects).
    idle = await new_session(store)
    await connected(store, idle)
    await store.release(idle, "any", ttl_ms=80)
    assert peek.expires_within(idle, 80)


# --- expiry and the sweeper --------------------------------------------------------------------------


async def test_session_expires_without_connects(store: Store, peek: Peek) -> None:
    cid = await new_session(store, "/operations/5", ttl_ms=30)
    live = await new_session(store, "/operations/5")

    async def gone() -> bool:
        return await store.get_session(cid) is None

    await until(gone)
    assert await attach(store, cid) is None
    assert not await store.subscribe(cid, ["/operations/6"], add=True)
    store.publish([event("/operations/5", 1)])  # reaches only the live one
    assert peek.queued(cid) == 0
    assert peek.queued(live) == 1
    assert peek.index("/operations/5") == {live}


async def test_sweep_removes_expired_sessions_from_the_index(
    store: Store, peek: Peek, listen: Callable[[str], Awaitable[Wakes]]
) -> None:
    wakes = await listen("hub-a")
    short1 = await new_session(store, "/operations/7", "/operations/*")
    # Held with a 10 ms hold and a 200 ms grace: a 210 ms life (from the second connect: the
    # first, with the default grace, gives it the time to come on a loaded machine).
    await connected(store, short1)
    attached = await attach(store, short1, requested_ms=10, max_interval_ms=200)
    assert attached is not None
    assert attached.held
    short2 = await new_session(store, "/operations/7", ttl_ms=30)
    live = await new_session(store, "/operations/7")
    await held(store, live, hub="hub-a", hold="t1")

    async def expired() -> bool:
        return peek.ttl_ms(short1) < 0 and peek.ttl_ms(short2) < 0

    await until(expired)
    assert peek.index("/operations/7") == {short1, short2, live}  # until swept

    assert await store.sweep() == 2

    assert peek.index("/operations/7") == {live}
    assert peek.index("/operations/*") == set()
    for gone in (short1, short2):
        assert not peek.traces(gone)
        assert await store.get_session(gone) is None
    assert await store.sweep() == 0

    # A publish finds only the live session: it neither queues for nor wakes the swept ones.
    store.publish([event("/operations/7", 1)])
    assert await wakes.next() == [live]
    assert peek.queued(live) == 1
    assert not peek.traces(short1)
    assert not peek.traces(short2)


async def test_sweep_leaves_live_sessions(store: Store, peek: Peek) -> None:
    cid = await new_session(store, "/operations/7")
    assert await store.sweep() == 0
    assert peek.index("/operations/7") == {cid}
    assert await store.get_session(cid) is not None


# --- wake-ups ----------------------------------------------------------------------------------------


async def test_publish_wakes_the_hubs_holding_the_sessions(
    store: Store, listen: Callable[[str], Awaitable[Wakes]]
) -> None:
    hub_a, hub_b = await listen("hub-a"), await listen("hub-b")
    a1 = await new_session(store, "/operations/5")
    a2 = await new_session(store, "/operations/*")
    b1 = await new_session(store, "/operations/5")
    await held(store, a1, hub="hub-a", hold="t1")
    await held(store, a2, hub="hub-a", hold="t2")
    await held(store, b1, hub="hub-b", hold="t3")
    # Held by hub-a before, released since: queued for, but hub-a is not woken.
    released = await new_session(store, "/9", "/operations/5")
    await held(store, released, hub="hub-a", hold="t4")
    await store.release(released, "t4")

    store.publish([event("/9", 0)])  # only the released session: no wake-up
    store.publish([event("/operations/5", 1), event("/operations/5", 2)])

    assert sorted(await hub_a.next()) == sorted([a1, a2])  # one wake-up for the batch
    assert await hub_b.next() == [b1]
    assert hub_a.queue.empty()
    assert hub_b.queue.empty()
    assert await store.drain(a1, "t1", release=True) == (HELD, payloads("/operations/5", [1, 2]))


async def test_publish_from_another_thread_wakes_the_hub(
    store: Store, listen: Callable[[str], Awaitable[Wakes]]
) -> None:
    wakes = await listen("hub-a")
    cid = await new_session(store, "/operations/5")
    await held(store, cid, hold="t1")

    publisher = threading.Thread(target=store.publish, args=([event("/operations/5", 1)],))
    publisher.start()
    assert await wakes.next() == [cid]
    publisher.join()
    assert await store.drain(cid, "t1", release=True) == (HELD, payloads("/operations/5", [1]))


async def test_removing_or_evicting_a_held_session_wakes_its_holder(
    store: Store, listen: Callable[[str], Awaitable[Wakes]]
) -> None:
    wakes = await listen("hub-a")
    idle = await new_session(store)
    await connected(store, idle)
    removed = await new_session(store)
    await held(store, removed, hold="t1")

    assert await store.remove_session(idle)  # nobody holds it: no wake-up
    assert await store.remove_session(removed)
    assert await wakes.next() == [removed]
    assert await store.drain(removed, "t1", release=True) == (ENDED, [])

    evicted = await new_session(store, uid="u9")
    await held(store, evicted, hold="t2")
    assert await store.create_session(new_client_id(), record("u9"), ttl_ms=1000, limit=1) == [
        evicted
    ]
    assert await wakes.next() == [evicted]
    assert await store.drain(evicted, "t2", release=True) == (ENDED, [])


async def test_a_newer_attach_wakes_the_previous_holder(
    store: Store, listen: Callable[[str], Awaitable[Wakes]]
) -> None:
    hub_a, hub_b = await listen("hub-a"), await listen("hub-b")
    cid = await new_session(store)
    await held(store, cid, hub="hub-a", hold="t1")

    attached = await attach(store, cid, hub="hub-b", hold="t2")

    assert attached is not None
    assert attached.held
    assert await hub_a.next() == [cid]
    assert await store.drain(cid, "t1", release=True) == (SUPERSEDED, [])
    assert hub_b.queue.empty()


# --- Hub.connect ---------------------------------------------------------------------------------------


async def test_held_connect_answers_as_soon_as_an_event_is_published(
    store: Store, hub: Hub
) -> None:
    cid = await new_session(store, "/operations/5", timeout=HOLD_MS, interval=100)
    first = await hub.connect(cid, requested_ms=None, immediate=False)
    assert (first.known, first.events, first.hold_ms) == (True, [], HOLD_MS)

    task = asyncio.create_task(hub.connect(cid, requested_ms=None, immediate=False))
    await wait_held(store, cid, hub.id)
    await store.apublish([event("/operations/5", 1)])
    outcome = await asyncio.wait_for(task, BOUND)

    assert outcome.known
    assert outcome.events == payloads("/operations/5", [1])
    assert (outcome.hold_ms, outcome.interval_ms, outcome.timeout_ms) == (HOLD_MS, 100, HOLD_MS)
    session = await store.get_session(cid)
    assert session is not None
    assert session["hold"] == ""


async def test_held_connect_answers_publishes_from_another_thread(store: Store, hub: Hub) -> None:
    cid = await new_session(store, "/operations/5", timeout=HOLD_MS)
    await hub.connect(cid, requested_ms=None, immediate=False)
    task = asyncio.create_task(hub.connect(cid, requested_ms=None, immediate=False))
    await wait_held(store, cid, hub.id)
    await asyncio.to_thread(store.publish, [event("/operations/5", 1)])
    outcome = await asyncio.wait_for(task, BOUND)
    assert outcome.known
    assert outcome.events == payloads("/operations/5", [1])


async def test_held_connect_ends_after_its_hold_time(store: Store, hub: Hub) -> None:
    cid = await new_session(store, "/operations/5", timeout=HOLD_MS)
    await hub.connect(cid, requested_ms=None, immediate=False)
    started = time.monotonic()
    # Within BOUND: the requested 150 ms, not the session's 60 s; and not before those 150 ms.
    outcome = await asyncio.wait_for(hub.connect(cid, requested_ms=150, immediate=False), BOUND)
    assert time.monotonic() - started >= 0.14
    assert (outcome.known, outcome.events, outcome.hold_ms) == (True, [], 150)
    session = await store.get_session(cid)
    assert session is not None
    assert session["hold"] == ""


async def test_second_connect_on_the_same_hub_supersedes_the_first(store: Store, hub: Hub) -> None:
    cid = await new_session(store, "/operations/5", timeout=HOLD_MS)
    await hub.connect(cid, requested_ms=None, immediate=False)
    first = asyncio.create_task(hub.connect(cid, requested_ms=None, immediate=False))
    token = await wait_held(store, cid, hub.id)

    second = asyncio.create_task(hub.connect(cid, requested_ms=None, immediate=False))
    outcome = await asyncio.wait_for(first, BOUND)
    assert outcome.known
    assert outcome.events == []

    await wait_held(store, cid, hub.id, not_token=token)
    assert not second.done()
    await store.apublish([event("/operations/5", 1)])
    outcome = await asyncio.wait_for(second, BOUND)
    assert outcome.known
    assert outcome.events == payloads("/operations/5", [1])


async def test_held_connect_stays_wakeable_after_a_wake_up_without_events(
    store: Store, hub: Hub
) -> None:
    cid = await new_session(store, "/operations/5", timeout=HOLD_MS)
    await hub.connect(cid, requested_ms=None, immediate=False)
    task = asyncio.create_task(hub.connect(cid, requested_ms=None, immediate=False))
    token = await wait_held(store, cid, hub.id)

    hub._wake(["*"])  # what the Redis listener does after a reconnect: nothing is queued
    await asyncio.sleep(0.05)  # let the woken connect look at the empty queue
    session = await store.get_session(cid)
    assert session is not None
    assert session["hold"] == token
    assert not task.done()

    await store.apublish([event("/operations/5", 1)])
    outcome = await asyncio.wait_for(task, BOUND)
    assert outcome.known
    assert outcome.events == payloads("/operations/5", [1])


async def test_connect_of_an_unknown_session(store: Store, hub: Hub) -> None:
    outcome = await hub.connect(new_client_id(), requested_ms=None, immediate=False)
    assert not outcome.known
    assert outcome.events == []


async def test_held_connect_of_a_removed_session_ends(store: Store, hub: Hub) -> None:
    cid = await new_session(store, "/operations/5", timeout=HOLD_MS)
    await hub.connect(cid, requested_ms=None, immediate=False)
    task = asyncio.create_task(hub.connect(cid, requested_ms=None, immediate=False))
    await wait_held(store, cid, hub.id)

    assert await store.remove_session(cid)
    outcome = await asyncio.wait_for(task, BOUND)

    assert outcome.known
    assert outcome.ended
    assert outcome.events == []
    later = await hub.connect(cid, requested_ms=None, immediate=False)
    assert not later.known  # a connect after the end: unknown client
    assert not later.ended


async def test_cancelled_held_connect_releases_its_hold(store: Store, hub: Hub) -> None:
    cid = await new_session(store, "/operations/5", timeout=HOLD_MS)
    await hub.connect(cid, requested_ms=None, immediate=False)
    task = asyncio.create_task(hub.connect(cid, requested_ms=None, immediate=False))
    await wait_held(store, cid, hub.id)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    session = await store.get_session(cid)
    assert session is not None
    assert session["hold"] == ""
    # A later connect holds again and gets the next event.
    later = asyncio.create_task(hub.connect(cid, requested_ms=None, immediate=False))
    await wait_held(store, cid, hub.id)
    await store.apublish([event("/operations/5", 1)])
    outcome = await asyncio.wait_for(later, BOUND)
    assert outcome.known
    assert outcome.events == payloads("/operations/5", [1])


# --- commit order (events.take_order numbers each transaction per managed object) ------------------


def about(key: int, n: int) -> Prepared:
    """Event `n` of object `key`, on its channel `/operations/<key>`."""
    return event(f"/operations/{key}", n)


def publish(store: Store, key: int, seq: int, after_ms: int | None = RECENT) -> None:
    """Publish the `seq`-th transaction of `key` (its event `seq`), numbered `after_ms` after the
    one before it."""
    store.publish([about(key, seq)], [(key, seq, after_ms)])


def got(*events: tuple[int, int]) -> list[bytes]:
    return [about(key, n)[0] for key, n in events]


async def test_batches_arriving_in_order_are_delivered_at_once(ordered: Store) -> None:
    cid = await new_session(ordered, "/operations/*")
    publish(ordered, 5, 1, None)
    publish(ordered, 5, 2)
    publish(ordered, 6, 1, None)
    publish(ordered, 5, 3)
    assert await events_of(ordered, cid) == got((5, 1), (5, 2), (6, 1), (5, 3))


async def test_a_batch_waits_for_the_one_before_it(ordered: Store) -> None:
    cid = await new_session(ordered, "/operations/*")
    publish(ordered, 5, 1, None)
    assert await events_of(ordered, cid) == got((5, 1))

    publish(ordered, 5, 3)  # the second transaction has not published yet
    publish(ordered, 5, 4)  # waits behind the third
    publish(ordered, 6, 1, None)  # another object is not held up
    assert await events_of(ordered, cid) == got((6, 1))

    publish(ordered, 5, 2)
    assert await events_of(ordered, cid) == got((5, 2), (5, 3), (5, 4))
    publish(ordered, 5, 5)
    assert await events_of(ordered, cid) == got((5, 5))


async def test_batches_arriving_backwards_are_delivered_forwards(ordered: Store) -> None:
    cid = await new_session(ordered, "/operations/*")
    for seq in (4, 3, 2):
        publish(ordered, 5, seq)
    assert await events_of(ordered, cid) == []
    publish(ordered, 5, 1, None)
    assert await events_of(ordered, cid) == got((5, 1), (5, 2), (5, 3), (5, 4))


async def test_a_predecessor_numbered_long_ago_is_not_waited_for(ordered: Store) -> None:
    """A store without memory of the object (a first event, a restarted process, a key unused for
    a while) waits only when the number before was taken recently: it may still be on its way."""
    cid = await new_session(ordered, "/operations/*")
    publish(ordered, 5, 7, 10 * ORDER_TIMEOUT_MS)
    publish(ordered, 6, 7, None)
    assert await events_of(ordered, cid) == got((5, 7), (6, 7))
    publish(ordered, 7, 7, 10 * ORDER_TIMEOUT_MS - 1)
    assert await events_of(ordered, cid) == []


async def test_the_in_process_store_waits_for_no_predecessor_older_than_itself(
    clock: Clock,
) -> None:
    """A new process (the embedded server restarted) has an empty store: a predecessor numbered
    before it existed went to the one before, and is not waited for."""
    async with new_store("memory", order_timeout_ms=ORDER_TIMEOUT_MS, clock=clock) as store:
        cid = await new_session(store, "/operations/*")
        clock.advance(1)
        publish(store, 5, 8, 1001)  # its predecessor: numbered before the store was created
        publish(store, 6, 8, 999)  # after: may still come
        assert await events_of(store, cid) == got((5, 8))


async def test_a_batch_about_several_objects_waits_for_each(ordered: Store) -> None:
    cid = await new_session(ordered, "/operations/*")
    publish(ordered, 5, 1, None)
    publish(ordered, 6, 1, None)
    both = [about(5, 30), about(6, 20)]
    ordered.publish(both, [(5, 3, RECENT), (6, 2, RECENT)])
    publish(ordered, 6, 3)  # behind the held batch on object 6
    assert await events_of(ordered, cid) == got((5, 1), (6, 1))

    publish(ordered, 5, 2)
    assert await events_of(ordered, cid) == got((5, 2), (5, 30), (6, 20), (6, 3))


async def test_unordered_batches_are_never_held(ordered: Store) -> None:
    cid = await new_session(ordered, "/operations/*")
    publish(ordered, 5, 2)  # held
    ordered.publish([about(5, 99)])
    assert await events_of(ordered, cid) == got((5, 99))


async def test_a_gap_is_delivered_after_the_timeout(ordered: Store, clock: Clock) -> None:
    """The publisher of the second transaction died after its commit: the third waits for it
    ORDER_TIMEOUT_MS, then goes out; the second, should it come after all, goes out at once."""
    cid = await new_session(ordered, "/operations/*")
    publish(ordered, 5, 1, None)
    publish(ordered, 5, 3)
    assert await events_of(ordered, cid) == got((5, 1))

    clock.advance(ORDER_TIMEOUT_MS / 1000 - 0.01)
    await ordered.release_held()
    assert await events_of(ordered, cid) == []
    clock.advance(0.02)
    await ordered.release_held()
    assert await events_of(ordered, cid) == got((5, 3))

    publish(ordered, 5, 4)
    publish(ordered, 5, 2)  # late
    assert await events_of(ordered, cid) == got((5, 4), (5, 2))


async def test_a_publish_after_the_timeout_releases_the_overdue_first(
    ordered: Store, clock: Clock
) -> None:
    cid = await new_session(ordered, "/operations/*")
    publish(ordered, 5, 1, None)
    publish(ordered, 5, 3)
    clock.advance(ORDER_TIMEOUT_MS / 1000)
    publish(ordered, 6, 1, None)
    assert await events_of(ordered, cid) == got((5, 1), (5, 3), (6, 1))


async def test_an_overdue_batch_goes_out_after_the_held_ones_before_it(
    ordered: Store, clock: Clock
) -> None:
    cid = await new_session(ordered, "/operations/*")
    publish(ordered, 5, 1, None)
    publish(ordered, 5, 4)  # waits for 3
    clock.advance(1)
    publish(ordered, 5, 3)  # waits for 2, which never comes; not overdue yet
    clock.advance(ORDER_TIMEOUT_MS / 1000 - 1)
    await ordered.release_held()  # the fourth is overdue: the third goes out before it
    assert await events_of(ordered, cid) == got((5, 1), (5, 3), (5, 4))
    clock.advance(ORDER_TIMEOUT_MS / 1000)
    await ordered.release_held()
    assert await events_of(ordered, cid) == []


async def test_released_batches_wake_the_holding_hub(ordered: Store, clock: Clock) -> None:
    wakes = Wakes("hub-a")
    ready = asyncio.Event()
    listener = asyncio.create_task(ordered.listen("hub-a", wakes.queue.put_nowait, ready))
    try:
        await asyncio.wait_for(ready.wait(), BOUND)
        cid = await new_session(ordered, "/operations/5")
        await held(ordered, cid, hold="t1")

        publish(ordered, 5, 2)
        clock.advance(ORDER_TIMEOUT_MS / 1000)
        await ordered.release_held()
        assert await wakes.next() == [cid]
        assert await ordered.drain(cid, "t1", release=False) == (HELD, got((5, 2)))

        publish(ordered, 5, 4)
        publish(ordered, 5, 3)  # releases the fourth with it: one wake-up
        assert await wakes.next() == [cid]
        assert await ordered.drain(cid, "t1", release=True) == (HELD, got((5, 3), (5, 4)))
        assert wakes.queue.empty()
    finally:
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)


async def test_the_hub_delivers_overdue_batches_without_another_publish(clock: Clock) -> None:
    """No publish follows the held batch: the hub's own task releases it once the clock passed its
    deadline (it looks every quarter of the timeout, here 50 ms of real time)."""
    for kind in ("redis", "memory"):
        async with new_store(kind, order_timeout_ms=200, clock=clock) as store:
            clock.advance(60)
            hub = Hub(store)
            try:
                cid = await new_session(store, "/operations/5", timeout=HOLD_MS)
                await hub.connect(cid, requested_ms=None, immediate=False)
                task = asyncio.create_task(hub.connect(cid, requested_ms=None, immediate=False))
                await wait_held(store, cid, hub.id)
                publish(store, 5, 2)
                assert not task.done()
                clock.advance(0.2)
                outcome = await asyncio.wait_for(task, BOUND)
                assert outcome.events == got((5, 2))
            finally:
                await hub.close()


async def test_zero_timeout_delivers_everything_as_it_arrives(clock: Clock) -> None:
    for kind in ("redis", "memory"):
        async with new_store(kind, order_timeout_ms=0, clock=clock) as store:
            cid = await new_session(store, "/operations/*")
            publish(store, 5, 3)
            publish(store, 5, 2)
            assert await events_of(store, cid) == got((5, 3), (5, 2))


async def test_the_hub_closes_when_a_store_call_swallows_the_cancel() -> None:
    """redis-py's async client (8.1) was seen returning normally from a script call that a cancel
    interrupted (a loop blocked for a while, then every timer due at once): the hub's periodic
    task must end anyway, or `Hub.close` waits for ever. The store here is the in-process one with
    the client's behaviour in `release_held`."""
    entered = asyncio.Event()
    swallow = True

    class Swallowing(MemoryStore):
        async def release_held(self) -> None:
            entered.set()
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                if not swallow:
                    raise

    hub = Hub(Swallowing(QUEUE_LIMIT, order_timeout_ms=40))
    await asyncio.wait_for(entered.wait(), BOUND)
    closing = asyncio.create_task(hub.close())
    done, _ = await asyncio.wait({closing}, timeout=BOUND)
    swallow = False  # a hub that did not end its task ends now: a failure must not hang the run
    for task in hub._tasks:
        task.cancel()
    await asyncio.wait_for(closing, BOUND)
    assert done, "Hub.close did not end its periodic tasks"
