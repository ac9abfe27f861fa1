"""API keys: who may call ``/v1/*`` and for which tenant.

A key reads ``ksk_<key_id>_<secret>``: ``key_id`` (12 hex characters) names
the key in listings and revocations; the secret is 32 random bytes
(``secrets.token_urlsafe``). Cassandra keeps only the SHA-256 of the whole
key, in the row of its ``key_id``: a lookup reads that one row and compares
hashes (a fast hash is enough for a 256-bit random secret; nobody can guess
it offline either). The plain key is shown once, when it is made.

Each key belongs to one tenant. An admin key may also act for any tenant
and see every job and ``/v1/workers``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

PREFIX = "ksk_"
_KEY_RE = re.compile(r"^ksk_([0-9a-f]{12})_([A-Za-z0-9_-]{20,})$")
TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ApiKeyError(ValueError):
    """A key or tenant name that cannot be used (bad form, unknown id)."""


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    tenant: str
    admin: bool
    created_at: datetime | None = None
    revoked_at: datetime | None = None
    label: str = ""

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def check_tenant(name: str) -> str:
    """``name`` if it is a valid tenant name (letters, digits, ``._-``; up to 64), else ``ApiKeyError``."""
    if not TENANT_RE.match(name or ""):
        raise ApiKeyError(f"invalid tenant name {name!r}: letters, digits, '.', '_', '-' (up to 64, not first)")
    return name


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_id_of(key: str) -> str | None:
    """The ``key_id`` inside a well-formed key, else None."""
    m = _KEY_RE.match(key.strip())
    return m.group(1) if m else None


class KeyStore:
    """The ``api_keys`` table."""

    def __init__(self, session) -> None:
        self.session = session
        p = session.prepare
        self._insert = p(
            "INSERT INTO api_keys (key_id, key_hash, tenant, admin, created_at, label) VALUES (?,?,?,?,?,?)"
            " IF NOT EXISTS"
        )
        self._get = p("SELECT * FROM api_keys WHERE key_id = ?")
        self._revoke = p("UPDATE api_keys SET revoked_at = ? WHERE key_id = ? IF EXISTS")
        self._all = p("SELECT * FROM api_keys")

    def create(self, tenant: str, *, admin: bool = False, label: str = "") -> tuple[str, ApiKey]:
        """A new key of ``tenant``; returns (the plain key, shown only now; its record)."""
        check_tenant(tenant)
        now = datetime.now(UTC)
        while True:
            key_id = secrets.token_hex(6)
            key = f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
            applied = self.session.execute(self._insert, (key_id, _hash(key), tenant, admin, now, label)).one()
            if applied is None or applied[0]:  # [applied] is False only if key_id was taken (1 in 2^48)
                return key, ApiKey(key_id, tenant, admin, now, None, label)

    def lookup(self, key: str) -> ApiKey | None:
        """The active key ``key`` (None if malformed, unknown, wrong secret or revoked)."""
        key_id = key_id_of(key)
        if key_id is None:
            return None
        row = self.session.execute(self._get, (key_id,)).one()
        if row is None or not hmac.compare_digest(row.key_hash, _hash(key.strip())):
            return None
        record = _record(row)
        return record if record.active else None

    def revoke(self, key_or_id: str) -> ApiKey:
        """Revoke a key given by its id or the key itself; effective at once (ingress caches: AUTH_CACHE_S)."""
        key_id = key_id_of(key_or_id) or key_or_id.strip()
        if not re.fullmatch(r"[0-9a-f]{12}", key_id):
            raise ApiKeyError(f"{key_or_id!r} is neither a key id nor a key")
        row = self.session.execute(self._get, (key_id,)).one()
        if row is None:
            raise ApiKeyError(f"no key {key_id}")
        if row.revoked_at is None:
            self.session.execute(self._revoke, (datetime.now(UTC), key_id))
            row = self.session.execute(self._get, (key_id,)).one()
        return _record(row)

    def list(self, tenant: str | None = None) -> list[ApiKey]:
        """Every key (of ``tenant``), oldest first. Small table: a full scan."""
        keys = [_record(r) for r in self.session.execute(self._all)]
        keys = [k for k in keys if tenant is None or k.tenant == tenant]
        return sorted(keys, key=lambda k: (k.created_at or datetime.min.replace(tzinfo=UTC), k.key_id))


def _record(row) -> ApiKey:
    return ApiKey(row.key_id, row.tenant, bool(row.admin), _utc(row.created_at), _utc(row.revoked_at),
                  row.label or "")


def _utc(value: datetime | None) -> datetime | None:
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value
