"""Inventory over HTTP under concurrent load, next to the raw-INSERT ceiling of the same machine.

Creates a dedicated PostgreSQL database, migrates it, starts gunicorn (sync workers) or uvicorn
(ASGI) on a loopback port, then drives N keep-alive connections from asyncio + aiohttp through three
phases (create, get by id, list) and prints requests/s, p50, p99 and errors per phase. In the same run
it measures one psycopg connection doing prepared single-row INSERTs (autocommit) and prints the
ratio create-rps / raw-insert-rps, the figure to compare across machines (shared/PERFORMANCE.md).

Usage (see bench/README.md):  .venv/bin/python bench/inventory_http.py [--server uvicorn] [--scale 0.5]
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import base64
import contextlib
import math
import os
import platform
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import orjson
import psycopg
from psycopg.types.json import Jsonb

REPO = Path(__file__).resolve().parent.parent
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", ""})
DEFAULT_DATABASE_URL = "postgres://root@127.0.0.1:5432/dp_bench"
BENCH_USER = "bench"
BENCH_PASSWORD = "bench-pw:not-secret"
TENANT = "t100"
STARTUP_TIMEOUT = 60.0
# A request slower than this during warm-up is taken as a worker's first request (Django's password
# hasher runs once per worker and process-wide credential cache; see deviceplatform/api/authentication.py).
WARM_REQUEST_SECONDS = 0.25
MAX_WARMUP_ROUNDS = 60
IDLE_CORES = 0.3  # --wait-idle: the machine counts as idle below this many busy cores
MAX_BALANCE_ATTEMPTS = 8
BUSY_WORKER_CORES = 0.05  # a server process using less than this during the probe serves nobody
NOISY_CORES = 0.25  # warn when other processes used more than this during a phase

CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- arguments ------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--server", choices=("gunicorn", "uvicorn"), default="gunicorn")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="server processes (default: gunicorn 4, uvicorn 2)",
    )
    parser.add_argument("--concurrency", "-c", type=int, default=16, help="client connections")
    parser.add_argument("--creates", type=int, default=3000)
    parser.add_argument("--gets", type=int, default=3000)
    parser.add_argument("--lists", type=int, default=1000)
    parser.add_argument("--list-page-size", type=int, default=20)
    parser.add_argument("--raw-inserts", type=int, default=3000)
    parser.add_argument(
        "--scale", type=float, default=1.0, help="multiplies every request and row count"
    )
    parser.add_argument("--warmup", type=int, default=50, help="minimum untimed warm-up requests")
    parser.add_argument(
        "--phase-timeout",
        type=float,
        default=40.0,
        help="seconds after which a phase stops issuing requests (keeps the run bounded)",
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_DATABASE_URL", DEFAULT_DATABASE_URL),
        help="PostgreSQL on loopback; the database is DROPPED and re-created (name must contain 'bench')",
    )
    parser.add_argument(
        "--no-pool",
        action="store_true",
        help="server without Django's psycopg pool (DATABASE_POOL=false, CONN_MAX_AGE=60)",
    )
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to this long for the machine to be idle (shared machines)",
    )
    parser.add_argument("--port", type=int, default=0, help="server port (0: a free one)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--save", action="store_true", help="also write the report to bench/results/ (git-ignored)"
    )
    args = parser.parse_args(argv)
    if args.workers is None:
        args.workers = 4 if args.server == "gunicorn" else 2
    for name in ("creates", "gets", "lists", "raw_inserts"):
        setattr(args, name, max(1, round(getattr(args, name) * args.scale)))
    if args.concurrency < 1 or args.workers < 1:
        parser.error("--concurrency and --workers must be at least 1")
    return args


# --- output ---------------------------------------------------------------------------------------


class Report:
    """Prints lines as they come and keeps them for --save."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)


# --- database -------------------------------------------------------------------------------------


def checked_database_url(url: str) -> tuple[str, str]:
    """(url of the bench database, url of the `postgres` maintenance database on the same server)."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql"):
        raise SystemExit(f"--database-url must be a postgres:// URL, not {url!r}")
    if (parts.hostname or "") not in LOOPBACK_HOSTS:
        raise SystemExit(f"the benchmark only talks to loopback; {parts.hostname!r} is not")
    name = parts.path.lstrip("/")
    if "bench" not in name:
        raise SystemExit(f"refusing to drop database {name!r}: its name must contain 'bench'")
    admin = urlunsplit((parts.scheme, parts.netloc, "/postgres", parts.query, ""))
    return url, admin


def redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return url


def recreate_database(url: str, admin_url: str) -> None:
    name = urlsplit(url).path.lstrip("/")
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


def manage(env: dict[str, str], *args: str) -> None:
    result = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"manage.py {' '.join(args)} failed:\n{result.stdout}{result.stderr}")


# --- measurements ---------------------------------------------------------------------------------


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass
class CpuSample:
    """CPU seconds so far, per process, of the server (its session), of PostgreSQL (the backends of
    the bench database and the background processes), of this client, and of the whole machine.
    Everything else running meanwhile (other people's test runs, their databases) is "other"."""

    server: dict[int, float]
    postgres: dict[int, float]
    client: float
    machine: float


def machine_busy_seconds() -> float:
    with open("/proc/stat") as handle:
        ticks = [int(value) for value in handle.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    guest = sum(ticks[8:10])  # guest time is already counted in user time
    return (sum(ticks) - guest - idle) / CLK_TCK


def _read(path: str) -> str:
    with open(path, "rb") as handle:
        return handle.read().decode(errors="replace")


def cpu_sample(server_session: int | None, database: str) -> CpuSample:
    machine = machine_busy_seconds()
    server: dict[int, float] = {}
    postgres: dict[int, float] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = _read(f"/proc/{entry.name}/stat")
            comm = raw[raw.find("(") + 1 : raw.rfind(")")]
            fields = raw[raw.rfind(")") + 2 :].split()
            seconds = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime
            if server_session is not None and int(fields[3]) == server_session:
                server[int(entry.name)] = seconds
            elif comm.startswith("postgres"):
                # Backends are titled "postgres: 15/main: user database host(port) state".
                title = _read(f"/proc/{entry.name}/cmdline").replace("\0", " ")
                if f" {database} " in title or "(" not in title:
                    postgres[int(entry.name)] = seconds
        except (OSError, IndexError, ValueError):  # the process ended meanwhile
            continue
    return CpuSample(server=server, postgres=postgres, client=time.process_time(), machine=machine)


def cores_used(before: CpuSample, after: CpuSample, seconds: float) -> dict[str, float]:
    """Cores busy per group over the interval; per process, so processes that end or start in
    between do not distort the sum."""

    def delta(old: dict[int, float], new: dict[int, float]) -> float:
        return sum(value - old.get(pid, 0.0) for pid, value in new.items())

    used = {
        "server": delta(before.server, after.server) / seconds,
        "postgres": delta(before.postgres, after.postgres) / seconds,
        "client": (after.client - before.client) / seconds,
        "machine": (after.machine - before.machine) / seconds,
    }
    used["other"] = max(0.0, used["machine"] - used["server"] - used["postgres"] - used["client"])
    return used


def server_split(before: CpuSample, after: CpuSample, seconds: float) -> list[float]:
    """Cores used by each server process, busiest first: shows whether the keep-alive connections
    (each pinned to the worker that accepted it) spread over the workers."""
    return sorted(
        ((value - before.server.get(pid, 0.0)) / seconds for pid, value in after.server.items()),
        reverse=True,
    )


@dataclass
class PhaseResult:
    name: str
    planned: int
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    error_kinds: Counter[str] = field(default_factory=Counter)
    elapsed: float = 0.0
    cut: bool = False
    cpu: dict[str, float] = field(default_factory=dict)  # cores used per process group
    per_process: list[float] = field(default_factory=list)  # cores used per server process

    @property
    def done(self) -> int:
        return len(self.latencies)

    @property
    def rate(self) -> float:
        return self.done / self.elapsed if self.elapsed else math.nan

    def row(self) -> str:
        ordered = sorted(self.latencies)
        requests = f"{self.done}{'*' if self.cut else ''}"
        return (
            f"{self.name:<16}{requests:>9}{self.errors:>8}{self.rate:>10.1f}"
            f"{percentile(ordered, 0.50) * 1000:>9.2f}{percentile(ordered, 0.99) * 1000:>9.2f}"
            f"{(ordered[-1] if ordered else math.nan) * 1000:>9.1f}"
            + "".join(f"{self.cpu.get(key, math.nan):>7.2f}" for key in CPU_COLUMNS)
        )


CPU_COLUMNS = {"server": "server", "postgres": "pg", "client": "client", "other": "other"}
TABLE_HEADER = (
    f"{'phase':<16}{'requests':>9}{'errors':>8}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"
    + "".join(f"{label:>7}" for label in CPU_COLUMNS.values())
)


def raw_insert_ceiling(url: str, rows: int, body: dict[str, Any]) -> PhaseResult:
    """One connection, autocommit, a prepared single-row INSERT of a jsonb document per round trip."""
    result = PhaseResult(name="raw INSERT", planned=rows)
    database = urlsplit(url).path.lstrip("/")
    sql = "INSERT INTO bench_raw_insert (body) VALUES (%s)"
    with psycopg.connect(url, autocommit=True) as conn:
        # Flush what CREATE DATABASE and migrate left dirty, so a checkpoint does not land here.
        with contextlib.suppress(psycopg.Error):
            conn.execute("CHECKPOINT")
        conn.execute("DROP TABLE IF EXISTS bench_raw_insert")
        conn.execute(
            "CREATE TABLE bench_raw_insert (id bigserial PRIMARY KEY, body jsonb NOT NULL,"
            " created timestamptz NOT NULL DEFAULT now())"
        )
        with conn.cursor() as cursor:
            for _ in range(50):  # warm-up: prepare the statement, fault in the table's pages
                cursor.execute(sql, (Jsonb(body),), prepare=True)
            before = cpu_sample(None, database)
            start = time.perf_counter()
            for _ in range(rows):
                t0 = time.perf_counter()
                cursor.execute(sql, (Jsonb(body),), prepare=True)
                result.latencies.append(time.perf_counter() - t0)
            result.elapsed = time.perf_counter() - start
            after = cpu_sample(None, database)
        conn.execute("DROP TABLE bench_raw_insert")
    result.cpu = cores_used(before, after, result.elapsed)
    del result.cpu["server"]  # no server runs during this phase
    return result


# --- server ---------------------------------------------------------------------------------------


def wait_until_idle(limit: float, out: Report) -> None:
    """Wait (at most `limit` s) for 3 consecutive seconds in which the machine used < 0.3 cores."""
    deadline = time.monotonic() + limit
    quiet = 0
    busy = machine_busy_seconds()
    while time.monotonic() < deadline and quiet < 3:
        time.sleep(1.0)
        now = machine_busy_seconds()
        quiet = quiet + 1 if now - busy < IDLE_CORES else 0
        busy = now
    waited = limit - max(0.0, deadline - time.monotonic())
    out(f"waited {waited:.0f} s for an idle machine: {'idle' if quiet >= 3 else 'still busy'}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """The server under test in its own session (process group), so that stopping it also stops
    every worker it forked or spawned, and Ctrl-C in the terminal reaches only the benchmark."""

    def __init__(self, command: list[str], env: dict[str, str], log_path: Path) -> None:
        self.command = command
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop())
        self.process = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        atexit.register(self.stop)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, url: str) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(
                    f"server exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 (loopback)
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise SystemExit(f"server not ready after {STARTUP_TIMEOUT:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
            except ProcessLookupError:
                pass
        else:
            # The master is gone; make sure no orphaned worker of its group survives.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        if not self._log.closed:
            self._log.close()


def server_command(args: argparse.Namespace, port: int) -> list[str]:
    if args.server == "gunicorn":
        return [
            sys.executable,
            "-m",
            "gunicorn",
            "deviceplatform.wsgi:application",
            "--workers",
            str(args.workers),
            "--bind",
            f"127.0.0.1:{port}",
            "--log-level",
            "warning",
        ]
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "deviceplatform.asgi:application",
        "--workers",
        str(args.workers),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--lifespan",
        "off",
        "--no-access-log",
        "--log-level",
        "warning",
    ]


# --- load -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    body: bytes | None = None


class Load:
    """N connections pulling request numbers from one counter (closed loop: each connection sends
    its next request when the previous answer is read completely)."""

    def __init__(self, base: str, concurrency: int, server_session: int, database: str) -> None:
        self.base = base
        self.database = database
        self.concurrency = concurrency
        self.server_session = server_session
        token = base64.b64encode(f"{TENANT}/{BENCH_USER}:{BENCH_PASSWORD}".encode()).decode()
        self.headers = {"Authorization": f"Basic {token}", "Accept": "application/json"}
        self.post_headers = {**self.headers, "Content-Type": "application/json"}
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Load:
        self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.session is not None:
            await self.session.close()

    def connect(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.concurrency, limit_per_host=self.concurrency)
        self.session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=60)
        )

    async def reconnect(self) -> None:
        if self.session is not None:
            await self.session.close()
        self.connect()

    async def spread_over_workers(self, workers: int, path: str) -> tuple[int, int]:
        """Keep-alive connections stay with the worker that accepted them, and an ASGI worker's
        event loop accepts while its thread is busy, so one worker may own every connection (seen
        with uvicorn). Probe for a second; reconnect until every worker serves (or give up).
        Returns (workers serving, attempts)."""
        expected = min(workers, self.concurrency)
        serving = 0
        for attempt in range(1, MAX_BALANCE_ATTEMPTS + 1):
            probe = await self.phase("probe", 10**9, lambda n: Call("GET", path), None, 1.0)
            serving = sum(1 for cores in probe.per_process if cores > BUSY_WORKER_CORES)
            if serving >= expected:
                return serving, attempt
            await self.reconnect()
            await self.warm_up(self.concurrency, path)
        return serving, MAX_BALANCE_ATTEMPTS

    async def one(self, call: Call) -> tuple[int | None, bytes, float, str]:
        """(status or None, body, seconds, error description)."""
        assert self.session is not None
        headers = self.post_headers if call.body is not None else self.headers
        t0 = time.perf_counter()
        try:
            async with self.session.request(
                call.method, self.base + call.path, data=call.body, headers=headers
            ) as response:
                payload = await response.read()
                return response.status, payload, time.perf_counter() - t0, ""
        except (aiohttp.ClientError, TimeoutError) as exc:
            return None, b"", time.perf_counter() - t0, type(exc).__name__

    async def phase(
        self,
        name: str,
        count: int,
        make: Callable[[int], Call],
        on_success: Callable[[int, bytes], None] | None,
        deadline_seconds: float,
    ) -> PhaseResult:
        result = PhaseResult(name=name, planned=count)
        counter = iter(range(count))
        before = cpu_sample(self.server_session, self.database)
        start = time.perf_counter()
        deadline = start + deadline_seconds

        async def connection() -> None:
            for number in counter:
                if time.perf_counter() > deadline:
                    result.cut = True
                    return
                status, payload, seconds, problem = await self.one(make(number))
                result.latencies.append(seconds)
                if status is None or not 200 <= status < 300:
                    result.errors += 1
                    result.error_kinds[problem or f"HTTP {status}"] += 1
                elif on_success is not None:
                    on_success(number, payload)

        await asyncio.gather(*(connection() for _ in range(self.concurrency)))
        result.elapsed = time.perf_counter() - start
        after = cpu_sample(self.server_session, self.database)
        result.cpu = cores_used(before, after, result.elapsed)
        result.per_process = server_split(before, after, result.elapsed)
        return result

    async def warm_up(self, minimum: int, path: str) -> tuple[int, float]:
        """Untimed rounds of `concurrency` parallel requests until at least `minimum` were sent and
        one whole round was fast: by then every worker has verified the password once (the
        expensive hash), opened its database pool and imported everything. (requests, slowest s)."""
        sent, slowest = 0, 0.0
        for _ in range(MAX_WARMUP_ROUNDS):
            answers = await asyncio.gather(
                *(self.one(Call("GET", path)) for _ in range(self.concurrency))
            )
            sent += len(answers)
            failed = [a for a in answers if a[0] != 200]
            if failed:
                status, payload, _, problem = failed[0]
                raise SystemExit(f"warm-up request failed: {problem or status} {payload[:300]!r}")
            latencies = sorted(a[2] for a in answers)
            slowest = max(slowest, latencies[-1])
            # A password check stands out from its round; on a busy machine every request is slow.
            if sent >= minimum and latencies[-1] < max(
                WARM_REQUEST_SECONDS, 3 * percentile(latencies, 0.5)
            ):
                break
        return sent, slowest


def device_body(number: int) -> dict[str, Any]:
    return {
        "name": f"bench-device-{number:06d}",
        "type": "c8y_BenchDevice",
        "c8y_IsDevice": {},
        "c8y_Hardware": {"model": "BenchBox 1", "serialNumber": f"bench-{number:06d}"},
        "c8y_SupportedOperations": ["c8y_Restart", "c8y_Command"],
    }


async def drive(args: argparse.Namespace, base: str, server: Server, out: Report) -> list[Any]:
    rng = random.Random(args.seed)
    created: list[str] = []
    list_path = (
        f"/inventory/managedObjects?pageSize={args.list_page_size}&fragmentType=c8y_IsDevice"
    )

    def remember(number: int, payload: bytes) -> None:
        created.append(orjson.loads(payload)["id"])

    database = urlsplit(args.database_url).path.lstrip("/")
    async with Load(base, args.concurrency, server.process.pid, database) as load:
        sent, slowest = await load.warm_up(args.warmup, list_path)
        out(f"warm-up: {sent} untimed requests (slowest {slowest * 1000:.0f} ms)")
        serving, attempts = await load.spread_over_workers(args.workers, list_path)
        out(
            f"connections served by {serving} of {args.workers} workers "
            f"(after {attempts} connection attempt{'s' if attempts > 1 else ''})"
        )
        if serving < min(args.workers, args.concurrency):
            out("WARNING: some workers own no connection; the figures reflect fewer workers")
        create = await load.phase(
            "create",
            args.creates,
            lambda n: Call("POST", "/inventory/managedObjects", orjson.dumps(device_body(n))),
            remember,
            args.phase_timeout,
        )
        if not created:
            raise SystemExit(f"no create succeeded: {dict(create.error_kinds)}")
        get = await load.phase(
            "get by id",
            args.gets,
            lambda n: Call("GET", f"/inventory/managedObjects/{rng.choice(created)}"),
            None,
            args.phase_timeout,
        )
        listing = await load.phase(
            f"list ({args.list_page_size}/page)",
            args.lists,
            lambda n: Call("GET", list_path),
            None,
            args.phase_timeout,
        )
    return [create, get, listing, len(created)]


def count_rows(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM inventory_managedobject WHERE type = 'c8y_BenchDevice'"
        ).fetchone()
    return int(row[0]) if row else 0


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    out = Report()
    url, admin_url = checked_database_url(args.database_url)
    port = args.port or free_port()
    base = f"http://127.0.0.1:{port}"
    command = server_command(args, port)
    cores = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores

    out("# bench/inventory_http.py")
    out(f"command: {shlex.join([sys.executable, 'bench/inventory_http.py', *argv])}")
    out(
        f"server: {args.server}, {args.workers} worker(s), "
        f"{'no pool (CONN_MAX_AGE=60)' if args.no_pool else 'psycopg pool'}, DEBUG off"
    )
    out(f"server command: {shlex.join(command)}")
    out(
        f"machine: {cores} cores ({usable} usable), {platform.machine()}, "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}"
    )
    out(f"database: {redacted(url)} (dropped and re-created)")
    out("load average before the run: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    out(
        f"load: {args.concurrency} connections, creates={args.creates} gets={args.gets} "
        f"lists={args.lists} raw_inserts={args.raw_inserts}, phase timeout {args.phase_timeout:.0f} s"
    )

    if args.wait_idle > 0:
        wait_until_idle(args.wait_idle, out)
    started = time.perf_counter()
    recreate_database(url, admin_url)
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"REDIS_URL", "DATABASE_URL"} and not key.startswith("PYTEST_")
    }
    env.update(
        DATABASE_URL=url,
        DEBUG="false",
        LOG_LEVEL="WARNING",
        DJANGO_SETTINGS_MODULE="deviceplatform.settings",
        PYTHONUNBUFFERED="1",
    )
    if args.no_pool:
        env["DATABASE_POOL"] = "false"
    manage(env, "migrate", "--noinput", "-v", "0")
    manage(env, "createuser", BENCH_USER, "--password", BENCH_PASSWORD, "--groups", "admins")
    out(f"setup (database, migrate, user): {time.perf_counter() - started:.1f} s")

    raw = raw_insert_ceiling(url, args.raw_inserts, device_body(0))

    log_dir = Path(tempfile.mkdtemp(prefix="dp-bench-"))
    server = Server(command, env, log_dir / "server.log")
    try:
        server.wait_ready(f"{base}/tenant/loginOptions")
        # uvloop makes the client cheaper; it competes with the server for the same cores.
        try:
            import uvloop

            runner: Any = uvloop.run
            loop_name = "uvloop"
        except ImportError:  # pragma: no cover - uvicorn[standard] brings uvloop
            runner, loop_name = asyncio.run, "asyncio"
        out(f"client: aiohttp {aiohttp.__version__} on {loop_name}")
        create, get, listing, created = runner(drive(args, base, server, out))
        if server.process.poll() is not None:
            raise SystemExit(f"server died during the run:\n{server.log_tail()}")
    finally:
        server.stop()
    rows = count_rows(url)

    out()
    out(TABLE_HEADER)
    out("-" * len(TABLE_HEADER))
    for result in (create, get, listing, raw):
        out(result.row())
    out()
    for result in (create, get, listing):
        split = " ".join(f"{cores:.2f}" for cores in result.per_process)
        out(f"server cores per process, {result.name}: {split}")
    ratio = create.rate / raw.rate if raw.rate else math.nan
    out(
        f"ratio create req/s / raw INSERT rows/s: {create.rate:.1f} / {raw.rate:.1f} = {ratio:.2f}x"
    )
    out(
        "server/pg/client/other: cores busy during the phase (server processes, all postgres "
        f"processes, this client, everything else on the machine); {usable} usable cores"
    )
    noisy = [r.name for r in (create, get, listing, raw) if r.cpu.get("other", 0) > NOISY_CORES]
    if noisy:
        out(
            f"WARNING: other processes used more than {NOISY_CORES} cores during {', '.join(noisy)}; "
            "these figures are not comparable (rerun, e.g. with --wait-idle 300)"
        )
    if any(r.cut for r in (create, get, listing)):
        out("* phase stopped at --phase-timeout before all planned requests were sent")
    for result in (create, get, listing):
        if result.error_kinds:
            out(f"errors in {result.name}: {dict(result.error_kinds)}")
    if rows != created:
        out(f"MISMATCH: {created} creates answered 2xx but {rows} rows exist")
    out(f"rows created: {rows}; total run time {time.perf_counter() - started:.1f} s")
    if args.save:
        results = REPO / "bench" / "results"
        results.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = results / f"inventory_http-{args.server}-{stamp}.txt"
        path.write_text("\n".join(out.lines) + "\n")
        print(f"saved {path.relative_to(REPO)}")
    errors = sum(r.errors for r in (create, get, listing))
    return 1 if errors or rows != created else 0


def _terminate(signum: int, frame: Any) -> None:
    print(f"stopped by signal {signum}", file=sys.stderr)
    raise SystemExit(128 + signum)  # unwinds through the finally that stops the server


if __name__ == "__main__":
    # Ctrl-C raises KeyboardInterrupt even when started with SIGINT ignored (e.g. `cmd &`).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
