"""Database helpers shared by the apps: the one global ID sequence (spec README §3) for their
migrations, and the JSON field their fragments are stored in."""

from __future__ import annotations

from typing import Any

import orjson
from django.db import migrations, models

GLOBAL_ID_SEQUENCE = "global_id_seq"


class RunSQLForVendor(migrations.RunSQL):
    """RunSQL whose statements depend on the database vendor (`postgresql`, `sqlite`)."""

    def __init__(
        self, forwards: dict[str, list[str]], backwards: dict[str, list[str]] | None = None
    ):
        self.forwards = forwards
        self.backwards = backwards or {}
        super().__init__(sql=migrations.RunSQL.noop, reverse_sql=migrations.RunSQL.noop)

    def deconstruct(self) -> tuple[str, list[Any], dict[str, Any]]:
        return (self.__class__.__name__, [self.forwards, self.backwards], {})

    def database_forwards(self, app_label, schema_editor, from_state, to_state):  # type: ignore[no-untyped-def]
        for statement in self.forwards.get(schema_editor.connection.vendor, []):
            schema_editor.execute(statement)

    def database_backwards(self, app_label, schema_editor, from_state, to_state):  # type: ignore[no-untyped-def]
        for statement in self.backwards.get(schema_editor.connection.vendor, []):
            schema_editor.execute(statement)


def use_global_id_sequence(table: str) -> RunSQLForVendor:
    """Make `table.id` draw from the one global sequence.

    PostgreSQL: a shared SEQUENCE as the column default (no extra round trip per insert).
    SQLite: AUTOINCREMENT tables keep their high-water mark in `sqlite_sequence`; a trigger per table
    raises the mark of every participating table to the newest ID, so the next insert anywhere gets
    a larger one. (Never insert T's own row there: SQLite writes it itself at the end of the statement.)

    SQLite rebuilds a table for most AlterField/RemoveField operations and drops its triggers then:
    a migration that does so must end with this operation again (it is idempotent);
    tests/deviceplatform/test_global_ids.py checks every participating table has its trigger."""
    return RunSQLForVendor(
        forwards={
            "postgresql": [
                f"CREATE SEQUENCE IF NOT EXISTS {GLOBAL_ID_SEQUENCE} AS bigint",
                f"ALTER TABLE {table} ALTER COLUMN id DROP IDENTITY IF EXISTS",
                f"ALTER TABLE {table} ALTER COLUMN id SET DEFAULT nextval('{GLOBAL_ID_SEQUENCE}')",
                f"SELECT setval('{GLOBAL_ID_SEQUENCE}', GREATEST("
                f"(SELECT COALESCE(MAX(id), 0) FROM {table}) + 1,"
                f" (SELECT last_value FROM {GLOBAL_ID_SEQUENCE})))",
            ],
            "sqlite": [
                "CREATE TABLE IF NOT EXISTS global_id_tables (name TEXT PRIMARY KEY)",
                f"INSERT OR IGNORE INTO global_id_tables (name) VALUES ('{table}')",
                f"""CREATE TRIGGER IF NOT EXISTS {table}_global_id AFTER INSERT ON {table}
                BEGIN
                  INSERT INTO sqlite_sequence (name, seq)
                    SELECT g.name, NEW.id FROM global_id_tables g
                    WHERE g.name != '{table}'
                      AND g.name NOT IN (SELECT name FROM sqlite_sequence);
                  UPDATE sqlite_sequence SET seq = NEW.id
                    WHERE name IN (SELECT name FROM global_id_tables)
                      AND name != '{table}' AND seq < NEW.id;
                END""",
            ],
        },
        backwards={
            "postgresql": [f"ALTER TABLE {table} ALTER COLUMN id DROP DEFAULT"],
            "sqlite": [
                f"DROP TRIGGER IF EXISTS {table}_global_id",
                f"DELETE FROM global_id_tables WHERE name = '{table}'",
            ],
        },
    )


class DocumentField(models.JSONField):
    """A JSONField whose stored documents always read back.

    Django reads a stored document with Python's json module, which gives up at about 1,000 levels
    of nesting (RecursionError) and at integers of more than 4,300 digits (ValueError): a 500 on
    every read of the row. The API never stores either today (deviceplatform.api.parsers), but
    rows written before it checked, or around it, read back through orjson instead (1,024 levels;
    integers of any size become floats). Migrations see a plain JSONField: same column, same
    deconstruction, no migration."""

    def from_db_value(self, value: Any, expression: Any, connection: Any) -> Any:
        try:
            return super().from_db_value(value, expression, connection)
        except (RecursionError, ValueError):
            return orjson.loads(value)

    def deconstruct(self) -> Any:
        name, _, args, kwargs = super().deconstruct()
        return name, "django.db.models.JSONField", args, kwargs
