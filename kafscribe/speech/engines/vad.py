"""Voice activity detection for engines without their own: Silero VAD, as bundled with faster-whisper.

faster-whisper ships the Silero model as an ONNX file inside its package and
runs it with onnxruntime, so this works offline and without torch hub. The
openai-whisper engine uses it to find the speech and decodes only there
(whisper's ``clip_timestamps``), with the options faster-whisper's own
``vad_filter`` uses, so both engines skip the same silences.
"""

from __future__ import annotations

import numpy as np

SAMPLE_RATE = 16000


def speech_clips(audio: np.ndarray) -> list[tuple[float, float]]:
    """``(start, end)`` seconds of each stretch of speech in 16 kHz mono ``audio`` (empty: no speech)."""
    from faster_whisper.vad import VadOptions, get_speech_timestamps

    chunks = get_speech_timestamps(audio, VadOptions(), sampling_rate=SAMPLE_RATE)
    return [(c["start"] / SAMPLE_RATE, c["end"] / SAMPLE_RATE) for c in chunks]
