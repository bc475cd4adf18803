"""Date formats for the operator UI (settings.FORMAT_MODULE_PATH), and `admin_time`."""

from __future__ import annotations

from datetime import datetime


def admin_time(moment: datetime | None, empty: str = "-") -> str:
    """A moment as the admin shows dates ("2026-12-03 08:40:56 UTC", which dates.js shows in the
    browser's zone), for cells built in Python rather than by the admin's own field rendering."""
    if moment is None:
        return empty
    from django.utils import formats, timezone

    return formats.localize(timezone.template_localtime(moment))
