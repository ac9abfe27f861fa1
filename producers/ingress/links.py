"""A job's links in API answers: the base a request may use (the links themselves: ``kafscribe.webhooks.links``).

The base is ``KAFSCRIBE_PUBLIC_URL`` when set. Otherwise the request's
``Host`` is used only when it is in ``KAFSCRIBE_ALLOWED_HOSTS`` (a name
allows any port, ``name:port`` that port only); any other Host gets relative
links. A client-chosen Host is never echoed back (no link poisoning through
caches, proxies or copied responses).
"""

from __future__ import annotations

import re

from aiohttp import web

from kafscribe.settings import Settings
from kafscribe.webhooks import links

from .appkeys import SETTINGS

_HOST = re.compile(r"(?P<name>\[[0-9a-f:.]+\]|[a-z0-9.-]+)(?::[0-9]{1,5})?")


def job_links(request: web.Request, job_id: str) -> dict[str, str]:
    return links.job_links(base_url(request), job_id)


def base_url(request: web.Request) -> str:
    """Scheme and authority of links (``""``: relative links)."""
    settings: Settings = request.app[SETTINGS]
    if settings.public_url:
        return settings.public_url.rstrip("/")
    host = request.headers.get("Host", "")
    return f"{request.scheme}://{host}" if host_allowed(host, settings.allowed_hosts) else ""


def host_allowed(host: str, allowed: str) -> bool:
    """``host`` (a Host header) matches an entry of the comma-separated ``allowed`` list."""
    host = host.strip().lower()
    m = _HOST.fullmatch(host)
    if m is None:
        return False
    name = m.group("name")
    for entry in (e.strip().lower() for e in allowed.split(",")):
        if entry and (host == entry or name == entry):
            return True
    return False
