"""One simulated agent: onboarding (or the credentials it kept), its managed object and child devices
(found again by external ID after a restart), membership of the fleet's group, a CometD
subscription to its operations and their execution.

Operations arrive on the agent channel `/{agentId}` of `/notification/operations`, which carries
every new operation routed to the agent (its own and its child devices'). Nothing is replayed to a
new subscriber, so after every successful (re)subscription the agent also lists its PENDING
operations; on its first start it also finishes the EXECUTING ones a previous run left behind.
Each operation is taken with a conditional PUT (read, then `If-Match`): one that is no longer
PENDING when it arrives is skipped.

A cancel request (README "Cancel that reaches the device") comes as the EXECUTING operation with
`c8y_CancelRequested`, on the same agent channel: the agent asks for them on its subscription
(`"ext": {"com.deviceplatform": {"cancelRequests": true}}`; a plain Cumulocity agent, which sends
none, gets new operations only). It also sees them when it lists its EXECUTING operations after
each (re)subscription. An operation still in its simulated work stops
and ends FAILED "Cancelled on request"; one whose handler is already changing the device
finishes (as a real device past the point of no return would)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from aiocometd_ng import Client
from aiocometd_ng.constants import TransportState
from aiocometd_ng.extensions import Extension

from simulator.api import ApiError, Login, Response, Unreachable, backoff
from simulator.handlers import AGENT_OPERATIONS, CHILD_OPERATIONS, HANDLERS, Refused
from simulator.onboarding import obtain_credentials

if TYPE_CHECKING:
    from simulator.fleet import Fleet

SERIAL_TYPE = "c8y_Serial"
AGENT_TYPE = "c8y_SimulatedAgent"
CHILD_TYPE = "c8y_SimulatedDevice"
AGENT_ENDPOINT = "/notification/operations"
MODIFY_ATTEMPTS = 10  # conditional PUTs of one read-modify-write before giving up
CANCEL_REQUESTED = "c8y_CancelRequested"
CANCELLED_ON_REQUEST = "Cancelled on request"
OPTIONS_EXT = "com.deviceplatform"  # the server's options on a subscription (README)


class StaleLogin(Exception):
    def __init__(self, response: Response) -> None:
        super().__init__(response.describe())
        self.response = response


class CometD(Client):
    _HTTP_SESSION_CLOSE_TIMEOUT = 0  # the library's grace period is for TLS shutdowns

    async def _wait_connection_timeout(self, timeout: float) -> None:
        """The library's own version passes `loop=` to `asyncio.wait_for`, which Python 3.10
        removed: it failed at once (a TypeError logged as never retrieved), so any network
        hiccup ended the client. This one lets the transport retry for `connection_timeout`
        seconds, as documented, before `receive()` raises TransportTimeoutError."""
        assert self._transport is not None
        while True:
            await self._transport.wait_for_state(TransportState.CONNECTING)
            try:
                await asyncio.wait_for(
                    self._transport.wait_for_state(TransportState.CONNECTED), timeout
                )
            except TimeoutError:
                return


class CumulocityAuth(Extension):
    """The device's credentials in the handshake, as Cumulocity's CometD clients send them."""

    def __init__(self, login: Login) -> None:
        self.token = base64.b64encode(f"{login.login}:{login.password}".encode()).decode()

    async def outgoing(self, payload: list[dict[str, Any]], headers: dict[str, str]) -> None:
        for message in payload:
            if message.get("channel") == "/meta/handshake":
                message.setdefault("ext", {})["com.cumulocity.authn"] = {"token": self.token}

    async def incoming(self, payload: Any, headers: Any = None) -> None:
        return None


class CancelRequests(Extension):
    """Opts in to cancel requests on every `/meta/subscribe` (also the ones the client repeats by
    itself after a new handshake)."""

    async def outgoing(self, payload: list[dict[str, Any]], headers: dict[str, str]) -> None:
        for message in payload:
            if message.get("channel") == "/meta/subscribe":
                message.setdefault("ext", {})[OPTIONS_EXT] = {"cancelRequests": True}

    async def incoming(self, payload: Any, headers: Any = None) -> None:
        return None


class Subscribed(Extension):
    """Calls `on_subscribed` for every successful `/meta/subscribe` reply: the first one, and the
    ones of the re-subscriptions the client sends by itself after a new handshake."""

    def __init__(self, on_subscribed: Callable[[], None]) -> None:
        self.on_subscribed = on_subscribed

    async def outgoing(self, payload: Any, headers: Any) -> None:
        return None

    async def incoming(self, payload: Any, headers: Any = None) -> None:
        for message in payload or []:
            if message.get("channel") == "/meta/subscribe" and message.get("successful"):
                self.on_subscribed()


class SimulatedDevice:
    """A managed object the agent simulates (itself or a child device)."""

    def __init__(self, agent: Agent, device_id: str, serial: str, supported: list[str]) -> None:
        self.agent = agent
        self.id = device_id
        self.serial = serial
        self.supported = supported

    @property
    def path(self) -> str:
        return f"/inventory/managedObjects/{self.id}"

    async def put(self, fragments: dict[str, Any]) -> None:
        await self.agent.api.expect("PUT", self.path, self.agent.login, fragments, ok=(200,))

    async def modify(self, change: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        api, login = self.agent.api, self.agent.login
        for _ in range(MODIFY_ATTEMPTS):
            current = await api.expect("GET", self.path, login, ok=(200,))
            headers = {"If-Match": current.etag} if current.etag else None
            answer = await api.call("PUT", self.path, login, change(current.body), headers=headers)
            if answer.status == 200:
                return
            if answer.status != 412:  # 412: changed since read; read again
                raise ApiError(answer)
        raise Refused(f"Device {self.id} kept changing; gave up after {MODIFY_ATTEMPTS} attempts")


class Agent:
    def __init__(self, fleet: Fleet, index: int) -> None:
        self.fleet = fleet
        self.api = fleet.api
        self.config = fleet.config
        self.serial = f"{self.config.prefix}-{index:04d}"
        self.record = fleet.state.agent(self.serial)
        self.login: Login | None = None
        self.agent_id: str | None = None
        self.devices: dict[str, SimulatedDevice] = {}
        self.active: set[str] = set()  # operations being executed
        # Set when a cancel request for an active operation arrives (until its work starts).
        self.cancel_requests: dict[str, asyncio.Event] = {}
        self.operations: set[asyncio.Task[None]] = set()
        self.resync = asyncio.Event()
        self.resumed = False  # the EXECUTING operations of an earlier run were picked up

    def __str__(self) -> str:
        return f"agent {self.serial}"

    # --- set-up -------------------------------------------------------------------------------

    async def prepare(self) -> None:
        """Credentials, devices and group membership, retried until they work (or a fatal error)."""
        attempt = 0
        while True:
            try:
                await self._prepare()
                return
            except (ApiError, Unreachable, Refused) as exc:
                self.fleet.error(self, f"setting up: {exc}")
            except (KeyError, TypeError, AttributeError) as exc:  # an answer of an unexpected shape
                self.fleet.error(self, f"setting up: unexpected answer ({exc!r})")
            await asyncio.sleep(backoff(attempt, base=2.0, cap=60.0))
            attempt += 1

    async def _prepare(self) -> None:
        from_state = self._stored_login()
        if not from_state:
            await self._onboard()
        try:
            agent_id = await self._find_agent()
        except StaleLogin as exc:
            if not from_state:
                raise ApiError(exc.response) from exc
            await self._onboard()  # stored credentials of a platform since reset: start afresh
            agent_id = await self._find_agent()
        if agent_id is None:
            agent_id = await self._create_agent()
        self.agent_id = agent_id
        self.record["agentId"] = agent_id
        self.devices = {agent_id: SimulatedDevice(self, agent_id, self.serial, AGENT_OPERATIONS)}
        await self._ensure_children()
        await self.api.expect(
            "POST",
            f"/inventory/managedObjects/{self.fleet.group_id}/childAssets",
            self.fleet.admin,
            {"references": [{"managedObject": {"id": key}} for key in self.devices]},
            ok=(201,),
        )
        self.fleet.state.changed()

    def _stored_login(self) -> bool:
        try:
            username, password = self.record["username"], self.record["password"]
            tenant = self.record["tenantId"]
        except KeyError:
            return False
        self.login = Login(f"{tenant}/{username}", password)
        return True

    async def _onboard(self) -> None:
        credentials = await obtain_credentials(
            self.api, self.fleet.admin, self.fleet.bootstrap_login(), self.serial
        )
        self.record.clear()
        self.record.update(credentials)
        self.fleet.state.changed()
        self.fleet.state.save()  # the password is shown once: keep it before anything else
        self._stored_login()

    async def _find_agent(self) -> str | None:
        """The agent's managed object by its external ID, or None. The first request with the
        credentials: a 401 raises `StaleLogin`."""
        path = f"/identity/externalIds/{SERIAL_TYPE}/{quote(self.serial, safe='')}"
        found = await self.api.call("GET", path, self.login)
        if found.status == 401:
            raise StaleLogin(found)
        if found.status == 200:
            return str(found.body["managedObject"]["id"])
        if found.status != 404:
            raise ApiError(found)
        # Created by a run that stopped before binding the external ID: find it by its hardware.
        mine = await self.api.pages(
            "/inventory/managedObjects",
            self.login,  # type: ignore[arg-type]
            "managedObjects",
            {"type": AGENT_TYPE, "withChildren": "false"},
        )
        for candidate in mine:
            if hardware_serial(candidate) == self.serial:
                await self._bind_serial(str(candidate["id"]), self.serial)
                return str(candidate["id"])
        return None

    async def _create_agent(self) -> str:
        created = await self.api.expect(
            "POST",
            "/inventory/managedObjects",
            self.login,
            {
                "name": f"Simulated agent {self.serial}",
                "type": AGENT_TYPE,
                "c8y_IsDevice": {},
                "com_cumulocity_model_Agent": {},
                "c8y_SupportedOperations": AGENT_OPERATIONS,
                "c8y_Hardware": {
                    "serialNumber": self.serial,
                    "model": "SimAgent 1000",
                    "revision": "A1",
                },
                "c8y_Firmware": {"name": "simagent-firmware", "version": "1.0.0"},
            },
            ok=(201,),
        )
        agent_id = str(created.body["id"])
        await self._bind_serial(agent_id, self.serial)
        return agent_id

    async def _bind_serial(self, device_id: str, serial: str) -> None:
        await self.api.expect(
            "POST",
            f"/identity/globalIds/{device_id}/externalIds",
            self.login,
            {"type": SERIAL_TYPE, "externalId": serial},
            ok=(201,),
        )

    async def _ensure_children(self) -> None:
        """Child devices `<serial>-cNN`, found among the agent's child devices by their hardware
        serial (no duplicates after a restart), created with their external ID when missing.
        Children of an earlier run with a larger --children stay simulated."""
        assert self.agent_id is not None
        children_path = f"/inventory/managedObjects/{self.agent_id}/childDevices"
        existing = await self.api.pages(
            children_path,
            self.login,
            "references",
            {"withChildren": "false"},  # type: ignore[arg-type]
        )
        known: dict[str, str] = self.record.setdefault("children", {})
        by_serial = {}
        for reference in existing:
            device = reference.get("managedObject", {})
            serial = hardware_serial(device)
            if serial:
                by_serial[serial] = str(device["id"])
        wanted = [f"{self.serial}-c{number:02d}" for number in range(1, self.config.children + 1)]
        for serial in wanted:
            if serial in by_serial:
                if known.get(serial) != by_serial[serial]:
                    # Found but never recorded: its external ID may be missing.
                    await self._bind_serial(by_serial[serial], serial)
                    known[serial] = by_serial[serial]
                continue
            created = await self.api.expect(
                "POST",
                children_path,
                self.login,
                {
                    "name": f"Simulated device {serial}",
                    "type": CHILD_TYPE,
                    "c8y_IsDevice": {},
                    "c8y_SupportedOperations": CHILD_OPERATIONS,
                    "c8y_Hardware": {"serialNumber": serial, "model": "SimSensor", "revision": "2"},
                    "c8y_Firmware": {"name": "simsensor-firmware", "version": "1.0.0"},
                },
                ok=(201,),
            )
            child_id = str(created.body["managedObject"]["id"])
            await self._bind_serial(child_id, serial)
            by_serial[serial] = known[serial] = child_id
            self.fleet.state.changed()
        for serial, child_id in by_serial.items():
            self.devices[child_id] = SimulatedDevice(self, child_id, serial, CHILD_OPERATIONS)

    # --- realtime -----------------------------------------------------------------------------

    async def listen(self) -> None:
        """Subscribe to the agent channel and dispatch what arrives, for ever: a lost connection
        (a platform restart, a network drop) is opened again with back-off and followed by a
        fresh look at the PENDING operations."""
        assert self.login is not None
        syncing = asyncio.create_task(self._sync())
        attempt = 0
        try:
            while True:
                client = CometD(
                    self.config.url + AGENT_ENDPOINT,
                    self.config.transport,
                    extensions=[
                        CumulocityAuth(self.login),
                        CancelRequests(),
                        Subscribed(self.resync.set),
                    ],
                )
                connected = False
                try:
                    await client.open()
                    await client.subscribe(f"/{self.agent_id}")
                    connected = True
                    self.fleet.stats.connected += 1
                    attempt = 0
                    async for message in client:
                        operation = message.get("data")
                        if isinstance(operation, dict) and "id" in operation:
                            self.dispatch(operation)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - any failure of the connection: reconnect
                    self.fleet.connection_lost(self, exc, connected)
                finally:
                    if connected:
                        self.fleet.stats.connected -= 1
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(client.close(), 5)
                await asyncio.sleep(backoff(attempt, base=1.0, cap=10.0))
                attempt += 1
        finally:
            syncing.cancel()

    async def _sync(self) -> None:
        """After each subscription: the EXECUTING operations of an earlier run (first time only),
        then every PENDING one."""
        attempt = 0
        while True:
            await self.resync.wait()
            self.resync.clear()
            try:
                # Every time: cancel requests sent while the subscription was down show here.
                for operation in await self._operations("EXECUTING"):
                    self.dispatch(operation, resume=not self.resumed)
                self.resumed = True
                for operation in await self._operations("PENDING"):
                    self.dispatch(operation)
                attempt = 0
            except (ApiError, Unreachable) as exc:
                self.fleet.error(self, f"listing its operations: {exc}")
                await asyncio.sleep(backoff(attempt, base=1.0, cap=30.0))
                attempt += 1
                self.resync.set()

    async def _operations(self, status: str) -> list[dict[str, Any]]:
        return await self.api.pages(
            "/devicecontrol/operations",
            self.login,  # type: ignore[arg-type]
            "operations",
            {"agentId": str(self.agent_id), "status": status},
        )

    # --- operations ---------------------------------------------------------------------------

    def dispatch(self, operation: dict[str, Any], *, resume: bool = False) -> None:
        if self.fleet.stopping:
            return
        operation_id = str(operation["id"])
        cancel = operation.get("status") == "EXECUTING" and CANCEL_REQUESTED in operation
        if operation_id in self.active:
            if cancel and operation_id in self.cancel_requests:
                self.cancel_requests[operation_id].set()
            return
        if operation.get("status") == "EXECUTING" and not resume:
            return  # a cancel request for an operation this run is not working on
        self.active.add(operation_id)
        self.cancel_requests[operation_id] = asyncio.Event()
        if cancel:
            self.cancel_requests[operation_id].set()
        self.fleet.stats.received += 1
        task = asyncio.create_task(self._execute(operation_id, operation, resume))
        self.operations.add(task)
        task.add_done_callback(self.operations.discard)

    async def _execute(self, operation_id: str, operation: dict[str, Any], resume: bool) -> None:
        path = f"/devicecontrol/operations/{operation_id}"
        cancel = self.cancel_requests[operation_id]
        try:
            if not resume and not await self._take(path):
                self.fleet.stats.skipped += 1
                return
            delay = self.config.delay * random.uniform(0.5, 1.5)  # noqa: S311 - simulated timing
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(cancel.wait(), delay)
            del self.cancel_requests[operation_id]  # past this point the work is done anyway
            if cancel.is_set():
                status, fragments = failed(CANCELLED_ON_REQUEST)
            else:
                status, fragments = await self._perform(operation)
            await self.api.expect(
                "PUT", path, self.login, {"status": status, **fragments}, ok=(200,)
            )
            self.fleet.stats.finished(successful=status == "SUCCESSFUL")
        except (ApiError, Unreachable) as exc:
            self.fleet.error(self, f"operation {operation_id}: {exc}")
        except (KeyError, TypeError, AttributeError) as exc:  # an answer of an unexpected shape
            self.fleet.error(self, f"operation {operation_id}: unexpected answer ({exc!r})")
        finally:
            self.active.discard(operation_id)
            self.cancel_requests.pop(operation_id, None)

    async def _take(self, path: str) -> bool:
        """PENDING -> EXECUTING unless someone else moved it first (conditional on what was read)."""
        for _ in range(MODIFY_ATTEMPTS):
            current = await self.api.expect("GET", path, self.login, ok=(200, 404))
            if current.status == 404 or current.body.get("status") != "PENDING":
                return False
            headers = {"If-Match": current.etag} if current.etag else None
            answer = await self.api.call(
                "PUT", path, self.login, {"status": "EXECUTING"}, headers=headers
            )
            if answer.status == 200:
                return True
            if answer.status != 412:
                raise ApiError(answer)
        return False

    async def _perform(self, operation: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """The final status and the fragments to write with it."""
        device = self.devices.get(str(operation.get("deviceId")))
        if device is None:
            return failed(f"Unsupported operation: device {operation.get('deviceId')} is unknown")
        names = [name for name in device.supported if name in operation]
        if not names:
            return failed(
                f"Unsupported operation: {device.serial} supports {', '.join(device.supported)}"
            )
        if random.random() < self.config.failure_rate:  # noqa: S311 - simulated failures
            return failed(f"Simulated failure of {', '.join(names)} on {device.serial}")
        result: dict[str, Any] = {}
        try:
            for name in names:
                result.update(await HANDLERS[name](operation[name], device))
        except Refused as exc:
            return failed(str(exc))
        except (ApiError, Unreachable) as exc:
            self.fleet.error(self, f"updating device {device.id}: {exc}")
            return failed(f"Device update failed: {exc}")
        return "SUCCESSFUL", result


def failed(reason: str) -> tuple[str, dict[str, Any]]:
    return "FAILED", {"failureReason": reason}


def hardware_serial(managed_object: dict[str, Any]) -> str | None:
    hardware = managed_object.get("c8y_Hardware")
    serial = hardware.get("serialNumber") if isinstance(hardware, dict) else None
    return serial if isinstance(serial, str) else None
