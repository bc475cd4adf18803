"""How big a fleet one simulator process holds, and how many operations per second it completes.

    .venv/bin/python bench/simulator.py [--fleets 50x10,200x10,500x0] [--rounds 3] [--save]

Starts the platform the way a user does, `bin/run` with PostgreSQL and Redis (a dropped and
re-created database whose name contains "bench", a flushed Redis DB other than 0, its own port),
then for each fleet AxC runs `python -m simulator --agents A --children C --delay 0
--failure-rate 0` against it (its own serial prefix and group) and measures:

  onboard   wall time until every agent is onboarded (bootstrap flow, devices, group) and holds
            its CometD subscription; CPU of the simulator and of the platform meanwhile
  hold      10 s of the connected fleet doing nothing: the simulator's CPU share and memory
  bulk      `--rounds` bulk operations (c8y_Firmware prototype, creationRamp 0) over the fleet's
            group, one after the other: wall time from the POST until generalStatus SUCCESSFUL,
            operations per second, the simulator's and the platform's CPU share

The platform's CPU is that of bin/run and every process below it (web, worker, beat). Figures move with the
machine's other load: the load average is printed before and after."""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import requests
from _common import (
    REPO,
    Process,
    Report,
    Server,
    checked_database_url,
    checked_redis_url,
    command_line,
    flush_redis,
    load_average_line,
    machine_line,
    proc_status_kb,
    process_cpu_seconds,
    recreate_database,
    redacted,
    run_main,
)

ADMIN_PASSWORD = "simbench-admin-pw"
BOOTSTRAP_PASSWORD = "simbench-bootstrap-pw"
HOLD_SECONDS = 10.0
ONBOARD_TIMEOUT = 1800.0
BULK_TIMEOUT = 600.0


def descendants(root: int) -> list[int]:
    """`root` and every process below it (honcho starts each Procfile process in a session of its
    own, so bin/run's session does not hold them)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as handle:
                raw = handle.read()
            parent = int(raw[raw.rfind(")") + 2 :].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    found, queue = [], [root]
    while queue:
        pid = queue.pop()
        found.append(pid)
        queue += children.get(pid, [])
    return found


def tree_cpu(root: int) -> float:
    """CPU seconds so far of a process and its live descendants (bin/run: web, worker, beat)."""
    total = 0.0
    for pid in descendants(root):
        try:
            total += process_cpu_seconds(pid)
        except (OSError, IndexError, ValueError):
            continue
    return total


class Simulator(Process):
    def progress(self) -> str:
        lines = [line for line in self.log_tail(20).splitlines() if line.startswith("agents ")]
        return lines[-1] if lines else ""


def wait_onboarded(simulator: Simulator, agents: int) -> None:
    wanted = re.compile(rf"agents {agents}/{agents} onboarded, {agents} connected")
    deadline = time.monotonic() + ONBOARD_TIMEOUT
    while not wanted.search(simulator.progress()):
        if not simulator.alive():
            raise SystemExit(f"the simulator exited:\n{simulator.log_tail()}")
        if time.monotonic() > deadline:
            raise SystemExit(f"fleet not onboarded in time:\n{simulator.log_tail()}")
        time.sleep(0.2)


def find_group(http: requests.Session, url: str, name: str) -> str:
    page = http.get(
        url + "/inventory/managedObjects",
        params={"fragmentType": "c8y_IsDeviceGroup", "text": name, "pageSize": "100"},
        timeout=30,
    ).json()
    (group,) = [group for group in page["managedObjects"] if group["name"] == name]
    return group["id"]


def bulk_round(http: requests.Session, url: str, group: str, version: str) -> tuple[float, int]:
    """POST a bulk firmware update with creationRamp 0; (seconds until it finished, targets)."""
    started = time.monotonic()
    created = http.post(
        url + "/devicecontrol/bulkoperations",
        json={
            "groupId": group,
            "startDate": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
            "creationRamp": 0,
            "operationPrototype": {"c8y_Firmware": {"name": "bench-fw", "version": version}},
        },
        timeout=60,
    )
    created.raise_for_status()
    bulk = created.json()
    deadline = started + BULK_TIMEOUT
    while True:
        body: dict[str, Any] = http.get(
            url + f"/devicecontrol/bulkoperations/{bulk['id']}", timeout=60
        ).json()
        if body["generalStatus"] in ("SUCCESSFUL", "FAILED"):
            if body["generalStatus"] != "SUCCESSFUL":
                raise SystemExit(f"bulk operation ended {body['generalStatus']}: {body}")
            return time.monotonic() - started, body["progress"]["all"]
        if time.monotonic() > deadline:
            raise SystemExit(f"bulk operation not finished in time: {body}")
        time.sleep(0.1)


def run_fleet(
    report: Report,
    platform: Server,
    url: str,
    agents: int,
    children: int,
    rounds: int,
    workdir: Path,
) -> None:
    name = f"bench {agents}x{children}"
    prefix = f"b{agents}x{children}-{int(time.time())}"
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_")}
    simulator = Simulator(
        [sys.executable, "-m", "simulator", "--url", url, "--user", "admin"]
        + ["--password", ADMIN_PASSWORD, "--bootstrap-password", BOOTSTRAP_PASSWORD]
        + ["--agents", str(agents), "--children", str(children), "--delay", "0"]
        + ["--failure-rate", "0", "--prefix", prefix, "--group", name]
        + ["--state", str(workdir / f"state-{prefix}.json")],
        env,
        workdir / f"simulator-{prefix}.log",
        name="simulator",
    )
    try:
        devices = agents * (children + 1)
        report(f"fleet {agents} agents x {children} children = {devices} devices")
        started = time.monotonic()
        platform_cpu = tree_cpu(platform.pid)
        wait_onboarded(simulator, agents)
        seconds = time.monotonic() - started
        sim_cpu = process_cpu_seconds(simulator.pid)
        report(
            f"  onboard  {seconds:7.1f} s  ({agents / seconds:5.1f} agents/s)  simulator "
            f"{sim_cpu / seconds:4.2f} cores  platform "
            f"{(tree_cpu(platform.pid) - platform_cpu) / seconds:4.2f} cores"
        )

        before = process_cpu_seconds(simulator.pid)
        time.sleep(HOLD_SECONDS)
        idle = (process_cpu_seconds(simulator.pid) - before) / HOLD_SECONDS
        rss = proc_status_kb(simulator.pid, "VmRSS") / 1024
        report(f"  hold     simulator {idle:4.2f} cores idle, {rss:6.1f} MB resident")

        http = requests.Session()
        http.auth = ("t100/admin", ADMIN_PASSWORD)
        http.headers["Accept"] = "application/json"
        group = find_group(http, url, name)
        for number in range(1, rounds + 1):
            sim_before = process_cpu_seconds(simulator.pid)
            platform_before = tree_cpu(platform.pid)
            seconds, targets = bulk_round(http, url, group, f"{number}.0")
            sim_share = (process_cpu_seconds(simulator.pid) - sim_before) / seconds
            platform_share = (tree_cpu(platform.pid) - platform_before) / seconds
            report(
                f"  bulk {number}   {targets} operations in {seconds:6.2f} s = "
                f"{targets / seconds:6.1f} ops/s  simulator {sim_share:4.2f} cores  "
                f"platform {platform_share:4.2f} cores"
            )
        simulator.process.send_signal(signal.SIGINT)
        simulator.process.wait(timeout=120)
        summary = [line for line in simulator.log_tail(5).splitlines() if "simulator ran" in line]
        report(f"  {summary[-1] if summary else simulator.log_tail(3)}")
    finally:
        simulator.stop()


def main(argv: list[str]) -> int:
    options = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    options.add_argument(
        "--database-url", default="postgres://root@127.0.0.1:5432/simbench", help="%(default)s"
    )
    options.add_argument("--redis-url", default="redis://127.0.0.1:6379/5", help="%(default)s")
    options.add_argument("--port", type=int, default=8100, help="%(default)s")
    options.add_argument("--fleets", default="50x10,200x10,500x0", help="AxC,... (%(default)s)")
    options.add_argument("--rounds", type=int, default=3, help="bulk operations per fleet")
    options.add_argument("--save", action="store_true", help="write bench/results/simulator-*.txt")
    args = options.parse_args(argv)
    fleets = []
    for item in args.fleets.split(","):
        agents, _, children = item.partition("x")
        fleets.append((int(agents), int(children or 0)))
    database_url, admin_url = checked_database_url(args.database_url)
    redis_url = checked_redis_url(args.redis_url)

    report = Report()
    report(command_line("bench/simulator.py", argv))
    report(machine_line())
    report(load_average_line())
    recreate_database(database_url, admin_url)
    flush_redis(redis_url)
    workdir = REPO / "bench" / "results" / "simulator-work"
    workdir.mkdir(parents=True, exist_ok=True)
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("PYTEST_") and key not in ("VIRTUAL_ENV", "STATIC_ROOT")
    }
    env.update(
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        PORT=str(args.port),
        ADMIN_PASSWORD=ADMIN_PASSWORD,
        DEVICE_BOOTSTRAP_PASSWORD=BOOTSTRAP_PASSWORD,
        LOG_LEVEL="WARNING",
    )
    url = f"http://127.0.0.1:{args.port}"
    report(f"platform: bin/run (web, worker, beat) on {url}, {redacted(database_url)}, {redis_url}")
    platform = Server(["bin/run"], env, workdir / "platform.log", name="platform")
    try:
        platform.wait_ready(url + "/tenant/loginOptions")
        for agents, children in fleets:
            run_fleet(report, platform, url, agents, children, args.rounds, workdir)
    finally:
        platform.stop()
    report("load average after the run: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    if args.save:
        report.save("simulator")
    return 0


if __name__ == "__main__":
    run_main(main)
