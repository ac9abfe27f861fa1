"""Callbacks and translation through the whole pipeline, on the real stack."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import standardwebhooks

from bench.harness import wait_until
from kafscribe.store import session as cassandra_session
from kafscribe.store.webhook_secrets import WebhookSecrets
from kafscribe.webhooks import signing as webhooks
from producers.client import HttpError
from schemas.events import CallbackAttempt, DeadLetter, decode_event
from tests.conftest import fresh_settings, make_pipeline
from tests.fakes import FakeLLM
from tests.kafka_read import read_topic

pytestmark = [pytest.mark.stack, pytest.mark.slow]


@pytest.fixture(scope="module")
def secrets(stack_settings):
    session = cassandra_session.connect(stack_settings, keyspace=stack_settings.cassandra_keyspace)
    yield WebhookSecrets(session, stack_settings.callback_secret_overlap_s)
    session.cluster.shutdown()


@pytest.fixture(scope="module")
def llm():
    server = FakeLLM()
    yield server
    server.close()


@pytest.fixture(scope="module")
def pipe(stack_settings, tmp_path_factory, llm):
    settings = fresh_settings(
        stack_settings, engine="faster-whisper", model="base",
        callback_allow_networks="127.0.0.0/8",
        callback_backoff_base_s=0.3, callback_backoff_factor=2.0, callback_max_attempts=3,
        callback_timeout_s=2.0, llm_base_url=llm.url + "/v1", llm_model="fake", llm_retry_base_s=0.05,
    )
    p = make_pipeline(settings, tmp_path_factory, "callbacks").start_all()
    yield p
    p.stop()


def submit(pipe, path, tenant="default", **options) -> str:
    """Submit with an X-Tenant header (the HTTP client sends none by default)."""
    if tenant == "default":
        return pipe.http.submit(path, **options)["job_id"]
    original = pipe.http._request

    def with_tenant(method, p, body=None, headers=None):
        return original(method, p, body, {**(headers or {}), "X-Tenant": tenant})

    pipe.http._request = with_tenant
    try:
        return pipe.http.submit(path, **options)["job_id"]
    finally:
        pipe.http._request = original



def callbacks(pipe, job_id) -> dict:
    status, body, _ = pipe.http._request("GET", f"/v1/jobs/{job_id}/callbacks")
    assert status == 200, body
    return json.loads(body)


def test_one_signed_delivery_per_event(pipe, receiver, clips, secrets):
    job_id = submit(pipe, clips["en"], tenant="acme", callback_url=receiver.url + "/hook")
    assert pipe.wait_job(job_id)["status"] == "completed"
    wait_until(lambda: receiver.for_job(job_id))
    time.sleep(2)  # nothing more may arrive
    (request,) = receiver.for_job(job_id)
    secret = secrets.current("acme").secret  # the tenant's own secret, made on its first callback
    assert secret != secrets.current("default").secret
    webhooks.verify(secret, request["headers"], request["body"])  # raises if the signature is wrong
    standardwebhooks.Webhook(secret).verify(request["body"], request["headers"])  # the reference agrees
    with pytest.raises(webhooks.WebhookVerificationError):
        webhooks.verify(secrets.current("default").secret, request["headers"], request["body"])
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(webhooks.new_secret()).verify(request["body"], request["headers"])
    event = json.loads(request["body"])
    assert event["type"] == "job.completed" and event["data"]["status"] == "completed"
    assert event["data"]["links"]["self"].endswith(f"/v1/jobs/{job_id}")
    assert "transcript" not in event["data"]
    assert request["headers"]["webhook-id"] == webhooks.event_id(job_id, "job.completed")
    attempts = callbacks(pipe, job_id)["attempts"]
    assert [(a["attempt"], a["status_code"], a["outcome"]) for a in attempts] == [(1, 200, "delivered")]


def test_receiver_errors_are_retried_until_delivered(pipe, receiver, clips):
    job_id = submit(pipe, clips["en"], callback_url=receiver.url + "/flaky")
    receiver.script.extend([500, 500])
    assert pipe.wait_job(job_id)["status"] == "completed"
    wait_until(lambda: len(receiver.for_job(job_id)) >= 3)
    time.sleep(1.5)
    requests = receiver.for_job(job_id)
    assert [r["status"] for r in requests] == [500, 500, 200]
    assert len({r["headers"]["webhook-id"] for r in requests}) == 1
    attempts = wait_until(lambda: (a := callbacks(pipe, job_id)["attempts"]) and len(a) == 3 and a)
    assert [(a["status_code"], a["outcome"]) for a in attempts] == [
        (500, "retrying"), (500, "retrying"), (200, "delivered")
    ]


def test_unreachable_receiver_ends_in_the_dlq_and_can_be_redelivered(pipe, receiver, clips):
    from bench.harness import free_port

    dead_url = f"http://127.0.0.1:{free_port()}/gone"
    job_id = submit(pipe, clips["en"], callback_url=dead_url)
    assert pipe.wait_job(job_id)["status"] == "completed"
    attempts = wait_until(lambda: (a := callbacks(pipe, job_id)["attempts"]) and len(a) == 3 and a)
    assert [a["outcome"] for a in attempts] == ["retrying", "retrying", "gave_up"]
    assert all(a["status_code"] is None and "Connection refused" in a["error"] for a in attempts)
    letters = wait_until(lambda: [
        e for e in read_topic(pipe.settings, "dlq") if isinstance(e, DeadLetter) and e.job_id == job_id
    ])
    assert "not delivered after 3 attempts" in letters[0].reason
    parked = decode_event(letters[0].payload)
    assert isinstance(parked, CallbackAttempt) and parked.url == dead_url

    status, body, _ = pipe.http._request("POST", f"/v1/jobs/{job_id}/callbacks/redeliver")
    assert status == 202 and json.loads(body)["delivery_attempt"] == 4
    attempts = wait_until(lambda: (a := callbacks(pipe, job_id)["attempts"]) and len(a) == 4 and a)
    assert attempts[-1]["attempt"] == 4


@pytest.mark.parametrize("url", ["http://169.254.169.254/latest", "http://10.0.0.1/hook", "http://[::1]/x"])
def test_callbacks_to_internal_addresses_are_refused(pipe, clips, url):
    with pytest.raises(HttpError) as err:
        pipe.http.submit(clips["en"], callback_url=url)
    assert err.value.status == 422
    assert "non-public address" in err.value.body


@pytest.mark.parametrize("url", ["http://user:pw@127.0.0.1:9/hook", "http://token@127.0.0.1:9/hook",
                                 "http://100.100.100.200/latest/meta-data/"])
def test_userinfo_and_metadata_addresses_are_refused_at_submit(pipe, clips, url):
    with pytest.raises(HttpError) as err:  # 127.0.0.0/8 is allowed in this pipeline: userinfo alone refuses
        pipe.http.submit(clips["en"], callback_url=url)
    assert err.value.status == 422
    assert ("user info" if "@" in url else "non-public address") in err.value.body


def test_spanish_translated_to_english_in_result_and_callback(pipe, receiver, clips):
    job_id = submit(pipe, clips["es"], translate_to="en", callback_url=receiver.url + "/t",
                    callback_include_transcript="true")
    job = pipe.wait_job(job_id)
    assert job["status"] == "completed", job
    translation = job["result"]["translation"]
    assert translation["language"] == "en"
    assert "hello" in translation["text"].lower() and "friends" in translation["text"].lower()
    assert job["result"]["language"] == "es" and "hola" in job["result"]["text"].lower()
    assert "friends" in pipe.http.transcript(job_id, "txt", lang="en").lower()
    assert "hola" in pipe.http.transcript(job_id, "txt", lang="es").lower()
    (request,) = wait_until(lambda: receiver.for_job(job_id))
    data = json.loads(request["body"])["data"]
    assert "friends" in data["transcript"]["translation"]["text"].lower()


def test_llm_translation_through_the_pipeline_and_a_refusing_provider(pipe, llm, clips):
    job_id = submit(pipe, clips["es"], translate_to="de")
    job = pipe.wait_job(job_id)
    assert job["status"] == "completed", job
    translated = job["result"]["translation"]
    assert translated["language"] == "de"
    assert [s["text"] for s in translated["segments"]] == [
        f"[German] {s['text'].strip()}" for s in job["result"]["segments"]
    ]
    vtt = pipe.http.transcript(job_id, "vtt", lang="de")
    assert vtt.startswith("WEBVTT") and "[German]" in vtt

    llm.script.append(400)
    job_id = submit(pipe, clips["es"], translate_to="fr")
    job = pipe.wait_job(job_id)
    assert job["status"] == "failed"
    assert "HTTP 400" in job["error"] and "scripted failure 400" in job["error"]


class ReadingReceiver:
    """A client's webhook endpoint that, as a real client would, fetches the job while handling the delivery."""

    def __init__(self, pipe) -> None:
        self.seen: dict[str, dict] = {}
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                job_id = json.loads(body)["data"]["job_id"]
                status, raw, _ = pipe.http._request("GET", f"/v1/jobs/{job_id}")
                job = json.loads(raw) if status == 200 else {}
                transcript_status, text, _ = pipe.http._request("GET", f"/v1/jobs/{job_id}/transcript?format=txt")
                owner.seen.setdefault(job_id, {
                    "job_status": job.get("status"), "result": job.get("result"),
                    "transcript_status": transcript_status, "transcript": text.decode(errors="replace"),
                })
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_at_every_delivery_the_job_is_already_readable(pipe, clips):
    """10 jobs with callbacks: when each job.completed arrives, GET shows completed + result, transcript 200."""
    receiver = ReadingReceiver(pipe)
    try:
        job_ids = [submit(pipe, clips["en"], callback_url=receiver.url, model="tiny.en") for _ in range(10)]
        wait_until(lambda: len(receiver.seen) == 10, timeout_s=300, what="10 deliveries")
        for job_id in job_ids:
            seen = receiver.seen[job_id]
            assert seen["job_status"] == "completed", seen
            assert seen["result"] and seen["result"]["text"].strip() and seen["result"]["segments"], seen
            assert seen["transcript_status"] == 200
            assert seen["transcript"].splitlines() == [s["text"].strip() for s in seen["result"]["segments"]]
    finally:
        receiver.close()
