"""The API on the real pipeline: the OpenAI-compatible endpoints through the official ``openai`` package,
the CLI's submit --format and jobs watch, cancelling a running job."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
import uuid

import openai
import pytest

from bench.harness import Pipeline, wait_until
from tests.conftest import make_pipeline

pytestmark = [pytest.mark.stack, pytest.mark.slow]


@pytest.fixture(scope="module")
def pipe(stack_settings, tmp_path_factory):
    from tests.conftest import fresh_settings

    settings = fresh_settings(stack_settings, engine="faster-whisper", model="tiny.en", transient_retries=1)
    p = make_pipeline(settings, tmp_path_factory, "openai").start_all()
    yield p
    p.stop()


def client(pipe: Pipeline, key: str | None = None, **kw) -> openai.OpenAI:
    kw.setdefault("max_retries", 0)
    return openai.OpenAI(base_url=f"{pipe.url}/v1", api_key=key or pipe.api_key, timeout=300, **kw)


def test_text_and_srt(pipe, clips):
    oa = client(pipe)
    with open(clips["en"], "rb") as f:
        text = oa.audio.transcriptions.create(file=f, model="whisper-1", response_format="text")
    assert isinstance(text, str) and "fox" in text.lower() and "lazy" in text.lower()
    with open(clips["en_mp3"], "rb") as f:
        srt = oa.audio.transcriptions.create(file=f, model="tiny.en", response_format="srt", language="en")
    assert srt.startswith("1\n00:00:0") and " --> " in srt and "fox" in srt.lower()
    with open(clips["en"], "rb") as f:
        plain = oa.audio.transcriptions.create(file=f, model="whisper-1")  # json, the default
    assert "dog" in plain.text.lower()


def test_verbose_json_with_segments_and_words(pipe, clips):
    oa = client(pipe)
    with open(clips["en"], "rb") as f:
        out = oa.audio.transcriptions.create(file=f, model="whisper-1", response_format="verbose_json",
                                             timestamp_granularities=["word", "segment"])
    assert out.language == "english" and out.duration > 1.0 and "fox" in out.text.lower()
    times = [(seg.start, seg.end) for seg in out.segments]
    assert times and all(0 <= a < b <= out.duration + 0.5 for a, b in times)
    assert [t[0] for t in times] == sorted(t[0] for t in times)
    assert out.words
    words = [w.word.strip(" .,").lower() for w in out.words]
    assert "fox" in words and "lazy" in words
    starts = [w.start for w in out.words]
    assert starts == sorted(starts) and all(w.start <= w.end for w in out.words)
    assert all(out.segments[0].start - 0.05 <= w.start and w.end <= out.segments[-1].end + 0.05 for w in out.words)
    with open(clips["en"], "rb") as f:
        words_only = oa.audio.transcriptions.create(file=f, model="whisper-1", response_format="verbose_json",
                                                    timestamp_granularities=["word"])
    assert words_only.words and not words_only.segments


def test_translation_into_english(pipe, clips):
    oa = client(pipe)
    with open(clips["es"], "rb") as f:
        out = oa.audio.translations.create(file=f, model="base")  # tiny.en cannot translate; base can
    text = out.text.lower()
    assert "hello" in text and "friends" in text, text


def test_bad_file_and_bad_options_are_400_in_openai_shape(pipe, clips):
    oa = client(pipe)
    with open(clips["garbage"], "rb") as f, pytest.raises(openai.BadRequestError) as err:
        oa.audio.transcriptions.create(file=f, model="whisper-1")
    assert err.value.param == "file" and err.value.code == "invalid_file_format"
    assert err.value.type == "invalid_request_error"
    with open(clips["en"], "rb") as f, pytest.raises(openai.BadRequestError) as err:
        oa.audio.transcriptions.create(file=f, model="gpt-9-imaginary")
    assert err.value.param == "model" and "whisper-1" in err.value.message
    with open(clips["en"], "rb") as f, pytest.raises(openai.BadRequestError) as err:
        oa.audio.transcriptions.create(file=f, model="whisper-1", response_format="json",
                                       timestamp_granularities=["word"])
    assert err.value.param == "timestamp_granularities"
    with open(clips["en"], "rb") as f, pytest.raises(openai.BadRequestError) as err:
        oa.audio.transcriptions.create(file=f, model="whisper-1", language="xx")
    assert err.value.param == "language"


def test_missing_or_invalid_key_is_401_in_openai_shape(pipe, clips):
    with open(clips["en"], "rb") as f, pytest.raises(openai.AuthenticationError) as err:
        client(pipe, key="ksk_000000000000_not-a-real-key").audio.transcriptions.create(file=f, model="whisper-1")
    assert err.value.code == "invalid_api_key" and err.value.type == "invalid_request_error"
    request = urllib.request.Request(f"{pipe.url}/v1/audio/translations", data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as http:
        urllib.request.urlopen(request, timeout=30)
    body = json.loads(http.value.read())
    assert http.value.code == 401 and set(body["error"]) == {"message", "type", "param", "code"}


def test_past_the_wait_the_answer_names_the_job_and_nothing_is_resubmitted(pipe, clips, tmp_path):
    """An ingress with a short wait: 504 with the job id and link; the client does not retry (one job);
    the job goes on and completes."""
    tenant = f"oa-{uuid.uuid4().hex[:8]}"
    short = Pipeline(pipe.settings.with_(openai_wait_s=0.2), tmp_path)
    short.start("ingress", name="ingress-short")
    try:
        key = short.key(tenant)
        with open(clips["en"], "rb") as f, pytest.raises(openai.InternalServerError) as err:
            client(short, key=key, max_retries=2).audio.transcriptions.create(file=f, model="whisper-1")
        assert err.value.status_code == 504 and err.value.code == "job_not_finished"
        job_id = err.value.body["job_id"]
        assert err.value.body["links"]["self"].endswith(f"/v1/jobs/{job_id}")
        listed = short.client(key)._request("GET", "/v1/jobs", None, {})
        assert [j["job_id"] for j in json.loads(listed[1])["jobs"]] == [job_id]  # no retry submitted it again
        assert pipe.wait_job(job_id)["status"] == "completed"
    finally:
        short.stop()


def test_cli_submit_writes_each_result_beside_its_input(pipe, clips, tmp_path):
    """`kafscribe submit DIR --format srt`: a progress bar per file on stderr, one .srt beside each input."""
    for name in ("one.wav", "two.mp3"):
        shutil.copy(clips["en_mp3" if name.endswith("mp3") else "en"], tmp_path / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAFSCRIBE_")}
    done = subprocess.run(
        [sys.executable, "-m", "kafscribe.cli.main", "submit", str(tmp_path), "--format", "srt", "--url", pipe.url,
         "--api-key", pipe.api_key, "--timeout", "300"], env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr
    for name in ("one", "two"):
        srt = (tmp_path / f"{name}.srt").read_text()
        assert srt.startswith("1\n00:00:0") and "fox" in srt.lower()
    assert "completed" in done.stderr  # the bars' last state
    job_id = re.search(r"job (\w+) queued for .*one\.wav", done.stderr).group(1)
    watched = subprocess.run(
        [sys.executable, "-m", "kafscribe.cli.main", "jobs", "watch", job_id, "--url", pipe.url, "--api-key",
         pipe.api_key], env=env, capture_output=True, text=True, timeout=120)
    assert watched.returncode == 0 and watched.stdout.split() == [job_id, "completed"], watched.stderr


def test_cancel_of_a_running_job_sticks_through_the_pipeline(pipe, clips, tmp_path):
    """DELETE while transcribing: `cancelled` at once, the transcriber stops it at its next check and
    nothing reaches the sink; it stays cancelled; then a second DELETE removes it."""
    longer = tmp_path / "longer.wav"  # ~75 s: seconds of transcribing to cancel in, even on a quiet machine
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-stream_loop", "2", "-i", str(clips["long"]),
                    "-c", "copy", str(longer)], check=True)
    job_id = pipe.http.submit(longer)["job_id"]
    pipe.wait_job(job_id, statuses=("transcribing",), timeout_s=240)
    status, body, _ = pipe.http._request("DELETE", f"/v1/jobs/{job_id}")
    assert status == 202 and json.loads(body)["status"] == "cancelled"
    wait_until(lambda: any(job_id in line and "job cancelled" in line
                           for line in (pipe.log_dir / "transcriber.log").read_text().splitlines()),
               timeout_s=300, what="the transcriber to stop the cancelled job")
    assert job_id not in (pipe.log_dir / "sink.log").read_text()
    job = pipe.http.job(job_id)
    assert job["status"] == "cancelled" and "result" not in job
    assert pipe.http._request("DELETE", f"/v1/jobs/{job_id}")[0] == 200 and pipe.http.job(job_id) is None


# --- prompt and temperature (kafscribe/speech/decoding.py) --------------------------------------------------
# espeak-ng says the name; tiny.en writes "Caffcribe". Tried on 6 sentences x 3 prompts, both engines, 1 and 2
# threads (docs/transcription.md, "Prompt and temperature"): this sentence and prompt spelled it every time.
NAME_SENTENCE = "We use Kafscribe every day."
NAME = "Kafscribe"
PROMPT = "Glossary: Kafscribe."


@pytest.fixture(scope="module")
def name_clip(tmp_path_factory):
    from tests.audio_clips import speak

    return speak(NAME_SENTENCE, tmp_path_factory.mktemp("prompt") / "name.wav")


def test_a_prompt_spells_a_spoken_name_and_the_temperature_is_the_one_used(pipe, name_clip):
    """Without a prompt tiny.en misspells the name; with it as the prompt the transcript spells it so. The
    temperature asked for is what every segment reports; both options are stored and shown with the job."""
    oa = client(pipe)
    with open(name_clip, "rb") as f:
        plain = oa.audio.transcriptions.create(file=f, model="whisper-1", response_format="verbose_json")
    assert NAME.lower() not in plain.text.lower() and "every day" in plain.text.lower(), plain.text
    assert all(s.temperature in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0) for s in plain.segments)  # the fallback schedule
    with open(name_clip, "rb") as f:
        raw = oa.audio.transcriptions.with_raw_response.create(
            file=f, model="whisper-1", response_format="verbose_json", prompt=PROMPT, temperature=0.0)
    primed = raw.parse()
    assert NAME in primed.text and "every day" in primed.text.lower(), primed.text
    assert primed.segments and all(s.temperature == 0.0 for s in primed.segments)
    job = pipe.http.job(raw.headers["x-job-id"])
    assert (job["options"]["prompt"], job["options"]["temperature"]) == (PROMPT, 0.0)
    assert all(s["temperature"] == 0.0 for s in job["result"]["segments"])
    with open(name_clip, "rb") as f:
        raw = oa.audio.transcriptions.with_raw_response.create(
            file=f, model="whisper-1", response_format="verbose_json", temperature=0.4)
    warm = raw.parse()  # sampled: the text may vary, the temperature may not
    assert warm.segments and all(s.temperature == 0.4 for s in warm.segments)
    assert pipe.http.job(raw.headers["x-job-id"])["options"]["temperature"] == 0.4


def test_bad_prompt_or_temperature_is_400_in_openai_shape_and_submits_nothing(pipe, name_clip):
    tenant = f"oa-{uuid.uuid4().hex[:8]}"
    key = pipe.key(tenant)
    oa = client(pipe, key=key)
    for fields, param, message in (({"temperature": 1.5}, "temperature", "must be a number from 0 to 1"),
                                   ({"temperature": -0.1}, "temperature", "must be a number from 0 to 1"),
                                   ({"prompt": "x" * 1000}, "prompt", "the limit is 896")):
        with open(name_clip, "rb") as f, pytest.raises(openai.BadRequestError) as err:
            oa.audio.transcriptions.create(file=f, model="whisper-1", **fields)
        assert err.value.param == param and message in err.value.message, err.value.message
        assert (err.value.type, err.value.code) == ("invalid_request_error", "invalid_value")
    with open(name_clip, "rb") as f, pytest.raises(openai.BadRequestError) as err:
        oa.audio.translations.create(file=f, model="whisper-1", temperature=3)
    assert err.value.param == "temperature"
    listed = pipe.client(key)._request("GET", "/v1/jobs", None, {})
    assert json.loads(listed[1])["jobs"] == []  # nothing was submitted


def test_a_direct_upload_with_a_10kb_prompt_fails_with_the_reason(pipe, name_clip):
    """A direct producer skips the door: the transcriber's check fails the job with the reason, and the
    partition goes on (a good job after it completes)."""
    import hashlib

    from kafscribe.kafka import clients as kafka_clients
    from kafscribe.store import blobs as blobstore
    from kafscribe.store import session as cassandra_session
    from kafscribe.store.jobs import JobStore
    from schemas.events import JobOptions, Upload

    settings = pipe.settings
    session = cassandra_session.connect(settings, keyspace=settings.cassandra_keyspace)
    try:
        data = name_clip.read_bytes()
        job_id = f"prompt-{uuid.uuid4().hex[:10]}"
        ref = blobstore.open_store(settings, session).put(job_id, data)
        upload = Upload(job_id=job_id, blob_ref=ref, audio_sha256=hashlib.sha256(data).hexdigest(),
                        audio_bytes=len(data), audio_duration=3.0, options=JobOptions(prompt="Kafscribe " * 1024))
        JobStore(session).create(upload)  # what a direct producer does (docs/architecture.md, "Direct producers")
        producer = kafka_clients.producer(settings)
        producer.produce(settings.topic("uploads"), key=job_id.encode(), value=upload.encode())
        assert producer.flush(30) == 0
    finally:
        session.cluster.shutdown()
    job = pipe.wait_job(job_id)
    assert job["status"] == "failed" and "prompt is 10240 characters; the limit is 896" in job["error"], job
    with open(name_clip, "rb") as f:
        after = client(pipe).audio.transcriptions.create(file=f, model="whisper-1", response_format="text")
    assert "every day" in after.lower()


def test_cli_submit_with_prompt_and_temperature(pipe, name_clip):
    """`kafscribe submit --prompt --temperature --wait`: the options go over HTTP; the transcript on stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAFSCRIBE_")}
    done = subprocess.run(
        [sys.executable, "-m", "kafscribe.cli.main", "submit", str(name_clip), "--prompt", PROMPT, "--temperature", "0",
         "--wait", "--url", pipe.url, "--api-key", pipe.api_key, "--timeout", "300"],
        env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr
    assert NAME in done.stdout, done.stdout
    refused = subprocess.run(
        [sys.executable, "-m", "kafscribe.cli.main", "submit", str(name_clip), "--temperature", "7", "--url", pipe.url],
        env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "must be a number from 0 to 1" in refused.stderr
