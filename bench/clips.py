"""Benchmark audio: espeak-ng speech of chosen lengths (5-60 s)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from kafscribe.speech import audio

SENTENCES = [
    "The committee met on Tuesday to review the quarterly results.",
    "Revenue grew in every region except the north, where shipping delays hurt sales.",
    "The new warehouse will open in March and employ two hundred people.",
    "Questions from the audience focused on pricing and on the hiring plan.",
    "Everyone agreed to meet again after the holidays to decide on the budget.",
]


def make_clips(directory: Path, durations: list[float]) -> list[tuple[Path, float]]:
    """One WAV per target duration (±a sentence); returns (path, measured seconds)."""
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for i, target in enumerate(durations):
        path = directory / f"clip-{i:02d}-{int(target)}s.wav"
        if not path.exists():
            words: list[str] = []
            # espeak-ng at 160 wpm speaks about 2.6 words a second.
            while len(" ".join(words).split()) < target * 2.6:
                words.append(SENTENCES[len(words) % len(SENTENCES)])
            subprocess.run(["espeak-ng", "-v", "en", "-s", "160", "-w", str(path), " ".join(words)], check=True)
        out.append((path, audio.probe(path).duration))
    return out
