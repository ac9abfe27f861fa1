"""Auth at the door, on a real ingress: keys, tenant separation, admin routes, quota, redelivery limit, links.

Only the ingress runs (no workers): every check here is about who may see or
do what, and queued jobs are enough for that.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from bench.harness import wait_until
from kafscribe.statuses import FAILED
from kafscribe.store.apikeys import KeyStore
from kafscribe.store.callbacks import CallbackStore
from kafscribe.store.jobs import JobStore
from producers.client import HttpClient, HttpError
from schemas.events import CallbackAttempt
from tests.conftest import fresh_settings, make_pipeline

pytestmark = pytest.mark.stack

QUOTA = 2
REDELIVER_S = 30


@pytest.fixture(scope="module")
def pipe(stack_settings, tmp_path_factory):
    settings = fresh_settings(
        stack_settings, tenant_max_unfinished=QUOTA, quota_retry_after_s=17, redeliver_interval_s=REDELIVER_S,
        auth_cache_s=1.0, callback_allow_networks="127.0.0.0/8",
    )
    p = make_pipeline(settings, tmp_path_factory, "auth")
    p.start("ingress")
    yield p
    p.stop()


def tenant() -> str:
    return f"tenant-{uuid.uuid4().hex[:8]}"


def call(client: HttpClient, method: str, path: str, **headers: str) -> tuple[int, dict, dict]:
    status, body, response_headers = client._request(method, path, None, headers)
    try:
        data = json.loads(body) if body else {}
    except ValueError:
        data = {"raw": body.decode(errors="replace")}
    return status, data, response_headers


JOB_ROUTES = [
    ("GET", "/v1/jobs/{id}"),
    ("GET", "/v1/jobs/{id}/transcript"),
    ("GET", "/v1/jobs/{id}/callbacks"),
    ("POST", "/v1/jobs/{id}/callbacks/redeliver"),
]


def test_v1_needs_a_valid_key_and_health_routes_stay_open(pipe, session):
    anonymous = pipe.client()
    for method, path in [("POST", "/v1/jobs"), ("GET", "/v1/workers"), *JOB_ROUTES]:
        status, data, headers = call(anonymous, method, path.format(id="x"))
        assert status == 401, (method, path, data)
        assert headers.get("WWW-Authenticate", "").startswith("Bearer")
    for bad in ["Bearer ", "Bearer nonsense", f"Bearer ksk_{'0' * 12}_{'x' * 43}", "Basic dXNlcjpwYXNz",
                f"Token {pipe.api_key}"]:
        assert call(anonymous, "GET", "/v1/jobs/x", Authorization=bad)[0] == 401, bad
    for path in ("/healthz", "/readyz", "/metrics"):
        assert call(anonymous, "GET", path)[0] == 200, path

    key = pipe.key(tenant())
    client = pipe.client(key)
    assert call(client, "GET", "/v1/jobs/x")[0] == 404  # accepted: no such job
    KeyStore(session).revoke(key)
    # revoked: 401 within the ingress's key cache time (1 s here)
    wait_until(lambda: call(client, "GET", "/v1/jobs/x")[0] == 401, timeout_s=5, what="revoked key refused")


def test_another_tenants_job_is_404_on_every_job_route(pipe, clips):
    alice, bob = pipe.client(pipe.key(tenant())), pipe.client(pipe.key(tenant()))
    job_id = alice.submit(clips["en"], callback_url="http://127.0.0.1:9/hook")["job_id"]
    missing = uuid.uuid4().hex
    for method, path in JOB_ROUTES:
        status, data, _ = call(bob, method, path.format(id=job_id))
        assert status == 404, (path, data)
        # exactly what an id that does not exist gets: nothing tells the job exists
        status_missing, data_missing, _ = call(bob, method, path.format(id=missing))
        assert (status_missing, json.dumps(data_missing).replace(missing, job_id)) == (status, json.dumps(data))
    assert call(alice, "GET", f"/v1/jobs/{job_id}")[0] == 200
    assert call(alice, "GET", f"/v1/jobs/{job_id}/transcript")[0] == 409  # hers, not finished yet
    assert call(alice, "GET", f"/v1/jobs/{job_id}/callbacks")[0] == 200
    assert call(alice, "POST", f"/v1/jobs/{job_id}/callbacks/redeliver")[0] == 409  # no event yet
    # the admin key of the pipeline sees every tenant's jobs
    status, data, _ = call(pipe.http, "GET", f"/v1/jobs/{job_id}")
    assert status == 200 and data["tenant"] != "default"


def test_x_tenant_is_for_admins_only(pipe, clips):
    name = tenant()
    own = pipe.client(pipe.key(name))
    other = tenant()
    with pytest.raises(HttpError) as err:
        _submit_as(own, clips["en"], other)
    assert err.value.status == 403
    job_id = _submit_as(own, clips["en"], name)  # its own name is fine
    assert call(own, "GET", f"/v1/jobs/{job_id}")[1]["tenant"] == name
    # an admin acts for a tenant: the job is that tenant's
    job_id = _submit_as(pipe.http, clips["en"], name)
    status, data, _ = call(own, "GET", f"/v1/jobs/{job_id}")
    assert status == 200 and data["tenant"] == name
    with pytest.raises(HttpError) as err:
        _submit_as(pipe.http, clips["en"], "not a tenant!")
    assert err.value.status == 422


def _submit_as(client: HttpClient, path, tenant_name: str) -> str:
    original = client._request

    def with_tenant(method, p, body=None, headers=None):
        return original(method, p, body, {**(headers or {}), "X-Tenant": tenant_name})

    client._request = with_tenant
    try:
        return client.submit(path)["job_id"]
    finally:
        client._request = original


def test_only_admin_keys_see_workers(pipe):
    status, data, _ = call(pipe.client(pipe.key(tenant())), "GET", "/v1/workers")
    assert status == 403 and "admin" in data["error"]
    status, data, _ = call(pipe.http, "GET", "/v1/workers")
    assert status == 200 and "workers" in data


def test_quota_of_unfinished_jobs(pipe, clips, session):
    name = tenant()
    client = pipe.client(pipe.key(name))
    jobs = [client.submit(clips["en"])["job_id"] for _ in range(QUOTA)]
    with pytest.raises(HttpError) as err:
        client.submit(clips["en"])
    assert err.value.status == 429 and "quota" in err.value.body
    status, body, headers = client._request("POST", "/v1/jobs", b"", {"Content-Type": "multipart/form-data; boundary=x"})
    assert status == 429 and headers["Retry-After"] == "17"  # refused before the upload is read
    pipe.client(pipe.key(tenant())).submit(clips["en"])  # another tenant is not held back
    JobStore(session).transition(jobs[0], FAILED, error="finished by the test")  # as the sink would
    client.submit(clips["en"])  # a slot is free again
    with pytest.raises(HttpError) as err:
        client.submit(clips["en"])
    assert err.value.status == 429


def test_redelivery_needs_the_tenant_and_is_rate_limited(pipe, clips, session):
    alice, bob = pipe.client(pipe.key(tenant())), pipe.client(pipe.key(tenant()))
    job_id = alice.submit(clips["en"], callback_url="http://127.0.0.1:9/hook")["job_id"]
    # the callback event the notifier would have stored when the job finished
    CallbackStore(session).save_event(CallbackAttempt(
        job_id=job_id, tenant="whoever", event_id=f"evt_{job_id}", url="http://127.0.0.1:9/hook",
        event_type="job.completed", body="{}", delivery_attempt=1, not_before=0,
    ))
    redeliver = f"/v1/jobs/{job_id}/callbacks/redeliver"
    for _ in range(3):
        assert call(bob, "POST", redeliver)[0] == 404  # and bob's tries use up nothing of alice's
    status, data, _ = call(alice, "POST", redeliver)
    assert status == 202, data
    status, data, headers = call(alice, "POST", redeliver)
    assert status == 429, data
    assert 1 <= int(headers["Retry-After"]) <= REDELIVER_S
    assert call(pipe.http, "POST", redeliver)[0] == 429  # per job: an admin waits too
    assert call(bob, "POST", redeliver)[0] == 404  # still no hint to others


def test_links_never_reflect_an_arbitrary_host(pipe, clips):
    port = pipe.settings.http_port
    client = pipe.client(pipe.key(tenant()))  # tenant "default" may be at this module's small quota
    created = _submit_with_host(client, clips["en"], "evil.example")
    assert created["links"]["self"] == f"/v1/jobs/{created['job_id']}"
    status, data, _ = call(client, "GET", f"/v1/jobs/{created['job_id']}", Host="evil.example:8000")
    assert status == 200 and "evil" not in json.dumps(data["links"])
    status, data, _ = call(client, "GET", f"/v1/jobs/{created['job_id']}", Host=f"localhost:{port}")
    assert data["links"]["self"] == f"http://localhost:{port}/v1/jobs/{created['job_id']}"


def _submit_with_host(client: HttpClient, path, host: str) -> dict:
    original = client._request

    def with_host(method, p, body=None, headers=None):
        return original(method, p, body, {**(headers or {}), "Host": host})

    client._request = with_host
    try:
        return client.submit(path)
    finally:
        client._request = original


def test_cli_submit_sends_the_key_from_the_environment_or_the_option(pipe, clips):
    key = pipe.key(tenant())
    base = {k: v for k, v in os.environ.items() if not k.startswith("KAFSCRIBE_")}
    argv = [sys.executable, "-m", "kafscribe.cli.main", "submit", str(clips["en"]), "--url", pipe.url]

    def run(extra_argv=(), **env):
        return subprocess.run([*argv, *extra_argv], env={**base, **env}, capture_output=True, text=True, timeout=120)

    refused = run()
    assert refused.returncode == 1 and "401" in refused.stderr and "KAFSCRIBE_API_KEY" in refused.stderr
    by_env = run(KAFSCRIBE_API_KEY=key)
    assert by_env.returncode == 0, by_env.stderr
    by_option = run(["--api-key", key])
    assert by_option.returncode == 0, by_option.stderr
    client = pipe.client(key)
    for job_id in (by_env.stdout.strip(), by_option.stdout.strip()):
        assert call(client, "GET", f"/v1/jobs/{job_id}")[0] == 200  # the key's tenant owns both


def test_concurrent_redeliveries_of_one_job_let_exactly_one_through(pipe, clips, session):
    alice = pipe.client(pipe.key(tenant()))
    job_id = alice.submit(clips["en"], callback_url="http://127.0.0.1:9/hook")["job_id"]
    CallbackStore(session).save_event(CallbackAttempt(
        job_id=job_id, tenant="whoever", event_id=f"evt_{job_id}", url="http://127.0.0.1:9/hook",
        event_type="job.completed", body="{}", delivery_attempt=1, not_before=0,
    ))
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda _: call(alice, "POST", f"/v1/jobs/{job_id}/callbacks/redeliver")[0],
                                 range(8)))
    assert sorted(statuses) == [202] + [429] * 7
