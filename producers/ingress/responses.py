"""JSON bodies, errors and 503s with Retry-After: the shapes every route answers with."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import web

from kafscribe.settings import Settings
from kafscribe.store import session as cassandra_session

from ..submission import Unavailable
from .appkeys import SETTINGS

T = TypeVar("T")


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        text=json.dumps(data, default=_default), status=status, content_type="application/json", headers=headers
    )


def _default(value: Any) -> Any:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def error(status: int, reason: str, **headers: str) -> web.Response:
    return json_response({"error": reason, "status": status}, status=status, headers=headers or None)


def unavailable(settings: Settings, reason: str) -> web.Response:
    return error(503, reason, **{"Retry-After": str(settings.retry_after_s)})


def cassandra_outage(request: web.Request, exc: BaseException) -> web.HTTPServiceUnavailable:
    """The 503 (with Retry-After) a route raises when Cassandra cannot answer."""
    reason = str(exc) if str(exc).startswith("Cassandra unavailable") else f"Cassandra unavailable: {exc}"
    return web.HTTPServiceUnavailable(
        text=json.dumps({"error": reason, "status": 503}), content_type="application/json",
        headers={"Retry-After": str(request.app[SETTINGS].retry_after_s)},
    )


async def in_store(request: web.Request, work: Callable[[], T]) -> T:
    """``work`` (blocking Cassandra calls) in a thread, off the event loop; an outage becomes a 503."""
    try:
        return await asyncio.to_thread(work)
    except Exception as exc:
        if isinstance(exc, Unavailable) or cassandra_session.is_outage(exc):
            raise cassandra_outage(request, exc) from exc
        raise
