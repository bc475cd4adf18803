"""`manage.py ensureadmin`: create the first superuser if there is none, and print its credentials."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand

from deviceplatform.models import User
from deviceplatform.services import user_upsert

# Git-ignored; holds the generated password so later runs can print it again.
PASSWORD_FILE_NAME = ".admin-password"


class Command(BaseCommand):
    help = (
        "If no superuser exists, create one named $ADMIN_USERNAME (default admin) with password "
        f"$ADMIN_PASSWORD, or else a random one kept in {PASSWORD_FILE_NAME}. Prints the credentials."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        username = settings.ADMIN_USERNAME
        env_password = settings.ADMIN_PASSWORD or None
        password_file = Path(settings.BASE_DIR) / PASSWORD_FILE_NAME
        stored_password = None
        if password_file.exists():
            stored_password = password_file.read_text().strip() or None

        superusers = User.objects.filter(is_superuser=True, is_active=True).order_by("pk")
        existing = superusers.filter(username__iexact=username).first() or superusers.first()
        if existing is None:
            password = env_password or stored_password
            if password is None:
                password = secrets.token_urlsafe(12)
                password_file.touch(mode=0o600)
                password_file.write_text(password + "\n")
            user = user_upsert(
                username=username, password=password, is_superuser=True, groups=["admins"]
            )
            self.stdout.write(f"Created admin user {user.username}")
            self.stdout.write(f"Admin user: {user.username} / password: {password}")
            return

        known = [pw for pw in (env_password, stored_password) if pw]
        password = next((pw for pw in known if existing.check_password(pw)), None)
        if password is None:
            self.stdout.write(
                f"Admin user: {existing.username} / password: unknown (neither ADMIN_PASSWORD nor "
                f"{PASSWORD_FILE_NAME} matches; reset it with "
                f".venv/bin/python manage.py changepassword {existing.username})"
            )
        else:
            self.stdout.write(f"Admin user: {existing.username} / password: {password}")
