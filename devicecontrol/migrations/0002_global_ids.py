from django.db import migrations

from deviceplatform.db import RunSQLForVendor, use_global_id_sequence


class Migration(migrations.Migration):
    dependencies = [("devicecontrol", "0001_initial")]

    operations = [
        use_global_id_sequence("devicecontrol_operation"),
        # fragmentType filters use the jsonb GIN index on PostgreSQL.
        RunSQLForVendor(
            forwards={
                "postgresql": [
                    "CREATE INDEX IF NOT EXISTS devicecontrol_operation_fragments_gin "
                    "ON devicecontrol_operation USING gin (fragments)"
                ]
            },
            backwards={"postgresql": ["DROP INDEX IF EXISTS devicecontrol_operation_fragments_gin"]},
        ),
    ]
