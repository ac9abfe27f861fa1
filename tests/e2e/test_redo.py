"""A transcriber killed between consume and commit: the job is redone once, never twice."""

from __future__ import annotations

import signal
import time

import pytest

from schemas.events import Result, Transcript
from tests.conftest import fresh_settings, make_pipeline
from tests.kafka_read import read_topic

pytestmark = [pytest.mark.stack, pytest.mark.slow]


def test_transcriber_killed_mid_job_redoes_it_exactly_once(stack_settings, clips, tmp_path_factory):
    settings = fresh_settings(stack_settings, engine="faster-whisper", model="base", session_timeout_ms=6000)
    pipe = make_pipeline(settings, tmp_path_factory, "redo").start_all()
    try:
        job_id = pipe.http.submit(clips["long"])["job_id"]
        job = pipe.wait_job(job_id, statuses=("transcribing", "completed"))
        assert job["status"] == "transcribing", "the kill must land between consume and commit"
        first_worker = job["worker_id"]
        pipe.kill("transcriber", signal.SIGKILL)
        pipe.start("transcriber", name="transcriber-2")

        job = pipe.wait_job(job_id, timeout_s=300)
        assert job["status"] == "completed", job
        assert job["attempts"] == 2
        assert job["worker_id"] != first_worker
        assert "worker dies" in job["result"]["text"].lower()

        time.sleep(1)
        results = [e for e in read_topic(settings, "results") if isinstance(e, Result) and e.job_id == job_id]
        transcripts = [e for e in read_topic(settings, "transcripts") if isinstance(e, Transcript)]
        assert len(results) == 1, results
        assert len([t for t in transcripts if t.job_id == job_id]) == 1
        assert results[0].attempt == 2
    finally:
        pipe.stop()
