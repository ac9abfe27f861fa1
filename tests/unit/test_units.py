"""Small pieces that need no servers: settings, options, formats, audio probing."""

from __future__ import annotations

from pathlib import Path

import pytest

from kafscribe import formats
from kafscribe.settings import Settings, SettingsError, settings_table
from kafscribe.speech import audio
from producers.submission import SubmissionError, parse_options


def test_settings_from_env_parses_types_and_refuses_unknown_names():
    s = Settings.from_env({"KAFSCRIBE_HTTP_PORT": "9000", "KAFSCRIBE_STATE_DIR": "/tmp/x", "PATH": "/bin"})
    assert s.http_port == 9000 and s.state_dir == Path("/tmp/x")
    assert s.topic("uploads") == "kafscribe.uploads"
    with pytest.raises(SettingsError, match="KAFSCRIBE_NO_SUCH"):
        Settings.from_env({"KAFSCRIBE_NO_SUCH": "1"})
    with pytest.raises(SettingsError, match="not a valid int"):
        Settings.from_env({"KAFSCRIBE_HTTP_PORT": "eighty"})
    # The test session's knobs (tests/conftest.py) are not settings: `make test` with them set still runs.
    assert Settings.from_env({"KAFSCRIBE_TEST_PORT_OFFSET": "100"}) == Settings()


def test_settings_round_trip_through_env_and_every_field_is_documented():
    s = Settings(http_port=8123, topic_prefix="x.", session_timeout_ms=6000)
    assert Settings.from_env(s.to_env()) == s
    assert all(doc for _, _, doc in settings_table())


def test_options_are_validated():
    settings = Settings()
    opts = parse_options({"language": "ES", "task": "translate", "translate_to": "en"}, settings)
    assert (opts.language, opts.task, opts.translate_to) == ("es", "translate", "en")
    for raw, fragment in [
        ({"colour": "red"}, "unknown option"),
        ({"language": "xx"}, "not a Whisper language"),
        ({"task": "summarise"}, "task="),
        ({"model": "gigantic"}, "not served here"),
        ({"callback_url": "ftp://x"}, "http(s)"),
    ]:
        with pytest.raises(SubmissionError, match=fragment.replace("(", r"\(").replace(")", r"\)")) as err:
            parse_options(raw, settings)
        assert err.value.status == 422


SEGMENTS = [
    {"start": 0.0, "end": 1.5, "text": " Hello there."},
    {"start": 61.25, "end": 3723.004, "text": " General Kenobi."},
]


def test_srt_vtt_txt_json_renderings():
    srt, ctype = formats.render("srt", SEGMENTS)
    assert ctype.startswith("application/x-subrip")
    assert srt.splitlines()[:3] == ["1", "00:00:00,000 --> 00:00:01,500", "Hello there."]
    assert "00:01:01,250 --> 01:02:03,004" in srt
    vtt, _ = formats.render("vtt", SEGMENTS)
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nHello there.")
    assert formats.render("txt", SEGMENTS)[0] == "Hello there.\nGeneral Kenobi.\n"
    assert '"segments"' in formats.render("json", SEGMENTS, {"language": "en"})[0]
    with pytest.raises(ValueError):
        formats.render("docx", SEGMENTS)


def test_probe_measures_real_audio_and_refuses_the_rest(clips):
    info = audio.probe(clips["en"])
    assert 3.0 < info.duration < 15.0 and info.channels == 1
    assert audio.probe(clips["en_mp3"]).codec == "mp3"
    with pytest.raises(audio.AudioError, match="not a readable audio file"):
        audio.probe(clips["garbage"])
    samples = audio.decode(clips["en"].read_bytes())
    assert abs(len(samples) / audio.SAMPLE_RATE - info.duration) < 0.1
    assert samples.dtype.name == "float32" and 0 < abs(samples).max() <= 1.0


def test_lying_file_is_refused_at_the_door_and_by_the_decoder(clips):
    # The door decodes (bounded) instead of trusting the header, so a header that lies is caught there.
    with pytest.raises(audio.AudioError, match="could not be decoded"):
        audio.probe(clips["lying"])
    with pytest.raises(audio.AudioError, match="could not be decoded"):
        audio.decode(clips["lying"].read_bytes())
