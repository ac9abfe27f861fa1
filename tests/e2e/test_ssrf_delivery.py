"""SSRF table test: real deliveries (``Deliverer`` on the real Cassandra) to local HTTP servers.

A delivery must go to the address that was checked: a resolver that answers
differently the second time (DNS rebinding) cannot steer it to loopback, a
redirect is not followed, refused addresses are never contacted, and a URL
with user info is refused without crashing anything.
"""

from __future__ import annotations

import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bench.harness import free_port
from consumers.notifier import DELIVERED, GAVE_UP, RETRYING, Deliverer
from kafscribe.webhooks import signing as webhooks
from schemas.events import CallbackAttempt, now_ms

pytestmark = [pytest.mark.stack]


class _Server(ThreadingHTTPServer):
    request_queue_size = 64  # concurrent deliveries must not overflow the listen backlog


class Recorder:
    """An HTTP server on ``address:port`` that records every request and answers ``status`` (+ headers)."""

    def __init__(self, address: str, port: int = 0, status: int = 200, headers: dict | None = None) -> None:
        self.requests: list[dict] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                owner.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST  # noqa: N815 - a followed redirect would arrive as GET

            def log_message(self, *args) -> None:
                pass

        self.httpd = _Server((address, port), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class Resolver:
    """A DNS server under the test's control: answers each lookup with the next of ``answers``."""

    def __init__(self, *answers: list[str]) -> None:
        self.answers = list(answers)
        self.calls = 0

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls += 1
        return self.answers[min(self.calls, len(self.answers)) - 1]


def attempt_event(url: str, tenant: str = "ssrf-test") -> CallbackAttempt:
    job_id = uuid.uuid4().hex
    body = json.dumps({"type": "job.completed", "data": {"job_id": job_id}})
    return CallbackAttempt(job_id=job_id, tenant=tenant, trace_id="t", event_id=webhooks.event_id(job_id, "x"),
                           url=url, event_type="job.completed", body=body, delivery_attempt=1,
                           not_before=now_ms())


def deliverer(stack_settings, session, resolve=None, **settings) -> Deliverer:
    s = stack_settings.with_(**{"callback_timeout_s": 1.0, "callback_max_attempts": 5, **settings})
    return Deliverer(s, session, "notifier", **({"resolve": resolve} if resolve else {}))


def history(d: Deliverer, job_id: str) -> list[tuple]:
    return [(a["attempt"], a["status_code"], a["outcome"], a["error"]) for a in d.store.attempts(job_id)]


def test_a_rebinding_resolver_cannot_steer_a_delivery_to_loopback(stack_settings, session):
    """First answer: an address we allow (stands in for a public one); any later answer: 127.0.0.1."""
    port = free_port()
    allowed, trap = Recorder("127.0.0.2", port), Recorder("127.0.0.1", port)
    try:
        resolve = Resolver(["127.0.0.2"], ["127.0.0.1"])
        d = deliverer(stack_settings, session, resolve, callback_allow_networks="127.0.0.2/32")
        event = attempt_event(f"http://hooks.rebind.test:{port}/in?k=v")
        assert d.attempt(event) == []
        assert resolve.calls == 1  # resolved once: the connection went to the checked address
        assert trap.requests == []
        (request,) = allowed.requests
        assert request["path"] == "/in?k=v"
        assert request["headers"]["Host"] == f"hooks.rebind.test:{port}"  # the name, not the address
        assert history(d, event.job_id) == [(1, 200, DELIVERED, None)]
    finally:
        allowed.close()
        trap.close()


def test_public_then_loopback_answers_never_reach_loopback(stack_settings, session):
    """A genuinely public first answer (unreachable here) and loopback after: loopback gets nothing."""
    trap = Recorder("127.0.0.1")
    try:
        resolve = Resolver(["93.184.216.34"], ["127.0.0.1"])
        d = deliverer(stack_settings, session, resolve)
        event = attempt_event(f"http://hooks.rebind.test:{trap.port}/in")
        outputs = d.attempt(event)
        assert resolve.calls == 1 and trap.requests == []
        ((number, status, outcome, error),) = history(d, event.job_id)
        assert (number, status, outcome) == (1, None, RETRYING) and error  # no network here: a failed attempt
        assert len(outputs) == 1 and outputs[0].topic.startswith(stack_settings.topic("callbacks.retry"))  # a retry tier
        # The retry resolves afresh, gets loopback, and is refused without a connection.
        assert d.attempt(outputs[0].event) == []
        assert trap.requests == []
        assert history(d, event.job_id)[1][2] == GAVE_UP and "non-public" in history(d, event.job_id)[1][3]
    finally:
        trap.close()


def test_a_redirect_to_loopback_is_not_followed(stack_settings, session):
    trap = Recorder("127.0.0.1")
    redirect = Recorder("127.0.0.2", headers={"Location": f"http://127.0.0.1:{trap.port}/admin"}, status=302)
    try:
        d = deliverer(stack_settings, session, callback_allow_networks="127.0.0.2/32")
        event = attempt_event(f"http://127.0.0.2:{redirect.port}/hook")
        outputs = d.attempt(event)
        assert len(redirect.requests) == 1 and trap.requests == []
        assert history(d, event.job_id) == [(1, 302, RETRYING, "HTTP 302 (redirects are not followed)")]
        assert len(outputs) == 1 and outputs[0].event.delivery_attempt == 2
    finally:
        redirect.close()
        trap.close()


@pytest.mark.parametrize("url", [
    "http://100.100.100.200/latest/meta-data/", "http://169.254.169.254/latest", "http://[::ffff:127.0.0.1]:9/",
    "http://[2002:7f00:1::1]/", "http://192.0.0.170/",
])
def test_refused_addresses_are_never_contacted_and_end_delivery(stack_settings, session, url):
    d = deliverer(stack_settings, session)
    event = attempt_event(url)
    assert d.attempt(event) == []
    ((number, status, outcome, error),) = history(d, event.job_id)
    assert (number, status, outcome) == (1, None, GAVE_UP) and "non-public address" in error


@pytest.mark.parametrize("url", ["http://user:pw@127.0.0.1:9/x", "http://[::1", "http://h.test:99999/"])
def test_a_bad_url_from_a_direct_producer_is_recorded_not_a_crash(stack_settings, session, url):
    d = deliverer(stack_settings, session, callback_allow_networks="127.0.0.0/8")
    event = attempt_event(url)
    assert d.attempt(event) == []
    ((_, status, outcome, error),) = history(d, event.job_id)
    assert status is None and outcome == GAVE_UP and error.startswith("refused: ")


def test_https_goes_to_the_checked_address_with_the_name_in_sni_and_the_certificate_check(tmp_path):
    """TLS: connect to the pinned address, but SNI and certificate verification use the URL's host name."""
    import shutil
    import ssl
    import subprocess

    from kafscribe.webhooks.guard import check_url, post

    if not shutil.which("openssl"):
        pytest.fail("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=hooks.tls.test", "-addext", "subjectAltName=DNS:hooks.tls.test",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    server = Recorder("127.0.0.2")
    seen_sni: list[str | None] = []
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    tls.sni_callback = lambda sock, name, ctx: seen_sni.append(name)
    server.httpd.socket = tls.wrap_socket(server.httpd.socket, server_side=True)
    try:
        client = ssl.create_default_context(cafile=str(cert))
        resolve = Resolver(["127.0.0.2"], ["127.0.0.1"])
        target = check_url(f"https://hooks.tls.test:{server.port}/in", "127.0.0.2/32", resolve)
        assert post(target, b"{}", {"content-type": "application/json"}, 5.0, ssl_context=client) == 200
        assert seen_sni == ["hooks.tls.test"] and resolve.calls == 1
        assert server.requests[0]["headers"]["Host"] == f"hooks.tls.test:{server.port}"
        wrong_name = check_url(f"https://other.tls.test:{server.port}/in", "127.0.0.2/32", Resolver(["127.0.0.2"]))
        with pytest.raises(ssl.SSLCertVerificationError):
            post(wrong_name, b"{}", {}, 5.0, ssl_context=client)
    finally:
        server.close()
