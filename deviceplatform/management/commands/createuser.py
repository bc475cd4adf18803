"""`manage.py createuser NAME --password PW [--roles ROLE ...] [--groups GROUP ...]`, idempotent."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from deviceplatform.api.exceptions import ValidationFailed
from deviceplatform.roles import Role
from deviceplatform.services import user_upsert


class Command(BaseCommand):
    help = (
        "Create a platform user, or update it: re-running sets the password and sets roles and "
        "groups to exactly those given. Roles: " + ", ".join(role.value for role in Role)
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("--password", required=True)
        parser.add_argument("--roles", nargs="*", default=[], metavar="ROLE")
        parser.add_argument("--groups", nargs="*", default=[], metavar="GROUP")
        parser.add_argument("--superuser", action="store_true", help="grant every role")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            user = user_upsert(
                username=options["username"],
                password=options["password"],
                roles=options["roles"],
                groups=options["groups"],
                is_superuser=options["superuser"],
            )
        except ValidationFailed as exc:
            raise CommandError(exc.message) from exc
        self.stdout.write(f"User {user.username} saved")
