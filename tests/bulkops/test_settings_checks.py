"""Bulk-operation settings out of range stop the start with a clear message, instead of a 500 at
the first cancel (a batch size of 0) or a request outliving gunicorn's worker timeout."""

from __future__ import annotations

import pytest
from django.core.exceptions import ImproperlyConfigured

from tests.deviceplatform.test_tracing import run


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        (
            "BULK_PENDING_FAIL_BATCH_SIZE",
            "0",
            "BULK_PENDING_FAIL_BATCH_SIZE must be from 1 to 100000",
        ),
        ("BULK_PENDING_FAIL_BATCH_SIZE", "-5", "BULK_PENDING_FAIL_BATCH_SIZE must be from 1 to"),
        (
            "BULK_PENDING_FAIL_INLINE_SECONDS",
            "-1",
            "BULK_PENDING_FAIL_INLINE_SECONDS must be from 0",
        ),
        (
            "BULK_PENDING_FAIL_INLINE_SECONDS",
            "500ms",
            "BULK_PENDING_FAIL_INLINE_SECONDS must be from 0",
        ),
        ("BULK_PENDING_FAIL_INLINE_SECONDS", "60", "before gunicorn's 30 s worker timeout"),
    ],
)
def test_a_bulk_setting_out_of_range_is_refused_at_start(
    name: str, value: str, message: str
) -> None:
    done = run("import django; django.setup()", **{name: value})
    assert done.returncode != 0
    assert ImproperlyConfigured.__name__ in done.stderr
    assert message in done.stderr


def test_the_bulk_settings_in_range_start() -> None:
    done = run(
        "import django; django.setup()",
        BULK_PENDING_FAIL_BATCH_SIZE="1",
        BULK_PENDING_FAIL_INLINE_SECONDS="0",
    )
    assert done.returncode == 0, done.stderr
