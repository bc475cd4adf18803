"""Bounded string columns: a value longer than its column is a 422 naming the field and the limit.

PostgreSQL refuses such a value only when the row is written (a 500 then), and SQLite does not
refuse it at all, so the check is ours, with the limit read from the model field."""

from __future__ import annotations

from django.db.models import Model

from deviceplatform.api.exceptions import ValidationFailed


def max_length(model: type[Model], field: str) -> int | None:
    return model._meta.get_field(field).max_length  # type: ignore[union-attr]


def check_length(value: object, model: type[Model], field: str, *, name: str | None = None) -> None:
    """422 when `value` is a string longer than `model.field` holds; `name` is the wire name."""
    limit = max_length(model, field)
    if isinstance(value, str) and limit is not None and len(value) > limit:
        raise ValidationFailed(
            f"Invalid value for {name or field}: at most {limit} characters are allowed, "
            f"not {len(value)}"
        )
