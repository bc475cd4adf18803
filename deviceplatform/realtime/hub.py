"""The per-process side of realtime: which connects this server holds, and waking them.

One `Hub` per event loop (a uvicorn worker has one). It owns a random ID that sessions record as
their `holder` while one of its connects holds them, one wake-up listener (a Redis pub/sub
subscription, or the in-process store's callback), a sweeper for expired sessions and a task that
delivers the events held back for commit order once their time is up (store.py). Holding a
connect is `Hub.connect`: it attaches the session, answers at once when events are queued or the
connect is not to be held, and otherwise waits for a wake-up, a newer connect or the hold time."""

from __future__ import annotations

import asyncio
import logging
import secrets
import string
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import cache

from django.conf import settings
from django.core.signals import setting_changed

from deviceplatform import metrics
from deviceplatform.realtime.store import (
    ENDED,
    GONE,
    SUPERSEDED,
    MemoryStore,
    RedisStore,
    Store,
)

logger = logging.getLogger(__name__)

Stream = Callable[[list[bytes]], Awaitable[None]]
_ALPHABET = string.ascii_lowercase + string.digits


def new_client_id() -> str:
    """26+ lowercase letters and digits, unguessable (realtime.md §3): 32 chars, ~165 bits."""
    return "".join(secrets.choice(_ALPHABET) for _ in range(32))


@cache
def _store(redis_url: str, prefix: str, queue_limit: int, order_timeout_ms: int) -> Store:
    if redis_url:
        return RedisStore(redis_url, prefix, queue_limit, order_timeout_ms=order_timeout_ms)
    return MemoryStore(queue_limit, order_timeout_ms=order_timeout_ms)


def get_store() -> Store:
    """The store the settings name: Redis when REDIS_URL is set, else this process's memory."""
    return _store(
        settings.REDIS_URL,
        settings.REALTIME_PREFIX,
        settings.REALTIME_QUEUE_LIMIT,
        settings.REALTIME_ORDER_TIMEOUT_MS,
    )


@dataclass(eq=False)
class _Holder:
    token: str
    event: asyncio.Event = field(default_factory=asyncio.Event)
    superseded: bool = False  # a newer connect for the same session arrived on this hub
    published: float | None = None  # when the first events not yet delivered were published

    def delivered(self) -> None:
        """Events went out: the time since their publish is the delivery latency (metrics)."""
        if self.published is not None:
            metrics.realtime_delivered(time.time() - self.published)
            self.published = None


@dataclass
class ConnectOutcome:
    known: bool  # False: the session is gone (answer 402 Unknown client)
    events: list[bytes]
    hold_ms: int = 0
    interval_ms: int = 0
    timeout_ms: int = 0
    ended: bool = False  # disconnected or evicted during the hold (answer reconnect: none)


def _stop_if_cancelled() -> None:
    """End this task if it was cancelled during a store call that did not end with the
    cancellation: redis-py's async client (8.1) can return normally, or raise another error, from
    a command a cancel interrupted, and a periodic task would then go on for ever (`Hub.close`
    waiting for it)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class Hub:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.id = secrets.token_hex(8)
        self._holders: dict[str, _Holder] = {}
        self._ready = asyncio.Event()
        self._tasks = [
            asyncio.create_task(store.listen(self.id, self._wake, self._ready, self._stamp)),
            asyncio.create_task(self._sweep_forever()),
            asyncio.create_task(self._release_held_forever()),
        ]

    def _stamp(self, published: float, cids: list[str]) -> None:
        for holder in map(self._holders.get, cids):
            if holder is not None and holder.published is None:
                holder.published = published

    def _wake(self, cids: list[str]) -> None:
        if cids == ["*"]:
            holders = list(self._holders.values())
        else:
            holders = [h for h in map(self._holders.get, cids) if h is not None]
        for holder in holders:
            holder.event.set()

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(settings.REALTIME_SWEEP_SECONDS)
            try:
                while await self.store.sweep() >= 1000:
                    pass
            except Exception:
                logger.warning("realtime session sweep failed", exc_info=True)
            _stop_if_cancelled()

    async def _release_held_forever(self) -> None:
        """Deliver the batches held back for a predecessor that never came once their time is up,
        even when no later publish does it (a quarter of the timeout late at most)."""
        failing = False
        while True:
            await asyncio.sleep(max(0.01, self.store.order_timeout_ms / 4000))
            if self.store.order_timeout_ms <= 0:
                continue
            try:
                await self.store.release_held()
                failing = False
            except Exception:
                if not failing:  # once per outage: the wake-up listener reports it too
                    logger.warning("realtime: releasing held-back events failed", exc_info=True)
                failing = True
            _stop_if_cancelled()

    async def connect(
        self,
        cid: str,
        *,
        requested_ms: int | None,
        immediate: bool,
        stream: Stream | None = None,
    ) -> ConnectOutcome:
        """Hold one `/meta/connect` (realtime.md §6.2). Long-polling passes no `stream`: the
        first events end the hold. A WebSocket passes `stream`: events are sent as they come and
        the hold ends when its time passes or a newer connect takes over."""
        # Wake-ups must be able to reach us before we hold anything (Redis down: fail, do not hang).
        await asyncio.wait_for(self._ready.wait(), 10)
        holder = _Holder(secrets.token_hex(8))
        previous = self._holders.get(cid)
        self._holders[cid] = holder
        if previous is not None:
            previous.superseded = True
            previous.event.set()  # a newer connect on this process: the older one answers now
        released = True
        try:
            attached = await self.store.attach(
                cid,
                hub=self.id,
                token=holder.token,
                requested_ms=requested_ms,
                max_hold_ms=settings.REALTIME_MAX_TIMEOUT_MS,
                max_interval_ms=settings.REALTIME_MAX_INTERVAL_MS,
                immediate=immediate,
            )
            if attached is None:
                return ConnectOutcome(known=False, events=[])

            def outcome(events: list[bytes], state: int = 1) -> ConnectOutcome:
                return ConnectOutcome(
                    state != GONE,
                    events,
                    attached.hold_ms,
                    attached.interval_ms,
                    attached.timeout_ms,
                    ended=state == ENDED,
                )

            if not attached.held:
                return outcome(attached.events)
            released = False
            loop = asyncio.get_running_loop()
            deadline = loop.time() + attached.hold_ms / 1000
            while (remaining := deadline - loop.time()) > 0:
                try:
                    await asyncio.wait_for(holder.event.wait(), remaining)
                except TimeoutError:
                    break
                holder.event.clear()
                if holder.superseded:
                    released = True  # the newer connect's attach replaced our hold token
                    return outcome([])
                # Keep the hold while draining: a wake-up may find nothing (a newer connect's
                # attach or a listener reconnect wakes us too), and the hold must stay wakeable.
                state, events = await self.store.drain(cid, holder.token, release=False)
                if state in (GONE, ENDED):
                    released = True
                    return outcome([], state)
                if state == SUPERSEDED:
                    released = True
                    return outcome([])
                if events and stream is None:
                    holder.delivered()
                    return outcome(events)  # the hold is released below
                if events and stream is not None:
                    await stream(events)
                    holder.delivered()
            state, events = await self.store.drain(cid, holder.token, release=True)
            released = True
            return outcome(events, state)
        finally:
            if self._holders.get(cid) is holder:
                del self._holders[cid]
            if not released:  # answered with events, or cancelled (client gone)
                try:
                    await asyncio.shield(self.store.release(cid, holder.token))
                except BaseException:
                    logger.debug("could not release hold of %s", cid, exc_info=True)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


_hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Hub] = weakref.WeakKeyDictionary()


def get_hub() -> Hub:
    """This event loop's hub, started on first use."""
    loop = asyncio.get_running_loop()
    store = get_store()
    hub = _hubs.get(loop)
    if hub is None or hub.store is not store:
        if hub is not None:
            loop.create_task(hub.close())
        hub = _hubs[loop] = Hub(store)
    return hub


def _reset(setting: str, **_: object) -> None:
    if setting in {
        "REDIS_URL",
        "REALTIME_PREFIX",
        "REALTIME_QUEUE_LIMIT",
        "REALTIME_ORDER_TIMEOUT_MS",
    }:
        _store.cache_clear()


setting_changed.connect(_reset)


class Watch:
    """A server-side session: lets server code wait for events like a subscriber does."""

    def __init__(self, hub: Hub, client_id: str) -> None:
        self.hub = hub
        self.client_id = client_id

    async def next(self, timeout: float) -> list[bytes]:
        """The events queued for this watch, waiting up to `timeout` seconds for the first."""
        outcome = await self.hub.connect(
            self.client_id, requested_ms=max(0, int(timeout * 1000)), immediate=timeout <= 0
        )
        return outcome.events


@asynccontextmanager
async def watching(channels: list[str]) -> AsyncIterator[Watch]:
    """Subscribe a server-side session to `channels` for the duration of the block."""
    hub = get_hub()
    client_id = new_client_id()
    await hub.store.create_session(
        client_id,
        {"family": "internal", "uid": client_id, "user": "", "timeout": "0", "interval": "0"},
        ttl_ms=settings.REALTIME_MAX_INTERVAL_MS,
        limit=1,
    )
    try:
        await hub.store.subscribe(client_id, channels, add=True)
        await hub.connect(client_id, requested_ms=0, immediate=True)  # the first connect
        yield Watch(hub, client_id)
    finally:
        await hub.store.remove_session(client_id)
