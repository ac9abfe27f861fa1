"""`kafscribe submit`'s file expansion and output names, and the progress fraction, without a stack."""

from __future__ import annotations

import pytest

from kafscribe.cli.jobs import audio_files, fraction, output_path


def test_files_and_directories_expand_to_audio_files_once(tmp_path):
    (tmp_path / "b.MP3").write_bytes(b"x")
    (tmp_path / "a.wav").write_bytes(b"x")
    (tmp_path / "a.srt").write_text("result of an earlier run")
    (tmp_path / ".hidden.wav").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.wav").write_bytes(b"x")
    odd = tmp_path / "sub" / "recording.dat"
    odd.write_bytes(b"x")
    got = audio_files([str(tmp_path), str(tmp_path / "a.wav"), str(odd)])
    assert [p.name for p in got] == ["a.wav", "b.MP3", "recording.dat"]  # a file named explicitly is taken
    with pytest.raises(FileNotFoundError):
        audio_files([str(tmp_path / "missing.wav")])


def test_outputs_sit_beside_their_inputs(tmp_path):
    assert output_path(tmp_path / "talk.wav", "srt") == tmp_path / "talk.srt"
    assert output_path(tmp_path / "talk.en.mp3", "vtt", "de") == tmp_path / "talk.en.de.vtt"


def test_fraction_prefers_the_jobs_progress():
    assert fraction({"status": "transcribing", "progress": {"fraction": 0.42}}) == 0.42
    assert fraction({"status": "transcribing", "progress": {"fraction": 7}}) == 1.0
    assert fraction({"status": "transcribing"}) == 0.1
    assert fraction({"status": "cancelled"}) == 1.0 and fraction({"status": "queued"}) < 0.1
