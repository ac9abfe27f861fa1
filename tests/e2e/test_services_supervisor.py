"""`kafscribe services` supervises: a stage worker killed with SIGKILL is restarted and its jobs complete."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request

import pytest

from bench.harness import free_port, wait_until
from kafscribe.cli import services
from kafscribe.store.apikeys import KeyStore
from producers.client import HttpClient
from tests.conftest import fresh_settings

pytestmark = [pytest.mark.stack, pytest.mark.slow]


def rows(settings) -> dict[str, services.ServiceRow]:
    return {row.name: row for row in services.status(settings)}


def test_a_killed_worker_is_restarted_and_its_jobs_complete(stack_settings, session, clips, tmp_path):
    settings = fresh_settings(stack_settings, engine="faster-whisper", model="tiny.en", session_timeout_ms=6000,
                              state_dir=tmp_path / "state", http_port=free_port(),
                              supervisor_metrics_port=free_port(), status_interval_s=1.0,
                              transcribers="1")  # the one transcriber is the one killed
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAFSCRIBE_")}
    env.update(settings.to_env())
    api_key, _ = KeyStore(session).create("default", admin=True, label="tests")
    http = HttpClient(f"http://127.0.0.1:{settings.http_port}", timeout_s=60, api_key=api_key)
    try:
        assert services.up(settings, log=print, env=env) == list(services.DEFAULT_SERVICES)
        wait_until(lambda: all(r.pid for r in rows(settings).values()), timeout_s=60, what="all services running")
        first_pid = rows(settings)["transcriber"].pid

        job_ids = [http.submit(clips["long" if i == 0 else "en"])["job_id"] for i in range(3)]
        wait_until(lambda: http.job(job_ids[0])["status"] == "transcribing", timeout_s=120, what="transcribing")
        os.kill(first_pid, signal.SIGKILL)

        restarted = wait_until(lambda: (r := rows(settings)["transcriber"]).restarts == 1 and r.pid and r,
                               timeout_s=60, what="transcriber restarted")
        assert restarted.pid != first_pid and restarted.last_exit == -signal.SIGKILL

        def finished(job_id: str) -> dict | None:
            job = http.job(job_id)
            return job if job["status"] in ("completed", "failed") else None

        done = [wait_until(lambda j=j: finished(j), timeout_s=180, what=f"job {j}") for j in job_ids]
        assert [d["status"] for d in done] == ["completed"] * 3, done
        assert done[0]["attempts"] == 2, "the killed worker's job was redone once"

        cli = subprocess.run([sys.executable, "-m", "kafscribe.cli.main", "services", "status"], env=env,
                             capture_output=True, text=True, timeout=60)
        line = next(x for x in cli.stdout.splitlines() if x.startswith("transcriber"))
        assert f"running pid {restarted.pid}" in line and "restarts 1" in line and "last exit -9" in line, cli.stdout
        assert cli.returncode == 0, cli.stdout

        url = f"http://127.0.0.1:{settings.supervisor_metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
        assert 'kafscribe_service_restarts_total{service="transcriber"} 1.0' in text
    finally:
        services.down(settings, log=print)
    assert not any(r.pid for r in rows(settings).values()), "down stops the supervisor and every service"


def test_a_worker_answers_healthz_beside_metrics(stack_settings, tmp_path_factory):
    """A real worker process: ``GET /healthz`` reports each poll loop's progress (the watchdog's view)."""
    import json

    from tests.conftest import make_pipeline

    port = free_port()
    pipe = make_pipeline(fresh_settings(stack_settings, watchdog_s=60.0), tmp_path_factory, "healthz")
    try:
        pipe.start("sink", KAFSCRIBE_METRICS_PORT=str(port))

        def health() -> dict | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
                    body = json.load(resp)
                return body if resp.status == 200 and body["seconds_since_progress"] else None
            except OSError:
                return None

        body = wait_until(health, timeout_s=60, what="healthz answers")
        assert body["status"] == "ok" and body["limit_s"] == 60.0
        [(loop, age)] = body["seconds_since_progress"].items()
        assert loop.startswith("sink:") and age < 5
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert b"# HELP kafscribe_producer_resets_total" in resp.read()
    finally:
        pipe.stop()
