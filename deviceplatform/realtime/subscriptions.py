"""Which Bayeux channels exist, on which endpoint family, and who may subscribe (realtime.md §1,
auth.md §7). The apps register their channels in `AppConfig.ready()`; this package names no app.

**Options.** A channel may offer options a subscriber opts in to with its `/meta/subscribe`
(`"ext": {"com.deviceplatform": {"<option>": true}}`, protocol.py): events meant only for such
subscribers (`RealtimeEvent.option`) go to the subscription `variant(channel, option)`, which the
session holds beside the channel itself. A variant is no channel a client can name (no rule
matches it), so a client that sends no option gets exactly the channel's standard events."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class Family(StrEnum):
    REALTIME = "realtime"  # /notification/realtime, /cep/realtime
    AGENT = "agent"  # /notification/operations, /devicecontrol/notifications


Authorize = Callable[[Any, re.Match[str]], bool]


@dataclass(frozen=True)
class ChannelRule:
    family: Family
    pattern: re.Pattern[str]
    authorize: Authorize  # (user with roles, match) -> allowed; runs in a thread, may query
    options: frozenset[str] = frozenset()  # what a subscriber may opt in to (see above)


_rules: dict[tuple[Family, str], ChannelRule] = {}


def register(
    family: Family, pattern: str, authorize: Authorize, *, options: frozenset[str] = frozenset()
) -> None:
    """Make channels matching `pattern` (a full-match regex) subscribable on `family`, with
    `options` a subscriber may opt in to."""
    _rules[(family, pattern)] = ChannelRule(family, re.compile(pattern), authorize, options)


# Joins a channel and an option into a variant: no registered pattern matches a name with it.
VARIANT_SEPARATOR = "#"


def variant(channel: str, option: str) -> str:
    """The subscription that receives `channel`'s events for subscribers who opted in to `option`
    (`/4711` -> `/4711#cancelRequests`)."""
    return f"{channel}{VARIANT_SEPARATOR}{option}"


def is_variant(subscription: str) -> bool:
    """Whether `subscription` is an option's variant (held for the channel a client subscribed
    to, not a subscription of its own)."""
    return VARIANT_SEPARATOR in subscription


def variants(channel: str) -> list[str]:
    """Every variant of `channel` its rules offer (whatever the family): what ends with it."""
    return sorted(
        variant(channel, option)
        for rule in _rules.values()
        if rule.options and rule.pattern.fullmatch(channel)
        for option in rule.options
    )


def canonical(channel: str) -> str:
    """`/operations/**` is treated as `/operations/*` (realtime.md §4.3)."""
    return channel[:-1] if channel.endswith("/**") else channel


def rule_for(family: Family, channel: str) -> tuple[ChannelRule, re.Match[str]] | None:
    for rule in _rules.values():
        if rule.family == family and (match := rule.pattern.fullmatch(channel)):
            return rule, match
    return None


def subscriptions_matching(channel: str, option: str | None = None) -> list[str]:
    """The subscriptions an event on `channel` goes to: the channel and its one-segment wildcard
    (`/operations/4712` -> also `/operations/*`; `/4711` -> itself only); with `option`, their
    variants for it only."""
    head = channel.rpartition("/")[0]
    matching = [channel, f"{head}/*"] if head else [channel]
    return matching if option is None else [variant(each, option) for each in matching]
