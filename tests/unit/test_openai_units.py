"""The OpenAI-compatible routes' request parsing and rendering, without a stack."""

from __future__ import annotations

import asyncio
import json

import pytest

from kafscribe.settings import Settings
from producers.ingress.routes.audio import BadRequest, parse_request, render

SETTINGS = Settings(model="tiny.en", allowed_models="")


def parse(**fields: str) -> dict:
    return parse_request({"model": "whisper-1", **fields}, SETTINGS, "transcribe")


def test_model_mapping_and_defaults():
    asked = parse()
    assert asked["options"].model is None and asked["options"].task == "transcribe"  # whisper-1: the default
    assert asked["options"].word_timestamps is False
    assert asked["format"] == "json" and asked["granularities"] == ["segment"] and asked["stream"] is False
    assert parse(model="base")["options"].model == "base"  # an allowed name passes through
    assert parse_request({"model": "whisper-1"}, SETTINGS, "translate")["options"].task == "translate"
    assert parse(language="de")["options"].language == "de"


@pytest.mark.parametrize("fields, param", [
    ({"model": ""}, "model"),
    ({"model": "whisper-2"}, "model"),
    ({"language": "klingon"}, "language"),
    ({"response_format": "diarized_json"}, "response_format"),
    ({"timestamp_granularities[]": "word"}, "timestamp_granularities"),  # needs verbose_json
    ({"response_format": "verbose_json", "timestamp_granularities[]": "word,phoneme"}, "timestamp_granularities"),
    ({"temperature": "1.5"}, "temperature"),
    ({"temperature": "warm"}, "temperature"),
    ({"stream": "maybe"}, "stream"),
])
def test_bad_fields_name_the_param(fields, param):
    with pytest.raises(BadRequest) as err:
        parse(**fields)
    assert err.value.param == param, err.value.message


def test_granularities_and_stream():
    asked = parse(response_format="verbose_json", **{"timestamp_granularities[]": "word,segment"})
    assert asked["granularities"] == ["word", "segment"] and asked["options"].word_timestamps is True
    assert parse(stream="true")["stream"] is True


RESULT = {"language": "en", "duration": 3.4, "text": " Hello there. ",
          "segments": [{"id": 0, "start": 0.0, "end": 1.5, "text": " Hello", "avg_logprob": -0.2,
                        "no_speech_prob": 0.01, "words": [{"word": " Hello", "start": 0.1, "end": 0.6,
                                                           "probability": 0.9}]},
                       {"id": 1, "start": 1.5, "end": 3.4, "text": " there.", "avg_logprob": -0.3,
                        "no_speech_prob": 0.02}]}


def test_render_formats():
    assert render("text", "transcribe", RESULT, ["segment"], "j").text == "Hello there.\n"
    assert json.loads(render("json", "transcribe", RESULT, ["segment"], "j").text) == {
        "text": "Hello there.", "usage": {"type": "duration", "seconds": 3}}
    srt = render("srt", "transcribe", RESULT, ["segment"], "j").text
    assert srt.startswith("1\n00:00:00,000 --> 00:00:01,500\nHello\n")
    assert render("vtt", "transcribe", RESULT, ["segment"], "j").text.startswith("WEBVTT\n\n00:00:00.000 -->")
    verbose = json.loads(render("verbose_json", "transcribe", RESULT, ["word", "segment"], "j").text)
    assert verbose["language"] == "english" and verbose["task"] == "transcribe"
    assert [s["id"] for s in verbose["segments"]] == [0, 1]
    assert verbose["words"] == [{"word": " Hello", "start": 0.1, "end": 0.6}]
    words_only = json.loads(render("verbose_json", "transcribe", RESULT, ["word"], "j").text)
    assert "segments" not in words_only and words_only["words"]
    assert json.loads(render("verbose_json", "translate", {**RESULT, "language": "es"}, ["segment"],
                             "j").text)["language"] == "english"


def test_refusals_from_elsewhere_get_openai_shape_on_audio_routes_only():
    """The auth middleware's JSON refusals (here a quota 429) are rewritten on /v1/audio/*, headers kept."""
    asyncio.run(_refusals())


async def _refusals() -> None:
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from producers.ingress.auth import _refuse
    from producers.ingress.routes.audio import openai_errors

    async def limited(request):
        raise _refuse(web.HTTPTooManyRequests, "tenant t has 3 unfinished jobs", **{"Retry-After": "30"})

    app = web.Application(middlewares=[openai_errors])
    app.router.add_post("/v1/audio/transcriptions", limited)
    app.router.add_post("/v1/jobs", limited)
    async with TestClient(TestServer(app)) as http:
        r = await http.post("/v1/audio/transcriptions")
        assert r.status == 429 and r.headers["Retry-After"] == "30"
        assert (await r.json())["error"] == {"message": "tenant t has 3 unfinished jobs", "type": "rate_limit_error",
                                             "param": None, "code": "rate_limit_exceeded"}
        missing = await http.get("/v1/audio/nothing")
        assert missing.status == 404 and (await missing.json())["error"]["code"] == "not_found"
        r = await http.post("/v1/jobs")  # other routes keep their own shape
        assert r.status == 429 and (await r.json()) == {"error": "tenant t has 3 unfinished jobs", "status": 429}
