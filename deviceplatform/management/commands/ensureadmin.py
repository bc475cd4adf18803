"""`manage.py ensureadmin`: create the first superuser if there is none, and print its credentials;
make sure the device bootstrap login exists with its password, and print that too."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand

from deviceplatform.models import User
from deviceplatform.services import bootstrap_user_ensure, generate_password, user_upsert

# Git-ignored; hold the generated passwords so later runs can print them again.
PASSWORD_FILE_NAME = ".admin-password"
BOOTSTRAP_PASSWORD_FILE_NAME = ".bootstrap-password"


def _stored(path: Path) -> str | None:
    return (path.read_text().strip() or None) if path.exists() else None


def _store(path: Path, password: str) -> None:
    path.touch(mode=0o600)
    path.write_text(password + "\n")


class Command(BaseCommand):
    help = (
        "If no superuser exists, create one named $ADMIN_USERNAME (default admin) with password "
        f"$ADMIN_PASSWORD, or else a random one kept in {PASSWORD_FILE_NAME}. Make sure the device "
        "bootstrap login (devicebootstrap) has $DEVICE_BOOTSTRAP_PASSWORD, or else a random one "
        f"kept in {BOOTSTRAP_PASSWORD_FILE_NAME}. Prints both credentials."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        self.ensure_admin()
        self.ensure_bootstrap()

    def ensure_bootstrap(self) -> None:
        password_file = Path(settings.BASE_DIR) / BOOTSTRAP_PASSWORD_FILE_NAME
        password = settings.DEVICE_BOOTSTRAP_PASSWORD or _stored(password_file)
        if password is None:
            password = generate_password()
            _store(password_file, password)
        bootstrap_user_ensure(password)
        self.stdout.write(
            f"Device bootstrap: {settings.DEVICE_BOOTSTRAP_TENANT}/"
            f"{settings.DEVICE_BOOTSTRAP_USERNAME} / password: {password}"
        )

    def ensure_admin(self) -> None:
        username = settings.ADMIN_USERNAME
        env_password = settings.ADMIN_PASSWORD or None
        password_file = Path(settings.BASE_DIR) / PASSWORD_FILE_NAME
        stored_password = _stored(password_file)

        superusers = User.objects.filter(is_superuser=True, is_active=True).order_by("pk")
        existing = superusers.filter(username__iexact=username).first() or superusers.first()
        if existing is None:
            password = env_password or stored_password
            if password is None:
                password = secrets.token_urlsafe(12)
                _store(password_file, password)
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
