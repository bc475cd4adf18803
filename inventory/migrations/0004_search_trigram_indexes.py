"""Trigram indexes for the admin's substring search (icontains: UPPER(column) LIKE UPPER('%x%'))
on managed objects' name, type and owner and on external ID values: a search for a rare
substring reads the index instead of every row. PostgreSQL only (pg_trgm, a trusted extension);
nothing on SQLite."""

from django.db import migrations

INDEXES = [
    ("mo_name_trgm_idx", "inventory_managedobject", "name"),
    ("mo_type_trgm_idx", "inventory_managedobject", "type"),
    ("mo_owner_trgm_idx", "inventory_managedobject", "owner"),
    ("externalid_value_trgm_idx", "inventory_externalid", "external_id"),
]


def create(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    schema_editor.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    for name, table, column in INDEXES:
        schema_editor.execute(
            f'CREATE INDEX IF NOT EXISTS "{name}" ON "{table}" USING gin (UPPER("{column}") gin_trgm_ops)'
        )


def drop(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    for name, _, _ in INDEXES:
        schema_editor.execute(f'DROP INDEX IF EXISTS "{name}"')


class Migration(migrations.Migration):
    dependencies = [("inventory", "0003_owner_index")]

    operations = [migrations.RunPython(create, drop, elidable=False)]
