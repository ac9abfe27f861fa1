"""The SSRF guard: which callback addresses are refused, and URL masking (no servers needed)."""

from __future__ import annotations

import pytest

from kafscribe.webhooks.guard import CallbackRefused, check_url, mask_url


def resolver(*addresses: str):
    calls: list[str] = []

    def resolve(host: str, port: int) -> list[str]:
        calls.append(host)
        return list(addresses)

    resolve.calls = calls  # type: ignore[attr-defined]
    return resolve


@pytest.mark.parametrize("address", [
    "127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254",  # loopback, private, link-local
    "100.100.100.200", "100.64.0.1", "100.127.255.254",  # shared address space, incl. a cloud metadata service
    "192.0.0.8", "192.0.0.170",  # IETF protocol assignments
    "0.0.0.0", "224.0.0.1", "255.255.255.255", "198.18.0.1", "192.0.2.1", "240.0.0.1",
    "::1", "::", "fe80::1", "fc00::1", "fec0::1", "ff02::1",  # IPv6 loopback, link/site-local, ULA, multicast
    "2002:7f00:1::1", "2002:0808:0808::1",  # 6to4, whatever it embeds
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "64:ff9b::7f00:1", "64:ff9b:1::1",  # v4 behind v6 wrappers
    "3fff::1", "5f00::1", "2001:db8::1",  # documentation and SRv6 ranges
])
def test_non_global_addresses_are_refused(address):
    with pytest.raises(CallbackRefused, match="non-public address"):
        check_url("https://hooks.example.com/x", resolve=resolver(address))
    literal = f"[{address}]" if ":" in address else address
    with pytest.raises(CallbackRefused, match="non-public address"):
        check_url(f"http://{literal}/x")


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "64:ff9b::808:808"])
def test_global_addresses_pass_and_are_what_a_delivery_connects_to(address):
    resolve = resolver(address)
    target = check_url("https://hooks.example.com:8443/in?token=abc", resolve=resolve)
    assert target.addresses == (address,)
    assert (target.host, target.port, target.path) == ("hooks.example.com", 8443, "/in?token=abc")
    assert resolve.calls == ["hooks.example.com"]


def test_one_refused_address_among_public_ones_refuses_the_url():
    with pytest.raises(CallbackRefused, match="127.0.0.1"):
        check_url("http://mixed.example.com/", resolve=resolver("93.184.216.34", "127.0.0.1"))


def test_allowed_networks_open_exactly_their_range():
    check_url("http://127.0.0.1:9/x", allow="127.0.0.0/8")
    check_url("http://a.test/", allow="10.0.0.0/8", resolve=resolver("10.9.9.9"))
    with pytest.raises(CallbackRefused):
        check_url("http://a.test/", allow="10.0.0.0/8", resolve=resolver("10.9.9.9", "192.168.0.1"))


@pytest.mark.parametrize("url", [
    "http://user:pw@hooks.example.com/x", "http://user@93.184.216.34/", "https://:pw@hooks.example.com/",
    "http://a@b@hooks.example.com/",
])
def test_userinfo_is_refused(url):
    resolve = resolver("93.184.216.34")
    with pytest.raises(CallbackRefused, match="user info"):
        check_url(url, resolve=resolve)
    assert resolve.calls == []  # refused before any lookup


@pytest.mark.parametrize("url", [
    "ftp://hooks.example.com/", "/relative", "http:///nohost", "http://[::1", "http://hooks.example.com:99999/",
    "http://hooks.example.com:port/", "http://hooks.example.com/a b", "http://hooks.example.com/\r\nX: y",
    "http://hööks.example.com/", "", "http://hooks.example.com:0/",
])
def test_malformed_urls_are_refused_with_a_reason(url):
    with pytest.raises(CallbackRefused):
        check_url(url, resolve=resolver("93.184.216.34"))


def test_a_host_that_does_not_resolve_is_refused():
    def fails(host, port):
        raise OSError("no such host")

    with pytest.raises(CallbackRefused, match="does not resolve"):
        check_url("http://nowhere.example.com/", resolve=fails)
    with pytest.raises(CallbackRefused, match="does not resolve"):
        check_url("http://nowhere.example.com/", resolve=resolver())


@pytest.mark.parametrize(("url", "masked"), [
    ("https://h.example.com/hook?token=s3cret&x=1", "https://h.example.com/hook?token=***&x=***"),
    ("https://h.example.com:8443/p?s3cret", "https://h.example.com:8443/p?***"),
    ("https://h.example.com/p", "https://h.example.com/p"),
    ("http://user:pw@h.example.com/p?a=b#frag", "http://***@h.example.com/p?a=***"),
    ("http://[2606:4700::1]:81/p?k=v", "http://[2606:4700::1]:81/p?k=***"),
    ("http://h:notaport/p?k=v", "***"),
    (None, None),
])
def test_mask_url_hides_query_values_and_userinfo(url, masked):
    assert mask_url(url) == masked


def test_a_receiver_that_trickles_its_answer_is_cut_off_at_the_timeout():
    """Per-socket timeouts alone let a byte every few seconds hold a delivery slot for ever."""
    import socket
    import threading
    import time

    from kafscribe.webhooks.guard import post

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    stop = threading.Event()

    def trickle() -> None:
        conn, _ = server.accept()
        conn.recv(65536)
        for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 200:
            if stop.wait(0.2):
                break
            try:
                conn.sendall(bytes([byte]))
            except OSError:
                break
        conn.close()

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    target = check_url(f"http://trickle.test:{server.getsockname()[1]}/hook", "127.0.0.0/8",
                       resolve=lambda host, port: ["127.0.0.1"])
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="no complete answer within 1s"):
        post(target, b"{}", {"content-type": "application/json"}, timeout_s=1.0)
    assert time.monotonic() - started < 3.0  # each byte came within the per-read timeout; the total did not
    stop.set()
    server.close()
