"""Signing and verifying callbacks the Standard Webhooks way (https://www.standardwebhooks.com).

Headers: ``webhook-id`` (the same on every retry of one event, for the
receiver's dedup), ``webhook-timestamp`` (unix seconds) and
``webhook-signature``: ``v1,<base64 HMAC-SHA256 of "id.timestamp.body">``,
one per secret that currently signs, separated by spaces (while a rotated
secret's overlap lasts, the old and the new one both sign).

Secrets have the Standard Webhooks form ``whsec_<base64>``; the HMAC key is
the base64-decoded part after ``whsec_`` (not the text itself). Receivers
can verify with the ``standardwebhooks`` package
(``Webhook(secret).verify(body, headers)``) or with this module alone
(stdlib only)::

    from kafscribe.webhooks.signing import verify
    verify(secret, request.headers, raw_body)   # raises WebhookVerificationError
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections.abc import Iterable, Mapping

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 24  # the key length Standard Webhooks libraries generate


class WebhookVerificationError(ValueError):
    """The signature is missing, wrong, or too old."""


def new_secret() -> str:
    """A fresh random secret, ``whsec_`` + base64 of 24 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key of ``secret``: the base64-decoded part after ``whsec_`` (as the reference libraries do)."""
    encoded = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded + "==", validate=False)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("a webhook secret is whsec_ followed by base64") from exc
    if not key:
        raise ValueError("a webhook secret may not be empty")
    return key


def event_id(job_id: str, event_type: str) -> str:
    """Stable id of one event: retries and replays of it carry the same id."""
    return "msg_" + hashlib.sha256(f"{job_id}:{event_type}".encode()).hexdigest()[:26]


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """One ``v1,<base64>`` signature of ``id.timestamp.body`` with ``secret``."""
    mac = hmac.new(secret_key(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def headers(signing_secrets: str | Iterable[str], msg_id: str, body: bytes,
            timestamp: int | None = None) -> dict[str, str]:
    """The headers of one delivery, signed with every secret in ``signing_secrets`` (newest first)."""
    if isinstance(signing_secrets, str):
        signing_secrets = [signing_secrets]
    timestamp = int(time.time()) if timestamp is None else timestamp
    signatures = [sign(s, msg_id, timestamp, body) for s in signing_secrets]
    if not signatures:
        raise ValueError("no secret to sign with")
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(signatures),
        "content-type": "application/json",
    }


def verify(secret: str, request_headers: Mapping[str, str], body: bytes, tolerance_s: int = 300) -> None:
    """Check a received callback; raises ``WebhookVerificationError`` if it is not genuine.

    Accepts the delivery when any ``v1`` signature in ``webhook-signature``
    matches ``secret``, and the timestamp is within ``tolerance_s`` of now.
    """
    lower = {k.lower(): v for k, v in request_headers.items()}
    try:
        msg_id, ts, sigs = lower["webhook-id"], int(lower["webhook-timestamp"]), lower["webhook-signature"]
    except (KeyError, ValueError) as exc:
        raise WebhookVerificationError("missing or malformed webhook headers") from exc
    if abs(time.time() - ts) > tolerance_s:
        raise WebhookVerificationError("timestamp outside the tolerance window")
    try:
        expected = sign(secret, msg_id, ts, body).encode()
    except ValueError as exc:
        raise WebhookVerificationError(f"unusable secret: {exc}") from exc
    if not any(hmac.compare_digest(expected, s.encode()) for s in sigs.split() if s.startswith("v1,")):
        raise WebhookVerificationError("no matching signature")
