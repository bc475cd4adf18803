"""Entity tags for optimistic concurrency (an extension beyond Cumulocity, docs/api/conventions.md).

Every single-object GET/PUT/POST answer carries a strong `ETag`: a digest of the JSON the resource
renders by default (no query parameters), with the request's own base URL. A client that wants to
update only what it has seen sends the tag back in `If-Match` on PUT or DELETE; the service compares
it with the current representation *under the row lock* (`Precondition`), so a concurrent writer that
committed in between makes the request fail with 412 instead of being overwritten. A client that
sends no `If-Match` sees no difference."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import orjson

from deviceplatform.api.exceptions import PreconditionFailed
from deviceplatform.api.renderers import dumps

T = TypeVar("T")


def etag_of(body: Any) -> str:
    """The strong entity tag of a rendered JSON body. Keys are sorted first: PostgreSQL's jsonb
    gives fragments back in its own key order, not in the order a PUT merged them."""
    try:
        canonical = orjson.dumps(body, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
    except orjson.JSONEncodeError:  # a stored value beyond orjson's limits (renderers.py)
        canonical = dumps(body)
    return '"' + hashlib.blake2b(canonical, digest_size=16).hexdigest() + '"'


def parse_if_match(header: str | None) -> list[str] | None:
    """The entity tags of an `If-Match` header (`["*"]` for any); None when absent.

    Weak tags (`W/"…"`) are kept as they are: If-Match compares strongly, so they never match."""
    if header is None:
        return None
    tags = [tag.strip() for tag in header.split(",")]
    return [tag for tag in tags if tag]


class Precondition(Generic[T]):
    """`If-Match`, checked by a service against the row it has just locked and re-read.

    `render(row)` gives the default representation of the row as this request would render it."""

    def __init__(self, tags: list[str], render: Callable[[T], Any]) -> None:
        self.tags = tags
        self.render = render

    def __call__(self, row: T) -> None:
        if "*" in self.tags:
            return
        current = etag_of(self.render(row))
        if current not in self.tags:
            raise PreconditionFailed(
                "The resource changed since the version named in If-Match "
                f"(current ETag {current}): read it again and retry"
            )


def precondition(header: str | None, render: Callable[[T], Any]) -> Precondition[T] | None:
    tags = parse_if_match(header)
    return Precondition(tags, render) if tags is not None else None
