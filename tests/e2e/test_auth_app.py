"""The ingress's auth in process (aiohttp test client): auth off for local development, outages, links."""

from __future__ import annotations

import asyncio
import logging

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request

from bench.harness import free_port
from kafscribe.settings import Settings, SettingsError
from producers.ingress import build_app
from producers.ingress.appkeys import SETTINGS
from producers.ingress.links import job_links


async def _call(settings: Settings, method: str, path: str, headers: dict[str, str] | None = None):
    async with TestClient(TestServer(build_app(settings))) as client:
        resp = await client.request(method, path, headers=headers or {})
        return resp.status, await resp.json(), dict(resp.headers)


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", "example.com"])
def test_auth_off_is_refused_unless_the_ingress_listens_on_loopback(host):
    with pytest.raises(SettingsError, match="local development"):
        build_app(Settings(auth_required=False, http_host=host))


@pytest.mark.stack
def test_auth_off_makes_every_request_an_admin_and_says_so(isolated, caplog):
    settings = isolated.with_(auth_required=False, http_host="127.0.0.1")
    with caplog.at_level(logging.WARNING, logger="kafscribe.ingress.auth"):
        status, data, _ = asyncio.run(_call(settings, "GET", "/v1/workers"))
    assert status == 200 and "workers" in data
    assert any("AUTH IS OFF" in r.getMessage() for r in caplog.records)
    status, _, _ = asyncio.run(_call(settings, "GET", "/v1/jobs/nope", {"X-Tenant": "acme"}))
    assert status == 404


def test_cassandra_down_while_checking_a_key_is_503_not_401():
    settings = Settings(cassandra_port=free_port(), kafka_bootstrap=f"127.0.0.1:{free_port()}", retry_after_s=9)
    well_formed = {"Authorization": f"Bearer ksk_{'a' * 12}_{'s' * 43}"}
    status, data, headers = asyncio.run(_call(settings, "GET", "/v1/jobs/x", well_formed))
    assert status == 503 and headers["Retry-After"] == "9", data
    # a malformed key needs no lookup: 401 even now
    status, _, _ = asyncio.run(_call(settings, "GET", "/v1/jobs/x", {"Authorization": "Bearer nonsense"}))
    assert status == 401


@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/jobs/x"), ("GET", "/v1/jobs"),
                                            ("DELETE", "/v1/jobs/x"), ("GET", "/v1/jobs/x/transcript")])
def test_cassandra_down_behind_a_job_route_is_503_with_retry_after(method, path):
    """Nothing listens on the Cassandra port: every job route answers 503 + Retry-After, never 500."""
    settings = Settings(cassandra_port=free_port(), kafka_bootstrap=f"127.0.0.1:{free_port()}", retry_after_s=7,
                        auth_required=False, http_host="127.0.0.1")
    status, data, headers = asyncio.run(_call(settings, method, path))
    assert status == 503 and headers["Retry-After"] == "7", data
    assert data["error"].startswith("Cassandra unavailable: ") and data["error"].count("Cassandra unavailable") == 1


@pytest.mark.parametrize(
    ("public_url", "host", "base"),
    [
        ("https://stt.example.com/", "evil.example", "https://stt.example.com"),
        ("", "evil.example", ""),
        ("", "localhost.evil.example", ""),
        ("", "127.0.0.1@evil.example", ""),
        ("", "localhost:8123", "http://localhost:8123"),
        ("", "[::1]:8000", "http://[::1]:8000"),
        ("", "", ""),
    ],
)
def test_links_come_from_public_url_or_an_allowed_host(public_url, host, base):
    app = web.Application()
    app[SETTINGS] = Settings(public_url=public_url)
    request = make_mocked_request("GET", "/v1/jobs/j1", headers={"Host": host} if host else {}, app=app)
    assert job_links(request, "j1") == {"self": f"{base}/v1/jobs/j1", "transcript": f"{base}/v1/jobs/j1/transcript"}


def test_keys_cli_says_where_it_looked_when_cassandra_is_down():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("KAFSCRIBE_")}
    env["KAFSCRIBE_CASSANDRA_PORT"] = str(free_port())
    proc = subprocess.run([sys.executable, "-m", "kafscribe.cli.main", "keys", "create", "--tenant", "acme"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "cannot reach Cassandra" in proc.stderr and "Traceback" not in proc.stderr
