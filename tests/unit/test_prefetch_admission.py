"""The transcriber's prefetch is admitted against memory like a job, and a job whose audio was
prefetched is not asked to find that memory free a second time. Real blob store (file), real ffmpeg;
only the host's memory reading is set by the test."""

from __future__ import annotations

import hashlib
from concurrent.futures import Future

import numpy as np
import pytest

from consumers.stage import LeaveGroup
from consumers.transcriber import Prefetched, Transcriber, prefetch_bytes
from kafscribe.settings import Settings
from kafscribe.speech import memory
from kafscribe.store import blobs as blobstore
from schemas.events import Upload
from tests import audio_clips

MIB = 2**20


def transcriber(tmp_path, headroom: int) -> Transcriber:
    t = Transcriber.__new__(Transcriber)  # no engine, no Cassandra: only admission and prefetch
    t.settings = Settings(blob_store="file", blob_dir=tmp_path / "blobs", throttle_leave_s=0.0)
    t.session = None
    t.throttled = False
    t._last_need = memory.estimate_job_bytes(30.0, "base")
    t.headroom = lambda: headroom
    t.idle_capacity = lambda collect=True: 64 * 2**30
    return t


def upload(tmp_path, settings: Settings) -> Upload:
    wav = audio_clips.speak("Prefetched while the other job runs.", tmp_path / "p.wav")
    data = wav.read_bytes()
    ref = blobstore.open_store(settings).put("job-p", data)
    return Upload(job_id="job-p", blob_ref=ref, audio_sha256=hashlib.sha256(data).hexdigest(),
                  audio_bytes=len(data), audio_duration=3.0, filename="p.wav")


def test_a_prefetch_waits_for_memory_beyond_the_running_jobs_estimate(tmp_path):
    short = transcriber(tmp_path, headroom=memory.estimate_job_bytes(30.0, "base") + prefetch_bytes(3.0) - 1)
    assert short.prefetch(upload(tmp_path, short.settings), None) is None, "no room: the job does it later"
    roomy = transcriber(tmp_path, headroom=2**30)
    got = roomy.prefetch(upload(tmp_path, roomy.settings), None)
    assert isinstance(got, Prefetched) and got.samples.dtype == np.float32
    assert 2.0 < len(got.samples) / 16000 < 4.0 and got.nbytes == got.samples.nbytes


def test_a_prefetched_jobs_admission_does_not_count_its_resident_audio_twice(tmp_path):
    event = Upload(job_id="job-q", blob_ref="file:x", audio_sha256="0" * 64, audio_bytes=1,
                   audio_duration=600.0, filename="q.wav")
    need = memory.estimate_job_bytes(600.0, "base")
    resident = int(600.0 * 16000 * 4)
    t = transcriber(tmp_path, headroom=need - resident)
    with pytest.raises(LeaveGroup):
        t.admit(event)  # without the prefetch the memory is short
    assert t.admit(event, resident=resident) is None


def test_a_failed_prefetch_is_not_used_and_the_job_does_the_work_itself():
    failed: Future = Future()
    failed.set_exception(blobstore.BlobError("checksum mismatch"))
    assert Transcriber._prefetched(failed, 1.0) is None
    assert Transcriber._prefetched(None, 1.0) is None
    done: Future = Future()
    done.set_result(Prefetched(np.zeros(16000, np.float32), 0.01, 0.02))
    assert Transcriber._prefetched(done, 1.0).nbytes == 64000
