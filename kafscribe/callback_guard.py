"""Refuse callback URLs that point inside our network (SSRF).

Checked when a job is submitted (422) and again right before each delivery
(DNS can change in between). Loopback, link-local, private, multicast,
reserved and unspecified addresses are refused unless they fall in one of
the networks of ``KAFSCRIBE_CALLBACK_ALLOW_NETWORKS``.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit


class CallbackRefused(ValueError):
    """The callback URL may not be called; ``str()`` says why."""


def allowed_networks(spec: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(part.strip(), strict=False) for part in spec.split(",") if part.strip()]


def check_url(url: str, allow: str = "") -> list[str]:
    """Resolve ``url``'s host; return its addresses or raise ``CallbackRefused``."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CallbackRefused("callback_url must be an absolute http(s) URL")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise CallbackRefused(f"callback host {parts.hostname!r} does not resolve") from exc
    networks = allowed_networks(allow)
    addresses = sorted({info[4][0] for info in infos})
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        if any(ip in net for net in networks):
            continue
        if (ip.is_loopback or ip.is_link_local or ip.is_private or ip.is_multicast
                or ip.is_reserved or ip.is_unspecified):
            raise CallbackRefused(
                f"callback host {parts.hostname!r} resolves to {ip}, a non-public address"
            )
    return addresses
