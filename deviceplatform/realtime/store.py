"""Where Bayeux sessions, subscriptions and event queues live (realtime.md §3, §6, §8).

`RedisStore` (REDIS_URL set) is shared by every server process: a client may handshake on one
worker and connect on another, and a restarted worker loses nothing. `MemoryStore` (the embedded
default) keeps the same state in this process. Both have the same semantics:

- a session is a record `{family, uid, user, timeout, interval, base, holder, hold, connected}` that
  lives while connects keep arriving (each refreshes its deadline to hold + interval + maxInterval;
  closing a WebSocket shortens it to interval + maxInterval);
- `holder` is the hub (one per server process and event loop) that last attached the session and
  `hold` the token of the connect it holds ('' when none);
- subscriptions are kept per session and in a reverse index channel -> sessions, so publishing
  resolves subscribers without scanning sessions;
- every session has a bounded FIFO queue of event payloads (JSON bytes); publishing appends to the
  queue of each matching session once, then wakes the hubs that hold a connect for them.

In Redis every step is one Lua script, so each is atomic: a publish racing a connect either lands
in the queue the connect drains or wakes the connect it set up. Keys (prefix P):
`P s:<cid>` hash, `P q:<cid>` list, `P sub:<cid>` set, `P c:<channel>` set, `P u:<family>:<uid>`
zset (sessions per user), `P exp` zset (deadlines, for the sweeper), pub/sub `P w:<hub>`, and
`P x:<cid>` (a minute): the hold token a session had when it was disconnected or evicted, so that
connect learns it ended (and answers `reconnect: none`, as CometD does) rather than was lost, and
`P r:<cid>` (a minute): the session was ended because its user's credentials were revoked or
rotated (`end_user_sessions`), so its next message is told so rather than "unknown client".

**Commit order.** A published batch may carry an `order`: (key, seq, after_ms) per managed object it
is about, the number its transaction took just before COMMIT (`events.take_order`) and how long after
the object's previous number. The store remembers per key the last number it delivered (for
`20 × order timeout`, refreshed on delivery) and delivers a batch only when, for each of its keys,
no held batch has a lower number and the previous number was delivered, unless that one was taken
long ago (`after_ms` of `10 × order timeout` or more, or none: it is delivered or given up by now;
this also covers a store that lost its memory; the in-process store also does not wait for one
numbered before it was created, in an earlier process). Otherwise the batch is
held back; delivering a batch releases those waiting for it, and a batch held for the order timeout
(`order_timeout_ms`) is delivered anyway, after the held batches before it for its keys: its
predecessor's publisher may have died after committing. Overdue batches are released by every
publish and by each hub every quarter of the timeout. Keys: `P o:<key>` (last number), `P hb`
hash (held id -> msgpack of order and events), `P hd` zset (held id -> deadline ms), `P hk:<key>`
zset (held id -> its number for the key), `P hseq` (held ids)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from deviceplatform import metrics
from deviceplatform.realtime.subscriptions import VARIANT_SEPARATOR, is_variant

logger = logging.getLogger(__name__)

# (payload, subscription channels it goes to): one prepared event
Prepared = tuple[bytes, Sequence[str]]
# (key, seq, after_ms): a batch is the `seq`-th transaction with events about managed object `key`,
# numbered `after_ms` after the one before (None: the first)
Order = tuple[int, int, int | None]
Waker = Callable[[list[str]], None]
# Called with (seconds since the epoch, cids) before the wake-up of sessions that got events
# published then: the hub times their delivery (metrics).
Stamper = Callable[[float, list[str]], None]

# drain() outcomes
GONE = -1  # the session no longer exists (expired, or the store lost it)
ENDED = -2  # the session was disconnected or evicted while this connect held it
SUPERSEDED = 0  # another connect took over the session
HELD = 1
# How long a Redis call of the realtime store waits for a free pooled connection (see _client).
REDIS_POOL_WAIT_SECONDS = 20
# Connections per event loop. Redis runs one command at a time, so more connections than this buy
# no throughput; a burst that opened 1,000 at once overflowed Redis's accept backlog (511 by
# default): dropped handshakes retried after 1 s, 3 s, ... and ran into redis-py's 5 s connect
# timeout on a loaded machine.
REDIS_POOL_SIZE = 100


@dataclass
class Attached:
    held: bool  # True: the connect holds the session now; False: answer at once with `events`
    events: list[bytes]
    hold_ms: int  # how long the connect may be held (its own advice, else the session's)
    interval_ms: int  # the session's advice
    timeout_ms: int  # the session's default hold


def _session(raw: dict[Any, Any]) -> dict[str, str] | None:
    if not raw:
        return None
    return {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in raw.items()
    }


# --- Redis --------------------------------------------------------------------------------------

_LUA_COMMON = """
local P = ARGV[1]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function touch(cid, ttl)
  redis.call('PEXPIRE', P .. 's:' .. cid, ttl)
  redis.call('ZADD', P .. 'exp', now_ms() + ttl, cid)
end
local function forget(cid)
  for _, ch in ipairs(redis.call('SMEMBERS', P .. 'sub:' .. cid)) do
    redis.call('SREM', P .. 'c:' .. ch, cid)
  end
  redis.call('DEL', P .. 'q:' .. cid, P .. 'sub:' .. cid)
  redis.call('ZREM', P .. 'exp', cid)
end
local function remove(cid)
  local skey = P .. 's:' .. cid
  local info = redis.call('HMGET', skey, 'holder', 'hold', 'family', 'uid')
  forget(cid)
  redis.call('DEL', skey)
  if info[3] and info[4] then
    redis.call('ZREM', P .. 'u:' .. info[3] .. ':' .. info[4], cid)
  end
  if info[1] and info[1] ~= '' and info[2] and info[2] ~= '' then
    redis.call('SET', P .. 'x:' .. cid, info[2], 'PX', 60000)
    redis.call('PUBLISH', P .. 'w:' .. info[1], cid)
  end
end
"""

# ARGV: P, cid, ttl, limit, family, uid, field, value, ...
_LUA_HANDSHAKE = """
local cid, ttl, limit = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local skey = P .. 's:' .. cid
local fields = {}
for i = 7, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', skey, 'holder', '', 'hold', '', unpack(fields))
touch(cid, ttl)
local ukey = P .. 'u:' .. ARGV[5] .. ':' .. ARGV[6]
redis.call('ZADD', ukey, redis.call('INCR', P .. 'seq'), cid)
for _, other in ipairs(redis.call('ZRANGE', ukey, 0, -1)) do
  if redis.call('EXISTS', P .. 's:' .. other) == 0 then redis.call('ZREM', ukey, other) end
end
local evicted = {}
while redis.call('ZCARD', ukey) > limit do
  local oldest = redis.call('ZRANGE', ukey, 0, 0)[1]
  remove(oldest)
  redis.call('ZREM', ukey, oldest)
  evicted[#evicted + 1] = oldest
end
return evicted
"""

# ARGV: P, cid, hub, token, requested hold ('' = session default), max hold, max interval,
# immediate (1: answer at once even with nothing queued)
_LUA_ATTACH = """
local cid, hub, token = ARGV[2], ARGV[3], ARGV[4]
local skey = P .. 's:' .. cid
local info = redis.call('HMGET', skey, 'family', 'holder', 'hold', 'connected', 'timeout', 'interval')
if not info[1] then return false end
local timeout, interval = tonumber(info[5]), tonumber(info[6])
local hold = timeout
if ARGV[5] ~= '' then hold = tonumber(ARGV[5]) end
hold = math.min(hold, tonumber(ARGV[6]))
touch(cid, hold + interval + tonumber(ARGV[7]))
local immediate = ARGV[8] == '1' or hold == 0 or not info[4]
if not info[4] then redis.call('HSET', skey, 'connected', '1') end
local qkey = P .. 'q:' .. cid
local events = redis.call('LRANGE', qkey, 0, -1)
local held = 0
if #events > 0 or immediate then
  redis.call('DEL', qkey)
  redis.call('HSET', skey, 'hold', '')
else
  redis.call('HSET', skey, 'holder', hub, 'hold', token)
  held = 1
end
if info[3] and info[3] ~= '' and info[2] and info[2] ~= '' then
  redis.call('PUBLISH', P .. 'w:' .. info[2], cid)
end
return {held, events, hold, interval, timeout}
"""

# ARGV: P, cid, token, release
_LUA_DRAIN = """
local cid, token = ARGV[2], ARGV[3]
local skey = P .. 's:' .. cid
local hold = redis.call('HGET', skey, 'hold')
if not hold then
  if redis.call('GET', P .. 'x:' .. cid) == token then return {-2, {}} end
  return {-1, {}}
end
if hold ~= token then return {0, {}} end
local qkey = P .. 'q:' .. cid
local events = redis.call('LRANGE', qkey, 0, -1)
if #events > 0 then redis.call('DEL', qkey) end
if ARGV[4] == '1' then redis.call('HSET', skey, 'hold', '') end
return {1, events}
"""

# ARGV: P, cid, token, ttl ('' keeps the deadline)
_LUA_RELEASE = """
local cid, token = ARGV[2], ARGV[3]
local skey = P .. 's:' .. cid
local hold = redis.call('HGET', skey, 'hold')
if not hold then return 0 end
if hold == token then redis.call('HSET', skey, 'hold', '') end
if ARGV[4] ~= '' and (hold == token or hold == '') then touch(cid, tonumber(ARGV[4])) end
return 1
"""

# ARGV: P, cid, least ttl, then '+channel' (add) or '-channel' (remove), ...
_LUA_SUBSCRIBE = """
local cid = ARGV[2]
local left = redis.call('PTTL', P .. 's:' .. cid)
if left == -2 then return 0 end
if left < tonumber(ARGV[3]) then touch(cid, tonumber(ARGV[3])) end
for i = 4, #ARGV do
  local channel = string.sub(ARGV[i], 2)
  if string.sub(ARGV[i], 1, 1) == '+' then
    redis.call('SADD', P .. 'sub:' .. cid, channel)
    redis.call('SADD', P .. 'c:' .. channel, cid)
  else
    redis.call('SREM', P .. 'sub:' .. cid, channel)
    redis.call('SREM', P .. 'c:' .. channel, cid)
  end
end
return 1
"""

# ARGV: P, cid
_LUA_REMOVE = """
if redis.call('EXISTS', P .. 's:' .. ARGV[2]) == 0 then return 0 end
remove(ARGV[2])
return 1
"""

# ARGV: P, uid, family, ...: end every session of the user (credentials revoked or rotated)
_LUA_END_USER = """
local ended = {}
for i = 3, #ARGV do
  local ukey = P .. 'u:' .. ARGV[i] .. ':' .. ARGV[2]
  for _, cid in ipairs(redis.call('ZRANGE', ukey, 0, -1)) do
    if redis.call('EXISTS', P .. 's:' .. cid) == 1 then
      redis.call('SET', P .. 'r:' .. cid, '1', 'PX', 60000)
      remove(cid)
      ended[#ended + 1] = cid
    end
  end
  redis.call('DEL', ukey)
end
return ended
"""

# ARGV: P, batch size
_LUA_SWEEP = """
local now = now_ms()
local due = redis.call('ZRANGEBYSCORE', P .. 'exp', '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
for _, cid in ipairs(due) do
  local left = redis.call('PTTL', P .. 's:' .. cid)
  if left > 0 then
    redis.call('ZADD', P .. 'exp', now + left, cid)
  else
    redis.call('DEL', P .. 's:' .. cid)
    forget(cid)
  end
end
return #due
"""

# Held-back batches (see the module docstring). ARGV: P, queue limit, order ttl, now ('' = Redis
# time), then the script's own arguments.
_LUA_ORDER = """
local limit, order_ttl = tonumber(ARGV[2]), tonumber(ARGV[3])
local now = ARGV[4] ~= '' and tonumber(ARGV[4]) or now_ms()
local wakes = {}
local touched = {}  -- keys whose last number moved: batches held for them may be due
local queued, dropped = 0, 0  -- events appended to queues, and the oldest dropped (metrics)

local function enqueue(events)  -- flat: payload, n, channel_1 .. channel_n, ...
  local i = 1
  while i <= #events do
    local payload, n = events[i], tonumber(events[i + 1])
    local seen = {}
    for j = 1, n do
      local ckey = P .. 'c:' .. events[i + 1 + j]
      for _, cid in ipairs(redis.call('SMEMBERS', ckey)) do
        if not seen[cid] then
          seen[cid] = true
          local info = redis.call('HMGET', P .. 's:' .. cid, 'holder', 'hold')
          if not info[1] then
            redis.call('SREM', ckey, cid)
          else
            local qkey = P .. 'q:' .. cid
            local length = redis.call('RPUSH', qkey, payload)
            queued = queued + 1
            if length > limit then
              redis.call('LTRIM', qkey, -limit, -1)
              dropped = dropped + length - limit
            end
            if info[2] ~= '' then
              wakes[info[1]] = wakes[info[1]] or {}
              wakes[info[1]][cid] = true
            end
          end
        end
      end
    end
    i = i + 2 + n
  end
end

-- order: flat key, seq, follows (1: wait for seq - 1), ...
local function ready(order)
  for i = 1, #order, 3 do
    local key, seq = order[i], tonumber(order[i + 1])
    local first = redis.call('ZRANGE', P .. 'hk:' .. key, 0, 0, 'WITHSCORES')
    if first[2] and tonumber(first[2]) < seq then return false end
    if order[i + 2] == '1' then
      local last = redis.call('GET', P .. 'o:' .. key)
      if not last or tonumber(last) < seq - 1 then return false end
    end
  end
  return true
end

local function deliver(order, events)
  enqueue(events)
  for i = 1, #order, 3 do
    local okey, seq = P .. 'o:' .. order[i], tonumber(order[i + 1])
    local last = tonumber(redis.call('GET', okey) or '0')
    redis.call('SET', okey, math.max(last, seq), 'PX', order_ttl)
    touched[#touched + 1] = order[i]
  end
end

local function hold(order, events, deadline)
  local id = redis.call('INCR', P .. 'hseq')
  redis.call('HSET', P .. 'hb', id, cmsgpack.pack({order, events}))
  redis.call('ZADD', P .. 'hd', deadline, id)
  for i = 1, #order, 3 do
    redis.call('ZADD', P .. 'hk:' .. order[i], order[i + 1], id)
  end
end

local function held(id)  -- {order, events}, or nil
  local raw = redis.call('HGET', P .. 'hb', id)
  if raw then return cmsgpack.unpack(raw) end
  return nil
end

local function unhold(id, order)
  redis.call('HDEL', P .. 'hb', id)
  redis.call('ZREM', P .. 'hd', id)
  for i = 1, #order, 3 do
    redis.call('ZREM', P .. 'hk:' .. order[i], id)
  end
end

-- Deliver the held batches that are ready now, following the keys whose number moved.
local function release_ready()
  local i = 1
  while i <= #touched do
    local key = touched[i]
    local first = redis.call('ZRANGE', P .. 'hk:' .. key, 0, 0)
    local batch = first[1] and held(first[1])
    if first[1] and not batch then
      redis.call('ZREM', P .. 'hk:' .. key, first[1])
    elseif batch and ready(batch[1]) then
      unhold(first[1], batch[1])
      deliver(batch[1], batch[2])
    else
      i = i + 1
    end
  end
end

-- Deliver held batch `id` now, after the held batches before it for its keys.
local function force(id)
  local stack, onstack = {id}, {[id] = true}
  while #stack > 0 do
    local top = stack[#stack]
    local batch = held(top)
    if not batch then
      stack[#stack] = nil
    else
      local order, before = batch[1], nil
      for i = 1, #order, 3 do
        local ids = redis.call(
          'ZRANGEBYSCORE', P .. 'hk:' .. order[i], '-inf', '(' .. order[i + 1], 'LIMIT', 0, 1)
        if ids[1] and not onstack[ids[1]] then
          before = ids[1]
          break
        end
      end
      if before then
        stack[#stack + 1] = before
        onstack[before] = true
      else
        stack[#stack] = nil
        unhold(top, order)
        deliver(order, batch[2])
      end
    end
  end
end

local function release_overdue()
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'hd', '-inf', now)) do
    force(id)
  end
  release_ready()
end

local function wake_hubs()
  for hub, cids in pairs(wakes) do
    local list = {}
    for cid in pairs(cids) do list[#list + 1] = cid end
    -- '@' and Redis's clock in ms first: when the events were published (delivery latency)
    redis.call('PUBLISH', P .. 'w:' .. hub, '@' .. now_ms() .. ' ' .. table.concat(list, ' '))
  end
end
"""

# ARGV: P, queue limit, order ttl, now, hold ms, m, m x (key, seq, follows), then per event:
# payload, n, channel_1 .. channel_n
_LUA_PUBLISH = """
release_overdue()
local m = tonumber(ARGV[6])
local order, events = {}, {}
for i = 7, 6 + 3 * m do order[#order + 1] = ARGV[i] end
for i = 7 + 3 * m, #ARGV do events[#events + 1] = ARGV[i] end
if ready(order) then
  deliver(order, events)
  release_ready()
else
  hold(order, events, now + tonumber(ARGV[5]))
end
wake_hubs()
return {queued, dropped}
"""

# ARGV: P, queue limit, order ttl, now
_LUA_RELEASE_HELD = """
release_overdue()
wake_hubs()
return {queued, dropped}
"""


# Live sessions (deadline after now, ms) and their client subscriptions (an option's variant,
# named with ARGV[3], is no subscription of its own), for /metrics. ARGV: P, now ms, separator.
_LUA_STATS = """
local P = ARGV[1]
local sessions = redis.call('ZRANGEBYSCORE', P .. 'exp', '(' .. ARGV[2], '+inf')
local subscriptions = 0
for _, cid in ipairs(sessions) do
  for _, channel in ipairs(redis.call('SMEMBERS', P .. 'sub:' .. cid)) do
    if not string.find(channel, ARGV[3], 1, true) then
      subscriptions = subscriptions + 1
    end
  end
end
return {#sessions, subscriptions}
"""


def _follows(after_ms: int | None, order_timeout_ms: int) -> bool:
    """Whether a batch waits for its predecessor: one numbered less than ten order timeouts
    before it may still be on its way (one numbered earlier is delivered or given up by now)."""
    return after_ms is not None and after_ms < 10 * order_timeout_ms


class RedisStore:
    """State in Redis. The async client serves the server's event loop; the sync client serves
    publishers (request threads, Celery tasks, the in-process scheduler). `clock` (seconds) times
    the hold-back of out-of-order batches, for tests; by default Redis's own clock does."""

    def __init__(
        self,
        url: str,
        prefix: str,
        queue_limit: int,
        *,
        order_timeout_ms: int = 3000,
        clock: Callable[[], float] | None = None,
    ) -> None:
        import redis
        import redis.asyncio

        self.url = url
        self.prefix = f"{prefix}:"
        self.queue_limit = queue_limit
        self.order_timeout_ms = order_timeout_ms
        self.clock = clock
        self._sync = redis.Redis.from_url(url)
        self._publish_sync = self._sync.register_script(_LUA_COMMON + _LUA_ORDER + _LUA_PUBLISH)
        self._end_user_sync = self._sync.register_script(_LUA_COMMON + _LUA_END_USER)
        self._stats_sync = self._sync.register_script(_LUA_STATS)
        self._async_clients: dict[asyncio.AbstractEventLoop, Any] = {}
        self._redis_asyncio = redis.asyncio

    # --- per event loop async client -------------------------------------------------------------

    def _client(self) -> Any:
        loop = asyncio.get_running_loop()
        entry = self._async_clients.get(loop)
        if entry is None:
            # Many sockets hold sessions at once. A burst of more calls than there are pooled
            # connections (thousands of held connects ending in the same second) waits for a
            # free connection instead of failing with MaxConnectionsError.
            pool = self._redis_asyncio.BlockingConnectionPool.from_url(
                self.url, max_connections=REDIS_POOL_SIZE, timeout=REDIS_POOL_WAIT_SECONDS
            )
            client = self._redis_asyncio.Redis(connection_pool=pool)
            scripts = {
                name: client.register_script(_LUA_COMMON + source)
                for name, source in {
                    "handshake": _LUA_HANDSHAKE,
                    "attach": _LUA_ATTACH,
                    "drain": _LUA_DRAIN,
                    "release": _LUA_RELEASE,
                    "subscribe": _LUA_SUBSCRIBE,
                    "remove": _LUA_REMOVE,
                    "sweep": _LUA_SWEEP,
                    "publish": _LUA_ORDER + _LUA_PUBLISH,
                    "release_held": _LUA_ORDER + _LUA_RELEASE_HELD,
                }.items()
            }
            entry = (client, scripts)
            for closed in [other for other in self._async_clients if other.is_closed()]:
                del self._async_clients[closed]
            self._async_clients[loop] = entry
        return entry

    async def _run(self, script: str, *args: Any) -> Any:
        _, scripts = self._client()
        return await scripts[script](args=[self.prefix, *args])

    # --- sessions --------------------------------------------------------------------------------

    async def create_session(
        self, cid: str, record: dict[str, str], *, ttl_ms: int, limit: int
    ) -> list[str]:
        fields = list(itertools.chain.from_iterable(record.items()))
        evicted = await self._run(
            "handshake", cid, ttl_ms, limit, record["family"], record["uid"], *fields
        )
        return [c.decode() for c in evicted]

    async def get_session(self, cid: str) -> dict[str, str] | None:
        client, _ = self._client()
        return _session(await client.hgetall(f"{self.prefix}s:{cid}"))

    async def remove_session(self, cid: str) -> bool:
        return bool(await self._run("remove", cid))

    def end_user_sessions(self, uid: str, families: Sequence[str]) -> list[str]:
        """Synchronous (after a commit): remove every session of user `uid` on `families`, waking
        the connects they hold, and mark each as revoked for a minute (`revoked`)."""
        ended = self._end_user_sync(args=[self.prefix, uid, *families])
        return [cid.decode() for cid in ended]

    async def revoked(self, cid: str) -> bool:
        """Whether session `cid` was ended by `end_user_sessions` in the last minute."""
        client, _ = self._client()
        return bool(await client.exists(f"{self.prefix}r:{cid}"))

    async def subscribe(
        self,
        cid: str,
        channels: Sequence[str],
        *,
        add: bool,
        ttl_ms: int = 0,
        drop: Sequence[str] = (),
    ) -> bool:
        """Add (or remove) `channels` and remove `drop` in one step; the session then lives at
        least `ttl_ms` more (a subscribe is a sign of life, and its authorization may have taken a
        while under load)."""
        changes = [("+" if add else "-") + channel for channel in channels]
        changes += ["-" + channel for channel in drop]
        return bool(await self._run("subscribe", cid, ttl_ms, *changes))

    async def subscriptions(self, cid: str) -> set[str]:
        client, _ = self._client()
        return {c.decode() for c in await client.smembers(f"{self.prefix}sub:{cid}")}

    # --- connects --------------------------------------------------------------------------------

    async def attach(
        self,
        cid: str,
        *,
        hub: str,
        token: str,
        requested_ms: int | None,
        max_hold_ms: int,
        max_interval_ms: int,
        immediate: bool,
    ) -> Attached | None:
        result = await self._run(
            "attach",
            cid,
            hub,
            token,
            "" if requested_ms is None else requested_ms,
            max_hold_ms,
            max_interval_ms,
            "1" if immediate else "0",
        )
        if result is None:
            return None
        held, events, hold, interval, timeout = result
        return Attached(bool(held), list(events), int(hold), int(interval), int(timeout))

    async def drain(self, cid: str, token: str, *, release: bool) -> tuple[int, list[bytes]]:
        state, events = await self._run("drain", cid, token, "1" if release else "0")
        return int(state), list(events)

    async def release(self, cid: str, token: str, *, ttl_ms: int | None = None) -> None:
        await self._run("release", cid, token, "" if ttl_ms is None else ttl_ms)

    async def sweep(self, batch: int = 1000) -> int:
        return int(await self._run("sweep", batch))

    # --- publishing ------------------------------------------------------------------------------

    def publish(self, prepared: Sequence[Prepared], order: Sequence[Order] = ()) -> None:
        """Synchronous: append each event to its subscribers' queues and wake their holders, or
        hold the batch back until the batches before it in `order` arrived."""
        metrics.realtime_queued(*self._publish_sync(args=self._publish_args(prepared, order)))

    async def apublish(self, prepared: Sequence[Prepared], order: Sequence[Order] = ()) -> None:
        metrics.realtime_queued(
            *await self._run("publish", *self._publish_args(prepared, order)[1:])
        )

    async def release_held(self) -> None:
        """Deliver the held-back batches whose time is up."""
        metrics.realtime_queued(*await self._run("release_held", *self._order_args()[1:]))

    def stats(self) -> tuple[int, int]:
        """(live sessions, their client subscriptions: options' variants excluded), synchronous:
        for /metrics."""
        sessions, subscriptions = self._stats_sync(
            args=[self.prefix, int(time.time() * 1000), VARIANT_SEPARATOR]
        )
        return int(sessions), int(subscriptions)

    def _order_args(self) -> list[Any]:
        now = "" if self.clock is None else int(self.clock() * 1000)
        return [self.prefix, self.queue_limit, max(1, 20 * self.order_timeout_ms), now]

    def _publish_args(self, prepared: Sequence[Prepared], order: Sequence[Order]) -> list[Any]:
        args = self._order_args()
        if self.order_timeout_ms <= 0:
            order = ()
        args.append(self.order_timeout_ms)
        args.append(len(order))
        for key, seq, after_ms in order:
            args.extend((key, seq, 1 if _follows(after_ms, self.order_timeout_ms) else 0))
        for payload, channels in prepared:
            args.append(payload)
            args.append(len(channels))
            args.extend(channels)
        return args

    # --- waking ----------------------------------------------------------------------------------

    async def listen(
        self, hub: str, wake: Waker, ready: asyncio.Event, stamp: Stamper | None = None
    ) -> None:
        """Deliver the wake-ups for `hub` until cancelled; reconnects after a Redis outage (and
        then wakes every holder, in case a wake-up was missed meanwhile). A publish's wake-up
        goes to `stamp` first with the time of the publish."""
        client, _ = self._client()
        channel = f"{self.prefix}w:{hub}"
        first = True
        while True:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # redis-py can swallow the cancel of a pending read (return, or raise another
                # error): the listener must still end, or a closing event loop waits for ever.
                raise asyncio.CancelledError
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(channel)
                if not first:
                    wake(["*"])
                first = False
                ready.set()
                while True:
                    # Not `pubsub.listen()`: a cancel can get lost inside its read, and the
                    # listener would wait for the next message for ever; a bounded read lets it
                    # look at its own cancel at least once a second.
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if task is not None and task.cancelling():
                        raise asyncio.CancelledError
                    if message is not None and message["type"] == "message":
                        cids = message["data"].decode().split()
                        if cids and cids[0].startswith("@"):
                            if stamp is not None:
                                stamp(int(cids[0][1:]) / 1000, cids[1:])
                            cids = cids[1:]
                        wake(cids)
            except asyncio.CancelledError:
                raise
            except Exception:
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError from None
                logger.warning("realtime wake-up listener lost Redis; reconnecting", exc_info=True)
                await asyncio.sleep(1)
            finally:
                with contextlib.suppress(Exception):  # the connection may already be gone
                    await pubsub.aclose()


# --- in process ---------------------------------------------------------------------------------


@dataclass
class _MemorySession:
    record: dict[str, str]
    deadline: float
    seq: int
    queue: deque[bytes] = field(default_factory=deque)
    subs: set[str] = field(default_factory=set)


@dataclass
class _Held:
    """A batch held back until the batches before it arrive (or its deadline passes)."""

    order: list[tuple[int, int, bool]]  # (key, seq, follows: waits for seq - 1)
    prepared: Sequence[Prepared]
    deadline: float


class MemoryStore:
    """The same state in this process (embedded default: one server process, no Redis). Safe to
    publish from any thread: wake-ups are handed to each hub's event loop thread-safely. `clock`
    (seconds) times sessions and the hold-back of out-of-order batches."""

    def __init__(
        self,
        queue_limit: int,
        *,
        order_timeout_ms: int = 3000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.queue_limit = queue_limit
        self.order_timeout_ms = order_timeout_ms
        self.clock = clock
        self._last: dict[int, tuple[int, float]] = {}  # key -> (last delivered seq, kept until)
        self._held: dict[int, _Held] = {}
        self._held_by_key: dict[int, dict[int, int]] = {}  # key -> {held id: its seq}
        self._held_ids = itertools.count()
        self._created = clock()
        self._lock = threading.Lock()
        self._sessions: dict[str, _MemorySession] = {}
        self._index: dict[str, set[str]] = {}
        self._wakers: dict[str, tuple[asyncio.AbstractEventLoop, Waker, Stamper | None]] = {}
        self._seq = itertools.count()
        self._ended: dict[str, tuple[str, float]] = {}  # cid -> (hold token, until)
        self._revoked: dict[str, float] = {}  # cid -> until (ended by end_user_sessions)

    def _live(self, cid: str) -> _MemorySession | None:
        session = self._sessions.get(cid)
        if session is not None and session.deadline <= self.clock():
            self._forget(cid)
            return None
        return session

    def _forget(self, cid: str) -> _MemorySession | None:
        session = self._sessions.pop(cid, None)
        if session is not None:
            for channel in session.subs:
                members = self._index.get(channel)
                if members is not None:
                    members.discard(cid)
                    if not members:
                        del self._index[channel]
        return session

    def _touch(self, session: _MemorySession, ttl_ms: int) -> None:
        session.deadline = self.clock() + ttl_ms / 1000

    def _wake(self, wakes: dict[str, list[str]], published: float | None = None) -> None:
        for hub, cids in wakes.items():
            target = self._wakers.get(hub)
            if target is None:
                continue
            loop, wake, stamp = target
            try:
                if published is not None and stamp is not None:
                    loop.call_soon_threadsafe(stamp, published, cids)
                loop.call_soon_threadsafe(wake, cids)
            except RuntimeError:  # that loop is closed
                self._wakers.pop(hub, None)

    def _remove(self, cid: str) -> dict[str, list[str]]:
        session = self._forget(cid)
        if session is None or not session.record["hold"]:
            return {}
        self._ended[cid] = (session.record["hold"], self.clock() + 60)
        return {session.record["holder"]: [cid]}

    async def create_session(
        self, cid: str, record: dict[str, str], *, ttl_ms: int, limit: int
    ) -> list[str]:
        wakes: dict[str, list[str]] = {}
        with self._lock:
            session = _MemorySession(
                record={"holder": "", "hold": "", **record}, deadline=0, seq=next(self._seq)
            )
            self._touch(session, ttl_ms)
            self._sessions[cid] = session
            mine = sorted(
                (s.seq, other)
                for other, s in list(self._sessions.items())
                if self._live(other) is not None
                and s.record["family"] == record["family"]
                and s.record["uid"] == record["uid"]
            )
            evicted = [other for _, other in mine[: max(0, len(mine) - limit)]]
            for other in evicted:
                for hub, cids in self._remove(other).items():
                    wakes.setdefault(hub, []).extend(cids)
        self._wake(wakes)
        return evicted

    async def get_session(self, cid: str) -> dict[str, str] | None:
        with self._lock:
            session = self._live(cid)
            return dict(session.record) if session is not None else None

    async def remove_session(self, cid: str) -> bool:
        with self._lock:
            existed = self._live(cid) is not None
            wakes = self._remove(cid) if existed else {}
        self._wake(wakes)
        return existed

    def end_user_sessions(self, uid: str, families: Sequence[str]) -> list[str]:
        wakes: dict[str, list[str]] = {}
        with self._lock:
            until = self.clock() + 60
            ended = [
                cid
                for cid, session in list(self._sessions.items())
                if session.record["uid"] == uid
                and session.record["family"] in families
                and self._live(cid) is not None
            ]
            for cid in ended:
                self._revoked[cid] = until
                for hub, cids in self._remove(cid).items():
                    wakes.setdefault(hub, []).extend(cids)
        self._wake(wakes)
        return ended

    async def revoked(self, cid: str) -> bool:
        with self._lock:
            until = self._revoked.get(cid)
            return until is not None and until > self.clock()

    async def subscribe(
        self,
        cid: str,
        channels: Sequence[str],
        *,
        add: bool,
        ttl_ms: int = 0,
        drop: Sequence[str] = (),
    ) -> bool:
        with self._lock:
            session = self._live(cid)
            if session is None:
                return False
            session.deadline = max(session.deadline, self.clock() + ttl_ms / 1000)
            changes = [(channel, add) for channel in channels]
            changes += [(channel, False) for channel in drop]
            for channel, adding in changes:
                if adding:
                    session.subs.add(channel)
                    self._index.setdefault(channel, set()).add(cid)
                else:
                    session.subs.discard(channel)
                    members = self._index.get(channel)
                    if members is not None:
                        members.discard(cid)
                        if not members:
                            del self._index[channel]
            return True

    async def subscriptions(self, cid: str) -> set[str]:
        with self._lock:
            session = self._live(cid)
            return set(session.subs) if session is not None else set()

    async def attach(
        self,
        cid: str,
        *,
        hub: str,
        token: str,
        requested_ms: int | None,
        max_hold_ms: int,
        max_interval_ms: int,
        immediate: bool,
    ) -> Attached | None:
        wakes: dict[str, list[str]] = {}
        with self._lock:
            session = self._live(cid)
            if session is None:
                return None
            record = session.record
            timeout, interval = int(record["timeout"]), int(record["interval"])
            hold = min(timeout if requested_ms is None else requested_ms, max_hold_ms)
            self._touch(session, hold + interval + max_interval_ms)
            immediate = immediate or hold == 0
            if not record.get("connected"):
                record["connected"] = "1"
                immediate = True
            if record["hold"] and record["holder"]:
                wakes[record["holder"]] = [cid]
            events = list(session.queue)
            if events or immediate:
                session.queue.clear()
                record["hold"] = ""
                held = False
            else:
                record["holder"], record["hold"] = hub, token
                held = True
        self._wake(wakes)
        return Attached(held, events, hold, interval, timeout)

    async def drain(self, cid: str, token: str, *, release: bool) -> tuple[int, list[bytes]]:
        with self._lock:
            session = self._live(cid)
            if session is None:
                ended = self._ended.get(cid)
                return (ENDED if ended is not None and ended[0] == token else GONE), []
            if session.record["hold"] != token:
                return SUPERSEDED, []
            events = list(session.queue)
            session.queue.clear()
            if release:
                session.record["hold"] = ""
            return HELD, events

    async def release(self, cid: str, token: str, *, ttl_ms: int | None = None) -> None:
        with self._lock:
            session = self._live(cid)
            if session is None:
                return
            hold = session.record["hold"]
            if hold == token:
                session.record["hold"] = ""
            if ttl_ms is not None and hold in (token, ""):
                self._touch(session, ttl_ms)

    async def sweep(self, batch: int = 1000) -> int:
        with self._lock:
            now = self.clock()
            due = [cid for cid, s in self._sessions.items() if s.deadline <= now][:batch]
            for cid in due:
                self._forget(cid)
            for cid in [cid for cid, (_, until) in self._ended.items() if until <= now]:
                del self._ended[cid]
            for cid in [cid for cid, until in self._revoked.items() if until <= now]:
                del self._revoked[cid]
            for key in [key for key, (_, until) in self._last.items() if until <= now]:
                del self._last[key]
            return len(due)

    def publish(self, prepared: Sequence[Prepared], order: Sequence[Order] = ()) -> None:
        wakes: dict[str, set[str]] = {}
        with self._lock:
            now = self.clock()
            touched: list[int] = []
            self._release_overdue(now, wakes, touched)
            # A predecessor numbered before this store existed went to an earlier one (the process
            # restarted): nothing to wait for.
            age_ms = (now - self._created) * 1000
            flags = [
                (
                    key,
                    seq,
                    _follows(after_ms, self.order_timeout_ms)
                    and after_ms is not None
                    and after_ms <= age_ms,
                )
                for key, seq, after_ms in (order if self.order_timeout_ms > 0 else ())
            ]
            if self._ready(flags, now):
                self._deliver(prepared, flags, now, wakes, touched)
                self._release_ready(now, wakes, touched)
            else:
                hid = next(self._held_ids)
                self._held[hid] = _Held(flags, prepared, now + self.order_timeout_ms / 1000)
                for key, seq, _ in flags:
                    self._held_by_key.setdefault(key, {})[hid] = seq
        self._wake({hub: sorted(cids) for hub, cids in wakes.items()}, time.time())

    async def apublish(self, prepared: Sequence[Prepared], order: Sequence[Order] = ()) -> None:
        self.publish(prepared, order)

    async def release_held(self) -> None:
        """Deliver the held-back batches whose time is up."""
        wakes: dict[str, set[str]] = {}
        with self._lock:
            self._release_overdue(self.clock(), wakes, [])
        self._wake({hub: sorted(cids) for hub, cids in wakes.items()}, time.time())

    # --- commit order (the module docstring; the same steps as _LUA_ORDER) ----------------------

    def stats(self) -> tuple[int, int]:
        """(live sessions, their client subscriptions: options' variants excluded): for /metrics."""
        with self._lock:
            now = self.clock()
            live = [s for s in self._sessions.values() if s.deadline > now]
            return len(live), sum(
                1 for session in live for channel in session.subs if not is_variant(channel)
            )

    def _enqueue(self, prepared: Sequence[Prepared], wakes: dict[str, set[str]]) -> None:
        queued = dropped = 0
        for payload, channels in prepared:
            targets: set[str] = set()
            for channel in channels:
                targets.update(self._index.get(channel, ()))
            for cid in targets:
                session = self._live(cid)
                if session is None:
                    continue
                session.queue.append(payload)
                queued += 1
                while len(session.queue) > self.queue_limit:
                    session.queue.popleft()
                    dropped += 1
                if session.record["hold"]:
                    wakes.setdefault(session.record["holder"], set()).add(cid)
        metrics.realtime_queued(queued, dropped)

    def _first_held(self, key: int) -> tuple[int, int] | None:
        """(held id, seq) of the lowest-numbered batch held for `key`."""
        held = self._held_by_key.get(key)
        if not held:
            return None
        hid = min(held, key=lambda h: (held[h], h))
        return hid, held[hid]

    def _ready(self, flags: list[tuple[int, int, bool]], now: float) -> bool:
        for key, seq, follows in flags:
            first = self._first_held(key)
            if first is not None and first[1] < seq:
                return False
            if follows:
                last = self._last.get(key)
                if last is None or last[1] <= now or last[0] < seq - 1:
                    return False
        return True

    def _deliver(
        self,
        prepared: Sequence[Prepared],
        flags: list[tuple[int, int, bool]],
        now: float,
        wakes: dict[str, set[str]],
        touched: list[int],
    ) -> None:
        self._enqueue(prepared, wakes)
        until = now + 20 * self.order_timeout_ms / 1000
        for key, seq, _ in flags:
            last = self._last.get(key)
            kept = last[0] if last is not None and last[1] > now else seq
            self._last[key] = (max(kept, seq), until)
            touched.append(key)

    def _unhold(self, hid: int) -> _Held:
        batch = self._held.pop(hid)
        for key, _, _ in batch.order:
            held = self._held_by_key[key]
            del held[hid]
            if not held:
                del self._held_by_key[key]
        return batch

    def _release_ready(self, now: float, wakes: dict[str, set[str]], touched: list[int]) -> None:
        """Deliver the held batches that are ready now, following the keys whose number moved."""
        i = 0
        while i < len(touched):
            first = self._first_held(touched[i])
            if first is not None and self._ready(self._held[first[0]].order, now):
                batch = self._unhold(first[0])
                self._deliver(batch.prepared, batch.order, now, wakes, touched)
            else:
                i += 1

    def _force(self, hid: int, now: float, wakes: dict[str, set[str]], touched: list[int]) -> None:
        """Deliver held batch `hid` now, after the held batches before it for its keys."""
        stack, on_stack = [hid], {hid}
        while stack:
            top = self._held.get(stack[-1])
            if top is None:
                stack.pop()
                continue
            before = next(
                (
                    first[0]
                    for key, seq, _ in top.order
                    if (first := self._first_held(key)) is not None
                    and first[1] < seq
                    and first[0] not in on_stack
                ),
                None,
            )
            if before is not None:
                stack.append(before)
                on_stack.add(before)
            else:
                batch = self._unhold(stack.pop())
                self._deliver(batch.prepared, batch.order, now, wakes, touched)

    def _release_overdue(self, now: float, wakes: dict[str, set[str]], touched: list[int]) -> None:
        if not self._held:
            return
        for _, hid in sorted(
            (b.deadline, hid) for hid, b in self._held.items() if b.deadline <= now
        ):
            self._force(hid, now, wakes, touched)
        self._release_ready(now, wakes, touched)

    async def listen(
        self, hub: str, wake: Waker, ready: asyncio.Event, stamp: Stamper | None = None
    ) -> None:
        self._wakers[hub] = (asyncio.get_running_loop(), wake, stamp)
        ready.set()
        try:
            await asyncio.Event().wait()  # until cancelled
        finally:
            self._wakers.pop(hub, None)


Store = RedisStore | MemoryStore
