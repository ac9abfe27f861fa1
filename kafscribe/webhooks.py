"""Signing and verifying callbacks the Standard Webhooks way.

Headers: ``webhook-id`` (the same on every retry of one event, for the
receiver's dedup), ``webhook-timestamp`` (unix seconds) and
``webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">``.

Receivers can verify with this module alone (stdlib only)::

    from kafscribe.webhooks import verify
    verify(secret, request.headers, raw_body)   # raises WebhookVerificationError
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Mapping


class WebhookVerificationError(ValueError):
    """The signature is missing, wrong, or too old."""


def event_id(job_id: str, event_type: str) -> str:
    """Stable id of one event: retries and replays of it carry the same id."""
    return "msg_" + hashlib.sha256(f"{job_id}:{event_type}".encode()).hexdigest()[:26]


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def headers(secret: str, msg_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    timestamp = int(time.time()) if timestamp is None else timestamp
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, msg_id, timestamp, body),
        "content-type": "application/json",
    }


def verify(secret: str, request_headers: Mapping[str, str], body: bytes, tolerance_s: int = 300) -> None:
    """Check a received callback; raises ``WebhookVerificationError`` if it is not genuine."""
    lower = {k.lower(): v for k, v in request_headers.items()}
    try:
        msg_id, ts, sigs = lower["webhook-id"], int(lower["webhook-timestamp"]), lower["webhook-signature"]
    except (KeyError, ValueError) as exc:
        raise WebhookVerificationError("missing or malformed webhook headers") from exc
    if abs(time.time() - ts) > tolerance_s:
        raise WebhookVerificationError("timestamp outside the tolerance window")
    expected = sign(secret, msg_id, ts, body)
    if not any(hmac.compare_digest(expected, s) for s in sigs.split()):
        raise WebhookVerificationError("no matching signature")
