"""What every transcription engine offers, and the shape of its output."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from kafscribe.errors import PermanentError
from kafscribe.settings import Settings
from kafscribe.speech import memory
from kafscribe.speech.decoding import DEFAULT_ENGINE_OPTIONS, EngineOptions
from kafscribe.speech.models import offline
from schemas.events import Segment, Word


class EngineError(PermanentError, RuntimeError):
    """The engine cannot be loaded or used as configured."""


class TimeLimitExceeded(EngineError):
    """The job's time limit passed while the engine worked (checked between windows/segments)."""


class Cancelled(EngineError):
    """``should_continue`` said stop (the job was cancelled): checked before the job and between segments."""


# A decoded segment (None: progress only) and the fraction (0..1) of the audio done.
OnSegment = Callable[[Segment | None, float], None]
ShouldContinue = Callable[[], bool]


def check_continue(should_continue: ShouldContinue | None) -> None:
    """Raise ``Cancelled`` once ``should_continue()`` returns False (None: never)."""
    if should_continue is not None and not should_continue():
        raise Cancelled("the job was cancelled")


def check_deadline(deadline: float | None) -> None:
    """Raise ``TimeLimitExceeded`` once ``time.monotonic()`` is past ``deadline`` (None: no limit)."""
    if deadline is not None and time.monotonic() > deadline:
        raise TimeLimitExceeded("the job's time limit passed while transcribing")


@dataclass
class TranscriptionOutput:
    language: str
    language_probability: float
    duration: float
    text: str
    segments: list[Segment]


class Engine(Protocol):
    name: str
    model_name: str
    device: str
    multilingual: bool

    def transcribe(
        self, audio: np.ndarray, options: EngineOptions = DEFAULT_ENGINE_OPTIONS, *, deadline: float | None = None,
        on_segment: OnSegment | None = None, should_continue: ShouldContinue | None = None,
    ) -> TranscriptionOutput:
        """Transcribe 16 kHz mono ``audio`` as ``options`` say (``EngineOptions.for_job``: the job's language,
        task, word timestamps, VAD, prompt, temperature; the defaults: detect the language and transcribe).

        Each segment reports the temperature it was decoded with. With ``vad_filter`` only the stretches
        the Silero VAD hears as speech are decoded; times stay on the original audio's clock.

        The job's controls: past ``deadline`` (a ``time.monotonic()`` value) raise ``TimeLimitExceeded``.
        ``on_segment(segment, fraction)``: called as each segment is decoded, with the fraction
        (0..1) of the audio done (segment None: a window without speech was done). ``should_continue()``: asked
        before decoding and between segments (windows); False raises ``Cancelled``.
        """
        ...


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when the driver reports a GPU (NVML; importing torch to ask would cost a
    faster-whisper worker hundreds of MB), else ``cpu``. Anything else as given (``cuda:1`` pins a device)."""
    if device != "auto":
        return device
    return "cuda" if memory.cuda_ordinal("auto") is not None else "cpu"


def split_device(device: str) -> tuple[str, int]:
    """``cuda:1`` -> (``cuda``, 1); ``cuda`` -> (``cuda``, 0); ``cpu`` -> (``cpu``, 0)."""
    kind, _, index = device.partition(":")
    try:
        return kind, int(index) if index else 0
    except ValueError as exc:
        raise EngineError(f"device {device!r}: the index after ':' must be a number (e.g. cuda:1)") from exc


def ct2_model_dir(settings: Settings, model: str) -> str:
    """A CTranslate2 model directory for ``model``: a local path, a packaged model, or a hub name."""
    if Path(model).expanduser().is_dir():
        return str(Path(model).expanduser())
    if model in offline.PACKAGED:
        return str(offline.ct2_dir(model, settings.cache_dir))
    return model  # faster-whisper downloads known names where the network allows


def is_multilingual(model: str) -> bool:
    return not Path(model).name.endswith(".en") and not model.endswith(".en")


def word(text: str, start: float, end: float, probability: float) -> Word:
    """A ``Word`` from an engine's word (plain floats, never numpy scalars: Avro needs them)."""
    return Word(word=text, start=float(start), end=float(end), probability=float(probability))


def join_text(segments: list[Segment]) -> str:
    return "".join(s.text for s in segments).strip()
