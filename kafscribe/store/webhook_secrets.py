"""Each tenant's webhook signing secrets, in Cassandra (table ``webhook_secrets``).

A tenant's secret is created on first use (its first callback, or
``kafscribe webhooks secret --tenant T``), so there is no shared default
secret: every tenant signs with its own random ``whsec_`` secret.
``rotate`` adds a newer version; the previous one keeps signing beside it
for ``overlap_s`` (``KAFSCRIBE_CALLBACK_SECRET_OVERLAP_S``) so receivers can
switch over without dropping a delivery, then stops. ``revoke`` is for a
secret that leaked: it adds a newer version and deletes every older one at
once, so the next delivery is signed with the new secret alone (deliveries
read the secrets each time; nothing caches them). Versions are claimed
with lightweight transactions (``IF NOT EXISTS``), so concurrent creators
never end up with two different "first" secrets.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from kafscribe.webhooks import signing as webhooks


@dataclass(frozen=True)
class SecretVersion:
    tenant: str
    version: int
    secret: str
    created_at: datetime


class WebhookSecrets:
    def __init__(self, session, overlap_s: float) -> None:
        self.session = session
        self.overlap = timedelta(seconds=overlap_s)
        self._claim = session.prepare(
            "INSERT INTO webhook_secrets (tenant, version, secret, created_at) VALUES (?,?,?,?) IF NOT EXISTS"
        )
        self._list = session.prepare("SELECT * FROM webhook_secrets WHERE tenant = ?")
        self._written = session.prepare("SELECT version, WRITETIME(secret) AS written FROM webhook_secrets"
                                        " WHERE tenant = ?")
        self._drop_older = session.prepare(
            "DELETE FROM webhook_secrets USING TIMESTAMP ? WHERE tenant = ? AND version < ?"
        )

    def versions(self, tenant: str) -> list[SecretVersion]:
        """Every stored version of ``tenant``'s secret, newest first."""
        rows = self.session.execute(self._list, (tenant,))
        found = [SecretVersion(r.tenant, r.version, r.secret, r.created_at.replace(tzinfo=UTC)) for r in rows]
        return sorted(found, key=lambda v: v.version, reverse=True)

    def current(self, tenant: str) -> SecretVersion:
        """The newest secret of ``tenant``, created now if it has none."""
        versions = self.versions(tenant)
        return versions[0] if versions else self._add(tenant, 1)

    def rotate(self, tenant: str) -> SecretVersion:
        """A new secret for ``tenant``; the previous one keeps signing for the overlap window."""
        while True:
            versions = self.versions(tenant)
            created = self._add(tenant, (versions[0].version if versions else 0) + 1, must_win=True)
            if created is not None:
                return created

    def revoke(self, tenant: str) -> tuple[SecretVersion, list[int]]:
        """A new secret for ``tenant`` that signs alone from now on: every older version is deleted, with no
        overlap. Returns the new version and the versions revoked."""
        new = self.rotate(tenant)
        older = [(r.version, r.written or 0) for r in self.session.execute(self._written, (tenant,))
                 if r.version < new.version]
        # Past every older row's write time, whatever this host's clock says (versions are written by LWTs,
        # whose timestamps come from the coordinator): a delete older than its row would not remove it.
        stamp = max([int(time.time() * 1_000_000)] + [written + 1 for _, written in older])
        self.session.execute(self._drop_older, (stamp, tenant, new.version))
        return new, sorted(version for version, _ in older)

    def signing(self, tenant: str, now: datetime | None = None) -> list[str]:
        """The secrets that sign ``tenant``'s deliveries now, newest first (creates the first one)."""
        now = now or datetime.now(UTC)
        versions = self.versions(tenant) or [self.current(tenant)]
        active = [versions[0].secret]
        for newer, older in zip(versions, versions[1:], strict=False):
            if newer.created_at + self.overlap <= now:
                break  # ``older`` was superseded before the overlap window
            active.append(older.secret)
        return active

    def previous_valid_until(self, tenant: str) -> datetime | None:
        """Until when the secret before the newest one still signs (None: there is none, or it stopped)."""
        versions = self.versions(tenant)
        if len(versions) < 2:
            return None
        until = versions[0].created_at + self.overlap
        return until if until > datetime.now(UTC) else None

    def _add(self, tenant: str, version: int, must_win: bool = False) -> SecretVersion | None:
        """Claim ``version``; if another process claimed it first, return theirs (or None if ``must_win``)."""
        if not tenant:
            raise ValueError("a tenant name is required")
        now = datetime.now(UTC)
        created_at = now.replace(microsecond=now.microsecond // 1000 * 1000)  # Cassandra keeps milliseconds
        secret = webhooks.new_secret()
        result = self.session.execute(self._claim, (tenant, version, secret, created_at))
        if result.was_applied:
            return SecretVersion(tenant, version, secret, created_at)
        if must_win:
            return None
        row = result.one()
        return SecretVersion(tenant, row.version, row.secret, row.created_at.replace(tzinfo=UTC))
