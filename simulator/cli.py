"""The command line: options, their defaults (the admin and bootstrap passwords bin/run keeps in the
repository), checks, and the event loop with Ctrl-C/SIGTERM handling."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import sys
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiocometd_ng import ConnectionType

from simulator.api import Api
from simulator.fleet import Config, Fleet, new_session
from simulator.progress import Console
from simulator.state import State, StateError

REPO = Path(__file__).resolve().parent.parent
ADMIN_PASSWORD_FILE = REPO / ".admin-password"
BOOTSTRAP_PASSWORD_FILE = REPO / ".bootstrap-password"
DEFAULT_STATE = REPO / ".venv" / "simulator-state.json"
TRANSPORTS = {"websocket": ConnectionType.WEBSOCKET, "long-polling": ConnectionType.LONG_POLLING}
# A serial becomes part of a device user's name: no whitespace, control characters, \ / + $ :
SERIAL_FORBIDDEN = re.compile(r"[\s\\/+$:\x00-\x1f\x7f-\x9f]")

DESCRIPTION = """\
A fleet of simulated device agents for this platform, using only its public API (REST and
CometD), so an operator sees devices appear and operations run.

Each agent onboards through the device bootstrap flow (the admin registers and accepts its serial
<prefix>-NNNN, the agent polls for its credentials as the bootstrap user), creates its agent
device and --children child devices with external IDs (c8y_Serial), puts them all in the group
--group (created if missing) so a bulk operation can target them, subscribes to its operations
over CometD, and executes them: EXECUTING at once, then after --delay seconds (jittered)
SUCCESSFUL with its result (c8y_Command result, c8y_Firmware / c8y_SoftwareList /
c8y_Configuration / c8y_RestartCount on the device), or FAILED with probability --failure-rate.

Credentials and IDs are kept in the state file, so a restarted simulator logs in as the same
devices, finds them by external ID instead of creating duplicates, and first finishes the
operations that wait for it (PENDING, and EXECUTING ones a previous run left)."""


def parser() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(
        prog="bin/simulate",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    options.add_argument(
        "--url", default="http://127.0.0.1:8000", help="the platform (default: %(default)s)"
    )
    options.add_argument(
        "--user",
        default="admin",
        help="the admin user, login '<tenant>/<user>' or '<user>' (default: %(default)s)",
    )
    options.add_argument(
        "--password",
        help="the admin's password (default: $ADMIN_PASSWORD, else the .admin-password bin/run "
        "writes in this repository)",
    )
    options.add_argument(
        "--bootstrap-password",
        help="the device bootstrap login's password (default: $DEVICE_BOOTSTRAP_PASSWORD, else "
        "the .bootstrap-password bin/run writes)",
    )
    options.add_argument(
        "--agents", type=int, default=5, metavar="N", help="agents (default: %(default)s)"
    )
    options.add_argument(
        "--children",
        type=int,
        default=3,
        metavar="M",
        help="child devices per agent (default: %(default)s)",
    )
    options.add_argument(
        "--failure-rate",
        type=float,
        default=0.1,
        metavar="P",
        help="probability (0 to 1) that an operation ends FAILED (default: %(default)s)",
    )
    options.add_argument(
        "--delay",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="time an operation stays EXECUTING, jittered by +-50%% (default: %(default)s)",
    )
    options.add_argument(
        "--transport",
        choices=sorted(TRANSPORTS),
        default="websocket",
        help="CometD transport (default: %(default)s)",
    )
    options.add_argument(
        "--prefix",
        default="sim",
        help="serial prefix: agents are PREFIX-0001, ... (default: %(default)s)",
    )
    options.add_argument(
        "--group",
        default="Simulated fleet",
        metavar="NAME",
        help="device group holding every simulated device (default: %(default)s)",
    )
    options.add_argument(
        "--state",
        type=Path,
        default=DEFAULT_STATE,
        metavar="FILE",
        help="credentials and IDs of the agents, per platform URL "
        "(default: .venv/simulator-state.json)",
    )
    options.add_argument(
        "--duration",
        type=float,
        metavar="SECONDS",
        help="stop after this long (default: run until Ctrl-C or SIGTERM)",
    )
    options.add_argument(
        "--quiet", action="store_true", help="no progress line (errors and the summary remain)"
    )
    return options


def read_secret(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def config_from(args: argparse.Namespace, options: argparse.ArgumentParser) -> Config:
    url = args.url.rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        options.error(f"--url must be an http:// or https:// address, not {args.url!r}")
    if args.agents < 1:
        options.error("--agents must be at least 1")
    if args.children < 0:
        options.error("--children must be 0 or more")
    if not 0 <= args.failure_rate <= 1:
        options.error("--failure-rate must be between 0 and 1")
    if args.delay < 0:
        options.error("--delay must be 0 or more")
    if args.duration is not None and args.duration <= 0:
        options.error("--duration must be more than 0")
    if not args.prefix or SERIAL_FORBIDDEN.search(args.prefix):
        options.error(
            "--prefix must be non-empty, without whitespace, control characters, or any of \\ / + $ :"
        )
    if not args.group.strip():
        options.error("--group must not be empty")
    password = args.password or os.environ.get("ADMIN_PASSWORD") or read_secret(ADMIN_PASSWORD_FILE)
    if not password:
        options.error(
            "no admin password: pass --password, set ADMIN_PASSWORD, or run bin/run once in this "
            "repository (it writes .admin-password)"
        )
    bootstrap = (
        args.bootstrap_password
        or os.environ.get("DEVICE_BOOTSTRAP_PASSWORD")
        or read_secret(BOOTSTRAP_PASSWORD_FILE)
    )
    return Config(
        url=url,
        user=args.user,
        password=password,
        bootstrap_password=bootstrap,
        agents=args.agents,
        children=args.children,
        failure_rate=args.failure_rate,
        delay=args.delay,
        transport=TRANSPORTS[args.transport],
        prefix=args.prefix,
        group=args.group,
        state=args.state,
        duration=args.duration,
        quiet=args.quiet,
    )


async def run(config: Config) -> int:
    console = Console(sys.stderr, quiet=config.quiet)
    state = State(config.state, config.url)
    try:
        state.load()
    except StateError as exc:
        console.message(f"bin/simulate: error: {exc}")
        return 1
    async with new_session() as session:
        fleet = Fleet(config, Api(config.url, session), state, console)
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(quiet_cancellations)
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, fleet.stop_requested.set)
        try:
            return await fleet.run()
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)


def quiet_cancellations(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """aiocometd-ng's WebSocket transport reads its cancelled receive task's result in a done
    callback that catches only `Exception`, so closing a client reports a CancelledError as an
    exception in a callback: harmless, and not shown. Anything else goes to the default handler."""
    if isinstance(context.get("exception"), asyncio.CancelledError):
        return
    loop.default_exception_handler(context)


def main(argv: list[str] | None = None) -> int:
    options = parser()
    config = config_from(options.parse_args(argv), options)
    # The CometD library logs every reconnect and warns about its own aiohttp calls; the
    # simulator reports connections itself.
    logging.getLogger("aiocometd_ng").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        return asyncio.run(run(config))
    except KeyboardInterrupt:
        return 130
