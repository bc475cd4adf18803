"""Support for the end-to-end tests with the official `c8y-api` client: a request recorder."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs, urlsplit

from c8y_api import CumulocityApi


class RequestLog:
    """Method, path, query, Accept, JSON body and status of every request the client sends.

    `first_values=True` keeps each query parameter's first value; otherwise its list of values."""

    def __init__(self, c8y: CumulocityApi, *, first_values: bool) -> None:
        self.entries: list[dict[str, Any]] = []
        self.first_values = first_values
        c8y.session.hooks["response"].append(self._record)

    def _record(self, response: Any, *args: Any, **kwargs: Any) -> None:
        request = response.request
        url = urlsplit(request.url)
        query = parse_qs(url.query)
        self.entries.append(
            {
                "method": request.method,
                "path": url.path,
                "query": {k: v[0] for k, v in query.items()} if self.first_values else query,
                "accept": request.headers.get("Accept"),
                "body": json.loads(request.body) if request.body else None,
                "status": response.status_code,
            }
        )

    def take(self) -> list[dict[str, Any]]:
        entries, self.entries = self.entries, []
        return entries
