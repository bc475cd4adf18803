"""The user journey: the platform installed and started the way the README tells a user, then used
the way an operator and an agent use it, in each layout.

    .venv/bin/python .ci/journey.py [--layout embedded|redis|production ...] [--keep]

It copies this working tree as a fresh clone would have it (tracked and unignored files) into a
temporary directory, builds that copy's `.venv` from requirements.txt alone (what `bin/run` does
on first use), imports every module the processes load (.ci/import_check.py), and then for each
layout starts `bin/run` there as a real process and walks through:

  start        bin/run answers HTTP (migrations, static files, admin user), /health/ready 200
               (database, migrations and, with Redis, worker and beat heartbeats)
  device user  `manage.py createuser ... --groups devices`, as the README says
  inventory    the agent (as the device user) creates itself and three child devices; the admin
               makes a group of them
  realtime     the agent subscribes over WebSocket to its operations, the admin over long-polling
               to every operation
  operation    the admin creates an operation; it reaches the agent; the agent moves it to
               EXECUTING and SUCCESSFUL; the admin's subscription sees CREATE and both UPDATEs
  bulk         a bulk operation over the group ramps on beat; the agent completes every child;
               the bulk operation ends COMPLETED with every child SUCCESSFUL
  simulator    (embedded) bin/simulate onboards three agents with two child devices each
               through the bootstrap flow, using the passwords bin/run left in the copy; a bulk
               c8y_Firmware over its group runs to COMPLETED / SUCCESSFUL; Ctrl-C stops it
  sweep        an operation with executionTimeout 1 fails as timed out (the beat-driven sweep)
  admin UI     login, a page and each of its stylesheets (200, text/css, cached for ever)
  API docs     /openapi.json and /openapi.yaml (OpenAPI 3.1), /docs/ and each Swagger UI file it
               links (from our static files, cached for ever)
  processes    worker answers a ping and beat runs (Redis layouts)
  logs         an access line per request (JSON in the production layout) and nothing logged
               by an idle platform
  stop         Ctrl-C (embedded), a killed worker (redis: bin/run must exit non-zero, naming it),
               SIGTERM (production); no process is left behind

The layouts: `embedded` (no DATABASE_URL, no REDIS_URL: SQLite and the in-process scheduler),
`redis` (PostgreSQL and Redis, `bin/run --one-server`: server, worker, beat; plain `bin/run` starts
the production layout where nginx is installed) and `production` (`bin/run --production`: gunicorn,
uvicorn, worker, beat behind nginx). A failure names the layout and the step and shows
the end of the platform's log. Uses the dev venv's clients (requests, aiocometd-ng)."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import requests
from aiocometd_ng import Client, ConnectionType
from aiocometd_ng.extensions import Extension

ROOT = Path(__file__).resolve().parent.parent
LAYOUTS = ("embedded", "redis", "production")
TENANT = "t100"
AGENT_USER = "journey-agent"
AGENT_PASSWORD = "journey-agent-" + secrets.token_hex(4)
REDIS_DB = 14  # a Redis database of the journey's own, emptied before each layout
JSON_TYPE = "application/json"
STEP_TIMEOUT = 60.0


class JourneyFailed(Exception):
    pass


class PlatformExited(Exception):
    """bin/run is gone: nothing to wait for any more (wait_for does not retry this)."""


# --- output ------------------------------------------------------------------------------------


def say(text: str) -> None:
    print(text, flush=True)


@contextlib.contextmanager
def step(layout: str, name: str, platform: Platform | None = None) -> Iterator[None]:
    started = time.monotonic()
    try:
        yield
    except Exception as exc:
        say(f"FAILED  [{layout}] {name}: {type(exc).__name__}: {exc}")
        if platform is not None:
            say(f"--- last lines of the platform's log ({platform.log_path}) ---")
            say(platform.log_tail(60))
            say("--- end of log ---")
        raise JourneyFailed(f"[{layout}] {name}") from exc
    say(f"ok      [{layout}] {name} ({time.monotonic() - started:.1f} s)")


def wait_for(what: str, check: Callable[[], Any], timeout: float = STEP_TIMEOUT) -> Any:
    """Poll `check` until it returns something truthy; raise naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
        except (requests.RequestException, AssertionError) as exc:
            last_error, result = exc, None
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} ({last_error})")


# --- the copy of the repository and its venv ---------------------------------------------------


def copy_repository(destination: Path) -> None:
    """What a fresh clone of the working tree would hold: tracked and new unignored files."""
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for name in filter(None, (entry.decode() for entry in listing)):
        source = ROOT / name
        if not source.is_file():  # deleted in the working tree
            continue
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


def build_venv(clone: Path) -> None:
    """`bin/run`'s own first step (bin/_venv.sh): .venv from requirements.txt alone."""
    subprocess.run(
        ["bash", "-c", "source bin/_venv.sh && ensure_venv requirements.txt"],
        cwd=clone,
        check=True,
        env=clean_env(),
    )


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without the platform's settings (each layout sets its own) and
    without this venv on PATH."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key
        not in {
            "DATABASE_URL",
            "REDIS_URL",
            "VIRTUAL_ENV",
            "PYTHONPATH",
            "DJANGO_SETTINGS_MODULE",
            "STATIC_ROOT",
            "LOG_FORMAT",
            "LOG_LEVEL",
            "PORT",
            "HOST",
        }
    }
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    env.update(extra)
    return env


# --- services ------------------------------------------------------------------------------------


def postgres_admin_url() -> str:
    for role in ("root", "postgres"):
        url = f"postgresql://{role}@127.0.0.1:5432/postgres"
        try:
            with psycopg.connect(url, connect_timeout=5) as connection:
                if connection.execute(
                    "select rolsuper or rolcreatedb from pg_roles where rolname = current_user"
                ).fetchone()[0]:
                    return url
        except psycopg.Error:
            continue
    raise JourneyFailed(
        "no PostgreSQL role (root, postgres) on 127.0.0.1:5432 can create databases"
    )


def fresh_database(name: str) -> str:
    admin = postgres_admin_url()
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        connection.execute(f'CREATE DATABASE "{name}"')
    return admin.rsplit("/", 1)[0].replace("postgresql://", "postgres://") + f"/{name}"


def drop_database(name: str) -> None:
    with psycopg.connect(postgres_admin_url(), autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def fresh_redis() -> str:
    subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", "6379", "-n", str(REDIS_DB), "flushdb"],
        check=True,
        capture_output=True,
    )
    return f"redis://127.0.0.1:6379/{REDIS_DB}"


def free_port_block() -> int:
    """A port P with P, P+1 and P+2 free (the public port, REST and realtime upstreams)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port > 65000:
            continue
        try:
            for offset in (1, 2):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port + offset))
        except OSError:
            continue
        return port
    raise JourneyFailed("no three consecutive free ports")


# --- the running platform ----------------------------------------------------------------------


@dataclass
class Platform:
    clone: Path
    layout: str
    env: dict[str, str]
    port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    log_file: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        options = {"production": ["--production"], "redis": ["--one-server"]}
        args = ["bin/run", *options.get(self.layout, [])]
        self.log_file = self.log_path.open("wb")
        # A session of its own, as a terminal would give it: Ctrl-C is a SIGINT to its group.
        self.process = subprocess.Popen(
            args,
            cwd=self.clone,
            env=self.env,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_still(self, seconds: float) -> int | None:
        """The log's line count if no line came in the last `seconds`, else None."""
        count = len(self.log_text().splitlines())
        time.sleep(seconds)
        return count if len(self.log_text().splitlines()) == count else None

    def log_tail(self, lines: int) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def assert_running(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise PlatformExited(f"bin/run exited with status {self.process.returncode}")

    def manage(self, *args: str) -> str:
        return subprocess.run(
            [".venv/bin/python", "manage.py", *args],
            cwd=self.clone,
            env=self.env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout

    def processes(self) -> list[tuple[int, str]]:
        """Every live process started from this copy (its working directory), as (pid, cmdline)."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if Path(os.readlink(entry / "cwd")).resolve() != self.clone.resolve():
                    continue
                status = (entry / "stat").read_text().split(") ", 1)[1].split()[0]
                if status == "Z":
                    continue
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            except (OSError, IndexError):
                continue
            found.append((int(entry.name), cmdline))
        return found

    def stop(self, sig: signal.Signals, *, group: bool) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            if group:
                os.killpg(self.process.pid, sig)
            else:
                self.process.send_signal(sig)
        return self.process.wait(timeout=30)

    def kill_everything(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        for pid, _ in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.log_file is not None:
            self.log_file.close()


class Api:
    """Basic-auth JSON client as Cumulocity clients send it."""

    def __init__(self, base: str, login: str, password: str) -> None:
        self.base = base
        self.session = requests.Session()
        self.session.auth = (f"{TENANT}/{login}", password)
        self.session.headers.update({"Accept": JSON_TYPE})

    def call(self, method: str, path: str, expect: int, body: Any = None, **params: Any) -> Any:
        response = self.session.request(
            method, self.base + path, json=body, params=params or None, timeout=30
        )
        if response.status_code != expect:
            raise AssertionError(
                f"{method} {path} answered {response.status_code}, expected {expect}: "
                f"{response.text[:300]}"
            )
        return response.json() if response.content else None


# --- realtime ----------------------------------------------------------------------------------


class CumulocityAuth(Extension):
    """The handshake's `ext."com.cumulocity.authn".token`, as Cumulocity CometD clients send it."""

    def __init__(self, login: str, password: str) -> None:
        self.token = base64.b64encode(f"{TENANT}/{login}:{password}".encode()).decode()

    async def outgoing(self, payload: list[dict[str, Any]], headers: dict[str, str]) -> None:
        for message in payload:
            if message["channel"] == "/meta/handshake":
                message.setdefault("ext", {})["com.cumulocity.authn"] = {"token": self.token}

    async def incoming(self, payload: Any, headers: Any = None) -> None:
        return None


@dataclass
class Subscription:
    """A CometD client on its own event loop thread; what it receives lands in `messages`."""

    url: str
    channel: str
    login: str
    password: str
    transport: ConnectionType
    messages: queue.Queue[dict[str, Any]] = field(default_factory=queue.Queue)
    ready: threading.Event = field(default_factory=threading.Event)
    error: list[BaseException] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self.ready.wait(30):
            raise AssertionError(f"no CometD subscription to {self.channel} within 30 s")
        if self.error:
            raise AssertionError(f"CometD subscription to {self.channel} failed: {self.error[0]}")

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._loop.set_exception_handler(self._exception)
        try:
            async with Client(
                self.url,
                connection_types=[self.transport],
                extensions=[CumulocityAuth(self.login, self.password)],
            ) as client:
                await client.subscribe(self.channel)
                self.ready.set()
                receiving = asyncio.ensure_future(self._receive(client))
                await self._stop.wait()
                receiving.cancel()
        except BaseException as exc:  # reported to the main thread
            self.error.append(exc)
            self.ready.set()

    def _exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """aiocometd's done-callbacks (`_connect_done`, `_receive_done`) re-raise the cancellation
        of its own tasks when `close` stops them: noise of our shutdown, not an error. Anything
        else, or before `close`, is printed as asyncio does."""
        stopping = self._stop is not None and self._stop.is_set()
        if stopping and isinstance(context.get("exception"), asyncio.CancelledError):
            return
        loop.default_exception_handler(context)

    async def _receive(self, client: Client) -> None:
        async for message in client:
            self.messages.put(message)

    def next(self, what: str, timeout: float = 20.0) -> dict[str, Any]:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"no {what} on {self.channel} within {timeout:.0f} s "
                f"({self.error[0] if self.error else 'no client error'})"
            ) from None

    def close(self) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)


# --- the journey ---------------------------------------------------------------------------------


STYLESHEET = re.compile(r'<link rel="stylesheet"[^>]*href="([^"]+)"')
CSRF_INPUT = re.compile(r'name="csrfmiddlewaretoken" value="([^"]+)"')
WORKER = re.compile(r"celery -A deviceplatform .*\bworker\b")
BEAT = re.compile(r"celery -A deviceplatform .*\bbeat\b")


def simulate_fleet(platform: Platform, admin: Api, workdir: Path) -> None:
    """bin/simulate as the README's "See it work" runs it (its admin and bootstrap passwords
    from the files bin/run wrote), then the bulk firmware update an operator sends its group."""
    log_path = workdir / "simulator.log"
    with log_path.open("wb") as log:
        simulator = subprocess.Popen(
            ["bin/simulate", "--url", platform.url, "--agents", "3", "--children", "2"]
            + ["--delay", "0.2", "--failure-rate", "0", "--duration", "120"],
            cwd=platform.clone,
            env=platform.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:

        def fleet_group() -> str | None:
            assert simulator.poll() is None, log_path.read_text(errors="replace")
            groups = admin.call(
                "GET", "/inventory/managedObjects", 200, fragmentType="c8y_IsDeviceGroup"
            )["managedObjects"]
            for group in groups:
                if group["name"] == "Simulated fleet":
                    references = admin.call(
                        "GET",
                        f"/inventory/managedObjects/{group['id']}/childAssets",
                        200,
                        pageSize=100,
                    )["references"]
                    return group["id"] if len(references) == 9 else None
            return None

        group_id = wait_for("the simulated fleet's 9 devices in its group", fleet_group)
        bulk = admin.call(
            "POST",
            "/devicecontrol/bulkoperations",
            201,
            {
                "groupId": group_id,
                "startDate": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
                "creationRamp": 0,
                "operationPrototype": {"c8y_Firmware": {"name": "journey-fw", "version": "2.0"}},
            },
        )

        def finished() -> dict[str, Any] | None:
            assert simulator.poll() is None, log_path.read_text(errors="replace")
            body = admin.call("GET", f"/devicecontrol/bulkoperations/{bulk['id']}", 200)
            return body if body["generalStatus"] in ("SUCCESSFUL", "FAILED") else None

        final = wait_for("the bulk firmware update to finish", finished, timeout=30)
        assert (final["status"], final["generalStatus"]) == ("COMPLETED", "SUCCESSFUL"), final
        assert final["progress"]["successful"] == 9, final
        simulator.send_signal(signal.SIGINT)
        status = simulator.wait(timeout=30)
        output = log_path.read_text(errors="replace")
        assert status == 0, f"bin/simulate exited with {status} after Ctrl-C: {output[-2000:]}"
        assert "9 SUCCESSFUL, 0 FAILED" in output, output[-2000:]
    finally:
        if simulator.poll() is None:
            simulator.kill()
            simulator.wait()


def run_layout(clone: Path, layout: str, workdir: Path) -> float:
    started = time.monotonic()
    port = free_port_block()
    env = clean_env(PORT=str(port), OPERATION_SWEEP_INTERVAL="1", LOG_LEVEL="INFO")
    database = None
    if layout in ("redis", "production"):
        database = f"journey_{os.getpid()}_{layout}"
        env["DATABASE_URL"] = fresh_database(database)
        env["REDIS_URL"] = fresh_redis()
    if layout == "production":
        env["LOG_FORMAT"] = "json"
    if layout == "embedded":
        (clone / "db.sqlite3").unlink(missing_ok=True)
    platform = Platform(clone, layout, env, port, workdir / f"{layout}.log")
    subscriptions: list[Subscription] = []
    try:
        with step(layout, "start: bin/run answers HTTP", platform):
            platform.start()

            def answers() -> bool:
                platform.assert_running()
                return requests.get(platform.url + "/tenant/loginOptions", timeout=5).ok

            wait_for("GET /tenant/loginOptions to answer 200", answers, timeout=180)

            def ready() -> bool:
                platform.assert_running()
                response = requests.get(platform.url + "/health/ready", timeout=5)
                assert response.status_code in (200, 503), response.status_code
                if response.status_code != 200:
                    raise AssertionError(f"not ready: {response.text[:500]}")
                return True

            # Every process up (database, migrations and, with Redis, the worker's and beat's
            # heartbeats) before the journey relies on them: a slow machine starts them late.
            wait_for("GET /health/ready to answer 200", ready, timeout=120)
            admin_password = (clone / ".admin-password").read_text().strip()
            admin = Api(platform.url, "admin", admin_password)
            admin.call("GET", "/platform", 200)

        with step(layout, "device user: manage.py createuser --groups devices", platform):
            platform.manage(
                "createuser", AGENT_USER, "--password", AGENT_PASSWORD, "--groups", "devices"
            )
            agent_api = Api(platform.url, AGENT_USER, AGENT_PASSWORD)

        with step(layout, "inventory: agent, child devices, group", platform):
            agent = agent_api.call(
                "POST",
                "/inventory/managedObjects",
                201,
                {
                    "name": "Journey agent",
                    "type": "journey_Agent",
                    "c8y_IsDevice": {},
                    "com_cumulocity_model_Agent": {},
                    "c8y_SupportedOperations": ["c8y_Restart", "c8y_Command"],
                },
            )
            devices = []
            for number in range(3):
                device = agent_api.call(
                    "POST",
                    "/inventory/managedObjects",
                    201,
                    {"name": f"Journey device {number}", "c8y_IsDevice": {}},
                )
                agent_api.call(
                    "POST",
                    f"/inventory/managedObjects/{agent['id']}/childDevices",
                    201,
                    {"managedObject": {"id": device["id"]}},
                )
                devices.append(device["id"])
            group = admin.call(
                "POST",
                "/inventory/managedObjects",
                201,
                {"name": "Journey group", "type": "c8y_DeviceGroup", "c8y_IsDeviceGroup": {}},
            )
            for device_id in devices:
                admin.call(
                    "POST",
                    f"/inventory/managedObjects/{group['id']}/childAssets",
                    201,
                    {"managedObject": {"id": device_id}},
                )

        with step(layout, "realtime: agent over WebSocket, admin over long-polling", platform):
            agent_feed = Subscription(
                platform.url + "/notification/operations",
                f"/{agent['id']}",
                AGENT_USER,
                AGENT_PASSWORD,
                ConnectionType.WEBSOCKET,
            )
            subscriptions.append(agent_feed)
            admin_feed = Subscription(
                platform.url + "/notification/realtime",
                "/operations/*",
                "admin",
                admin_password,
                ConnectionType.LONG_POLLING,
            )
            subscriptions.append(admin_feed)

        with step(layout, "operation: created, pushed to the agent, SUCCESSFUL", platform):
            operation = admin.call(
                "POST",
                "/devicecontrol/operations",
                201,
                {"deviceId": devices[0], "c8y_Restart": {}},
            )
            pushed = agent_feed.next("new operation")
            assert pushed["data"]["id"] == operation["id"], pushed
            for status in ("EXECUTING", "SUCCESSFUL"):
                agent_api.call(
                    "PUT", f"/devicecontrol/operations/{operation['id']}", 200, {"status": status}
                )
            final = admin.call("GET", f"/devicecontrol/operations/{operation['id']}", 200)
            assert final["status"] == "SUCCESSFUL", final
            seen = [admin_feed.next("operation event") for _ in range(3)]
            actions = [(m["data"]["realtimeAction"], m["data"]["data"]["status"]) for m in seen]
            assert actions == [
                ("CREATE", "PENDING"),
                ("UPDATE", "EXECUTING"),
                ("UPDATE", "SUCCESSFUL"),
            ], actions

        with step(layout, "bulk: ramped over the group to COMPLETED", platform):
            bulk = admin.call(
                "POST",
                "/devicecontrol/bulkoperations",
                201,
                {
                    "groupId": group["id"],
                    "startDate": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
                    "creationRamp": 0.3,
                    "operationPrototype": {"c8y_Command": {"text": "uptime"}},
                },
            )
            done = set()
            while len(done) < len(devices):
                child = agent_feed.next("bulk child operation")["data"]
                assert child.get("bulkOperationId") == bulk["id"], child
                for status, extra in (("EXECUTING", {}), ("SUCCESSFUL", {"result": "up"})):
                    agent_api.call(
                        "PUT",
                        f"/devicecontrol/operations/{child['id']}",
                        200,
                        {"status": status, "c8y_Command": {"text": "uptime", **extra}},
                    )
                done.add(child["deviceId"])
            assert done == set(devices), done

            def completed() -> dict[str, Any] | None:
                body = admin.call("GET", f"/devicecontrol/bulkoperations/{bulk['id']}", 200)
                finished = body["progress"]["successful"] == len(devices)
                return body if body["status"] == "COMPLETED" and finished else None

            final = wait_for("the bulk operation to be COMPLETED", completed, timeout=30)
            assert final["generalStatus"] == "SUCCESSFUL", final

        if layout == "embedded":
            with step(layout, "simulator: bin/simulate fleet, bulk firmware update", platform):
                simulate_fleet(platform, admin, workdir)

        with step(layout, "sweep: executionTimeout fails an EXECUTING operation", platform):
            operation = admin.call(
                "POST",
                "/devicecontrol/operations",
                201,
                {"deviceId": devices[1], "c8y_Restart": {}, "executionTimeout": 1},
            )
            agent_api.call(
                "PUT", f"/devicecontrol/operations/{operation['id']}", 200, {"status": "EXECUTING"}
            )

            def timed_out() -> dict[str, Any] | None:
                body = admin.call("GET", f"/devicecontrol/operations/{operation['id']}", 200)
                return body if body["status"] == "FAILED" else None

            failed = wait_for("the operation to time out", timed_out, timeout=30)
            assert "timed out" in failed.get("failureReason", ""), failed

        with step(layout, "admin UI: login, a page, its stylesheets", platform):
            browser = requests.Session()
            login_url = platform.url + "/admin/login/?next=/admin/"
            page = browser.get(login_url, timeout=10)
            assert page.status_code == 200, page.status_code
            token = CSRF_INPUT.search(page.text)
            assert token, "no CSRF token on the login page"
            page = browser.post(
                login_url,
                data={
                    "csrfmiddlewaretoken": token.group(1),
                    "username": "admin",
                    "password": admin_password,
                    "next": "/admin/",
                },
                headers={"Referer": login_url},
                timeout=10,
            )
            assert page.status_code == 200, page.status_code
            errors = re.findall(r'class="errornote">([^<]*)<', page.text)
            assert "Device platform admin" in page.text, ("login failed", page.url, errors)
            page = browser.get(platform.url + "/admin/devicecontrol/operation/", timeout=10)
            assert page.status_code == 200, page.status_code
            sheets = STYLESHEET.findall(page.text)
            assert sheets, "the page links no stylesheet"
            for href in sheets:
                sheet = browser.get(platform.url + href, timeout=10)
                assert sheet.status_code == 200, (href, sheet.status_code)
                assert sheet.headers["Content-Type"].startswith("text/css"), sheet.headers
                assert "immutable" in sheet.headers.get("Cache-Control", ""), (href, sheet.headers)
            missing = browser.get(platform.url + "/static/admin/css/missing.css", timeout=10)
            assert missing.status_code == 404, missing.status_code
            assert missing.headers["Content-Type"].startswith("text/plain"), missing.headers

        with step(
            layout, "API description: /openapi.json, /openapi.yaml, /docs/, its files", platform
        ):
            document = requests.get(platform.url + "/openapi.json", timeout=30)
            assert document.status_code == 200, document.status_code
            assert document.json()["openapi"] == "3.1.0", document.text[:200]
            assert "/devicecontrol/operations" in document.json()["paths"]
            described = requests.get(platform.url + "/openapi.yaml", timeout=30)
            assert described.text.startswith("openapi: 3.1.0"), described.text[:200]
            page = requests.get(platform.url + "/docs/", timeout=10)
            assert page.status_code == 200, page.status_code
            assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text)
            assert any("swagger-ui-bundle" in href for href in assets), assets
            for href in assets:
                asset = requests.get(platform.url + href, timeout=10)
                assert asset.status_code == 200, (href, asset.status_code)
                assert "immutable" in asset.headers.get("Cache-Control", ""), (href, asset.headers)

        if layout != "embedded":
            with step(layout, "processes: worker answers a ping, beat is running", platform):
                ping = subprocess.run(
                    [".venv/bin/python", "-m", "celery", "-A", "deviceplatform"]
                    + ["inspect", "ping", "--timeout", "3"],
                    cwd=clone,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                assert ping.returncode == 0, ping.stdout + ping.stderr
                assert "pong" in ping.stdout, ping.stdout
                commands = [cmdline for _, cmdline in platform.processes()]
                assert any(BEAT.search(c) for c in commands), commands
                assert any(WORKER.search(c) for c in commands), commands

        with step(layout, "logs: one access line per request, silence when idle", platform):
            for subscription in subscriptions:
                subscription.close()
            subscriptions.clear()
            text = platform.log_text()
            if layout == "production":
                lines = [
                    json.loads(line)
                    for line in text.splitlines()
                    if line.startswith("{") and '"deviceplatform.access"' in line
                ]
                creates = [
                    r
                    for r in lines
                    if r["method"] == "POST"
                    and r["path"] == "/devicecontrol/operations"
                    and r["status"] == 201
                ]
                assert creates, "no JSON access line for POST /devicecontrol/operations"
                assert {"duration_ms", "request_id", "user", "time", "level"} <= set(creates[0])
                assert creates[0]["user"] == "admin", creates[0]
            else:
                assert re.search(
                    r"deviceplatform\.access \[[0-9a-f]{32}\] POST /devicecontrol/operations 201 [\d.]+ms"
                    r" user=admin",
                    text,
                ), "no access line for POST /devicecontrol/operations"
            # The subscriptions' last requests and disconnects log (on a busy machine later than
            # on an idle one): wait until the log has been still for a second, then watch it.
            before = wait_for(
                "the platform's log to be still for 1 s after the subscriptions closed",
                lambda: platform.log_still(1.0),
                timeout=30,
            )
            time.sleep(4)  # 8 ramp ticks and 4 sweeps of an idle platform
            after = platform.log_text().splitlines()
            idle = after[before:]
            assert not idle, f"an idle platform logged {len(idle)} line(s): {idle[:5]}"

        if layout == "embedded":
            with step(layout, "stop: Ctrl-C stops everything", platform):
                status = platform.stop(signal.SIGINT, group=True)
                assert status == 130, f"bin/run exited with {status} after Ctrl-C"
                wait_for("every process to exit", lambda: not platform.processes(), timeout=15)
        elif layout == "redis":
            with step(layout, "stop: a killed worker stops bin/run with an error", platform):
                workers = [pid for pid, cmd in platform.processes() if WORKER.search(cmd)]
                assert workers, "no worker process"
                os.kill(min(workers), signal.SIGKILL)  # the main process (lowest pid)
                status = platform.process.wait(timeout=30)  # type: ignore[union-attr]
                assert status != 0, "bin/run exited 0 after its worker was killed"
                log = platform.log_text()
                assert re.search(r"worker\.1 +stopped \(rc=-9\)", log), "no line naming the worker"
                assert "bin/run: error" in log, "no error line from bin/run"
                wait_for("every process to exit", lambda: not platform.processes(), timeout=15)
        else:
            with step(layout, "stop: SIGTERM stops everything", platform):
                status = platform.stop(signal.SIGTERM, group=False)
                assert status == 143, f"bin/run exited with {status} after SIGTERM"
                wait_for("every process to exit", lambda: not platform.processes(), timeout=15)
    finally:
        for subscription in subscriptions:
            subscription.close()
        platform.kill_everything()
        if database is not None:
            with contextlib.suppress(Exception):
                drop_database(database)
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layout", action="append", choices=LAYOUTS, help="default: all three")
    parser.add_argument("--keep", action="store_true", help="keep the copy and its logs")
    args = parser.parse_args()
    layouts = args.layout or list(LAYOUTS)
    workdir = Path(tempfile.mkdtemp(prefix="journey-"))
    clone = workdir / "deviceplatform"
    timings: dict[str, float] = {}
    failed = False
    try:
        with step("install", "copy of the repository, .venv from requirements.txt alone"):
            started = time.monotonic()
            copy_repository(clone)
            build_venv(clone)
            timings["install"] = time.monotonic() - started
        with step("install", "every module the processes load imports"):
            subprocess.run(
                [".venv/bin/python", ".ci/import_check.py"],
                cwd=clone,
                env=clean_env(),
                check=True,
            )
        for layout in layouts:
            timings[layout] = run_layout(clone, layout, workdir)
    except JourneyFailed as exc:
        say(f"user journey FAILED at {exc}")
        failed = True
    finally:
        say("timings: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items()))
        if args.keep or failed:
            say(f"the copy and the logs are in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if not failed:
        say("user journey passed: " + ", ".join(layouts))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
