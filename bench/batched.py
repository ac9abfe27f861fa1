"""Batched vs sequential faster-whisper on one long clip: speed and word recall against the spoken text.

    python -m bench.batched                     # a >= 5-minute espeak-ng clip, batch size 8
    python -m bench.batched --minutes 6 --batch-sizes 4,8,16

The clip is composed of espeak-ng sentences separated by short pauses (what a
VAD cuts at); the reference is the text that was spoken. Both runs use the
same engine settings (``KAFSCRIBE_*``: model, beam, threads, device); the
batched one is the engine's ``KAFSCRIBE_ENGINE_BATCH_SIZE`` option. Recall is
the share of the reference's words found in order in the transcript: the
longest common subsequence of lower-cased words over the reference's length
(a greedy matcher such as difflib's misaligns text that repeats, as this clip's
sentences do). Transcripts are written beside the clip.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from kafscribe.settings import Settings
from kafscribe.speech import audio

SENTENCES = [
    "The river flooded the lower fields after three days of heavy rain.",
    "Our train to the coast leaves at seven and arrives just before noon.",
    "She planted tomatoes, beans and peppers along the southern fence.",
    "The library will stay open late during the examination period.",
    "Engineers replaced the old bridge with a lighter steel structure.",
    "A small bakery on the corner sells fresh bread every morning.",
    "The orchestra rehearsed the second movement until it sounded right.",
    "Please remember to bring your passport and a printed ticket.",
    "The museum opened a new exhibition about ancient navigation.",
    "Farmers in the valley grow apples, pears and a little wheat.",
    "The council approved a plan to build more bicycle lanes downtown.",
    "He repaired the roof before the first snow arrived in November.",
    "Children from the village school visited the science center.",
    "The hospital hired twelve nurses and opened a second clinic.",
    "A strong wind blew the sailing boats back into the harbor.",
    "The company moved its offices to a quieter part of the city.",
    "Students collected data on birds that nest near the lake.",
    "The chef prepared soup with carrots, onions and fresh herbs.",
    "Traffic was slow on the highway because of road repairs.",
    "The new telescope can see galaxies that are very far away.",
]


def compose(path: Path, minutes: float, pause_s: float = 0.8) -> tuple[Path, str]:
    """A WAV of espeak-ng sentences with ``pause_s`` of silence between them, at least ``minutes`` long."""
    spoken: list[str] = []
    parts: list[np.ndarray] = []
    total = 0.0
    silence = np.zeros(int(pause_s * audio.SAMPLE_RATE), dtype=np.int16)
    with tempfile.TemporaryDirectory() as tmp:
        i = 0
        while total < minutes * 60:
            sentence = SENTENCES[i % len(SENTENCES)]
            wav = Path(tmp) / f"s{i % len(SENTENCES)}.wav"
            if not wav.exists():
                subprocess.run(["espeak-ng", "-v", "en", "-s", "160", "-w", str(wav), sentence], check=True)
            samples = (audio.decode(wav.read_bytes()) * 32767).astype(np.int16)
            parts += [samples, silence]
            spoken.append(sentence)
            total += (len(samples) + len(silence)) / audio.SAMPLE_RATE
            i += 1
    pcm = np.concatenate(parts)
    raw = path.with_suffix(".raw")
    raw.write_bytes(pcm.tobytes())
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "s16le", "-ar", str(audio.SAMPLE_RATE), "-ac", "1",
                    "-i", str(raw), str(path)], check=True)
    raw.unlink()
    return path, " ".join(spoken)


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def recall(reference: str, hypothesis: str) -> float:
    """Longest common subsequence of the words, over the reference's word count."""
    ref, hyp = words(reference), words(hypothesis)
    if not ref:
        return 0.0
    previous = [0] * (len(hyp) + 1)
    for r in ref:
        current = [0]
        for j, h in enumerate(hyp):
            current.append(previous[j] + 1 if r == h else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1] / len(ref)


def timed(settings: Settings, samples: np.ndarray) -> tuple[float, str]:
    from kafscribe.speech.engines import load_engine

    engine = load_engine(settings)
    engine.transcribe(samples[: 5 * audio.SAMPLE_RATE])  # warm-up
    t0 = time.monotonic()
    out = engine.transcribe(samples)
    return time.monotonic() - t0, out.text


def main(argv: list[str] | None = None) -> None:
    base = Settings.from_env()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--batch-sizes", default="8")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "kafscribe-bench")
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    path, reference = compose(args.dir / f"long-{args.minutes:g}min.wav", args.minutes)
    samples = audio.decode(path.read_bytes())
    duration = len(samples) / audio.SAMPLE_RATE
    print(f"clip {duration:.0f} s ({len(words(reference))} words spoken); engine {base.engine}, model {base.model}, "
          f"beam {base.beam_size}, device {base.device}, threads {base.cpu_threads or 'auto'}", flush=True)
    seq_s, seq_text = timed(base.with_(engine_batch_size=0), samples)
    path.with_suffix(".sequential.txt").write_text(seq_text)
    print(f"sequential      : {seq_s:7.1f} s  RTF {seq_s / duration:.3f}  word recall {recall(reference, seq_text):.3f}",
          flush=True)
    for size in [int(s) for s in args.batch_sizes.split(",") if s]:
        s, text = timed(base.with_(engine_batch_size=size, engine_batch_min_audio_s=0.0), samples)
        path.with_suffix(f".batched{size}.txt").write_text(text)
        print(f"batched (size {size:2d}): {s:7.1f} s  RTF {s / duration:.3f}  word recall {recall(reference, text):.3f}"
              f"  speed-up {seq_s / s:.2f}x", flush=True)


if __name__ == "__main__":
    main()
