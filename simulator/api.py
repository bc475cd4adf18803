"""The platform's REST API as the simulator calls it: JSON over HTTP with Basic credentials, retrying
what is worth retrying (a platform restarting, 429 with `Retry-After`, 502/503/504) and handing
every other answer back to the caller, which decides what a status means."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

JSON_TYPE = "application/json"
# Answers that say "not now": retried with back-off (429 after its Retry-After).
TRANSIENT_STATUSES = frozenset({429, 502, 503, 504})
REQUEST_TIMEOUT = 60.0
# How long a request keeps being retried while the platform is unreachable or busy.
RETRY_FOR_SECONDS = 120.0


@dataclass(frozen=True)
class Login:
    """Basic credentials: `login` is `<tenant>/<user>` or `<user>`."""

    login: str
    password: str

    @property
    def auth(self) -> aiohttp.BasicAuth:
        return aiohttp.BasicAuth(self.login, self.password)


@dataclass(frozen=True)
class Response:
    method: str
    path: str
    status: int
    body: Any
    headers: Mapping[str, str]

    @property
    def etag(self) -> str | None:
        return self.headers.get("ETag")

    def describe(self) -> str:
        """`PUT /x answered 422: <message>` from the Cumulocity error body when there is one."""
        detail = ""
        if isinstance(self.body, dict) and "message" in self.body:
            detail = f" {self.body.get('error', '')}: {self.body['message']}"
        elif isinstance(self.body, str) and self.body:
            detail = f" {self.body[:200]}"
        return f"{self.method} {self.path} answered {self.status}{detail}"


class ApiError(Exception):
    """An answer the caller did not expect."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.describe())
        self.response = response

    @property
    def status(self) -> int:
        return self.response.status


class Unreachable(Exception):
    """No HTTP answer at all (refused, reset, timed out), after the retries."""


class Stopping(Exception):
    """The simulator is shutting down: the request was not sent."""


def backoff(attempt: int, *, base: float = 0.5, cap: float = 10.0) -> float:
    """Exponential back-off with full jitter, so many agents do not retry in step."""
    return random.uniform(0, min(cap, base * 2**attempt))  # noqa: S311 - timing, not security


def retry_after(response: aiohttp.ClientResponse, default: float) -> float:
    value = response.headers.get("Retry-After", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return default


class Api:
    """One HTTP connection pool for every agent; each call names its credentials."""

    def __init__(self, base_url: str, session: aiohttp.ClientSession) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = session
        self.retry_for = RETRY_FOR_SECONDS
        self.requests = 0

    async def call(
        self,
        method: str,
        path: str,
        login: Login | None,
        body: Any = None,
        *,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        retry: bool = True,
    ) -> Response:
        """Send the request; return its answer whatever the status, except transient ones, which
        are retried for `retry_for` seconds (`retry=False`: once only). Raises `Unreachable`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.retry_for
        attempt = 0
        send_headers = {"Accept": JSON_TYPE}
        if body is not None:
            send_headers["Content-Type"] = JSON_TYPE
        send_headers.update(headers or {})
        data = json.dumps(body) if body is not None else None
        while True:
            response: Response | None = None
            try:
                self.requests += 1
                async with self.session.request(
                    method,
                    self.base_url + path,
                    params=params,
                    data=data,
                    headers=send_headers,
                    auth=login.auth if login else None,
                    timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
                ) as raw:
                    text = await raw.text(errors="replace")
                    response = Response(method, path, raw.status, parse(text), raw.headers)
                    if raw.status not in TRANSIENT_STATUSES or not retry:
                        return response
                    wait = (
                        retry_after(raw, 1.0) + random.uniform(0, 1)  # noqa: S311
                        if raw.status == 429
                        else backoff(attempt)
                    )
            except (TimeoutError, aiohttp.ClientConnectionError) as exc:
                wait = backoff(attempt)
                if not retry or loop.time() + wait > deadline:
                    raise Unreachable(f"{method} {self.base_url}{path}: {describe(exc)}") from exc
            if response is not None and loop.time() + wait > deadline:
                return response
            attempt += 1
            await asyncio.sleep(wait)

    async def expect(
        self,
        method: str,
        path: str,
        login: Login | None,
        body: Any = None,
        *,
        ok: tuple[int, ...] = (200, 201, 204),
        **kwargs: Any,
    ) -> Response:
        """`call`, raising `ApiError` unless the status is one of `ok`."""
        response = await self.call(method, path, login, body, **kwargs)
        if response.status not in ok:
            raise ApiError(response)
        return response

    async def pages(
        self, path: str, login: Login, key: str, params: Mapping[str, str], page_size: int = 2000
    ) -> list[dict[str, Any]]:
        """Every item of a paged list (`key` names the array), page by page until a short one."""
        items: list[dict[str, Any]] = []
        page = 1
        while True:
            query = {**params, "pageSize": str(page_size), "currentPage": str(page)}
            response = await self.expect("GET", path, login, params=query, ok=(200,))
            batch = response.body.get(key, []) if isinstance(response.body, dict) else []
            items += batch
            if len(batch) < page_size:
                return items
            page += 1


def parse(text: str) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return f"no answer within {REQUEST_TIMEOUT:.0f} s"
    return str(exc) or type(exc).__name__
