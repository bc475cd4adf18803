"""What a simulated device does for each operation fragment it supports, the way real agents report
it: the device's own managed object reflects the new state (firmware, software list,
configuration, restart count) and the operation carries the result (`c8y_Command.result`).

A handler gets the operation's fragment value and the target device, changes the device through the
API and returns the fragments to write into the operation with its SUCCESSFUL status. A payload it
cannot act on raises `Refused`: the operation then ends FAILED with that reason."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

AGENT_OPERATIONS = [
    "c8y_Restart",
    "c8y_Firmware",
    "c8y_Command",
    "c8y_SoftwareUpdate",
    "c8y_Configuration",
]
CHILD_OPERATIONS = ["c8y_Restart", "c8y_Firmware", "c8y_Configuration"]
RESTART_COUNT = "c8y_RestartCount"


class Refused(Exception):
    """The operation cannot be carried out; the message is its failureReason."""


class Device(Protocol):
    """A simulated device's managed object, as its agent may change it."""

    id: str
    serial: str

    async def put(self, fragments: dict[str, Any]) -> None:
        """Replace these fragments of the managed object."""

    async def modify(self, change: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        """Read the managed object, PUT the fragments `change(object)` returns, and do it again if
        someone else changed the object in between (If-Match)."""


Handler = Callable[[Any, Device], Awaitable[dict[str, Any]]]


async def restart(value: Any, device: Device) -> dict[str, Any]:
    def bump(current: dict[str, Any]) -> dict[str, Any]:
        count = current.get(RESTART_COUNT)
        return {RESTART_COUNT: (count if isinstance(count, int) else 0) + 1}

    await device.modify(bump)
    return {}


async def firmware(value: Any, device: Device) -> dict[str, Any]:
    if not isinstance(value, dict) or not value.get("name") or not value.get("version"):
        raise Refused("c8y_Firmware needs a name and a version")
    installed = {key: value[key] for key in ("name", "version", "url") if key in value}
    await device.put({"c8y_Firmware": installed})
    return {}


async def command(value: Any, device: Device) -> dict[str, Any]:
    if not isinstance(value, dict) or not isinstance(value.get("text"), str):
        raise Refused("c8y_Command needs a text")
    text = value["text"]
    result = f"{device.serial}$ {text}\n(simulated) command executed"
    return {"c8y_Command": {**value, "result": result}}


async def software_update(value: Any, device: Device) -> dict[str, Any]:
    """`c8y_SoftwareUpdate`: a list of `{name, version, url, action}`; `action` is `install`
    (the default) or `delete`. The device's `c8y_SoftwareList` is changed accordingly."""
    if not isinstance(value, list) or not all(
        isinstance(item, dict) and isinstance(item.get("name"), str) and item["name"]
        for item in value
    ):
        raise Refused("c8y_SoftwareUpdate needs a list of software items, each with a name")
    actions = {item.get("action", "install") for item in value}
    if not actions <= {"install", "delete"}:
        raise Refused(f"Unknown software action: {', '.join(sorted(map(str, actions)))}")

    def apply(current: dict[str, Any]) -> dict[str, Any]:
        installed = current.get("c8y_SoftwareList")
        software = {
            item["name"]: item
            for item in (installed if isinstance(installed, list) else [])
            if isinstance(item, dict) and isinstance(item.get("name"), str)
        }
        for item in value:
            if item.get("action", "install") == "delete":
                software.pop(item["name"], None)
            else:
                software[item["name"]] = {
                    key: item[key] for key in ("name", "version", "url") if key in item
                }
        return {"c8y_SoftwareList": sorted(software.values(), key=lambda item: item["name"])}

    await device.modify(apply)
    return {}


async def configuration(value: Any, device: Device) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise Refused('c8y_Configuration needs an object, e.g. {"config": "..."}')
    await device.put({"c8y_Configuration": value})
    return {}


HANDLERS: dict[str, Handler] = {
    "c8y_Restart": restart,
    "c8y_Firmware": firmware,
    "c8y_Command": command,
    "c8y_SoftwareUpdate": software_update,
    "c8y_Configuration": configuration,
}
