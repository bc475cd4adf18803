"""Bayeux 1.0 as Cumulocity speaks it (realtime.md §3-§6), independent of the transport.

The long-polling view and the WebSocket consumer parse their input into a list of messages and hand
it to `Exchange.run`, which answers every message, holds the connect and returns the JSON-encoded
parts of the answer: replies to the other messages in order, then queued events, then the connect
reply. Credentials are checked once, at the handshake; afterwards the `clientId` is the session,
until the user's credentials are revoked or rotated: `rights.credentials_changed` then ends its
sessions, and their next message is refused with `401::Authentication invalid`.

Hostile input costs little: a request (a long-polling body, a WebSocket frame) pays for at most one
failed password check, whatever number of handshakes it holds, and failed checks count towards the
failed-login limit (`deviceplatform.api.auth_throttle`). A subscription is checked again when its
events are delivered, so one granted by ownership ends when the device changes owner. A subscribe
may opt in to options of its channel (`ext."com.deviceplatform"`, subscriptions.py), held as
variants of the subscription that end with it. When Redis or the database is unreachable, each
message gets a Bayeux failure with advice to retry after a while, as CometD servers answer, never
an HTTP error."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import close_old_connections

from deviceplatform.api.auth_throttle import TooManyFailures
from deviceplatform.api.authentication import attach_roles, authenticate_header_value
from deviceplatform.realtime.events import absolute, delivered
from deviceplatform.realtime.hub import Hub, get_hub, new_client_id
from deviceplatform.realtime.rights import current_epoch, rights_cache
from deviceplatform.realtime.subscriptions import (
    Family,
    canonical,
    rule_for,
    subscriptions_matching,
    variant,
    variants,
)
from deviceplatform.roles import is_bootstrap, user_roles

logger = logging.getLogger(__name__)

SERVER_CONNECTION_TYPES = ("websocket", "long-polling")
AUTHN_EXT = "com.cumulocity.authn"
# Our own extension: `"ext": {"com.deviceplatform": {"<option>": true}}` on a `/meta/subscribe`
# opts in to options of the channel (subscriptions.py); Cumulocity's clients never send it.
OPTIONS_EXT = "com.deviceplatform"
# How long a client waits before it retries after an outage of Redis or the database.
OUTAGE_RETRY_INTERVAL_MS = 2000

Send = Callable[[list[bytes]], Awaitable[None]]


def in_thread(func: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
    """Run ORM and password code off the event loop, in the default pool (not Django's single
    thread-sensitive thread: a thousand agents handshaking must not queue behind each other).
    Like Channels' `database_sync_to_async`, it hands the thread's connection back (to the pool)
    around the call; Django's own function is called, which Channels' test communicator does not
    stub out."""

    def call(*args: Any, **kwargs: Any) -> Any:
        close_old_connections()
        try:
            return func(*args, **kwargs)
        finally:
            close_old_connections()

    return sync_to_async(call, thread_sensitive=False)


@dataclass(frozen=True)
class Context:
    """What the transport knows about where the messages came from."""

    family: Family  # of the endpoint the messages were sent to
    base_url: str  # scheme and host the client used, for URLs in events
    authorization: str | None = None  # an Authorization header that may authenticate a handshake
    client: str | None = None  # the client's address, for the failed-login limit


def _milliseconds(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        return None
    return int(value)


def _advice(message: dict[str, Any]) -> dict[str, Any]:
    advice = message.get("advice")
    return advice if isinstance(advice, dict) else {}


def _may_subscribe(user_id: int, rules: Sequence[tuple[Any, Any]]) -> bool:
    user = get_user_model().objects.filter(pk=user_id, is_active=True).first()
    if user is None:
        return False
    attach_roles(user)
    return all(rule.authorize(user, match) for rule, match in rules)


def _verdicts(user_id: int, family: Family, subscriptions: Sequence[str]) -> dict[str, bool]:
    """Whether this user may (still) hold each of `subscriptions` (False without a rule)."""
    user = get_user_model().objects.filter(pk=user_id, is_active=True).first()
    if user is not None:
        attach_roles(user)
    verdicts = {}
    for subscription in subscriptions:
        found = rule_for(family, subscription)
        verdicts[subscription] = bool(
            user is not None and found is not None and found[0].authorize(user, found[1])
        )
    return verdicts


def _credentials_current(user_id: int, stored_hash: str) -> bool:
    """Whether the user is still active with the password hash a handshake checked."""
    users = get_user_model().objects.filter(pk=user_id, is_active=True, password=stored_hash)
    return users.exists()


_authorize = in_thread(_may_subscribe)
_check_rights = in_thread(_verdicts)
_still_current = in_thread(_credentials_current)
check_credentials = in_thread(authenticate_header_value)


def _is_outage(exc: BaseException) -> bool:
    """Redis or the database unreachable (refused, reset, timed out), as opposed to a bug."""
    import redis.exceptions
    from django.db import InterfaceError, OperationalError

    return isinstance(
        exc,
        TimeoutError  # the hub's wake-up listener never got to Redis
        | redis.exceptions.ConnectionError
        | redis.exceptions.TimeoutError
        | OperationalError
        | InterfaceError,
    )


_refreshes: set[asyncio.Task[None]] = set()  # running background checks (kept referenced)


def _refresh_ahead(store: Any, client_id: str, subscriptions: list[str], epoch: int) -> None:
    """Check `subscriptions` of a session again in the background while their verdicts, in the
    last quarter of their life, are still used (RightsCache.due). Verdicts taken together (a
    thousand clients subscribing after a restart) would otherwise expire together and hold every
    delivery behind a thousand checks (p99 0.15-1 s after the REST answer, bench/realtime.py). A
    verdict is still never trusted beyond REALTIME_RIGHTS_CACHE_SECONDS: if the check has not
    answered by then, the delivery checks itself, as before."""

    async def refresh() -> None:
        try:
            session = await store.get_session(client_id)
            if session is None or session["family"] not in set(Family):
                return
            checked = await _check_rights(
                int(session["uid"]), Family(session["family"]), subscriptions
            )
            for subscription, allowed in checked.items():
                rights_cache.put(client_id, subscription, epoch, allowed)
        except Exception:  # the delivery after the verdict's end checks (and answers) itself
            logger.warning("realtime: background rights check failed", exc_info=True)
        finally:
            for subscription in subscriptions:
                rights_cache.refreshed(client_id, subscription)

    task = asyncio.get_running_loop().create_task(refresh())
    _refreshes.add(task)
    task.add_done_callback(_refreshes.discard)


def _channel_of(event: bytes) -> str:
    """The channel of a stored event, `{"channel":"...","data":...}` (events.publish writes the
    channel first; channels hold no characters JSON escapes)."""
    start = b'{"channel":"'
    if event.startswith(start):
        end = event.find(b'"', len(start))
        if end > 0:
            return event[len(start) : end].decode()
    return str(orjson.loads(event).get("channel", ""))


def _options(message: dict[str, Any], rules: Sequence[tuple[Any, Any]]) -> dict[str, bool] | str:
    """The options a `/meta/subscribe` sets (`ext."com.deviceplatform"`), each offered by every
    channel it names, or the error to answer. Without the extension: none (all off)."""
    ext = message.get("ext")
    if not isinstance(ext, dict) or OPTIONS_EXT not in ext:
        return {}
    asked = ext[OPTIONS_EXT]
    if not isinstance(asked, dict):
        return f"400::Invalid ext {OPTIONS_EXT} (an object of options is expected)"
    for option, value in asked.items():
        if not isinstance(value, bool):
            return f"400::Invalid ext {OPTIONS_EXT} ({option} must be true or false)"
        refused = [rule for rule, _match in rules if option not in rule.options]
        if refused:
            return f"400::Invalid ext {OPTIONS_EXT} (the channel offers no option {option})"
    return asked


def _reply(message: Any, **fields: Any) -> dict[str, Any]:
    reply: dict[str, Any] = {}
    if isinstance(message, dict):
        if isinstance(message.get("channel"), str):
            reply["channel"] = message["channel"]
        if "id" in message:
            reply["id"] = message["id"]
    reply.update(fields)
    return reply


def _failure(message: Any, error: str, **fields: Any) -> dict[str, Any]:
    return _reply(message, successful=False, error=error, **fields)


def _unknown_client(message: Any, **fields: Any) -> dict[str, Any]:
    return _failure(
        message, "402::Unknown client", advice={"reconnect": "handshake", "interval": 0}, **fields
    )


def _revoked(message: Any, **fields: Any) -> dict[str, Any]:
    """A session its user's credentials no longer back (revoked or rotated): the client may
    handshake again, which succeeds only with the new credentials."""
    return _failure(
        message,
        "401::Authentication invalid",
        advice={"reconnect": "handshake", "interval": 0},
        **fields,
    )


def _unavailable(message: Any) -> dict[str, Any]:
    """The answer to any message while Redis or the database is out: try again in a while (a
    handshake is repeated; other messages keep their session, which may have survived)."""
    channel = message.get("channel") if isinstance(message, dict) else None
    fields: dict[str, Any] = {}
    if isinstance(message, dict):
        if isinstance(message.get("clientId"), str):
            fields["clientId"] = message["clientId"]
        if "subscription" in message:
            fields["subscription"] = message["subscription"]
    reconnect = "handshake" if channel == "/meta/handshake" else "retry"
    return _failure(
        message,
        "503::Service temporarily unavailable",
        advice={"reconnect": reconnect, "interval": OUTAGE_RETRY_INTERVAL_MS},
        **fields,
    )


class Exchange:
    """Answers the messages of one transport connection (a long-polling request, or every frame of
    one WebSocket)."""

    def __init__(self, context: Context, hub: Hub | None = None) -> None:
        self.context = context
        self.hub = hub or get_hub()
        self.store = self.hub.store
        self._base = b'"' + context.base_url.encode()
        self.intervals: dict[str, int] = {}  # clientId -> advice interval, of connects seen here
        # Outcomes of the credential checks of the current request (one long-polling body, one
        # WebSocket frame): Authorization value -> user, None (refused) or TooManyFailures.
        self._checked: dict[str, Any] = {}
        # The rights epoch read before this request's first credential check (None: no check
        # yet; -1: Redis did not answer), so a handshake can tell whether credentials were
        # revoked or rotated since its user was checked.
        self._epoch: int | None = None

    def encode(self, events: Sequence[bytes], client_id: str = "") -> list[bytes]:
        """Stored events as the client gets them: without their envelope's request id (logged at
        DEBUG with it, so a request's story reaches the delivery), URLs on the client's host."""
        debug = logger.isEnabledFor(logging.DEBUG)
        messages = []
        for event in events:
            message, request_id = delivered(event)
            if debug:
                logger.debug(
                    "realtime: event on %s delivered to %s",
                    _channel_of(message),
                    client_id,
                    extra={"request_id": request_id, "client_id": client_id},
                )
            messages.append(absolute(message, self._base))
        return messages

    async def run(
        self, messages: Sequence[Any], *, holdable: bool, stream: Send | None = None
    ) -> list[bytes]:
        """The JSON-encoded answer to `messages`. `holdable`: the last connect may be held.
        `stream` (WebSocket): receives the replies before a hold and the events during it."""
        parts: list[bytes] = []
        connects: list[dict[str, Any]] = []
        for message in messages:
            if isinstance(message, dict) and message.get("channel") == "/meta/connect":
                connects.append(message)
                continue
            try:
                reply = await self._dispatch(message)
            except Exception as exc:
                if not _is_outage(exc):
                    raise
                logger.warning("realtime: %s while answering a message", type(exc).__name__)
                reply = _unavailable(message)
            parts.append(orjson.dumps(reply))
        for position, message in enumerate(connects):
            hold = holdable and position == len(connects) - 1
            if hold and stream is not None and parts:
                await stream(parts)
                parts = []
            try:
                parts.extend(await self._connect(message, hold=hold, stream=stream))
            except Exception as exc:
                if not _is_outage(exc):
                    raise
                logger.warning("realtime: %s while answering a connect", type(exc).__name__)
                parts.append(orjson.dumps(_unavailable(message)))
        return parts

    def new_request(self) -> None:
        """Forget the credential checks of the previous request (a WebSocket's Exchange serves
        every frame of the socket: each frame is a request)."""
        self._checked.clear()
        self._epoch = None

    async def authenticate(self, header: str) -> Any:
        """The user for an Authorization value, or None; raises TooManyFailures. Checked once per
        request, and after one refusal the request gets no further check: a body of a thousand
        handshakes costs what one costs."""
        if header not in self._checked:
            if any(outcome is None for outcome in self._checked.values()):
                return None
            if self._epoch is None:
                try:
                    self._epoch = await current_epoch(self.store)
                except Exception as exc:
                    if not _is_outage(exc):
                        raise
                    self._epoch = -1  # unknown: a handshake checks the user again
            try:
                self._checked[header] = await check_credentials(header, client=self.context.client)
            except TooManyFailures as refused:
                self._checked[header] = refused
        outcome = self._checked[header]
        if isinstance(outcome, TooManyFailures):
            raise outcome
        return outcome

    async def _dispatch(self, message: Any) -> dict[str, Any]:
        if not isinstance(message, dict) or not isinstance(message.get("channel"), str):
            return _failure(message, "400::Invalid message")
        channel = message["channel"]
        if channel == "/meta/handshake":
            return await self._handshake(message)
        if channel == "/meta/subscribe":
            return await self._subscribe(message, add=True)
        if channel == "/meta/unsubscribe":
            return await self._subscribe(message, add=False)
        if channel == "/meta/disconnect":
            return await self._disconnect(message)
        if channel.startswith("/meta/"):
            return _failure(message, "400::Unknown meta channel")
        return _failure(message, "403::Publish denied")

    # --- handshake -------------------------------------------------------------------------------

    def _credentials(self, message: dict[str, Any]) -> str | None:
        """`ext."com.cumulocity.authn".token` first, else the transport's Authorization header."""
        ext = message.get("ext")
        authn = ext.get(AUTHN_EXT) if isinstance(ext, dict) else None
        token = authn.get("token") if isinstance(authn, dict) else None
        if isinstance(token, str) and token:
            return f"Basic {token}"
        return self.context.authorization

    async def _handshake(self, message: dict[str, Any]) -> dict[str, Any]:
        refused = {"advice": {"reconnect": "none"}}
        requested = message.get("supportedConnectionTypes")
        if isinstance(requested, list):
            types = [kind for kind in SERVER_CONNECTION_TYPES if kind in requested]
        else:
            types = list(SERVER_CONNECTION_TYPES)
        if not types:
            return _failure(message, "400::Unsupported connection types", **refused)
        header = self._credentials(message)
        try:
            user = await self.authenticate(header) if header else None
        except TooManyFailures as limited:
            return _failure(
                message,
                f"429::{limited.detail}",
                advice={"reconnect": "handshake", "interval": int(limited.wait or 1) * 1000},
            )
        if user is None or is_bootstrap(user_roles(user)):  # the bootstrap login asks for
            return _failure(message, "403::Handshake denied", **refused)  # credentials only
        advice = _advice(message)
        timeout = _milliseconds(advice.get("timeout"))
        if timeout is None:
            timeout = settings.REALTIME_DEFAULT_TIMEOUT_MS
        timeout = min(timeout, settings.REALTIME_MAX_TIMEOUT_MS)
        interval = _milliseconds(advice.get("interval")) or 0
        interval = min(interval, settings.REALTIME_MAX_TIMEOUT_MS)
        client_id = new_client_id()
        evicted = await self.store.create_session(
            client_id,
            {
                "family": str(self.context.family),
                "uid": str(user.pk),
                "user": user.username,
                "timeout": str(timeout),
                "interval": str(interval),
            },
            ttl_ms=interval + settings.REALTIME_MAX_INTERVAL_MS,
            limit=settings.REALTIME_SESSIONS_PER_USER,
        )
        if evicted:
            logger.info("user %s: oldest session(s) %s removed (limit)", user.username, evicted)
        if await current_epoch(self.store) != self._epoch and not await _still_current(
            user.pk, user.password
        ):
            # Revoked or rotated after the check (which read the epoch first), and its sessions
            # were ended before this one existed: end this one too.
            await self.store.remove_session(client_id)
            return _failure(message, "403::Handshake denied", **refused)
        return _reply(
            message,
            successful=True,
            clientId=client_id,
            version="1.0",
            minimumVersion="1.0",
            supportedConnectionTypes=types,
            advice={"reconnect": "retry", "interval": interval, "timeout": timeout},
        )

    # --- subscriptions ---------------------------------------------------------------------------

    async def _session(self, message: dict[str, Any]) -> tuple[str, dict[str, str]] | None:
        client_id = message.get("clientId")
        if not isinstance(client_id, str) or not client_id:
            return None
        session = await self.store.get_session(client_id)
        return (client_id, session) if session is not None else None

    async def _gone(self, message: dict[str, Any], **fields: Any) -> dict[str, Any]:
        """The answer to a message for a session that does not exist (any more): revoked
        credentials ended it (401), or it is unknown (402)."""
        client_id = message.get("clientId")
        if isinstance(client_id, str) and client_id and await self.store.revoked(client_id):
            return _revoked(message, **fields)
        return _unknown_client(message, **fields)

    async def _subscribe(self, message: dict[str, Any], *, add: bool) -> dict[str, Any]:
        subscription = message.get("subscription")
        echo = {"subscription": subscription} if "subscription" in message else {}
        found = await self._session(message)
        if found is None:
            return await self._gone(message, **echo)
        client_id, session = found
        if isinstance(subscription, str):
            channels = [subscription]
        elif (
            isinstance(subscription, list)
            and subscription
            and all(isinstance(c, str) for c in subscription)
        ):
            channels = subscription
        else:
            return _failure(message, "400::Invalid channel", **echo)
        family = Family(session["family"])
        rules = [rule_for(family, canonical(channel)) for channel in channels]
        stored = [canonical(channel) for channel in channels]
        # A channel's variants follow it: an unsubscribe ends them, and a subscribe keeps those
        # of the options it sets and ends the others (the last subscribe decides).
        drop = [each for channel in stored for each in variants(channel)]
        if add:
            if any(rule is None for rule in rules):
                return _failure(message, "400::Invalid channel", **echo)
            options = _options(message, [found for found in rules if found is not None])
            if isinstance(options, str):
                return _failure(message, options, **echo)
            chosen = [variant(c, o) for c in stored for o, on in sorted(options.items()) if on]
            drop = [each for each in drop if each not in chosen]
            epoch = await current_epoch(self.store)  # before the check: a later change wins
            if not await _authorize(int(session["uid"]), rules):
                return _failure(message, "403::Subscription denied", **echo)
            for channel in stored:
                rights_cache.put(client_id, channel, epoch, True)
            stored += chosen
        grace = int(session["interval"]) + settings.REALTIME_MAX_INTERVAL_MS
        if not await self.store.subscribe(client_id, stored, add=add, ttl_ms=grace, drop=drop):
            return await self._gone(message, **echo)
        return _reply(message, successful=True, clientId=client_id, **echo)

    async def _disconnect(self, message: dict[str, Any]) -> dict[str, Any]:
        client_id = message.get("clientId")
        if not isinstance(client_id, str) or not await self.store.remove_session(client_id):
            return await self._gone(message)
        self.intervals.pop(client_id, None)
        return _reply(message, successful=True, clientId=client_id)

    # --- connect ---------------------------------------------------------------------------------

    async def _connect(
        self, message: dict[str, Any], *, hold: bool, stream: Send | None
    ) -> list[bytes]:
        client_id = message.get("clientId")
        if not isinstance(client_id, str) or not client_id:
            return [orjson.dumps(_unknown_client(message))]
        requested = _milliseconds(_advice(message).get("timeout"))

        async def send_events(events: list[bytes]) -> None:
            assert stream is not None
            events = await self._deliverable(client_id, events)
            if events:
                await stream(self.encode(events, client_id))

        outcome = await self.hub.connect(
            client_id,
            requested_ms=requested,
            immediate=not hold,
            stream=send_events if stream is not None else None,
        )
        if not outcome.known:
            self.intervals.pop(client_id, None)
            return [orjson.dumps(await self._gone(message, clientId=client_id))]
        if outcome.ended and await self.store.revoked(client_id):
            # Its user's credentials were revoked or rotated while this connect was held.
            self.intervals.pop(client_id, None)
            return [orjson.dumps(_revoked(message, clientId=client_id))]
        if outcome.ended:
            # Disconnected (or evicted) while held: CometD answers the held connect and tells the
            # client to stop, rather than to handshake again.
            self.intervals.pop(client_id, None)
            reply = _reply(
                message, successful=True, clientId=client_id, advice={"reconnect": "none"}
            )
            events = await self._deliverable(client_id, outcome.events)
            return [*self.encode(events, client_id), orjson.dumps(reply)]
        self.intervals[client_id] = outcome.interval_ms
        # The hold this connect got; a connect answered at once advertises the session's default,
        # so a client that adopts the advice does not start polling without a hold.
        timeout = outcome.hold_ms or outcome.timeout_ms
        reply = _reply(
            message,
            successful=True,
            clientId=client_id,
            advice={"reconnect": "retry", "interval": outcome.interval_ms, "timeout": timeout},
        )
        events = await self._deliverable(client_id, outcome.events)
        return [*self.encode(events, client_id), orjson.dumps(reply)]

    async def _deliverable(self, client_id: str, events: list[bytes]) -> list[bytes]:
        """`events` without those the session's user may no longer receive. Rights are checked
        again at delivery (ownership moves with the device's owner, roles are taken away, users
        are disabled; `rights` keeps this cheap), and a subscription that lost them is removed,
        so its events stop. An event may have come through the channel itself or its wildcard:
        it goes out if the user may hold either."""
        if not events:
            return events
        epoch = await current_epoch(self.store)  # before any check: a later change wins
        channels = {_channel_of(event) for event in events}
        candidates = {channel: subscriptions_matching(channel) for channel in channels}
        verdicts: dict[str, bool | None] = {
            subscription: rights_cache.get(client_id, subscription, epoch)
            for subscriptions in candidates.values()
            for subscription in subscriptions
        }
        unknown = [
            subscription
            for channel, subscriptions in candidates.items()
            if True not in (verdicts[s] for s in subscriptions)
            for subscription in subscriptions
            if verdicts[subscription] is None
        ]
        if unknown:
            session = await self.store.get_session(client_id)
            if session is None or session["family"] not in set(Family):
                return []  # ended meanwhile, or a server-side session: no client's to receive
            checked = await _check_rights(int(session["uid"]), Family(session["family"]), unknown)
            for subscription, allowed in checked.items():
                rights_cache.put(client_id, subscription, epoch, allowed)
            verdicts.update(checked)
        ageing = [
            subscription
            for subscription, verdict in verdicts.items()
            if verdict is not None and rights_cache.due(client_id, subscription, epoch)
        ]
        if ageing:
            _refresh_ahead(self.store, client_id, ageing, epoch)
        permitted = {
            channel
            for channel, subscriptions in candidates.items()
            if any(verdicts[s] for s in subscriptions)
        }
        if permitted == channels:
            return events
        revoked = sorted({s for channel in channels - permitted for s in candidates[channel]})
        logger.info("realtime: session %s lost the right to %s; unsubscribed", client_id, revoked)
        await self.store.subscribe(
            client_id, revoked, add=False, drop=[v for s in revoked for v in variants(s)]
        )
        return [event for event in events if _channel_of(event) in permitted]

    async def close(self) -> None:
        """The transport is gone (WebSocket closed): its sessions expire unless a connect comes
        within interval + maxInterval."""
        for client_id, interval in self.intervals.items():
            try:
                await self.store.release(
                    client_id, "", ttl_ms=interval + settings.REALTIME_MAX_INTERVAL_MS
                )
            except Exception:
                logger.debug("could not shorten session %s", client_id, exc_info=True)
        self.intervals.clear()


def encode_array(parts: Sequence[bytes]) -> bytes:
    return b"[" + b",".join(parts) + b"]"
