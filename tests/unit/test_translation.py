"""Translation backends: the LLM protocol against a local fake, Whisper's own task for real."""

from __future__ import annotations

import hashlib
import uuid

import pytest

from kafscribe.settings import Settings
from kafscribe.speech import audio
from kafscribe.speech.engines import load_engine
from kafscribe.store.blobs import FileBlobStore
from kafscribe.translation import TranslationError, backend_name
from kafscribe.translation.llm_backend import LLMTranslator, batches
from kafscribe.translation.whisper_backend import WhisperTranslator
from schemas.events import JobOptions, Segment, Transcript
from tests.fakes import FakeLLM


def transcript(segments: list[str], language: str = "es", **kw) -> Transcript:
    segs = [Segment(id=i, start=float(i), end=i + 0.9, text=f" {t}") for i, t in enumerate(segments)]
    return Transcript(
        job_id=uuid.uuid4().hex, blob_ref=kw.get("blob_ref", "file:none"), audio_sha256=kw.get("sha", ""),
        audio_bytes=1, audio_duration=float(len(segments)), options=JobOptions(translate_to="de"),
        language=language, language_probability=0.99, duration=float(len(segments)), text=" ".join(segments),
        segments=segs, engine="faster-whisper", model="base", worker_id="w", processing_seconds=0.1,
    )


@pytest.fixture
def llm():
    server = FakeLLM()
    yield server
    server.close()


def llm_settings(server: FakeLLM, **kw) -> Settings:
    return Settings(llm_base_url=server.url + "/v1", llm_model="test-model", llm_api_key="sk-test",
                    llm_retry_base_s=0.01, **kw)


def test_llm_translates_in_batches_keeping_timing(llm):
    source = ["Hola amigos.", "Hoy hace sol.", "Vamos a la playa.", "Con mis hermanos.", "Adiós."]
    out = LLMTranslator(llm_settings(llm, llm_batch_segments=2)).translate(transcript(source), "de")
    assert len(llm.requests) == 3
    assert [len(eval_user(r)) for r in llm.requests] == [2, 2, 1]
    first = llm.requests[0]
    assert first["path"] == "/v1/chat/completions"
    assert first["body"]["model"] == "test-model"
    assert first["headers"]["Authorization"] == "Bearer sk-test"
    system = first["body"]["messages"][0]["content"]
    assert "Spanish" in system and "German" in system
    assert eval_user(first) == ["Hola amigos.", "Hoy hace sol."]
    assert [s.text for s in out.segments] == [f"[German] {t}" for t in source]
    assert [(s.start, s.end) for s in out.segments] == [(float(i), i + 0.9) for i in range(5)]
    assert (out.source_language, out.target_language, out.backend) == ("es", "de", "llm")


def eval_user(request: dict) -> list[str]:
    import json

    return json.loads(request["body"]["messages"][-1]["content"])


def test_llm_batches_respect_the_character_budget():
    segs = [Segment(id=i, start=0, end=1, text="x" * 40) for i in range(5)]
    groups = batches(segs, max_segments=10, max_chars=100)
    assert [len(g) for g in groups] == [2, 2, 1]


def test_llm_retries_429_and_5xx_then_succeeds(llm):
    llm.script.extend([429, 503])
    out = LLMTranslator(llm_settings(llm)).translate(transcript(["Hola."]), "fr")
    assert len(llm.requests) == 3
    assert out.segments[0].text == "[French] Hola."


def test_llm_400_fails_with_the_provider_message(llm):
    llm.script.append(400)
    with pytest.raises(TranslationError, match=r"HTTP 400\): scripted failure 400"):
        LLMTranslator(llm_settings(llm)).translate(transcript(["Hola."]), "fr")
    assert len(llm.requests) == 1


def test_llm_gives_up_after_its_retries(llm):
    llm.script.extend([500] * 10)
    with pytest.raises(TranslationError, match="after 3 attempts"):
        LLMTranslator(llm_settings(llm, llm_retries=2)).translate(transcript(["Hola."]), "fr")


def test_llm_unconfigured_is_a_clear_error():
    with pytest.raises(TranslationError, match="KAFSCRIBE_LLM_BASE_URL"):
        LLMTranslator(Settings()).translate(transcript(["Hola."]), "fr")


def test_backend_policy():
    assert backend_name(Settings(), "en") == "whisper"
    assert backend_name(Settings(), "de") == "llm"
    assert backend_name(Settings(translator="llm"), "en") == "llm"


@pytest.mark.slow
@pytest.mark.parametrize("clip, language, words", [("de", "de", ("morning", "park")), ("es", "es", ("hello", "friends"))])
def test_whisper_backend_translates_real_speech_to_english(clips, tmp_path, clip, language, words):
    settings = Settings(blob_dir=tmp_path, engine="faster-whisper", model="base")
    data = clips[clip].read_bytes()
    ref = FileBlobStore(tmp_path).put("clip", data)
    engine = load_engine(settings)
    source = engine.transcribe(audio.decode(data))
    assert source.language == language
    t = transcript([s.text for s in source.segments], language=language, blob_ref=ref,
                   sha=hashlib.sha256(data).hexdigest())
    out = WhisperTranslator(settings, session=None).translate(t, "en")
    assert out.backend == "whisper" and out.target_language == "en"
    text = out.text.lower()
    assert all(w in text for w in words), text
    with pytest.raises(TranslationError, match="only translates into English"):
        WhisperTranslator(settings, session=None).translate(t, "fr")
