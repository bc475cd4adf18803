"""The built-in groups `admins`, `readers` and `devices` with their roles (spec auth.md §3)."""

from django.contrib.auth.management import create_permissions
from django.db import migrations

from deviceplatform.roles import DEFAULT_GROUPS, ROLE_APP_LABEL


def create_groups(apps, schema_editor):
    # Permissions are normally created after all migrations; the groups need them now.
    app_config = apps.get_app_config(ROLE_APP_LABEL)
    app_config.models_module = True
    create_permissions(app_config, apps=apps, verbosity=0)
    app_config.models_module = None
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    for name, roles in DEFAULT_GROUPS.items():
        group, _ = Group.objects.get_or_create(name=name)
        group.permissions.set(
            Permission.objects.filter(
                content_type__app_label=ROLE_APP_LABEL, codename__in=[r.value for r in roles]
            )
        )


def remove_groups(apps, schema_editor):
    apps.get_model("auth", "Group").objects.filter(name__in=list(DEFAULT_GROUPS)).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("deviceplatform", "0001_initial"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [migrations.RunPython(create_groups, remove_groups)]
