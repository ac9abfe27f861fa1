"""Keep callbacks out of our own network (SSRF): check the address, then call exactly that address.

A callback URL is checked when a job is submitted (422) and again before
each delivery. The check resolves the host once; every address it answers
must be globally routable (``ipaddress.is_global``, and none of
``REFUSED_NETWORKS``, which ``is_global`` lets through or which tunnel to
other addresses) unless it falls in ``KAFSCRIBE_CALLBACK_ALLOW_NETWORKS``.
``post`` then connects to one of those checked addresses itself (the host
name stays in ``Host`` and in TLS SNI/certificate checks), so a resolver
that answers differently the second time (DNS rebinding) cannot steer a
delivery anywhere. Redirects are never followed: a 3xx is the receiver's
answer like any other status. URLs with userinfo (``user:pass@host``) are
refused: credentials have no place in a stored, displayed callback URL.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit, urlunsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], list[str]]

# Refused even where ``is_global`` says otherwise (or may, depending on the Python version).
REFUSED_NETWORKS: tuple[Network, ...] = tuple(ipaddress.ip_network(n) for n in (
    "100.64.0.0/10",    # shared address space (carrier NAT); 100.100.100.200 is a cloud metadata service
    "192.0.0.0/24",     # IETF protocol assignments
    "fec0::/10",        # deprecated IPv6 site-local
    "2002::/16",        # 6to4: embeds an IPv4 address that a relay would reach
    "64:ff9b:1::/48",   # local-use NAT64
    "3fff::/20",        # IPv6 documentation (2024; older Pythons call it global)
    "5f00::/16",        # SRv6 segment identifiers (likewise)
))
NAT64 = ipaddress.ip_network("64:ff9b::/96")  # well-known NAT64 prefix: judged by the IPv4 address it embeds


class CallbackRefused(ValueError):
    """The callback URL may not be called; ``str()`` says why."""


@dataclass(frozen=True)
class Target:
    """A checked callback URL: where to connect (``addresses``) and what to ask for."""

    url: str
    scheme: str
    host: str
    port: int
    path: str  # path + query, as sent on the request line
    addresses: tuple[str, ...]


def system_resolver(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (the operating system's resolver)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def allowed_networks(spec: str) -> list[Network]:
    return [ipaddress.ip_network(part.strip(), strict=False) for part in spec.split(",") if part.strip()]


def is_public(ip: IPAddress) -> bool:
    """True when ``ip`` is globally routable and not in a range we refuse regardless."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return is_public(ip.ipv4_mapped)
        if ip in NAT64:
            return is_public(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if any(ip in net for net in REFUSED_NETWORKS if net.version == ip.version):
        return False
    return ip.is_global and not ip.is_multicast


def _split(url: str) -> SplitResult:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError as exc:
        raise CallbackRefused(f"callback_url is not a valid URL: {exc}") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CallbackRefused("callback_url must be an absolute http(s) URL")
    if parts.port == 0:
        raise CallbackRefused("callback_url has port 0")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise CallbackRefused("callback_url must not contain user info (user:password@)")
    if not url.isascii() or any(ord(c) < 33 or ord(c) == 127 for c in url):
        raise CallbackRefused("callback_url must be ASCII without spaces or control characters"
                              " (percent-encode the path, punycode the host)")
    return parts


def check_url(url: str, allow: str = "", resolve: Resolver = system_resolver) -> Target:
    """Resolve ``url``'s host once and check every address; raise ``CallbackRefused`` if any is refused."""
    parts = _split(url)
    host = parts.hostname or ""
    port = parts.port if parts.port is not None else (443 if parts.scheme == "https" else 80)
    try:
        literal = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        literal = None
    if literal is not None:
        addresses = [str(literal)]
    else:
        try:
            addresses = list(dict.fromkeys(resolve(host, port)))
        except (OSError, UnicodeError) as exc:
            raise CallbackRefused(f"callback host {host!r} does not resolve") from exc
        if not addresses:
            raise CallbackRefused(f"callback host {host!r} does not resolve")
    networks = allowed_networks(allow)
    for address in addresses:
        try:
            ip = ipaddress.ip_address(address.split("%")[0])
        except ValueError as exc:
            raise CallbackRefused(f"callback host {host!r} resolves to {address!r}, not an address") from exc
        if any(ip in net for net in networks if net.version == ip.version):
            continue
        if not is_public(ip):
            raise CallbackRefused(f"callback host {host!r} resolves to {ip}, a non-public address")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(url=url, scheme=parts.scheme, host=host, port=port, path=path, addresses=tuple(addresses))


def mask_url(url: str | None) -> str | None:
    """``url`` fit to show: query values and any user info replaced by ``***`` (tokens hide there)."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
        hostport = parts.hostname or ""
        if ":" in hostport:
            hostport = f"[{hostport}]"
        if parts.port is not None:
            hostport += f":{parts.port}"
    except ValueError:
        return "***"
    netloc = ("***@" if "@" in parts.netloc else "") + hostport
    query = "&".join(
        (pair.split("=", 1)[0] + "=***") if "=" in pair else "***" for pair in parts.query.split("&") if pair
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """HTTP to a fixed address; ``Host`` stays the URL's host."""

    def __init__(self, target: Target, address: str, timeout: float) -> None:
        super().__init__(target.host, target.port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a fixed address; SNI and the certificate check use the URL's host."""

    def __init__(self, target: Target, address: str, timeout: float, context: ssl.SSLContext | None) -> None:
        super().__init__(target.host, target.port, timeout=timeout, context=context)  # None: system CAs
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def post(target: Target, body: bytes, headers: dict[str, str], timeout_s: float,
         ssl_context: ssl.SSLContext | None = None) -> int:
    """POST ``body`` to ``target`` at one of its checked addresses; return the HTTP status.

    Addresses are tried in order until one accepts the connection; the
    response is never followed (a 3xx is returned as it is). ``timeout_s``
    bounds each connection attempt and the whole exchange after it: a
    receiver that trickles its answer a byte at a time is cut off then, so
    it cannot hold a delivery slot. Raises ``OSError`` (incl. timeouts) when
    no address answers in time.
    """
    last: OSError | None = None
    for address in target.addresses:
        if target.scheme == "https":
            conn: http.client.HTTPConnection = _PinnedHTTPSConnection(target, address, timeout_s, ssl_context)
        else:
            conn = _PinnedHTTPConnection(target, address, timeout_s)
        try:
            try:
                conn.connect()
            except OSError as exc:
                last = exc
                continue
            cut = threading.Event()
            cutoff = threading.Timer(timeout_s, _cut, args=(conn, cut))
            cutoff.start()
            try:
                conn.request("POST", target.path, body=body, headers=headers)
                response = conn.getresponse()
                response.read(64 * 1024)  # drain a little; the body is not used
                return response.status
            except (OSError, http.client.HTTPException) as exc:
                if cut.is_set():  # the deadline cut it off
                    raise TimeoutError(f"no complete answer within {timeout_s:g}s") from exc
                raise
            finally:
                cutoff.cancel()
        except http.client.HTTPException as exc:
            raise ConnectionError(f"bad HTTP response: {type(exc).__name__}: {exc}") from exc
        finally:
            conn.close()
    raise last or OSError("no address to connect to")


def _cut(conn: http.client.HTTPConnection, cut: threading.Event) -> None:
    """The exchange outlived its deadline: shut the socket so the blocked read returns."""
    cut.set()
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
