"""What ffmpeg may read and which duration we trust: decoded samples, bounded, from the uploaded bytes only."""

from __future__ import annotations

import json
import subprocess
import time

import numpy as np
import pytest

from kafscribe.settings import Settings
from kafscribe.speech import audio
from kafscribe.speech.engines import TimeLimitExceeded, load_engine
from tests import audio_clips as ac


def test_lying_flac_is_measured_by_decoding_not_by_its_header(tmp_path):
    lying = ac.lying_flac(tmp_path / "lying.flac", seconds=2.0)
    out = subprocess.run(["ffprobe", "-v", "error", "-print_format", "json", "-show_format", str(lying)],
                         capture_output=True, text=True, check=True)
    assert float(json.loads(out.stdout)["format"]["duration"]) > 8_000_000  # the header's claim
    info = audio.probe(lying, max_duration_s=60)
    assert info.duration == pytest.approx(2.0, abs=0.05)
    assert info.header_duration > 8_000_000
    assert len(audio.decode(lying.read_bytes(), max_duration_s=60)) == pytest.approx(2 * audio.SAMPLE_RATE, abs=800)


def test_an_uploaded_playlist_is_not_followed(tmp_path, clips):
    segment = tmp_path / "secret.ts"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(clips["en"]), "-c:a", "aac", str(segment)],
                   check=True)
    playlist = ac.hls_playlist(tmp_path / "upload.wav", segment)
    # Plain ffprobe follows it to the local file: the attack is real.
    plain = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=format_name,duration",
                            "-of", "json", str(playlist)], capture_output=True, text=True)
    assert json.loads(plain.stdout)["format"]["format_name"] == "hls"
    with pytest.raises(audio.AudioError, match="'hls' is not an accepted audio format"):
        audio.probe(playlist, max_duration_s=3600)
    with pytest.raises(audio.AudioError, match="'hls' is not an accepted audio format"):
        audio.decode(playlist.read_bytes(), max_duration_s=3600)


@pytest.mark.parametrize("suffix", ["mp3", "ogg", "m4a", "webm", "flac", "aiff"])
def test_common_formats_are_still_accepted(tmp_path, clips, suffix):
    converted = ac.to_format(clips["en"], tmp_path / f"en.{suffix}")
    reference = audio.probe(clips["en"], max_duration_s=60).duration
    assert audio.probe(converted, max_duration_s=60).duration == pytest.approx(reference, abs=0.1)
    # The worker decodes from a seekable file (an m4a written by ffmpeg has its index at the end).
    samples = audio.decode(converted.read_bytes(), max_duration_s=60)
    assert len(samples) / audio.SAMPLE_RATE == pytest.approx(reference, abs=0.1)


def test_long_audio_is_refused_and_never_decoded_past_the_limit(tmp_path):
    long = ac.silence_flac(tmp_path / "silence.flac", seconds=3 * 3600)  # 3 h of silence, a few MB
    assert long.stat().st_size < 5 * 2**20
    with pytest.raises(audio.AudioTooLong, match="longer than the limit of 60 s"):
        audio.probe(long, max_duration_s=60)
    with pytest.raises(audio.AudioTooLong):
        audio.decode(long.read_bytes(), max_duration_s=60)
    # ffmpeg is stopped just past the limit: what it produced is bounded by the limit, not by the file.
    produced = audio._run_ffmpeg(audio.input_args(long), 60, 120, keep=False)
    assert produced <= 60.5 * audio.PCM_BYTES_PER_SECOND


def test_the_default_limit_is_the_setting(monkeypatch, tmp_path):
    assert audio.default_max_duration_s() == Settings().max_audio_s == 4 * 3600
    monkeypatch.setenv("KAFSCRIBE_MAX_AUDIO_S", "1.5")
    lying = ac.lying_flac(tmp_path / "two.flac", seconds=2.0)
    with pytest.raises(audio.AudioTooLong):
        audio.probe(lying)


def test_a_stuck_decode_is_killed_at_its_timeout(tmp_path):
    long = ac.silence_flac(tmp_path / "silence.flac", seconds=3600)
    with pytest.raises(audio.AudioError, match="timed out"):
        audio._run_ffmpeg(audio.input_args(long), 3600, 0.05, keep=False)
    with pytest.raises(audio.AudioError, match="timed out"):
        audio.decode(long.read_bytes(), max_duration_s=3600, timeout_s=0)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["faster-whisper", "openai-whisper"])
def test_engines_stop_at_the_deadline(engine, clips, monkeypatch):
    eng = load_engine(Settings(model="tiny.en", engine=engine))
    samples = audio.decode(clips["en"].read_bytes(), max_duration_s=60)
    with pytest.raises(TimeLimitExceeded):
        eng.transcribe(samples, deadline=time.monotonic() - 1)
    if engine == "openai-whisper":
        # The deadline is also checked before every 30 s window that whisper decodes.
        from kafscribe.speech.engines import openai_whisper_engine as mod

        calls = []

        def second_call_fails(deadline):
            calls.append(deadline)
            if len(calls) > 1:
                raise TimeLimitExceeded("window")

        monkeypatch.setattr(mod, "check_deadline", second_call_fails)
        with pytest.raises(TimeLimitExceeded, match="window"):
            eng.transcribe(samples, deadline=time.monotonic() + 3600)
        assert "decode" not in eng._model.__dict__  # the model's own decode is back
        monkeypatch.undo()
    out = eng.transcribe(samples, deadline=time.monotonic() + 3600)
    assert "fox" in out.text.lower()
    assert isinstance(samples, np.ndarray)
