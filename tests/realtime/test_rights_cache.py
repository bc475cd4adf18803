"""The per-process cache of subscription verdicts (deviceplatform/realtime/rights.py): a verdict
never outlives REALTIME_RIGHTS_CACHE_SECONDS, and verdicts taken together do not all go stale in
the same instant (a thousand subscribers after a restart would otherwise be checked again at once,
delaying every delivery behind the checks)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from channels.db import database_sync_to_async

from deviceplatform.realtime import rights
from deviceplatform.realtime.rights import RightsCache, rights_cache
from deviceplatform.roles import Role
from tests.realtime.bayeux import LpBayeux, World, create_operation, event_ids


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_verdicts_taken_together_go_stale_spread_over_the_second_half(settings: Any) -> None:
    settings.REALTIME_RIGHTS_CACHE_SECONDS = 60.0
    clock = Clock()
    cache = RightsCache(clock=clock)
    sessions = [f"c{i}" for i in range(200)]
    for cid in sessions:
        cache.put(cid, "/operations/1", epoch=7, allowed=True)

    def fresh() -> int:
        return sum(cache.get(cid, "/operations/1", 7) is True for cid in sessions)

    assert fresh() == 200
    clock.now += 29.9  # under half the lifetime: every verdict holds
    assert fresh() == 200
    clock.now += 15.0  # three quarters: some have gone stale, not all
    assert 0 < fresh() < 200
    clock.now += 15.1  # the whole lifetime: none is trusted any longer
    assert fresh() == 0


def test_a_verdict_of_another_epoch_or_with_the_cache_off_is_unknown(settings: Any) -> None:
    settings.REALTIME_RIGHTS_CACHE_SECONDS = 60.0
    cache = RightsCache(clock=Clock())
    cache.put("c1", "/operations/1", epoch=1, allowed=False)
    assert cache.get("c1", "/operations/1", 1) is False
    assert cache.get("c1", "/operations/1", 2) is None
    settings.REALTIME_RIGHTS_CACHE_SECONDS = 0
    cache.put("c2", "/operations/1", epoch=1, allowed=True)
    assert cache.get("c2", "/operations/1", 1) is None


def test_a_verdict_in_its_last_quarter_is_due_for_one_background_check(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.REALTIME_RIGHTS_CACHE_SECONDS = 60.0
    monkeypatch.setattr(rights.random, "uniform", lambda low, high: 0.0)  # no spreading here
    clock = Clock()
    cache = RightsCache(clock=clock)
    cache.put("c1", "/operations/1", epoch=1, allowed=True)
    clock.now += 44.0
    assert not cache.due("c1", "/operations/1", 1)
    clock.now += 2.0  # 46 s: in the last quarter, still trusted
    assert cache.get("c1", "/operations/1", 1) is True
    assert not cache.due("c1", "/operations/1", 2)  # another epoch: not this verdict
    assert cache.due("c1", "/operations/1", 1)
    assert not cache.due("c1", "/operations/1", 1)  # claimed: one check at a time
    cache.refreshed("c1", "/operations/1")
    assert cache.due("c1", "/operations/1", 1)
    cache.put("c1", "/operations/1", epoch=1, allowed=False)
    cache.refreshed("c1", "/operations/1")
    assert cache.get("c1", "/operations/1", 1) is False
    assert not cache.due("c1", "/operations/1", 1)


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_an_ageing_verdict_is_checked_again_behind_the_delivery(
    world: World,
    make_user: Callable[..., Any],
    settings: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In its last quarter a verdict still lets the event through, and a check runs in the
    background: a role taken away meanwhile ends the subscription at the next delivery, before
    the verdict's life is up (and no delivery waited for the check)."""
    settings.AUTH_ROLES_CACHE_SECONDS = 0
    monkeypatch.setattr(rights.random, "uniform", lambda low, high: 0.0)
    lp = LpBayeux()
    await lp.start("reader", "/operations/*")
    first = await create_operation(world.other)
    assert event_ids(await lp.connect_now()) == [first]
    await database_sync_to_async(make_user)("reader", roles=[Role.INVENTORY_READ])
    ageing = rights_cache._clock() + 0.8 * settings.REALTIME_RIGHTS_CACHE_SECONDS
    monkeypatch.setattr(rights_cache, "_clock", lambda: ageing)
    trusted = await create_operation(world.other)
    delivered = event_ids(await lp.connect_now())
    for _ in range(100):  # the background check answers
        if not rights_cache._refreshing:
            break
        await asyncio.sleep(0.05)
    await create_operation(world.other)
    after_check = event_ids(await lp.connect_now())

    assert delivered == [trusted]
    assert after_check == []
