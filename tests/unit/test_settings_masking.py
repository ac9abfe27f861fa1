"""One masking rule for settings: declared secrets and the userinfo of URLs never show, other values do.

The rule (``kafscribe.settings.shown_value``) serves `kafscribe settings`, the generated docs/settings.md
and anything that logs a setting."""

from __future__ import annotations

import os
from dataclasses import fields

import pytest

from kafscribe.cli.main import main
from kafscribe.settings import (
    Settings,
    is_secret,
    mask_url_userinfo,
    settings_markdown,
    settings_table,
    shown_value,
)

DECLARED = {"api_key", "llm_api_key", "kafka_sasl_password", "kafka_ssl_key_password", "cassandra_password"}


def test_the_secret_settings_are_declared_not_guessed_from_their_names():
    assert {f.name for f in fields(Settings) if is_secret(f.name)} == DECLARED
    assert not is_secret("callback_secret_overlap_s")  # a duration that happens to say "secret"
    assert not is_secret("no_such_setting")


def test_a_new_credential_setting_must_be_declared_secret():
    """A setting named like a credential is declared secret (or is a duration/file path, which is not)."""
    words = ("password", "api_key", "token", "secret", "credential")
    for f in fields(Settings):
        looks_secret = any(w in f.name for w in words) and not f.name.endswith(("_s", "_file"))
        assert not looks_secret or is_secret(f.name), f"{f.name}: declare it with _doc(..., secret=True)"


@pytest.mark.parametrize(("value", "shown"), [
    ("https://user:hunter2@llm.example.com/v1", "https://****@llm.example.com/v1"),
    ("https://sk-live-0123456789@llm.example.com/v1", "https://****@llm.example.com/v1"),  # a bare token
    ("http://:pw@10.0.0.5:8000/v1", "http://****@10.0.0.5:8000/v1"),
    ("HTTPS://U:P@host", "HTTPS://****@host"),
    ("http://host:8000/v1", "http://host:8000/v1"),  # nothing to hide
    ("http://host/path@not-userinfo", "http://host/path@not-userinfo"),
    ("a=https://u:p@x/,b=http://v:q@y/", "a=https://****@x/,b=http://****@y/"),  # every URL in a value
    ("", ""),
])
def test_url_userinfo_is_masked(value, shown):
    assert mask_url_userinfo(value) == shown


def test_every_url_valued_setting_is_masked_and_non_secrets_show_as_they_are():
    s = Settings(llm_base_url="https://bob:hunter2@llm.example.com/v1", public_url="https://ops:pw@api.example.com",
                 callback_secret_overlap_s=3600.0)
    assert s.shown("llm_base_url") == "https://****@llm.example.com/v1"
    assert s.shown("public_url") == "https://****@api.example.com"
    assert s.shown("callback_secret_overlap_s") == "3600.0"
    assert s.shown("kafka_bootstrap") == s.kafka_bootstrap


def test_declared_secrets_show_only_their_last_characters_when_long():
    assert shown_value("cassandra_password", "") == ""
    assert shown_value("cassandra_password", "short") == "****"
    assert shown_value("llm_api_key", "sk-0123456789abcdef") == "****cdef"
    values = {name: f"s3cr3t-{name}-0123456789" for name in DECLARED}
    table = {var: value for var, value, _ in settings_table(Settings(**values))}
    for name, secret in values.items():
        assert secret not in table["KAFSCRIBE_" + name.upper()]


def test_the_cli_prints_no_password_of_a_url_and_shows_the_overlap(monkeypatch, capsys):
    for key in [k for k in os.environ if k.startswith("KAFSCRIBE_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("KAFSCRIBE_LLM_BASE_URL", "https://bob:hunter2-pw@llm.example.com/v1")
    monkeypatch.setenv("KAFSCRIBE_CALLBACK_SECRET_OVERLAP_S", "7200")
    monkeypatch.setenv("KAFSCRIBE_KAFKA_SASL_PASSWORD", "sasl-password-0123456789")
    assert main(["settings"]) == 0
    out = capsys.readouterr().out
    assert "hunter2-pw" not in out and "bob" not in out
    assert "https://****@llm.example.com/v1" in out
    assert "sasl-password-0123456789" not in out
    (overlap,) = [line for line in out.splitlines() if line.startswith("KAFSCRIBE_CALLBACK_SECRET_OVERLAP_S ")]
    assert "7200.0" in overlap and "****" not in overlap


def test_the_settings_page_uses_the_same_rule():
    page = settings_markdown()
    assert "| `KAFSCRIBE_CALLBACK_SECRET_OVERLAP_S` | `86400.0` |" in page
    for name in DECLARED:
        assert f"`{name.upper()}`" in page.split("| variable |")[0]  # listed as secret above the table


def test_an_llm_url_with_userinfo_authenticates_with_basic_auth_and_never_shows_the_password():
    """The translator sends ``user:password`` of KAFSCRIBE_LLM_BASE_URL as Basic auth, not in the URL; a bad URL's
    error (a job's error, a log line) holds no password."""
    import base64
    import uuid

    from kafscribe.translation import TranslationError
    from kafscribe.translation.llm_backend import LLMTranslator, endpoint
    from schemas.events import JobOptions, Segment, Transcript
    from tests.fakes import FakeLLM

    assert endpoint("https://bob:p%40ss@llm.example.com:8443/v1/") == (
        "https://llm.example.com:8443/v1/chat/completions",
        {"Authorization": "Basic " + base64.b64encode(b"bob:p@ss").decode()})
    assert endpoint("http://[::1]:8000/v1") == ("http://[::1]:8000/v1/chat/completions", {})
    source = Transcript(job_id=uuid.uuid4().hex, blob_ref="file:none", audio_sha256="", audio_bytes=1,
                        audio_duration=1.0, options=JobOptions(translate_to="de"), language="es",
                        language_probability=0.99, duration=1.0, text="Hola.",
                        segments=[Segment(id=0, start=0.0, end=0.9, text="Hola.")], engine="faster-whisper",
                        model="base", worker_id="w", processing_seconds=0.1)
    server = FakeLLM()
    try:
        port = server.url.rsplit(":", 1)[1]
        settings = Settings(llm_base_url=f"http://bob:hunter2@127.0.0.1:{port}/v1", llm_model="m",
                            llm_retry_base_s=0.01)
        out = LLMTranslator(settings).translate(source, "de")
        assert out.segments[0].text == "[German] Hola."
        (request,) = server.requests
        assert request["path"] == "/v1/chat/completions"
        assert request["headers"]["Authorization"] == "Basic " + base64.b64encode(b"bob:hunter2").decode()
    finally:
        server.close()
    broken = Settings(llm_base_url="http://bob:hunter2@/v1", llm_model="m", llm_retries=0)
    with pytest.raises(TranslationError) as err:
        LLMTranslator(broken).translate(source, "de")
    assert "hunter2" not in str(err.value)
