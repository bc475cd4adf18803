"""Server time of every admin page an operator scans, at fleet scale on PostgreSQL.

Creates a dedicated database (default `postgres://root@127.0.0.1:5432/dp_admin_bench`; the name
must contain `bench`), migrates it and fills it with SQL (generate_series): by default 100,000
devices (1,000 agents with 99 child devices each), 10 groups of 10,000 devices, one c8y_Serial
per device, 1,000,000 operations (10 per device: successful, one failed and its retry, some
pending and executing), 200 bulk operations, 1,000 registrations and the agents' device users;
then ANALYZE. Each page is then requested in this process through Django's test client as a
logged-in superuser (the full Django stack without the network: server time), once to warm up
and `--rounds` times measured; it prints median and slowest time, the number of queries and the
rows shown. `--keep` reuses a database filled by an earlier run (filling takes a few minutes).

Usage (see bench/README.md):  .venv/bin/python bench/admin_pages.py [--devices 100000]
"""

import argparse
import statistics
import tempfile
import time

import psycopg
from _common import (
    Report,
    bench_env,
    checked_database_url,
    command_line,
    database_name,
    load_average_line,
    machine_line,
    manage,
    recreate_database,
    redacted,
    run_main,
    setup_django,
)

DEFAULT_DATABASE_URL = "postgres://root@127.0.0.1:5432/dp_admin_bench"
CHILDREN_PER_AGENT = 99
GROUPS = 10
BULK_OPERATIONS = 200
REGISTRATIONS = 1_000
BUDGET_MS = 300  # the target for a list page's server time

FILL = [
    # Agents, then their child devices (owned by the agent's device user, as onboarding does).
    """
    INSERT INTO inventory_managedobject
        (type, name, owner, creation_time, last_updated, fragments, is_device, is_agent, is_group)
    SELECT 'c8y_Agent', 'Agent ' || a, 'device_agent-' || a, now() - interval '30 days', now(),
           jsonb_build_object('c8y_IsDevice', '{}'::jsonb, 'com_cumulocity_model_Agent',
               '{}'::jsonb, 'c8y_SupportedOperations',
               '["c8y_Restart", "c8y_Firmware", "c8y_Command"]'::jsonb,
               'c8y_Firmware', jsonb_build_object('name', 'agent-fw', 'version', '2.' || (a %% 7))),
           true, true, false
    FROM generate_series(1, %(agents)s) AS a
    """,
    """
    INSERT INTO inventory_managedobject
        (type, name, owner, creation_time, last_updated, fragments, is_device, is_agent, is_group)
    SELECT CASE WHEN c %% 3 = 0 THEN 'c8y_Sensor' ELSE 'c8y_Linux' END,
           'Device ' || a || '-' || c, 'device_agent-' || a, now() - interval '29 days', now(),
           jsonb_build_object('c8y_IsDevice', '{}'::jsonb, 'c8y_Firmware',
               jsonb_build_object('name', 'fw', 'version', '1.' || (c %% 5))),
           true, false, false
    FROM generate_series(1, %(agents)s) AS a, generate_series(1, %(children)s) AS c
    """,
    """
    INSERT INTO inventory_managedobjectreference (relation, parent_id, child_id)
    SELECT 'device', agent.id, child.id
    FROM inventory_managedobject agent
    JOIN inventory_managedobject child ON child.owner = agent.owner AND NOT child.is_agent
    WHERE agent.is_agent
    """,
    """
    INSERT INTO inventory_managedobject
        (type, name, owner, creation_time, last_updated, fragments, is_device, is_agent, is_group)
    SELECT 'c8y_DeviceGroup', 'Region ' || g, 'admin', now(), now(),
           '{"c8y_IsDeviceGroup": {}}'::jsonb, false, false, true
    FROM generate_series(0, %(groups)s - 1) AS g
    """,
    """
    INSERT INTO inventory_managedobjectreference (relation, parent_id, child_id)
    SELECT 'asset', grp.id, device.id
    FROM inventory_managedobject device
    JOIN inventory_managedobject grp
      ON grp.is_group AND grp.name = 'Region ' || (device.id %% %(groups)s)
    WHERE device.is_device
    """,
    """
    INSERT INTO inventory_externalid (type, external_id, managed_object_id)
    SELECT 'c8y_Serial', 'SN-' || id, id FROM inventory_managedobject WHERE is_device
    """,
    # Operations, oldest first: per device `per_device - 2` successful ones, one failed and its
    # retry (pending for every 20th device, executing for every 50th, else successful).
    """
    CREATE TEMP TABLE bench_device_agent AS
    SELECT device.id AS device_id, coalesce(ref.parent_id, device.id) AS agent_id
    FROM inventory_managedobject device
    LEFT JOIN inventory_managedobjectreference ref
      ON ref.child_id = device.id AND ref.relation = 'device'
    WHERE device.is_device
    """,
    """
    INSERT INTO devicecontrol_operation
        (device_id, agent_id, status, creation_time, status_changed_at, fragments, superseded)
    SELECT d.device_id, d.agent_id, 'SUCCESSFUL', now() - (k || ' hours')::interval,
           now() - (k || ' hours')::interval,
           CASE WHEN k %% 2 = 0
                THEN '{"description": "Restart device", "c8y_Restart": {}}'::jsonb
                ELSE '{"description": "Update firmware to 1.4",
                       "c8y_Firmware": {"name": "fw", "version": "1.4"}}'::jsonb END,
           false
    FROM generate_series(%(per_device)s, 3, -1) AS k, bench_device_agent d
    ORDER BY k DESC, d.device_id
    """,
    """
    INSERT INTO devicecontrol_operation
        (device_id, agent_id, status, creation_time, status_changed_at, fragments,
         failure_reason, superseded)
    SELECT device_id, agent_id, 'FAILED', now() - interval '2 hours', now() - interval '2 hours',
           '{"description": "Execute shell command", "c8y_Command": {"text": "df -h"}}'::jsonb,
           'No space left on device', false
    FROM bench_device_agent ORDER BY device_id
    """,
    """
    INSERT INTO devicecontrol_operation
        (device_id, agent_id, status, creation_time, status_changed_at, fragments, retry_of_id,
         superseded, executing_since)
    SELECT device_id, agent_id,
           CASE WHEN device_id %% 20 = 0 THEN 'PENDING'
                WHEN device_id %% 50 = 1 THEN 'EXECUTING' ELSE 'SUCCESSFUL' END,
           now() - interval '1 hour', now() - interval '1 hour', fragments, id, false,
           CASE WHEN device_id %% 50 = 1 THEN now() - interval '1 hour' END
    FROM devicecontrol_operation WHERE status = 'FAILED' ORDER BY device_id
    """,
    """
    INSERT INTO bulkops_bulkoperation
        (group_id, start_date, creation_ramp, operation_prototype, fragments, status,
         creation_time, last_updated, effective_start, first_index, next_index, target_count,
         dropped, pending, executing, successful, failed, ramp_error_count)
    SELECT (SELECT min(id) FROM inventory_managedobject WHERE is_group), now() - interval '1 day',
           0.5, '{"c8y_Restart": {}}'::jsonb, '{"description": "Nightly restart"}'::jsonb,
           CASE WHEN b %% 10 = 0 THEN 'ACTIVE' ELSE 'COMPLETED' END,
           now() - interval '1 day', now(), now() - interval '1 day', 0, 10000, 10000,
           0, 0, 0, 9900, 100, 0
    FROM generate_series(1, %(bulk)s) AS b
    """,
    """
    INSERT INTO devicecontrol_newdevicerequest
        (device_id, status, security_token_digest, creation_time, owner, accepted_by)
    SELECT 'new-' || r, CASE WHEN r %% 2 = 0 THEN 'PENDING_ACCEPTANCE'
                             ELSE 'WAITING_FOR_CONNECTION' END, '', now(), 'admin', ''
    FROM generate_series(1, %(registrations)s) AS r
    """,
    """
    INSERT INTO deviceplatform_user
        (password, is_superuser, username, first_name, last_name, email, is_staff, is_active,
         date_joined, last_request_at)
    SELECT '!', false, 'device_agent-' || a, '', '', '', false, true, now(),
           now() - (a || ' seconds')::interval
    FROM generate_series(1, %(agents)s) AS a
    """,
    """
    INSERT INTO deviceplatform_user_groups (user_id, group_id)
    SELECT u.id, g.id FROM deviceplatform_user u, auth_group g
    WHERE u.username LIKE 'device\\_agent-%%' AND g.name = 'devices'
    """,
]


def fill(url: str, devices: int, operations: int, report: Report) -> None:
    agents = max(1, devices // (CHILDREN_PER_AGENT + 1))
    params = {
        "agents": agents,
        "children": CHILDREN_PER_AGENT,
        "groups": GROUPS,
        "per_device": max(3, operations // devices),
        "bulk": BULK_OPERATIONS,
        "registrations": REGISTRATIONS,
    }
    started = time.perf_counter()
    with psycopg.connect(url) as conn:
        for statement in FILL:
            conn.execute(statement, params)
        conn.commit()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
        counts = conn.execute(
            "SELECT (SELECT count(*) FROM inventory_managedobject WHERE is_device),"
            " (SELECT count(*) FROM devicecontrol_operation)"
        ).fetchone()
    assert counts is not None
    report(
        f"filled: {counts[0]:,} devices ({agents:,} agents), {counts[1]:,} operations "
        f"in {time.perf_counter() - started:.0f} s"
    )


def pages() -> list[tuple[str, str]]:
    """(label, path) of the pages to time, with real IDs from the filled database."""
    from django.urls import reverse

    from devicecontrol.models import Operation
    from inventory.models import ManagedObject

    agent = ManagedObject.objects.filter(is_agent=True).order_by("id").first()
    group = ManagedObject.objects.filter(is_group=True).order_by("id").first()
    device = ManagedObject.objects.filter(is_device=True, is_agent=False).order_by("-id").first()
    failed = Operation.objects.filter(status="FAILED").order_by("-id").first()
    assert agent is not None
    assert group is not None
    assert device is not None
    assert failed is not None
    devices = reverse("admin:inventory_managedobject_changelist")
    operations = reverse("admin:devicecontrol_operation_changelist")
    change = "admin:inventory_managedobject_change"
    return [
        ("devices", devices),
        ("devices: only devices", devices + "?is_device__exact=1"),
        ("devices: type c8y_Sensor", devices + "?type__exact=c8y_Sensor"),
        ("devices: agent", devices + f"?agent={agent.pk}"),
        ("devices: group (10,000)", devices + f"?group={group.pk}"),
        ("devices: search serial", devices + f"?q=SN-{device.pk}"),
        ("devices: search name", devices + "?q=Device+500-7"),
        ("devices: page 500", devices + "?p=500"),
        ("devices: open operations", devices + "?operations=open"),
        ("devices: last one FAILED", devices + "?operations=last-FAILED"),
        ("devices: no operations", devices + "?operations=none"),
        ("agent page (99 children)", reverse(change, args=[agent.pk])),
        ("group page (10,000 children)", reverse(change, args=[group.pk])),
        ("device page", reverse(change, args=[device.pk])),
        ("operations", operations),
        ("operations: FAILED", operations + "?status__exact=FAILED"),
        ("operations: PENDING", operations + "?status__exact=PENDING"),
        ("operations: agent", operations + f"?agent={agent.pk}"),
        ("operations: page 500", operations + "?p=500"),
        ("operation page", reverse("admin:devicecontrol_operation_change", args=[failed.pk])),
        ("bulk operations", reverse("admin:bulkops_bulkoperation_changelist")),
        ("registrations", reverse("admin:devicecontrol_newdevicerequest_changelist")),
        ("external IDs", reverse("admin:inventory_externalid_changelist")),
        ("device users", reverse("admin:deviceplatform_deviceuser_changelist")),
        ("users", reverse("admin:deviceplatform_user_changelist")),
    ]


def measure(rounds: int, report: Report) -> int:
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    from deviceplatform.services import user_upsert

    operator = user_upsert(username="bench-operator", password="x", is_superuser=True)
    client = Client()
    client.force_login(operator)
    report(f"{'page':32} {'median ms':>9} {'max ms':>7} {'queries':>7} {'rows':>5}")
    over = 0
    for label, path in pages():
        client.get(path)  # warm-up: templates, plans, caches
        times = []
        for _ in range(rounds):
            with CaptureQueriesContext(connection) as captured:
                started = time.perf_counter()
                response = client.get(path)
                times.append((time.perf_counter() - started) * 1000)
        rows = response.content.count(b'name="_selected_action"') + response.content.count(
            b'name="reference"'
        )
        if response.status_code != 200:
            report(f"{label:32} answered {response.status_code} ({path})")
            continue
        median = statistics.median(times)
        flag = "  over budget" if median > BUDGET_MS else ""
        over += median > BUDGET_MS
        report(f"{label:32} {median:9.1f} {max(times):7.1f} {len(captured):7d} {rows:5d}{flag}")
    return over


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--operations", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="reuse an already filled database")
    parser.add_argument("--save", metavar="FILE", help="also write the report to FILE")
    args = parser.parse_args(argv)
    url, admin_url = checked_database_url(args.database_url)
    report = Report()
    report(command_line("admin_pages.py", argv))
    report(machine_line())
    report(f"database: {redacted(url)}")
    # The pages' static files under their hashed names, as in production (DEBUG=false).
    static_root = tempfile.mkdtemp(prefix="admin-bench-static-")
    env = bench_env(url, STATIC_ROOT=static_root)
    manage(env, "collectstatic", "--noinput", "-v", "0")
    if not args.keep:
        recreate_database(url, admin_url)
        manage(env, "migrate", "--noinput", "-v", "0")
        fill(url, args.devices, args.operations, report)
    else:
        report(f"reusing {database_name(url)} as filled by an earlier run")
    setup_django(env)
    report(load_average_line())
    over = measure(args.rounds, report)
    report(
        f"{over} page(s) over {BUDGET_MS} ms median" if over else f"every page under {BUDGET_MS} ms"
    )
    if args.save:
        with open(args.save, "w") as out:
            out.write("\n".join(report.lines) + "\n")
    return 0


if __name__ == "__main__":
    run_main(main)
