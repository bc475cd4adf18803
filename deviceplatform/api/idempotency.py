"""`Idempotency-Key` on creates (README "Beyond Cumulocity"): a client that retries a POST of an
operation, a bulk operation or a managed object with the same key gets the first answer again
instead of a second object.

- The key is the header's value, 1 to 255 characters (otherwise 400), per user: another user's
  same key is another key.
- The request is compared by a SHA-256 of its method, its path (without a trailing slash) and its
  parsed JSON body in canonical form (keys sorted, no whitespace): a body that differs only in key
  order or spacing is the same request; another body (or another path) with a used key is 422.
- Only a 2xx answer is kept: its status, `Location`, `ETag`, `Content-Type` and body bytes, replayed
  as they were (with `Idempotent-Replayed: true`), whatever the retry's `Accept` says. A 4xx or 5xx
  leaves nothing behind, so a corrected request may use the key again.
- The key's row is inserted in the same transaction as the create, and (user, key) is unique. A
  concurrent request with the same key waits on that row (PostgreSQL's unique index, SQLite's
  write lock) until the first commits, then answers the stored result (or, if the first failed
  and rolled back, creates). So two concurrent requests create one object and neither sees a 409.
- A key expires IDEMPOTENCY_KEY_TTL_SECONDS (24 h) after its first use: then it is new again (its
  old row is deleted on lookup), and the beat entry `purge-idempotency-keys` deletes expired rows.
- Requests without the header are not touched."""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.http import HttpResponse
from django.utils import timezone

from deviceplatform.api.exceptions import BadRequest, Conflict, ValidationFailed
from deviceplatform.api.renderers import dumps
from deviceplatform.models import IdempotencyKey

HEADER = "HTTP_IDEMPOTENCY_KEY"
MAX_KEY_LENGTH = 255
REPLAYED_HEADER = "Idempotent-Replayed"
# A request that keeps finding the key's row gone again (its holder rolled back, or it expired and
# another request replaced it) tries this many times before it answers 409.
ATTEMPTS = 5


def ttl() -> timedelta:
    return timedelta(seconds=settings.IDEMPOTENCY_KEY_TTL_SECONDS)


def fingerprint(method: str, path: str, body: Any) -> str:
    """SHA-256 of the request in canonical form: method, path without trailing slash, and the
    parsed JSON body with sorted keys and no whitespace."""
    canonical = json.dumps(
        [method.upper(), path.rstrip("/"), body],
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        default=str,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def check_key(key: str) -> None:
    if not key or len(key) > MAX_KEY_LENGTH:
        raise BadRequest(
            f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} characters long, got {len(key)}",
            error="general/badRequest",
        )
    # Control characters (NUL is refused by PostgreSQL's text type: it was a 500) and keys of
    # whitespace alone name nothing a client meant to send.
    if not key.strip() or any(ord(char) < 32 or ord(char) == 127 for char in key):
        raise BadRequest(
            "Idempotency-Key must be printable text, not blank and without control characters",
            error="general/badRequest",
        )


def idempotent_create(post: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a view's `post` (a create): with an `Idempotency-Key` header it runs once per
    user, key and request; without one it runs as it is."""

    @functools.wraps(post)
    def wrapper(view: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        key = request.META.get(HEADER)
        if key is None:
            return post(view, request, *args, **kwargs)
        check_key(key)
        digest = fingerprint(request.method, request.path, request.data)
        return run_once(
            user=request.user,
            key=key,
            digest=digest,
            create=lambda: post(view, request, *args, **kwargs),
        )

    wrapper.idempotent_create = True  # type: ignore[attr-defined]  # read by deviceplatform/schema.py
    return wrapper


def run_once(
    *,
    user: Any,
    key: str,
    digest: str,
    create: Callable[[], Any],
    now: datetime | None = None,
) -> Any:
    """`create()` in a transaction together with the key's row, or the stored answer of the
    key's earlier create; 422 when the key was used with another request."""
    for _ in range(ATTEMPTS):
        with transaction.atomic():
            at = now or timezone.now()
            row = _claim(user=user, key=key, digest=digest, now=at)
            if isinstance(row, HttpResponse):
                return row
            if row is None:
                continue  # gone meanwhile: claim again
            response = create()
            if 200 <= response.status_code < 300:
                _store(row, response)
            else:
                row.delete()  # only successes are remembered
            return response
    raise Conflict(
        f"Idempotency-Key {key!r} is being used by other requests at the same time; retry"
    )


def _claim(*, user: Any, key: str, digest: str, now: datetime) -> Any:
    """Insert the key's row (waiting for a concurrent holder of the key to finish), or answer
    from the row already there: its replay, 422 for another request, None if it vanished."""
    try:
        with transaction.atomic():
            return IdempotencyKey.objects.create(
                user=user, key=key, fingerprint=digest, created_at=now, status=0
            )
    except IntegrityError:
        pass
    row = IdempotencyKey.objects.select_for_update().filter(user=user, key=key).first()
    if row is None:
        return None
    if row.created_at <= now - ttl():
        row.delete()  # expired: the key is new again
        try:
            with transaction.atomic():
                return IdempotencyKey.objects.create(
                    user=user, key=key, fingerprint=digest, created_at=now, status=0
                )
        except IntegrityError:
            return None
    if row.fingerprint != digest:
        raise ValidationFailed(
            f"Idempotency-Key {key!r} was already used with a different request (method, path "
            "or body) in the last "
            f"{settings.IDEMPOTENCY_KEY_TTL_SECONDS} seconds; use a new key for a new request",
        )
    return replay(row)


def _store(row: IdempotencyKey, response: Any) -> None:
    data = getattr(response, "data", None)
    if data is None and not hasattr(response, "data"):
        body = bytes(response.content)  # a plain Django response
        content_type = response.get("Content-Type", "") if body else ""
    else:
        body = b"" if data is None else dumps(data)
        content_type = (response.content_type or "") if body else ""
    row.status = response.status_code
    row.location = response.get("Location", "")
    row.etag = response.get("ETag", "")
    row.content_type = content_type
    row.body = body
    row.save(update_fields=["status", "location", "etag", "content_type", "body"])


def replay(row: IdempotencyKey) -> HttpResponse:
    body = bytes(row.body)
    response = HttpResponse(body, status=row.status)
    if body:
        response["Content-Type"] = row.content_type
    else:
        del response["Content-Type"]
    if row.location:
        response["Location"] = row.location
    if row.etag:
        response["ETag"] = row.etag
    response[REPLAYED_HEADER] = "true"
    return response


def purge_expired(*, now: datetime) -> int:
    """Delete the keys older than the TTL (the beat entry `purge-idempotency-keys`)."""
    count, _ = IdempotencyKey.objects.filter(created_at__lte=now - ttl()).delete()
    return count
