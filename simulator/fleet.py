"""The fleet: checks the platform and the admin login, makes sure the group exists, runs every agent
in one event loop (set-up with bounded concurrency so hundreds of agents do not stampede the
platform), prints progress, and stops cleanly: subscriptions closed, operations in progress given
time to finish, the state file written."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiocometd_ng import ConnectionType
from aiocometd_ng.exceptions import ServerError

from simulator.agent import Agent
from simulator.api import Api, ApiError, Login, Unreachable
from simulator.onboarding import Fatal
from simulator.progress import Console, Stats, report_progress
from simulator.state import State, save_periodically

ONBOARDING_CONCURRENCY = 10  # agents setting up at the same time
HTTP_CONNECTIONS = 100  # the shared connection pool's size
BOOTSTRAP_TENANT = "management"
BOOTSTRAP_USER = "devicebootstrap"
ERRORS_SHOWN_PER_SECOND = 5
NOTICE_SECONDS = 5.0  # at most one line about lost connections this often
GRACE_SECONDS = 10.0  # beyond the delay: how long stopping waits for operations in progress


@dataclass(frozen=True)
class Config:
    url: str
    user: str
    password: str
    bootstrap_password: str | None
    agents: int
    children: int
    failure_rate: float
    delay: float
    transport: ConnectionType
    prefix: str
    group: str
    state: Path
    duration: float | None
    quiet: bool


class Fleet:
    def __init__(self, config: Config, api: Api, state: State, console: Console) -> None:
        self.config = config
        self.api = api
        self.state = state
        self.console = console
        self.stats = Stats(agents=config.agents)
        self.admin = Login(config.user, config.password)
        self.group_id: str | None = None
        self.stopping = False
        self.fatal_error: str | None = None
        self.stop_requested = asyncio.Event()
        self.onboarding = asyncio.Semaphore(ONBOARDING_CONCURRENCY)
        self.agents: list[Agent] = []
        self._shown_second = 0
        self._shown = 0
        self._hidden = 0
        self._lost_since_notice = 0
        self._last_notice = 0.0

    # --- messages ---------------------------------------------------------------------------

    def error(self, source: object, text: str) -> None:
        """Counts an error and prints it, at most a few per second (the rest are counted)."""
        self.stats.errors += 1
        second = int(time.monotonic())
        if second != self._shown_second:
            self._flush_hidden()
            self._shown_second, self._shown = second, 0
        if self._shown < ERRORS_SHOWN_PER_SECOND:
            self._shown += 1
            self.console.message(f"error: {source}: {text}")
        else:
            self._hidden += 1

    def _flush_hidden(self) -> None:
        if self._hidden:
            self.console.message(f"({self._hidden} more errors not shown)")
            self._hidden = 0

    def connection_lost(self, agent: Agent, exc: BaseException, was_connected: bool) -> None:
        """A refusal by the platform (handshake or subscription denied) is an error; a network
        failure (a platform restarting) is expected and summed up in one line every few seconds,
        not one per agent."""
        if self.stopping:
            return
        if isinstance(exc, ServerError) and not was_connected:
            self.error(agent, f"the platform refused its CometD subscription: {exc.error}")
            return
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        self._lost_since_notice += 1
        now = time.monotonic()
        if now - self._last_notice >= NOTICE_SECONDS:
            self.console.message(
                f"realtime: {self._lost_since_notice} connection(s) lost or not made ({detail});"
                " reconnecting"
            )
            self._lost_since_notice = 0
            self._last_notice = now

    def fail(self, message: str) -> None:
        """A fatal error: stop everything, exit non-zero."""
        if self.fatal_error is None:
            self.fatal_error = message
        self.stop_requested.set()

    def bootstrap_login(self) -> Login:
        if not self.config.bootstrap_password:
            raise Fatal(
                "no device bootstrap password: pass --bootstrap-password, set "
                "DEVICE_BOOTSTRAP_PASSWORD, or run bin/run once in this repository (it writes "
                ".bootstrap-password)"
            )
        return Login(f"{BOOTSTRAP_TENANT}/{BOOTSTRAP_USER}", self.config.bootstrap_password)

    # --- set-up -----------------------------------------------------------------------------

    async def check_platform(self) -> None:
        """A clear error for a wrong URL, a platform that is not running and a refused admin."""
        url = self.config.url
        try:
            probe = await self.api.call("GET", "/tenant/loginOptions", None, retry=False)
        except Unreachable as exc:
            raise Fatal(
                f"cannot reach the platform at {url} ({exc}): is it running? Start it with "
                "bin/run, or pass its address with --url"
            ) from exc
        if probe.status != 200 or not isinstance(probe.body, dict):
            raise Fatal(
                f"{url} does not answer like this platform ({probe.describe()}); check --url"
            )
        me = await self.api.call("GET", "/user/currentUser", self.admin, retry=False)
        if me.status == 401:
            raise Fatal(
                f"the platform at {url} refused the admin login '{self.config.user}' (401): check "
                "--user and --password (by default ADMIN_PASSWORD, or .admin-password which "
                "bin/run writes)"
            )
        if me.status == 429:
            raise Fatal(f"{me.describe()}: too many failed logins; try again later")
        if me.status != 200:
            raise Fatal(me.describe())

    async def ensure_group(self) -> str:
        """The device group named --group (the oldest, if several), created when missing."""
        name = self.config.group
        groups = await self.api.pages(
            "/inventory/managedObjects",
            self.admin,
            "managedObjects",
            {"fragmentType": "c8y_IsDeviceGroup", "text": name, "withChildren": "false"},
        )
        matching = sorted(
            (int(group["id"]) for group in groups if group.get("name") == name), key=int
        )
        if matching:
            return str(matching[0])
        created = await self.api.call(
            "POST",
            "/inventory/managedObjects",
            self.admin,
            {"name": name, "type": "c8y_DeviceGroup", "c8y_IsDeviceGroup": {}},
        )
        if created.status in (401, 403):
            raise Fatal(f"{created.describe()}: the admin login needs ROLE_INVENTORY_ADMIN")
        if created.status != 201:
            raise ApiError(created)
        return str(created.body["id"])

    # --- running ----------------------------------------------------------------------------

    async def _run_agent(self, agent: Agent) -> None:
        try:
            async with self.onboarding:
                await agent.prepare()
            self.stats.onboarded += 1
            await agent.listen()
        except Fatal as exc:
            self.fail(str(exc))

    async def run(self) -> int:
        try:
            await self.check_platform()
            self.group_id = await self.ensure_group()
        except (Fatal, ApiError, Unreachable) as exc:
            self.console.message(f"bin/simulate: error: {exc}")
            return 1
        config = self.config
        self.console.message(
            f"Simulating {config.agents} agent(s) with {config.children} child device(s) each "
            f"against {config.url} over {config.transport.value}; group '{config.group}' "
            f"(id {self.group_id}); state in {config.state}. Stop with Ctrl-C."
        )
        self.agents = [Agent(self, index) for index in range(1, config.agents + 1)]
        running = [asyncio.create_task(self._run_agent(agent)) for agent in self.agents]
        helpers = [
            asyncio.create_task(report_progress(self.stats, self.console)),
            asyncio.create_task(save_periodically(self.state)),
            asyncio.create_task(self._flush_hidden_periodically()),
        ]
        try:
            if config.duration is None:
                await self.stop_requested.wait()
            else:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.stop_requested.wait(), config.duration)
        finally:
            await self._stop(running)
            for helper in helpers:
                helper.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            self.state.save()
            self._flush_hidden()
            self.console.done()
            self.console.message(self.stats.summary())
        if self.fatal_error:
            self.console.message(f"bin/simulate: error: {self.fatal_error}")
            return 1
        return 0

    async def _stop(self, running: list[asyncio.Task[Any]]) -> None:
        """Stop taking operations, close every subscription, give the operations in progress
        time to finish (a second Ctrl-C cuts that short), then cancel what is left."""
        self.stopping = True
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        in_progress = {task for agent in self.agents for task in agent.operations}
        if in_progress and self.fatal_error is None:
            grace = self.config.delay * 1.5 + GRACE_SECONDS
            self.console.message(
                f"stopping: waiting up to {grace:.0f} s for {len(in_progress)} operation(s) in "
                "progress (Ctrl-C again to leave them EXECUTING; the next start finishes them)"
            )
            self.stop_requested.clear()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + grace
            interrupted = asyncio.create_task(self.stop_requested.wait())
            while in_progress and not interrupted.done():
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                done, _ = await asyncio.wait(
                    [*in_progress, interrupted],
                    timeout=timeout,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                in_progress -= done
            interrupted.cancel()
        for task in in_progress:
            task.cancel()
        await asyncio.gather(*in_progress, return_exceptions=True)

    async def _flush_hidden_periodically(self) -> None:
        while True:
            await asyncio.sleep(1)
            self._flush_hidden()


def new_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=HTTP_CONNECTIONS))
