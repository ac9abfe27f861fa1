"""Long recordings, the logic alone: where cuts go, how chunks spread, how a job is merged."""

from __future__ import annotations

import io
import wave
from collections import Counter

import numpy as np
import pytest

from consumers.chunk_transcriber import chunk_blob_id, shifted
from consumers.merger import assemble, done_prefix, renumbered, vote_language
from kafscribe import validation
from kafscribe.kafka.chunk_routing import chunk_partition, chunk_partitions
from kafscribe.kafka.workers import WorkerState
from kafscribe.settings import Settings
from kafscribe.speech import chunking
from schemas.events import (
    Chunk,
    ChunkTranscript,
    JobOptions,
    Segment,
    Upload,
    Word,
    WorkerStatus,
    decode_event,
)

SR = chunking.SAMPLE_RATE
SHA = "a" * 64


# --- cut points ---------------------------------------------------------------------------
def test_silences_are_the_gaps_between_speech_inside_the_window():
    assert chunking.silences([(1.0, 2.0), (3.0, 4.5)], 0.0, 6.0) == [(0.0, 1.0), (2.0, 3.0), (4.5, 6.0)]
    assert chunking.silences([(0.0, 6.0)], 0.0, 6.0) == []
    assert chunking.silences([], 0.0, 2.0) == [(0.0, 2.0)]
    assert chunking.silences([(2.5, 3.0), (0.5, 1.0)], 0.0, 3.0) == [(0.0, 0.5), (1.0, 2.5)]  # unsorted input


def test_cut_goes_to_the_middle_of_the_longest_silence_in_the_window():
    gaps = [(10.0, 10.3), (11.0, 12.0), (13.0, 13.2)]
    assert chunking.pick_cut(gaps, 9.0, 14.0, 12.5) == pytest.approx(11.5)
    # A silence running past the window counts only inside it.
    assert chunking.pick_cut([(8.0, 13.0), (13.5, 13.9)], 12.0, 14.0, 13.0) == pytest.approx(12.5)
    # Equal lengths: the one nearer the target.
    assert chunking.pick_cut([(9.0, 9.5), (12.0, 12.5)], 8.0, 14.0, 12.0) == pytest.approx(12.25)


def test_no_silence_in_the_window_means_a_cut_at_its_quietest_moment():
    assert chunking.pick_cut([], 48.0, 72.0, 60.0) is None
    assert chunking.pick_cut([(10.0, 20.0), (80.0, 90.0)], 48.0, 72.0, 60.0) is None
    loud = (np.random.default_rng(2).standard_normal(SR) * 3000).astype(np.int16)
    loud[5000:5400] //= 50  # a dip between two "words"
    assert 5000 <= chunking.quietest(loud) < 5400
    assert chunking.quietest(np.full(SR, 100, np.int16)) == pytest.approx(SR // 2, abs=SR // 50)  # flat: middle


def test_only_recordings_over_one_and_a_half_chunks_are_split():
    assert not chunking.should_split(89.0, 60.0)
    assert chunking.should_split(91.0, 60.0)
    assert not chunking.should_split(10_000.0, 0.0)  # 0 = never


def _tone_with_pauses(seconds: float, pause_every_s: float, pause_s: float = 0.5) -> tuple[np.ndarray, list]:
    """Int16 'speech' (noise) with silent pauses; the matching VAD answer for any window."""
    n = int(seconds * SR)
    rng = np.random.default_rng(1)
    audio = (rng.standard_normal(n) * 3000).astype(np.int16)
    pauses = []
    t = pause_every_s
    while t < seconds:
        audio[int(t * SR):int((t + pause_s) * SR)] = 0
        pauses.append((t, t + pause_s))
        t += pause_every_s
    return audio, pauses


def _fake_vad(audio: np.ndarray) -> list[tuple[float, float]]:
    """Speech = stretches of non-zero samples (what a perfect VAD would say of ``_tone_with_pauses``)."""
    loud = np.abs(audio) > 0
    out, start = [], None
    for i in range(0, len(loud), 160):  # 10 ms steps
        on = bool(loud[i:i + 160].any())
        if on and start is None:
            start = i / SR
        elif not on and start is not None:
            out.append((start, i / SR))
            start = None
    if start is not None:
        out.append((start, len(loud) / SR))
    return out


def _split(audio: np.ndarray, chunk_s: float, hint_s: float | None = None, piece: int = 4000):
    written = []
    pieces = chunking.split((audio[i:i + piece] for i in range(0, len(audio), piece)), chunk_s,
                            hint_s if hint_s is not None else len(audio) / SR,
                            lambda p, samples: written.append((p, samples.copy())), find_speech=_fake_vad)
    return pieces, written


def test_splitter_cuts_inside_pauses_and_loses_no_sample():
    audio, pauses = _tone_with_pauses(100.0, pause_every_s=4.5)
    pieces, written = _split(audio, chunk_s=10.0)
    assert np.array_equal(np.concatenate([s for _, s in written]), audio)  # nothing lost, nothing doubled
    assert [p.index for p in pieces] == list(range(len(pieces)))
    for a, b in zip(pieces, pieces[1:], strict=False):
        assert b.offset_s == pytest.approx(a.offset_s + a.duration_s)
    for p in pieces[:-1]:  # every cut lies in a pause, within +-30 % of 10 s after the previous cut
        cut = p.offset_s + p.duration_s
        assert any(s <= cut <= e for s, e in pauses), cut
        assert 7.0 <= p.duration_s <= 13.0
    assert pieces[-1].duration_s <= 1.5 * 10.0 + 2.0  # the tail is never split off as a sliver
    assert pieces[-1].duration_s >= 3.0


def test_splitter_without_pauses_cuts_near_the_chunk_length():
    audio, _ = _tone_with_pauses(45.0, pause_every_s=1000.0)
    pieces, written = _split(audio, chunk_s=10.0)
    assert len(pieces) == 3 or len(pieces) == 4
    assert all(7.0 <= p.duration_s <= 13.0 for p in pieces[:-1])
    assert sum(len(s) for _, s in written) == len(audio)
    assert pieces[-1].duration_s <= 15.0 + 2.0


def test_splitter_of_short_audio_gives_one_chunk_and_empty_audio_one_empty_chunk():
    audio, _ = _tone_with_pauses(12.0, pause_every_s=3.0)
    pieces, _ = _split(audio, chunk_s=10.0)
    assert len(pieces) == 1 and pieces[0].duration_s == pytest.approx(12.0)


def test_splitter_memory_holds_about_one_chunk():
    """Only the current chunk and its window are held: the buffer never grows with the recording."""
    audio, _ = _tone_with_pauses(600.0, pause_every_s=4.0)
    peak = [0]
    splitter = chunking.Splitter(10.0, 600.0, _fake_vad, lambda p, s: None)
    for i in range(0, len(audio), 4000):
        splitter.feed(audio[i:i + 4000])
        peak[0] = max(peak[0], len(splitter.buf) + splitter.pending_len)
    splitter.finish()
    assert peak[0] <= int(1.5 * 10.0 * SR) + 2 * 4000 + int(2.0 * SR)


def test_chunk_audio_is_a_16k_mono_wav():
    samples = (np.arange(1600) % 100).astype(np.int16)
    with wave.open(io.BytesIO(chunking.wav_bytes(samples))) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()) == (SR, 1, 2, 1600)
        assert np.array_equal(np.frombuffer(w.readframes(1600), np.int16), samples)


def test_vad_finds_the_pause_in_real_speech_like_audio():
    """The bundled Silero VAD (offline) on a synthetic voiced signal with a pause: the cut lands in it."""
    t = np.arange(int(6 * SR)) / SR
    voiced = (0.3 * np.sin(2 * np.pi * 150 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    voiced[int(2.8 * SR):int(3.6 * SR)] = 0.0
    speech = chunking.vad_speech(voiced)
    at = chunking.pick_cut(chunking.silences(speech, 0.0, 6.0), 1.0, 5.0, 3.0)
    assert isinstance(speech, list)
    assert 2.7 <= at <= 3.7 or speech == []  # Silero may call a pure tone no speech at all: a hard cut then


# --- partitions -----------------------------------------------------------------------------
def test_without_statuses_chunks_of_one_job_take_consecutive_partitions():
    parts = [chunk_partition("job-1", i, 4) for i in range(12)]
    assert Counter(parts) == {0: 3, 1: 3, 2: 3, 3: 3}
    assert all(parts[i + 1] == (parts[i] + 1) % 4 for i in range(11))
    assert chunk_partitions("job-1", 12, 4, [], 1) == parts


def _chunk_worker(worker_id: str, partitions: list[int], headroom: int = 10**10, state: str = "running",
                  liveness: str = "live", stage: str = "chunk-transcriber") -> WorkerState:
    status = WorkerStatus(job_id="", worker_id=worker_id, host="h", pid=1, stage=stage, state=state, rss_bytes=1,
                          host_mem_available=1, host_mem_total=2, partitions=partitions)
    return WorkerState(status, liveness, headroom)


@pytest.mark.parametrize("owned", [([0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]), ([0, 2, 4, 6, 8, 10], [1, 3, 5, 7, 9, 11]),
                                   ([0, 1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11])])
def test_chunks_are_dealt_evenly_to_the_live_chunk_loops_whatever_they_own(owned):
    workers = [_chunk_worker("a", owned[0]), _chunk_worker("b", owned[1])]
    for job in ("j1", "j2", "a-much-longer-job-id:7"):
        for count in (2, 5, 10, 11):
            parts = chunk_partitions(job, count, 12, workers, need_bytes=1)
            share = Counter(p in owned[0] for p in parts)
            assert abs(share[True] - share[False]) <= 1, (job, count, parts)
            assert len(set(parts)) == min(count, 12) or count > 9  # spread over the owners' partitions too


def test_chunk_dealing_skips_dead_throttled_upload_loops_and_workers_without_room():
    fits, full = _chunk_worker("fits", [0, 1]), _chunk_worker("full", [2, 3], headroom=10)
    others = [_chunk_worker("dead", [4], liveness="stale"), _chunk_worker("slow", [5], state="throttled"),
              _chunk_worker("uploads", [6], stage="transcriber")]
    assert set(chunk_partitions("j", 8, 12, [fits, full, *others], need_bytes=1000)) == {0, 1}
    # Nobody has room: everyone live shares (the chunks wait in admission rather than nowhere).
    assert set(chunk_partitions("j", 8, 12, [full, *others], need_bytes=1000)) == {2, 3}


def test_chunk_blob_ids_are_valid_and_distinct():
    ids = {chunk_blob_id("job:with@odd+chars=", i) for i in range(3)}
    assert len(ids) == 3 and all(len(i) < 128 and ":" not in i and "@" not in i for i in ids)


# --- merge ------------------------------------------------------------------------------------
def _upload(job: str = "j1", duration: float = 30.0) -> Upload:
    return Upload(job_id=job, tenant="acme", trace_id="t1", blob_ref="file:x", audio_sha256=SHA, audio_bytes=100,
                  audio_duration=duration, filename="talk.mp3", options=JobOptions(word_timestamps=True))


def _part(index: int, count: int, offset: float, duration: float, language: str = "en", prob: float = 0.9,
          texts: tuple[str, ...] = ("a",), upload: Upload | None = None) -> ChunkTranscript:
    segs = [Segment(id=k, start=k * 1.0, end=k * 1.0 + 0.8, text=f" {t}",
                    words=[Word(f" {t}", k * 1.0, k * 1.0 + 0.8, 0.9)]) for k, t in enumerate(texts)]
    return ChunkTranscript(job_id="j1", tenant="acme", index=index, count=count, offset_s=offset, duration_s=duration,
                           chunk_blob_ref=f"file:c{index}", upload=(upload or _upload()).encode(), language=language,
                           language_probability=prob, text="".join(s.text for s in segs).strip(),
                           segments=shifted(segs, offset), engine="faster-whisper", model="tiny.en",
                           processing_seconds=1.5)


def test_shifted_moves_segments_and_words_onto_the_recordings_clock():
    seg = Segment(id=0, start=1.0, end=2.0, text=" x", words=[Word(" x", 1.2, 1.8, 0.5)])
    (out,) = shifted([seg], 100.0)
    assert (out.start, out.end, out.words[0].start, out.words[0].end) == (101.0, 102.0, 101.2, 101.8)
    assert seg.start == 1.0  # the input is left alone


def test_merge_orders_chunks_renumbers_segments_and_keeps_the_recordings_identity():
    parts = [_part(2, 3, 20.0, 10.0, texts=("five", "six")), _part(0, 3, 0.0, 10.0, texts=("one", "two")),
             _part(1, 3, 10.0, 10.0, texts=("three", "four"))]
    t = assemble(_upload(), parts, "merger-1", attempt=1)
    assert [s.id for s in t.segments] == list(range(6))
    assert [s.text.strip() for s in t.segments] == ["one", "two", "three", "four", "five", "six"]
    assert [s.start for s in t.segments] == [0.0, 1.0, 10.0, 11.0, 20.0, 21.0]
    assert t.segments[5].words[0].start == 21.0
    assert t.text == "one two three four five six"
    assert t.duration == 30.0 and t.audio_duration == 30.0
    assert (t.blob_ref, t.filename, t.tenant, t.trace_id) == ("file:x", "talk.mp3", "acme", "t1")
    assert t.options.word_timestamps and t.processing_seconds == pytest.approx(4.5)
    assert decode_event(t.encode()) == t


def test_language_is_the_duration_weighted_majority():
    parts = [_part(0, 3, 0, 10, "de", 0.6), _part(1, 3, 10, 10, "de", 0.8), _part(2, 3, 20, 25, "en", 0.99)]
    assert vote_language(parts)[0] == "en"  # 25 s of English beat 20 s of German
    lang, prob = vote_language(parts[:2] + [_part(2, 3, 20, 5, "en", 0.99)])
    assert lang == "de" and prob == pytest.approx(0.7)


def test_done_prefix_stops_at_the_first_missing_or_failed_chunk():
    a, b, d = _part(0, 4, 0, 10), _part(1, 4, 10, 10), _part(3, 4, 30, 10)
    assert [p.index for p in done_prefix({0: a, 1: b, 3: d})] == [0, 1]
    assert done_prefix({1: b, 3: d}) == []
    assert [s.id for s in renumbered(done_prefix({0: a, 1: b}))] == [0, 1]


# --- validation of chunk events ----------------------------------------------------------------
def _chunk(**changes) -> Chunk:
    values = dict(job_id="j1", index=0, count=3, offset_s=0.0, duration_s=10.0, blob_ref="file:c0", audio_sha256=SHA,
                  audio_bytes=1000, upload=_upload().encode())
    values.update(changes)
    return Chunk(**values)


@pytest.mark.parametrize(("changes", "words"), [
    ({"index": 3}, "index 3 must be in [0, 2]"),
    ({"index": -1}, "index -1"),
    ({"count": 0}, "count 0"),
    ({"offset_s": -1.0}, "offset_s -1.0"),
    ({"offset_s": 25.0, "duration_s": 10.0}, "does not fit"),
    ({"duration_s": 0.0}, "duration_s 0.0"),
    ({"duration_s": float("nan")}, "duration_s nan"),
    ({"blob_ref": ""}, "blob_ref is empty"),
    ({"audio_sha256": "xyz"}, "audio_sha256"),
    ({"upload": b"not an event"}, "not an Upload event"),
    ({"upload": _upload("other").encode()}, "job 'other'"),
])
def test_malformed_chunks_are_refused_with_a_reason(changes, words):
    reason = validation.check_event(Settings(), "chunks", _chunk(**changes))
    assert reason is not None and words in reason, reason


def test_a_good_chunk_and_its_transcript_pass_validation():
    assert validation.check_event(Settings(), "chunks", _chunk()) is None
    assert validation.check_event(Settings(), "chunk-transcripts", _part(1, 3, 10.0, 10.0)) is None
    late = _part(1, 3, 10.0, 10.0)
    late.segments[0].start = 500.0
    assert "outside" in validation.check_event(Settings(), "chunk-transcripts", late)
