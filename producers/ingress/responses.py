"""JSON bodies, errors and 503s with Retry-After: the shapes every route answers with."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from kafscribe.settings import Settings


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
