"""What the benchmarks in bench/ share: database set-up, server processes, the HTTP load driver, CPU accounting.

Each script (inventory_http.py, operations.py, bulk.py) imports this module from its own folder
(`python bench/<script>.py` puts bench/ first on sys.path). Everything here is plain functions and
small classes; the scripts decide what to measure and how to print it.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import contextlib
import math
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import psycopg

REPO = Path(__file__).resolve().parent.parent
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", ""})
BENCH_USER = "bench"
BENCH_PASSWORD = "bench-pw:not-secret"
TENANT = "t100"
STARTUP_TIMEOUT = 60.0
# A request slower than this during warm-up is taken as a worker's first request (Django's password
# hasher runs once per worker and process-wide credential cache; see deviceplatform/api/authentication.py).
WARM_REQUEST_SECONDS = 0.25
MAX_WARMUP_ROUNDS = 60
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- output ---------------------------------------------------------------------------------------


class Report:
    """Prints lines as they come and keeps them for --save."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def save(self, stem: str) -> None:
        """Write the lines to bench/results/<stem>-<timestamp>.txt (git-ignored) and say so."""
        results = REPO / "bench" / "results"
        results.mkdir(exist_ok=True)
        path = results / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}.txt"
        path.write_text("\n".join(self.lines) + "\n")
        print(f"saved {path.relative_to(REPO)}")


SUMMARY_PREFIX = "SUMMARY "


def summary(
    report: Callable[[str], None],
    figure: str,
    value: float,
    unit: str,
    *,
    ceiling: str = "",
    ceiling_value: float | None = None,
    goal: str = "",
    met: bool | None = None,
) -> None:
    """Print one machine-readable headline figure for bench/all's summary table.

    One line `SUMMARY {json}` per figure: what was measured (`figure`, e.g. "operation create"),
    its `value` and `unit`, the ceiling measured in the same run (`ceiling`, `ceiling_value`; the
    `ratio` is computed here), the issue's goal in words (e.g. ">= 0.9x bare DRF") and whether this
    run met it (None: the figure has no goal). bench/all collects these lines from every script.
    """
    import json

    ratio = value / ceiling_value if ceiling_value else None
    report(
        SUMMARY_PREFIX
        + json.dumps(
            {
                "bench": Path(sys.argv[0]).stem,
                "figure": figure,
                "value": round(value, 4),
                "unit": unit,
                "ceiling": ceiling,
                "ceiling_value": None if ceiling_value is None else round(ceiling_value, 4),
                "ratio": None if ratio is None else round(ratio, 4),
                "goal": goal,
                "met": met,
            }
        )
    )


def command_line(script: str, argv: list[str]) -> str:
    """The `command:` header line: how this run was started."""
    return f"command: {shlex.join([sys.executable, script, *argv])}"


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask), else all of them."""
    cores = os.cpu_count() or 0
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores


def machine_line() -> str:
    """The `machine:` header line: cores, architecture, Python and kernel."""
    cores = os.cpu_count() or 0
    return (
        f"machine: {cores} cores ({usable_cores()} usable), {platform.machine()}, "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}"
    )


def load_average_line() -> str:
    """The `load average before the run:` header line."""
    return "load average before the run: " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_main(main: Callable[[list[str]], int]) -> None:
    """Run `main(sys.argv[1:])` and exit with its status. SIGTERM and SIGHUP raise SystemExit, and
    Ctrl-C raises KeyboardInterrupt even when started with SIGINT ignored (e.g. `cmd &`), so the
    `finally` blocks that stop the processes a benchmark started always run."""

    def terminate(signum: int, frame: Any) -> None:
        print(f"stopped by signal {signum}", file=sys.stderr)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# --- Redis ----------------------------------------------------------------------------------------


def checked_redis_url(url: str) -> str:
    """The URL, if it is Redis on loopback with a DB index other than 0 (the bench flushes it)."""
    parts = urlsplit(url)
    if (parts.hostname or "") not in LOOPBACK_HOSTS:
        raise SystemExit(f"the benchmark only talks to loopback; {parts.hostname!r} is not")
    if parts.path.strip("/") in ("", "0"):
        raise SystemExit("--redis-url needs a dedicated DB index other than 0 (it is flushed)")
    return url


def flush_redis(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()


# --- database -------------------------------------------------------------------------------------


def checked_database_url(url: str) -> tuple[str, str]:
    """(url of the bench database, url of the `postgres` maintenance database on the same server).
    Refuses anything but loopback and database names without 'bench' (the database is dropped)."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql"):
        raise SystemExit(f"--database-url must be a postgres:// URL, not {url!r}")
    if (parts.hostname or "") not in LOOPBACK_HOSTS:
        raise SystemExit(f"the benchmark only talks to loopback; {parts.hostname!r} is not")
    name = parts.path.lstrip("/")
    if "bench" not in name:
        raise SystemExit(f"refusing to drop database {name!r}: its name must contain 'bench'")
    return url, urlunsplit((parts.scheme, parts.netloc, "/postgres", parts.query, ""))


def database_name(url: str) -> str:
    """The database name in a postgres:// URL."""
    return urlsplit(url).path.lstrip("/")


def redacted(url: str) -> str:
    """The URL with its password, if any, replaced by ***."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return url


def recreate_database(url: str, admin_url: str) -> None:
    """DROP (with FORCE) and CREATE the bench database through the maintenance database."""
    name = database_name(url)
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


def manage(env: dict[str, str], *args: str) -> None:
    """Run `manage.py <args>` with `env`; exit with its output if it fails."""
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


def bench_env(url: str, drop: Iterable[str] = (), **extra: str) -> dict[str, str]:
    """This process's environment for the server and manage.py: without REDIS_URL, DATABASE_URL,
    `drop` and PYTEST_*, with DATABASE_URL=`url`, DEBUG=false, LOG_LEVEL=WARNING, the settings
    module, unbuffered output, and `extra`."""
    dropped = {"REDIS_URL", "DATABASE_URL", *drop}
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in dropped and not key.startswith("PYTEST_")
    }
    env.update(
        DATABASE_URL=url,
        DEBUG="false",
        LOG_LEVEL="WARNING",
        DJANGO_SETTINGS_MODULE="deviceplatform.settings",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def migrate_and_create_user(env: dict[str, str]) -> None:
    """`manage.py migrate`, then the admin user the load driver authenticates as."""
    manage(env, "migrate", "--noinput", "-v", "0")
    manage(env, "createuser", BENCH_USER, "--password", BENCH_PASSWORD, "--groups", "admins")


def setup_django(env: dict[str, str]) -> None:
    """Set up Django in this process with `env`, to use the app's own code (models, selectors)."""
    os.environ.update(env)
    sys.path.insert(0, str(REPO))
    import django

    django.setup()


def create_device_users(names: Iterable[str], password: str) -> list[Any]:
    """Users in the built-in group `devices` (as agents' own credentials are), created in bulk with
    one password hashed once. Needs setup_django() first."""
    from django.contrib.auth import get_user_model
    from django.contrib.auth.hashers import make_password
    from django.contrib.auth.models import Group

    user_model = get_user_model()
    hashed = make_password(password)
    users = user_model.objects.bulk_create(
        [user_model(username=name, password=hashed) for name in names]
    )
    devices_group = Group.objects.get(name="devices")
    user_model.groups.through.objects.bulk_create(
        [user_model.groups.through(user_id=user.pk, group_id=devices_group.pk) for user in users]
    )
    return users


def basic_auth(login: str = BENCH_USER, password: str = BENCH_PASSWORD) -> str:
    """The Authorization header value for `<tenant>/<login>:<password>`."""
    return "Basic " + base64.b64encode(f"{TENANT}/{login}:{password}".encode()).decode()


# --- processes ------------------------------------------------------------------------------------


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Process:
    """A child in its own session (process group), so that stopping it also stops every process it
    forked or spawned, and Ctrl-C in the terminal reaches only the benchmark. Output goes to
    `log_path`; it is stopped at exit too."""

    def __init__(
        self, command: list[str], env: dict[str, str], log_path: Path, name: str = "server"
    ) -> None:
        self.name = name
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

    @property
    def pid(self) -> int:
        """The pid of the child, which is also its session and process-group id."""
        return self.process.pid

    def alive(self) -> bool:
        """Whether the child is still running."""
        return self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        """The last `lines` lines of its output."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM to the process group, SIGKILL after 10 s; idempotent."""
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
            # The leader is gone; make sure no orphaned worker of its group survives.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        if not self._log.closed:
            self._log.close()


class Server(Process):
    """The HTTP server under test."""

    def wait_ready(self, url: str) -> None:
        """Poll `url` until it answers 200 (exit if the server dies or takes STARTUP_TIMEOUT)."""
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


def gunicorn_command(workers: int, port: int) -> list[str]:
    """gunicorn with `workers` sync workers on 127.0.0.1:`port` (the production REST layout)."""
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "deviceplatform.wsgi:application",
        "--workers",
        str(workers),
        "--bind",
        f"127.0.0.1:{port}",
        "--log-level",
        "warning",
    ]


def uvicorn_command(workers: int, port: int) -> list[str]:
    """uvicorn (ASGI: HTTP and WebSocket) with `workers` processes on 127.0.0.1:`port`."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "deviceplatform.asgi:application",
        "--workers",
        str(workers),
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


# --- CPU accounting from /proc --------------------------------------------------------------------


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy since boot (all but idle and iowait)."""
    with open("/proc/stat") as handle:
        ticks = [int(value) for value in handle.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    guest = sum(ticks[8:10])  # guest time is already counted in user time
    return (sum(ticks) - guest - idle) / CLK_TCK


def _read(path: str) -> str:
    with open(path, "rb") as handle:
        return handle.read().decode(errors="replace")


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of one process, in seconds."""
    raw = _read(f"/proc/{pid}/stat")
    fields = raw[raw.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


@dataclass
class CpuSample:
    """CPU seconds so far, per process, of the server (its session), of PostgreSQL (the backends of
    the bench database and the background processes), of this client, and of the whole machine.
    Everything else running meanwhile (other people's test runs, their databases) is "other"."""

    server: dict[int, float]
    postgres: dict[int, float]
    client: float
    machine: float


def cpu_sample(server_session: int | None, database: str) -> CpuSample:
    """Read /proc now: see CpuSample. `server_session` None: no server."""
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
    """Cores busy per group over the interval (server, postgres, client, machine, other); per
    process, so processes that end or start in between do not distort the sum."""

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


def session_pids(session: int) -> list[int]:
    """The processes of one session (a `Process` and everything it started)."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = _read(f"/proc/{entry.name}/stat")
            if int(raw[raw.rfind(")") + 2 :].split()[3]) == session:
                pids.append(int(entry.name))
        except (OSError, IndexError, ValueError):  # the process ended meanwhile
            continue
    return pids


def proc_status_kb(pid: int, key: str) -> int:
    """A kB figure from /proc/<pid>/status (VmRSS: resident now, VmHWM: peak resident); 0 if gone."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def redis_cpu_seconds() -> float:
    """CPU seconds so far of every redis-server process on the machine."""
    total = 0.0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if _read(f"/proc/{entry.name}/comm").startswith("redis-server"):
                total += process_cpu_seconds(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return total


def wait_for_idle(limit: float, threshold: float, windows: int = 3) -> tuple[bool, float, float]:
    """Wait (at most `limit` s) for `windows` consecutive one-second windows in which the whole
    machine used fewer than `threshold` cores. (quiet, seconds waited, cores busy in the last
    window)."""
    start = time.monotonic()
    quiet, cores = 0, 0.0
    busy = machine_busy_seconds()
    while time.monotonic() - start < limit and quiet < windows:
        time.sleep(1.0)
        now = machine_busy_seconds()
        cores, busy = now - busy, now
        quiet = quiet + 1 if cores < threshold else 0
    return quiet >= windows, time.monotonic() - start, cores


# --- measurements ---------------------------------------------------------------------------------


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


CPU_COLUMNS = {"server": "server", "postgres": "pg", "client": "client", "other": "other"}
TABLE_HEADER = (
    f"{'phase':<16}{'requests':>9}{'errors':>8}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"
    + "".join(f"{label:>7}" for label in CPU_COLUMNS.values())
)


@dataclass
class PhaseResult:
    """Latencies (s), errors, wall time and cores used of one measured phase."""

    name: str
    planned: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    error_kinds: Counter[str] = field(default_factory=Counter)
    elapsed: float = 0.0
    cut: bool = False
    cpu: dict[str, float] = field(default_factory=dict)  # cores used per process group
    per_process: list[float] = field(default_factory=list)  # cores used per server process

    @property
    def done(self) -> int:
        """Requests (or statements) completed."""
        return len(self.latencies)

    @property
    def rate(self) -> float:
        """Completed per second of wall time."""
        return self.done / self.elapsed if self.elapsed else math.nan

    def p(self, q: float) -> float:
        """Latency percentile `q` in milliseconds."""
        return percentile(sorted(self.latencies), q) * 1000

    def row(self) -> str:
        """This phase as a row under TABLE_HEADER (`*`: cut at the phase timeout)."""
        ordered = sorted(self.latencies)
        requests = f"{self.done}{'*' if self.cut else ''}"
        return (
            f"{self.name:<16}{requests:>9}{self.errors:>8}{self.rate:>10.1f}"
            f"{percentile(ordered, 0.50) * 1000:>9.2f}{percentile(ordered, 0.99) * 1000:>9.2f}"
            f"{(ordered[-1] if ordered else math.nan) * 1000:>9.1f}"
            + "".join(f"{self.cpu.get(key, math.nan):>7.2f}" for key in CPU_COLUMNS)
        )


def time_statement(
    cursor: psycopg.Cursor[Any],
    sql: str,
    params: Callable[[], tuple[Any, ...]],
    rows: int,
    database: str,
    name: str = "raw INSERT",
    warmup: int = 50,
) -> PhaseResult:
    """Execute the prepared `sql` `warmup` times untimed (prepare it, fault in the table's pages),
    then `rows` times timed, one round trip each; `params()` is called outside the timing."""
    result = PhaseResult(name=name, planned=rows)
    for _ in range(warmup):
        cursor.execute(sql, params(), prepare=True)
    before = cpu_sample(None, database)
    start = time.perf_counter()
    for _ in range(rows):
        values = params()
        t0 = time.perf_counter()
        cursor.execute(sql, values, prepare=True)
        result.latencies.append(time.perf_counter() - t0)
    result.elapsed = time.perf_counter() - start
    result.cpu = cores_used(before, cpu_sample(None, database), result.elapsed)
    return result


# --- HTTP load ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One HTTP request: method, path (with query string) and JSON body."""

    method: str
    path: str
    body: bytes | None = None


class Load:
    """aiohttp with keep-alive, Basic auth as the bench user and `Accept: application/json` on every
    request; up to `concurrency` connections. Use as `async with Load(...) as load:`."""

    def __init__(self, base: str, concurrency: int, server_session: int, database: str) -> None:
        self.base = base
        self.database = database
        self.concurrency = concurrency
        self.server_session = server_session
        self.headers = {"Authorization": basic_auth(), "Accept": "application/json"}
        self.post_headers = {**self.headers, "Content-Type": "application/json"}
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Load:
        self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.session is not None:
            await self.session.close()

    def connect(self) -> None:
        """Open a new client session (its connections are opened on demand)."""
        connector = aiohttp.TCPConnector(limit=self.concurrency, limit_per_host=self.concurrency)
        self.session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=60)
        )

    async def reconnect(self) -> None:
        """Close every connection and start a new session."""
        if self.session is not None:
            await self.session.close()
        self.connect()

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

    async def run(
        self,
        name: str,
        calls: Iterable[Call],
        deadline_seconds: float,
        check: Callable[[bytes], str | None] | None = None,
        *,
        planned: int = 0,
        concurrency: int | None = None,
        error_body: int = 0,
    ) -> PhaseResult:
        """Closed loop: `concurrency` (default: all) connections pulling from one iterator of
        calls, each sending its next call when the previous answer has been read, until the calls
        run out or `deadline_seconds` pass (then `cut`). `check(body)` of a 2xx answer returns a
        problem description or None; a non-2xx answer counts as `HTTP <status>` plus the first
        `error_body` bytes of its body."""
        result = PhaseResult(name=name, planned=planned)
        pending = iter(calls)
        before = cpu_sample(self.server_session, self.database)
        start = time.perf_counter()
        deadline = start + deadline_seconds

        async def connection() -> None:
            for call in pending:
                if time.perf_counter() > deadline:
                    result.cut = True
                    return
                status, payload, seconds, problem = await self.one(call)
                result.latencies.append(seconds)
                if status is None or not 200 <= status < 300:
                    detail = f" {payload[:error_body]!r}" if error_body else ""
                    problem = problem or f"HTTP {status}{detail}"
                elif check is not None:
                    problem = check(payload) or ""
                if problem:
                    result.errors += 1
                    result.error_kinds[problem] += 1

        await asyncio.gather(*(connection() for _ in range(concurrency or self.concurrency)))
        result.elapsed = time.perf_counter() - start
        after = cpu_sample(self.server_session, self.database)
        result.cpu = cores_used(before, after, result.elapsed)
        result.per_process = server_split(before, after, result.elapsed)
        return result

    async def warm_up(
        self, path: str, minimum: int = 50, median_factor: float = 0.0
    ) -> tuple[int, float]:
        """Untimed rounds of `concurrency` parallel GETs of `path` until at least `minimum` were
        sent and one whole round was fast (its slowest under WARM_REQUEST_SECONDS, or under
        `median_factor` times the round's median if that is more): by then every worker has
        verified the password once (the expensive hash), opened its database pool and imported
        everything. (requests, slowest s)."""
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
                WARM_REQUEST_SECONDS, median_factor * percentile(latencies, 0.5)
            ):
                break
        return sent, slowest


def combined(name: str, phases: list[PhaseResult]) -> PhaseResult:
    """Several phases of one kind as one (the alternating bare/product phases of inventory_http.py
    and operations.py): every latency, the summed wall time, the time-weighted cores, the
    per-process cores of the first."""
    result = PhaseResult(name=name, planned=sum(p.planned for p in phases))
    for phase in phases:
        result.latencies += phase.latencies
        result.errors += phase.errors
        result.error_kinds.update(phase.error_kinds)
        result.elapsed += phase.elapsed
        result.cut = result.cut or phase.cut
    for key in ("server", "postgres", "client", "other"):
        result.cpu[key] = (
            sum(p.cpu.get(key, 0.0) * p.elapsed for p in phases) / result.elapsed
            if result.elapsed
            else math.nan
        )
    result.per_process = phases[0].per_process if phases else []
    return result
