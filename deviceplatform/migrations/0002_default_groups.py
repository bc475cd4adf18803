"""The built-in groups `admins`, `readers` and `devices` with their roles (spec auth.md §3)."""

from django.db import migrations

from deviceplatform.roles import DEFAULT_GROUPS, ensure_default_groups


def create_groups(apps, schema_editor):
    ensure_default_groups(apps)


def remove_groups(apps, schema_editor):
    apps.get_model("auth", "Group").objects.filter(name__in=list(DEFAULT_GROUPS)).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("deviceplatform", "0001_initial"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [migrations.RunPython(create_groups, remove_groups)]
