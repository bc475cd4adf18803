from django.db import migrations

from deviceplatform.db import RunSQLForVendor, use_global_id_sequence


class Migration(migrations.Migration):
    dependencies = [("inventory", "0001_initial")]

    operations = [
        use_global_id_sequence("inventory_managedobject"),
        # fragmentType / has() / jsonpath queries use the jsonb GIN index on PostgreSQL.
        RunSQLForVendor(
            forwards={
                "postgresql": [
                    "CREATE INDEX IF NOT EXISTS inventory_mo_fragments_gin "
                    "ON inventory_managedobject USING gin (fragments)"
                ]
            },
            backwards={"postgresql": ["DROP INDEX IF EXISTS inventory_mo_fragments_gin"]},
        ),
    ]
