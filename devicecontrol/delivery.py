"""Delivery of operations by SMS (devicecontrol.md §9) through a pluggable backend.

An operation is SMS-delivered when its body says `"deliveryType": "SMS"` or its device has
`"c8y_CommunicationMode": {"mode": "SMS"}`. The service records `deliveryType: "SMS"` on the operation
and, after commit, hands it to the backend named by the OPERATION_SMS_BACKEND setting.

A backend is any class with `send(self, operation: dict) -> None`, where `operation` is the operation's
JSON (relative `self` URL) plus `deviceId`; it is built once per process without arguments. It runs
after the commit, outside the request's transaction: it must not raise for delivery failures it can
retry itself, and it should be quick (hand off to a queue for slow gateways)."""

from __future__ import annotations

import logging
from functools import cache
from typing import Any, Protocol

from django.conf import settings
from django.utils.module_loading import import_string

logger = logging.getLogger(__name__)


class SmsBackend(Protocol):
    def send(self, operation: dict[str, Any]) -> None: ...


class LoggingSmsBackend:
    """The default: no SMS gateway, the hand-off is logged."""

    def send(self, operation: dict[str, Any]) -> None:
        logger.info(
            "SMS delivery of operation %s to device %s", operation["id"], operation["deviceId"]
        )


@cache
def sms_backend() -> SmsBackend:
    return import_string(settings.OPERATION_SMS_BACKEND)()


def is_sms(*, fragments: dict[str, Any], device_fragments: dict[str, Any]) -> bool:
    mode = device_fragments.get("c8y_CommunicationMode")
    return fragments.get("deliveryType") == "SMS" or (
        isinstance(mode, dict) and mode.get("mode") == "SMS"
    )


def deliver_by_sms(operation: dict[str, Any]) -> None:
    try:
        sms_backend().send(operation)
    except Exception:  # the operation is committed; a gateway failure must not surface as a 500
        logger.exception("SMS backend failed for operation %s", operation.get("id"))
