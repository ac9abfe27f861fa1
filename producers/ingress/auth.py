"""Who is calling: the API key of every ``/v1/*`` request decides its tenant.

- ``Authorization: Bearer KEY`` (``kafscribe keys create``); missing, unknown
  or revoked: ``401``. ``/healthz``, ``/readyz`` and ``/metrics`` are open.
- The caller's tenant is the key's. An admin key may act for a tenant with
  ``X-Tenant`` (new jobs belong to it), reads every tenant's jobs and is the
  only one to see ``ADMIN_ONLY`` routes (``403`` for others). A tenant key
  that names another tenant in ``X-Tenant`` gets ``403``.
- Job routes read jobs through ``job_scope(request)``: another tenant's job
  is missing (``404``), the same answer as an id that does not exist.
- ``POST /v1/jobs`` (and the OpenAI-compatible ``/v1/audio/*`` routes) is
  refused with ``429`` past the door's caps of uploads in progress (per key and
  per process, ``door.Door``) or the tenant's quota of unfinished jobs, before
  the upload is read: the quota's slot is reserved atomically here
  (``quotas.TenantQuotas``) and given back if the upload is not accepted.
- A looked-up key is trusted for ``KAFSCRIBE_AUTH_CACHE_S``: a revocation
  takes effect within that time. Cassandra down while a key is checked: ``503``
  (the reason is logged; the answer names no internal address).
- A job's callback redelivery takes a slot (``redeliveries``), once per job
  per ``KAFSCRIBE_REDELIVER_INTERVAL_S``; the route answers ``429`` inside.
- ``KAFSCRIBE_AUTH_REQUIRED=false`` (local development, loopback only): every
  request is an admin of ``X-Tenant`` or ``default``; logged loudly at start.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import threading
import time
from dataclasses import dataclass

from aiohttp import web

from kafscribe.settings import Settings, SettingsError
from kafscribe.store import apikeys, quotas
from kafscribe.store import session as cassandra_session

from ..submission import Unavailable
from .appkeys import BACKENDS, SETTINGS
from .door import UPLOAD_END, Busy, door
from .responses import OUTAGE_REASON

log = logging.getLogger("kafscribe.ingress.auth")

ADMIN_ONLY = frozenset({"/v1/workers"})
# Routes that create a job: the tenant's quota of unfinished jobs is checked before the upload is read.
QUOTA_ROUTES = frozenset({"/v1/jobs", "/v1/audio/transcriptions", "/v1/audio/translations"})
DEFAULT_TENANT = "default"
_CACHE_MAX = 10_000


@dataclass(frozen=True)
class Caller:
    """The authenticated client of one request."""

    tenant: str  # new jobs belong to it
    admin: bool
    key_id: str = ""  # "" when auth is off

    @property
    def job_scope(self) -> str | None:
        """The tenant whose jobs this caller may read (None: every tenant's)."""
        return None if self.admin else self.tenant


class Gate:
    """API keys (cached lookups) and the redelivery limit, over the ingress's Cassandra session."""

    def __init__(self, settings: Settings, app: web.Application) -> None:
        self.settings = settings
        self.app = app  # its "backends" hold the Cassandra session
        self._store: apikeys.KeyStore | None = None
        self._redeliveries: quotas.RedeliverLimiter | None = None
        self._quotas: quotas.TenantQuotas | None = None
        self._cache: dict[str, tuple[float, apikeys.ApiKey | None]] = {}
        self._lock = threading.Lock()

    def cached(self, key: str) -> apikeys.ApiKey | None | bool:
        """The cached answer for ``key`` (an ApiKey, or None for a refused key); ``False`` if not cached.

        Non-blocking: a hit needs no thread (most requests, within ``KAFSCRIBE_AUTH_CACHE_S``).
        """
        hit = self._cache.get(key)
        return hit[1] if hit is not None and hit[0] > time.monotonic() else False

    def lookup(self, key: str) -> apikeys.ApiKey | None:
        """The active key ``key`` or None; blocking (run it in a thread). Raises ``Unavailable``."""
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        try:
            record = self._keys().lookup(key)
        except Exception as exc:
            if cassandra_session.is_outage(exc):
                raise Unavailable(f"Cassandra unavailable: {exc}") from exc
            raise
        if self.settings.auth_cache_s > 0:
            with self._lock:
                if len(self._cache) >= _CACHE_MAX:
                    self._cache.clear()
                self._cache[key] = (now + self.settings.auth_cache_s, record)
        return record

    def _keys(self) -> apikeys.KeyStore:
        session = self.app[BACKENDS].submitter().session  # connects (or raises Unavailable)
        with self._lock:
            if self._store is None or self._store.session is not session:
                self._store = apikeys.KeyStore(session)
            return self._store

    def redeliveries(self) -> quotas.RedeliverLimiter:
        """The per-job redelivery limit (blocking: prepares statements on first use)."""
        session = self.app[BACKENDS].submitter().session
        with self._lock:
            if self._redeliveries is None or self._redeliveries.session is not session:
                self._redeliveries = quotas.RedeliverLimiter(session, self.settings)
            return self._redeliveries

    def quotas(self) -> quotas.TenantQuotas:
        """The unfinished-job and audio quotas (blocking on first use: connects, prepares statements)."""
        session = self.app[BACKENDS].submitter().session
        with self._lock:
            if self._quotas is None or self._quotas.session is not session:
                self._quotas = quotas.TenantQuotas(session, self.settings)
            return self._quotas


CALLER = web.RequestKey("caller", Caller)
RESERVATION = web.RequestKey("reservation", quotas.Reservation)
QUOTAS = web.RequestKey("quotas", quotas.TenantQuotas)
GATE = web.AppKey("gate", Gate)


def caller(request: web.Request) -> Caller:
    """The caller ``authenticate`` found for this ``/v1/*`` request."""
    return request[CALLER]


def reservation(request: web.Request) -> tuple[quotas.TenantQuotas, quotas.Reservation] | None:
    """The quotas and the reservation ``authenticate`` made for this upload (None: no quota applies)."""
    held = request.get(RESERVATION)
    return (request[QUOTAS], held) if held is not None else None


async def release_held(request: web.Request) -> None:
    """Give back the upload's quota reservation unless a submission took it (idempotent)."""
    reserved = reservation(request)
    if reserved is not None and reserved[1].state == "held":  # never handed to a submission
        await reserved[0].release(reserved[1])


def job_scope(request: web.Request) -> str | None:
    """Tenant the request may read jobs of (None: all, for admins)."""
    return caller(request).job_scope


def _refuse(exc_cls: type[web.HTTPException], reason: str, **headers: str) -> web.HTTPException:
    body = json.dumps({"error": reason, "status": exc_cls.status_code})
    return exc_cls(text=body, content_type="application/json", headers=headers or None)


async def _identify(request: web.Request) -> Caller:
    settings: Settings = request.app[SETTINGS]
    if not settings.auth_required:
        return Caller(tenant=_wanted_tenant(request) or DEFAULT_TENANT, admin=True)
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    challenge = {"WWW-Authenticate": 'Bearer realm="kafscribe"'}
    if scheme.lower() != "bearer" or not token:
        raise _refuse(web.HTTPUnauthorized, "send 'Authorization: Bearer KEY' (kafscribe keys create)", **challenge)
    key = None
    if apikeys.key_id_of(token) is not None:  # a malformed key costs no lookup
        try:
            key = gate(request).cached(token)
            if key is False:
                key = await asyncio.to_thread(gate(request).lookup, token)
        except Unavailable as exc:
            log.warning("API key not checked: %s", exc)
            raise _refuse(web.HTTPServiceUnavailable, OUTAGE_REASON,
                          **{"Retry-After": str(settings.retry_after_s)}) from exc
    if key is None:
        raise _refuse(web.HTTPUnauthorized, "unknown or revoked API key", **challenge)
    wanted = _wanted_tenant(request)
    if wanted and wanted != key.tenant and not key.admin:
        raise _refuse(web.HTTPForbidden, "only an admin key may act for another tenant (X-Tenant)")
    return Caller(tenant=wanted or key.tenant, admin=key.admin, key_id=key.key_id)


def _wanted_tenant(request: web.Request) -> str:
    """The tenant named in ``X-Tenant`` ("" if none); 422 for a name no key could have."""
    wanted = request.headers.get("X-Tenant", "").strip()
    if wanted:
        try:
            apikeys.check_tenant(wanted)
        except apikeys.ApiKeyError as exc:
            raise _refuse(web.HTTPUnprocessableEntity, f"X-Tenant: {exc}") from exc
    return wanted


async def _reserve(request: web.Request, who: Caller) -> tuple[quotas.TenantQuotas, quotas.Reservation] | None:
    """Reserve the tenant's quota slot for this upload (429 at the quota); None when there is no quota."""
    settings: Settings = request.app[SETTINGS]
    if settings.tenant_max_unfinished <= 0:
        return None  # no slot to reserve; the audio quota per day is charged at submission (``quotas_for``)
    try:
        limits = await quotas_for(request)
        return limits, await limits.reserve(who.tenant)
    except quotas.LimitExceeded as exc:
        raise _refuse(web.HTTPTooManyRequests, exc.reason, **{"Retry-After": str(exc.retry_after_s)}) from exc
    except Exception as exc:
        if isinstance(exc, Unavailable) or cassandra_session.is_outage(exc):
            log.warning("quota of tenant %r not reserved: %s: %s", who.tenant, type(exc).__name__, exc)
            raise _refuse(web.HTTPServiceUnavailable, OUTAGE_REASON,
                          **{"Retry-After": str(settings.retry_after_s)}) from exc
        # a soft limit: a failure other than an outage must not stop every upload
        log.error("quota of tenant %r not reserved: %s: %s", who.tenant, type(exc).__name__, exc)
        return None


async def quotas_for(request: web.Request) -> quotas.TenantQuotas:
    """The app's ``TenantQuotas`` (connecting and preparing in a thread the first time)."""
    g = gate(request)
    limits = g._quotas
    if limits is None or not request.app[BACKENDS].connected():
        limits = await asyncio.to_thread(g.quotas)
    return limits


async def _upload(request: web.Request, handler, who: Caller):
    """An upload route: the door's caps, then the quota reservation, given back unless a submission took it."""
    try:
        end = door(request).enter_upload(who.key_id)
    except Busy as exc:
        raise _refuse(web.HTTPTooManyRequests, exc.reason, **{"Retry-After": "1"}) from exc
    request[UPLOAD_END] = end  # ended by read_upload once the body is read, or here at the latest
    try:
        reserved = await _reserve(request, who)
        if reserved is None:
            return await handler(request)
        limits, held = reserved
        request[RESERVATION] = held
        request[QUOTAS] = limits
        try:
            return await handler(request)
        finally:
            await release_held(request)  # nothing of it was accepted
    finally:
        end()


@web.middleware
async def authenticate(request: web.Request, handler):
    """Authenticate ``/v1/*``; admin-only routes; the caps and quota of new jobs."""
    if not request.path.startswith("/v1/"):
        return await handler(request)
    who = await _identify(request)
    request[CALLER] = who
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else ""
    if route in ADMIN_ONLY and not who.admin:
        raise _refuse(web.HTTPForbidden, "this route needs an admin key")
    if request.method == "POST" and route in QUOTA_ROUTES:
        return await _upload(request, handler, who)
    return await handler(request)


def setup(app: web.Application, settings: Settings) -> None:
    """Check the auth settings and hand the app its key lookup; call first in ``build_app``."""
    if not settings.auth_required:
        if not _loopback(settings.http_host):
            raise SettingsError(
                f"KAFSCRIBE_AUTH_REQUIRED=false is for local development: KAFSCRIBE_HTTP_HOST must be a loopback"
                f" address, not {settings.http_host!r}"
            )
        log.warning("AUTH IS OFF (KAFSCRIBE_AUTH_REQUIRED=false): every request to %s:%s is an admin of any"
                    " tenant. Local development only.", settings.http_host, settings.http_port)
    app[GATE] = Gate(settings, app)


def gate(request: web.Request) -> Gate:
    return request.app[GATE]


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
