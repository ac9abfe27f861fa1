"""JSON bodies, errors and 503s with Retry-After: the shapes every route answers with.

A 503 says which service is missing and nothing more: the driver's or the
broker's words (node addresses, ports, error maps) go to the log, never to a
client, who may not even be authenticated yet.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import web

from kafscribe.settings import Settings
from kafscribe.store import session as cassandra_session

from ..submission import Unavailable
from .appkeys import SETTINGS

T = TypeVar("T")
log = logging.getLogger("kafscribe.ingress")

OUTAGE_REASON = "Cassandra unavailable: the job store cannot be reached; retry later"
KAFKA_OUTAGE_REASON = "Kafka unavailable: the job could not be queued; retry later"


def outage_reason(exc: BaseException | str) -> str:
    """What a client is told of an outage: which service, never its addresses or the driver's words."""
    text = str(exc)
    if text.startswith("Cassandra") or "store unavailable" in text or not isinstance(exc, (Unavailable, str)):
        return OUTAGE_REASON
    return KAFKA_OUTAGE_REASON


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


def unavailable(settings: Settings, reason: BaseException | str) -> web.Response:
    """503 + Retry-After for an outage; ``reason`` (the cause, with its details) is logged, not sent."""
    log.warning("answering 503: %s", reason)
    return error(503, outage_reason(reason), **{"Retry-After": str(settings.retry_after_s)})


def cassandra_outage(request: web.Request, exc: BaseException) -> web.HTTPServiceUnavailable:
    """The 503 (with Retry-After) a route raises when Cassandra cannot answer (the cause is logged)."""
    log.warning("answering 503 to %s %s: %s: %s", request.method, request.path, type(exc).__name__, exc)
    return web.HTTPServiceUnavailable(
        text=json.dumps({"error": OUTAGE_REASON, "status": 503}), content_type="application/json",
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
