"""The ``prompt`` and ``temperature`` job options without a stack: parsing at the door (both APIs and the CLI),
the consumers' check of direct producers' events, the engines' keyword arguments, and the events' shape."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import types
from dataclasses import replace

import pytest
from aiohttp.test_utils import TestClient, TestServer

from kafscribe.cli.jobs import add_parsers
from kafscribe.settings import Settings
from kafscribe.speech import decoding
from kafscribe.speech.decoding import EngineOptions
from kafscribe.speech.engines import openai_whisper_engine
from kafscribe.speech.engines.faster_whisper_engine import FasterWhisperEngine
from kafscribe.validation import check_event
from producers.ingress import build_app
from producers.ingress.routes.audio import BadRequest, parse_request, render
from producers.submission import SubmissionError, parse_options
from schemas.events import JobOptions, Result, Segment, Transcript, Upload, decode_event

SETTINGS = Settings(model="tiny.en", allowed_models="")
NOW = 1_800_000_000_000
GOOD = Upload(job_id="job-1", blob_ref="cassandra:job-1", audio_sha256="a" * 64, audio_bytes=1000,
              audio_duration=12.5, produced_at=NOW)
LONG = "Kafscribe " * 89 + "Kafscribe."  # 900 characters


# --- the door: POST /v1/jobs fields, the direct client (both through parse_options) ---------------
def test_prompt_and_temperature_parse_into_the_jobs_options():
    opts = parse_options({"prompt": "  Kafscribe, Cassandra.\nKafka ", "temperature": "0.4"}, SETTINGS)
    assert (opts.prompt, opts.temperature) == ("Kafscribe, Cassandra.\nKafka", 0.4)  # a prompt may span lines
    opts = parse_options({"prompt": "   ", "temperature": ""}, SETTINGS)
    assert (opts.prompt, opts.temperature) == (None, None)  # blank = absent: the engine's fallback schedule
    assert parse_options({}, SETTINGS) == JobOptions()
    assert parse_options({"temperature": "0"}, SETTINGS).temperature == 0.0
    assert parse_options({"temperature": "1"}, SETTINGS).temperature == 1.0
    assert parse_options({"prompt": "x" * decoding.MAX_PROMPT_CHARS}, SETTINGS).prompt == "x" * 896


@pytest.mark.parametrize("raw, reason", [
    ({"prompt": LONG}, "prompt is 900 characters; the limit is 896"),
    ({"prompt": "a\x00b"}, "prompt contains a control character"),
    ({"prompt": "a\u2028b"}, "prompt contains a control character"),
    ({"prompt": "a\udcffb"}, "prompt is not valid UTF-8"),
    ({"temperature": "1.01"}, "temperature=1.01 must be a number from 0 to 1"),
    ({"temperature": "-0.2"}, "temperature=-0.2 must be a number from 0 to 1"),
    ({"temperature": "warm"}, "temperature='warm'"),
    ({"temperature": "nan"}, "temperature=nan must be a number"),
    ({"temperature": "inf"}, "temperature=inf must be a number"),
])
def test_bad_values_are_422_with_the_reason(raw, reason):
    with pytest.raises(SubmissionError) as err:
        parse_options(raw, SETTINGS)
    assert err.value.status == 422 and reason in err.value.reason, err.value.reason


def test_the_direct_client_sends_a_float_temperature_as_the_door_reads_it():
    for value in (0.0, 0.3, 1.0, 1e-3):
        assert parse_options({"temperature": repr(float(value))}, SETTINGS).temperature == value


# --- the OpenAI-compatible routes --------------------------------------------------------------------
def openai(**fields: str) -> dict:
    return parse_request({"model": "whisper-1", **fields}, SETTINGS, "transcribe")


def test_openai_fields_become_the_jobs_options():
    asked = openai(prompt="Kafscribe", temperature="0.2")
    assert (asked["options"].prompt, asked["options"].temperature) == ("Kafscribe", 0.2)
    asked = parse_request({"model": "whisper-1", "prompt": "Hello."}, SETTINGS, "translate")
    assert (asked["options"].task, asked["options"].prompt, asked["options"].temperature) == ("translate", "Hello.",
                                                                                             None)


@pytest.mark.parametrize("fields, param, message", [
    ({"temperature": "2"}, "temperature", "must be a number from 0 to 1"),
    ({"temperature": "-1"}, "temperature", "must be a number from 0 to 1"),
    ({"temperature": "NaN"}, "temperature", "must be a number from 0 to 1"),
    ({"prompt": LONG}, "prompt", "the limit is 896"),
    ({"prompt": "a\x07b"}, "prompt", "control character"),
])
def test_bad_openai_fields_name_the_param(fields, param, message):
    with pytest.raises(BadRequest) as err:
        openai(**fields)
    assert err.value.param == param and message in err.value.message, err.value.message
    assert err.value.code == "invalid_value"


class DoorOnly:
    """Backends that fail the test when used: these requests must be refused before."""

    def submitter(self):
        raise AssertionError("a bad request reached the backends")

    def connected(self) -> bool:
        return False

    def close(self) -> None:
        pass


def test_bad_values_are_refused_at_both_doors_in_their_shapes():
    """Through the app: 400 in OpenAI's shape on /v1/audio/*, 422 on /v1/jobs, before any backend is used."""
    asyncio.run(_doors())


async def _doors() -> None:
    from aiohttp import FormData

    settings = SETTINGS.with_(auth_required=False, tenant_max_unfinished=0)

    def form(**fields: str) -> FormData:
        data = FormData()
        for name, value in fields.items():
            data.add_field(name, value)
        data.add_field("file", b"RIFF" + b"\x00" * 60, filename="a.wav")
        return data

    async with TestClient(TestServer(build_app(settings, DoorOnly()))) as http:
        r = await http.post("/v1/audio/transcriptions", data=form(model="whisper-1", temperature="1.5"))
        assert r.status == 400
        assert (await r.json()) == {"error": {"message": "temperature=1.5 must be a number from 0 to 1",
                                              "type": "invalid_request_error", "param": "temperature",
                                              "code": "invalid_value"}}
        r = await http.post("/v1/audio/translations", data=form(model="whisper-1", prompt=LONG))
        body = await r.json()
        assert r.status == 400 and body["error"]["param"] == "prompt", body
        r = await http.post("/v1/audio/transcriptions", data=form(model="whisper-1", prompt="x" * 5000))
        body = await r.json()  # over the 4 KiB field limit: refused while it arrives, the field still named
        assert r.status == 400 and body["error"]["param"] == "prompt" and "4096 bytes" in body["error"]["message"]
        r = await http.post("/v1/jobs", data=form(temperature="hot"))
        assert r.status == 422 and "temperature='hot'" in (await r.json())["error"]
        r = await http.post("/v1/jobs", data=form(prompt=LONG))
        assert r.status == 422 and "the limit is 896" in (await r.json())["error"]


def test_openapi_lists_both_fields_on_every_upload_route():
    from producers.ingress.routes import audio, jobs

    for paths in (audio.OPENAPI_PATHS, jobs.OPENAPI_PATHS):
        for path, ops in paths.items():
            if "post" not in ops or "requestBody" not in ops["post"]:
                continue
            props = ops["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
            if "file" not in props:
                continue
            assert props["prompt"]["maxLength"] == decoding.MAX_PROMPT_CHARS, path
            assert (props["temperature"]["minimum"], props["temperature"]["maximum"]) == (0, 1), path
            assert "not used" not in json.dumps(props), path


# --- the CLI -------------------------------------------------------------------------------------------
def cli(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers())
    return parser.parse_args(["submit", "a.wav", *argv])


def test_cli_takes_prompt_and_temperature_and_refuses_bad_ones(capsys):
    args = cli("--prompt", "Kafscribe", "--temperature", "0.5")
    assert (args.prompt, args.temperature) == ("Kafscribe", 0.5)
    assert (cli().prompt, cli().temperature) == (None, None)
    for bad in (["--temperature", "1.5"], ["--temperature", ""], ["--prompt", LONG]):
        with pytest.raises(SystemExit) as err:
            cli(*bad)
        assert err.value.code == 2
    assert "the limit is 896" in capsys.readouterr().err


# --- direct producers: the consumers' check -----------------------------------------------------------
@pytest.mark.parametrize("options, reason", [
    (JobOptions(prompt="x" * 10_000), "prompt is 10000 characters; the limit is 896"),
    (JobOptions(prompt="a\x1bb"), "prompt contains a control character"),
    (JobOptions(temperature=1.5), "temperature=1.5 must be a number from 0 to 1"),
    (JobOptions(temperature=-0.1), "temperature=-0.1"),
    (JobOptions(temperature=math.nan), "temperature=nan"),
    (JobOptions(temperature=math.inf), "temperature=inf"),
    (JobOptions(temperature=True), "temperature=True"),  # type: ignore[arg-type]
    (JobOptions(prompt=7), "prompt must be text, not int"),  # type: ignore[arg-type]
])
def test_direct_uploads_with_bad_values_are_refused_with_the_reason(options, reason):
    got = check_event(SETTINGS, "uploads", replace(GOOD, options=options), NOW)
    assert got is not None and reason in got, got


def test_direct_uploads_with_good_values_pass():
    for options in (JobOptions(prompt="", temperature=0.0), JobOptions(prompt="Kafscribe\n", temperature=1),
                    JobOptions(prompt="é" * 896, temperature=0.7)):
        assert check_event(SETTINGS, "uploads", replace(GOOD, options=options), NOW) is None


def test_a_transcript_with_a_bad_segment_temperature_is_refused():
    seg = Segment(id=0, start=0.0, end=1.0, text="x", temperature=math.nan)
    transcript = Transcript(job_id="j", blob_ref="b", audio_sha256="a" * 64, audio_bytes=1, audio_duration=2.0,
                            options=JobOptions(), language="en", language_probability=1.0, duration=2.0,
                            text="x", segments=[seg], engine="e", model="m", worker_id="w",
                            processing_seconds=0.1, produced_at=NOW)
    assert "segment 0 has temperature nan" in check_event(SETTINGS, "transcripts", transcript, NOW)
    assert check_event(SETTINGS, "transcripts", replace(transcript, segments=[replace(seg, temperature=0.2)]),
                       NOW) is None


# --- the engines ---------------------------------------------------------------------------------------
def test_engine_decoder_kwargs():
    assert EngineOptions().decoder_kwargs() == {}  # the engine's own defaults, untouched
    assert EngineOptions(prompt="").decoder_kwargs() == {}
    assert EngineOptions(prompt="Kafscribe", temperature=0.3).decoder_kwargs() == {"initial_prompt": "Kafscribe",
                                                                                   "temperature": 0.3}
    got = EngineOptions(temperature=0).decoder_kwargs()
    assert got == {"temperature": 0.0} and isinstance(got["temperature"], float)


def test_engine_options_are_the_jobs_decoding_options():
    job = JobOptions(language="de", task="translate", translate_to="en", model="base", callback_url="https://x",
                     word_timestamps=True, vad_filter=True, prompt="Kafscribe", temperature=0.2)
    assert EngineOptions.for_job(job) == EngineOptions(language="de", task="translate", word_timestamps=True,
                                                       vad_filter=True, prompt="Kafscribe", temperature=0.2)
    assert EngineOptions.for_job(JobOptions()) == EngineOptions()  # detect, transcribe, the engine's defaults


class RecordingModel:
    """Stands in for faster-whisper's ``WhisperModel``: records the call, returns one segment."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def transcribe(self, audio, **kwargs):
        self.calls.append(kwargs)
        seg = types.SimpleNamespace(start=0.0, end=1.0, text=" hi", avg_logprob=-0.1, no_speech_prob=0.0, words=None,
                                    temperature=kwargs.get("temperature", 0.0))
        info = types.SimpleNamespace(language="en", language_probability=1.0, duration=1.0)
        return iter([seg]), info


def faster_engine(batch: bool = False) -> tuple[FasterWhisperEngine, RecordingModel]:
    engine = FasterWhisperEngine.__new__(FasterWhisperEngine)  # no model load: the call is what is tested
    model = RecordingModel()
    engine.multilingual, engine.beam_size, engine._model = True, 5, model
    engine._batched, engine.batch_size, engine.batch_min_audio_s = (model, 4, 0.0) if batch else (None, 0, 0.0)
    return engine, model


@pytest.mark.parametrize("batch", [False, True], ids=["sequential", "batched"])
def test_faster_whisper_gets_the_prompt_and_the_one_temperature(batch):
    import numpy as np

    engine, model = faster_engine(batch)
    out = engine.transcribe(np.zeros(16000, np.float32),
                            EngineOptions(task="translate", prompt="Kafscribe", temperature=0.6))
    assert model.calls[-1]["initial_prompt"] == "Kafscribe" and model.calls[-1]["temperature"] == 0.6
    assert model.calls[-1]["task"] == "translate"
    assert out.segments[0].temperature == 0.6 and isinstance(out.segments[0].temperature, float)
    engine.transcribe(np.zeros(16000, np.float32))
    assert "initial_prompt" not in model.calls[-1] and "temperature" not in model.calls[-1]  # the engine's defaults


def test_faster_whisper_gets_every_engine_option():
    import numpy as np

    engine, model = faster_engine()
    engine.transcribe(np.zeros(16000, np.float32), EngineOptions(language="de", word_timestamps=True, vad_filter=True))
    call = model.calls[-1]
    assert (call["language"], call["task"], call["beam_size"]) == ("de", "transcribe", 5)  # KAFSCRIBE_BEAM_SIZE
    assert call["word_timestamps"] is True and call["vad_filter"] is True
    engine.transcribe(np.zeros(16000, np.float32), EngineOptions(beam_size=2))
    assert model.calls[-1]["beam_size"] == 2 and model.calls[-1]["language"] is None
    engine.multilingual = False  # an English-only model: English, transcribed, whatever the job asked
    engine.transcribe(np.zeros(16000, np.float32), EngineOptions(language="de", task="translate"))
    assert (model.calls[-1]["language"], model.calls[-1]["task"]) == ("en", "transcribe")


def test_openai_whisper_segments_carry_their_temperature():
    seg = {"id": 0, "start": 0.0, "end": 1.0, "text": " hi", "avg_logprob": -0.1, "no_speech_prob": 0.0,
           "temperature": 0.4}
    assert openai_whisper_engine._segment(seg).temperature == 0.4
    assert openai_whisper_engine._segment({**seg, "temperature": None}).temperature is None


# --- events and rendering --------------------------------------------------------------------------------
def test_options_and_segment_temperatures_round_trip_through_avro():
    seg = Segment(id=0, start=0.0, end=1.0, text=" Kafscribe", temperature=0.2)
    result = Result(job_id="r", status="completed", segments=[seg],
                    options=JobOptions(prompt="Kafscribe", temperature=0.2))
    assert decode_event(result.encode()) == result
    upload = replace(GOOD, options=JobOptions(prompt="Kafscribe\nKafka", temperature=0.0))
    assert decode_event(upload.encode()).options == upload.options


def test_verbose_json_reports_each_segments_temperature():
    result = {"language": "en", "duration": 2.0, "text": " a b", "segments": [
        {"id": 0, "start": 0.0, "end": 1.0, "text": " a", "avg_logprob": -0.1, "no_speech_prob": 0.0,
         "temperature": 0.4},
        {"id": 1, "start": 1.0, "end": 2.0, "text": " b", "avg_logprob": -0.1, "no_speech_prob": 0.0,
         "temperature": None},  # stored before the engines reported it
    ]}
    body = json.loads(render("verbose_json", "transcribe", result, ["segment"], "j").text)
    assert [s["temperature"] for s in body["segments"]] == [0.4, 0.0]


def test_the_whisper_translator_gets_the_jobs_temperature_not_its_prompt(tmp_path):
    """The translator stage's second Whisper pass (``translate_to=en``): the spoken-language prompt stays out."""
    import hashlib

    from kafscribe.speech.engines import TranscriptionOutput
    from kafscribe.store import blobs as blobstore
    from kafscribe.translation.whisper_backend import WhisperTranslator
    from tests.audio_clips import silence_flac

    settings = Settings(model="base", blob_store="file", blob_dir=tmp_path / "blobs")
    data = silence_flac(tmp_path / "s.flac", 1.0).read_bytes()
    ref = blobstore.open_store(settings).put("j", data)
    calls = []

    class Engine:
        multilingual, model_name = True, "base"

        def transcribe(self, audio, options, **controls):
            calls.append((options, controls))
            return TranscriptionOutput(language="en", language_probability=1.0, duration=1.0, text="", segments=[])

    translator = WhisperTranslator(settings, None)
    translator._engine = Engine()
    transcript = Transcript(job_id="j", blob_ref=ref, audio_sha256=hashlib.sha256(data).hexdigest(),
                            audio_bytes=len(data), audio_duration=1.0, language="es", language_probability=1.0,
                            duration=1.0, text="", segments=[], engine="e", model="base", worker_id="w",
                            processing_seconds=0.1,
                            options=JobOptions(prompt="Hola, Karlos.", temperature=0.3, translate_to="en"))
    translator.translate(transcript, "en")
    assert calls == [(EngineOptions(language="es", task="translate", temperature=0.3), {})]


def test_the_door_reads_a_multi_line_prompt_and_refuses_other_control_characters():
    asyncio.run(_multi_line())


async def _multi_line() -> None:
    from aiohttp import FormData, web

    from producers.ingress.upload import read_upload

    async def echo(request):
        try:
            received = await read_upload(request, SETTINGS)
        except SubmissionError as exc:
            return web.json_response({"error": exc.reason}, status=exc.status)
        return web.json_response(received.fields)

    app = web.Application()
    app.router.add_post("/", echo)

    def form(**fields: str) -> FormData:
        data = FormData()
        for name, value in fields.items():
            data.add_field(name, value)
        data.add_field("file", b"x", filename="a.wav")
        return data

    async with TestClient(TestServer(app)) as http:
        r = await http.post("/", data=form(prompt="Kafscribe,\nCassandra,\tKafka.\r\n"))
        assert r.status == 200 and (await r.json())["prompt"] == "Kafscribe,\nCassandra,\tKafka."
        r = await http.post("/", data=form(prompt="a\x00b"))
        assert r.status == 422 and "control character" in (await r.json())["error"]
        r = await http.post("/", data=form(language="e\nn"))  # only the prompt may span lines
        assert r.status == 422 and "control character" in (await r.json())["error"]
