"""One increasing ID sequence across managed objects, operations and bulk operations (README §3),
on PostgreSQL (the test database) and on the embedded SQLite default (a migrated temp file)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from django.db import connection

GLOBAL_TABLES = ("inventory_managedobject", "devicecontrol_operation", "bulkops_bulkoperation")
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.postgresql
@pytest.mark.django_db
def test_postgresql_tables_share_one_sequence() -> None:
    with connection.cursor() as cursor:
        for table in GLOBAL_TABLES:
            cursor.execute(
                "SELECT column_default FROM information_schema.columns "
                "WHERE table_name = %s AND column_name = 'id'",
                [table],
            )
            assert cursor.fetchone()[0] == "nextval('global_id_seq'::regclass)", table


def test_sqlite_migrations_keep_a_trigger_on_every_table(tmp_path: Path) -> None:
    """SQLite drops triggers when a migration rebuilds a table; every table must end with one,
    and inserts into the three tables must draw distinct, increasing IDs."""
    database = tmp_path / "embedded.sqlite3"
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env["DATABASE_URL"] = f"sqlite:///{database}"
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"],
        cwd=REPO,
        env=env,
        check=True,
        timeout=120,
    )
    db = sqlite3.connect(database)
    triggers = {
        row[0] for row in db.execute("SELECT tbl_name FROM sqlite_master WHERE type='trigger'")
    }
    assert set(GLOBAL_TABLES) <= triggers
    ids = []
    db.execute(
        "INSERT INTO inventory_managedobject (owner, creation_time, last_updated, fragments,"
        " is_device, is_agent, is_group) VALUES ('x', 0, 0, '{}', 1, 1, 0)"
    )
    device = db.execute("SELECT max(id) FROM inventory_managedobject").fetchone()[0]
    ids.append(device)
    for _ in range(2):
        db.execute(
            "INSERT INTO devicecontrol_operation (device_id, agent_id, status, creation_time,"
            " status_changed_at, fragments) VALUES (?, ?, 'PENDING', 0, 0, '{}')",
            (device, device),
        )
        ids.append(db.execute("SELECT max(id) FROM devicecontrol_operation").fetchone()[0])
        db.execute(
            "INSERT INTO bulkops_bulkoperation (start_date, creation_ramp, operation_prototype,"
            " fragments, status, creation_time, last_updated, effective_start, first_index,"
            " next_index, target_count, dropped, pending, executing, successful, failed)"
            " VALUES (0, 0, '{}', '{}', 'ACTIVE', 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)"
        )
        ids.append(db.execute("SELECT max(id) FROM bulkops_bulkoperation").fetchone()[0])
    db.commit()
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
