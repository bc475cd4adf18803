"""Which Bayeux channels exist, on which endpoint family, and who may subscribe (realtime.md §1,
auth.md §7). The apps register their channels in `AppConfig.ready()`; this package names no app."""

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


_rules: dict[tuple[Family, str], ChannelRule] = {}


def register(family: Family, pattern: str, authorize: Authorize) -> None:
    """Make channels matching `pattern` (a full-match regex) subscribable on `family`."""
    _rules[(family, pattern)] = ChannelRule(family, re.compile(pattern), authorize)


def canonical(channel: str) -> str:
    """`/operations/**` is treated as `/operations/*` (realtime.md §4.3)."""
    return channel[:-1] if channel.endswith("/**") else channel


def rule_for(family: Family, channel: str) -> tuple[ChannelRule, re.Match[str]] | None:
    for rule in _rules.values():
        if rule.family == family and (match := rule.pattern.fullmatch(channel)):
            return rule, match
    return None


def subscriptions_matching(channel: str) -> list[str]:
    """The subscriptions an event on `channel` goes to: the channel and its one-segment wildcard
    (`/operations/4712` -> also `/operations/*`; `/4711` -> itself only)."""
    head = channel.rpartition("/")[0]
    return [channel, f"{head}/*"] if head else [channel]
