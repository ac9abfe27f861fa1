"""Transcription engines behind one interface (see ``base.Engine``)."""

from __future__ import annotations

from kafscribe.settings import Settings
from kafscribe.speech.decoding import EngineOptions
from kafscribe.speech.engines.base import (
    Cancelled,
    Engine,
    EngineError,
    TimeLimitExceeded,
    TranscriptionOutput,
)

ENGINES = ("faster-whisper", "openai-whisper")

__all__ = ["ENGINES", "Cancelled", "Engine", "EngineError", "EngineOptions", "TimeLimitExceeded", "TranscriptionOutput",
           "load_engine"]


def load_engine(settings: Settings, engine: str | None = None, model: str | None = None) -> Engine:
    """Load the configured engine and its model once (a worker keeps it for its life)."""
    engine = engine or settings.engine
    model = model or settings.model
    if engine == "faster-whisper":
        from kafscribe.speech.engines.faster_whisper_engine import FasterWhisperEngine

        return FasterWhisperEngine(settings, model)
    if engine == "openai-whisper":
        from kafscribe.speech.engines.openai_whisper_engine import OpenAIWhisperEngine

        return OpenAIWhisperEngine(settings, model)
    raise EngineError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
