"""Whisper's own speech -> English task, run again on the job's audio (works offline)."""

from __future__ import annotations

from kafscribe.speech import audio
from kafscribe.speech.engines import Engine, EngineOptions, load_engine
from kafscribe.store import blobs as blobstore
from schemas.events import Transcript, Translation

from ..settings import Settings
from .base import TranslationError


class WhisperTranslator:
    name = "whisper"

    def __init__(self, settings: Settings, session) -> None:
        self.settings = settings
        self.session = session
        self._engine: Engine | None = None

    @property
    def engine(self) -> Engine:
        if self._engine is None:  # loaded on first use, then kept for the process's life
            self._engine = load_engine(self.settings)
        return self._engine

    def translate(self, transcript: Transcript, target: str) -> Translation:
        if target != "en":
            raise TranslationError(f"the whisper translator only translates into English, not {target!r}")
        if not self.engine.multilingual:
            raise TranslationError(f"model {self.engine.model_name!r} is English-only and cannot translate")
        data = blobstore.read_verified(self.settings, self.session, transcript.blob_ref, transcript.audio_sha256)
        # The job's temperature, not its prompt: that is in the spoken language and would pull the English
        # back towards it (docs/transcription.md, "Prompt and temperature").
        out = self.engine.transcribe(audio.decode(data), EngineOptions(
            language=transcript.language, task="translate", temperature=transcript.options.temperature))
        return Translation(
            source_language=transcript.language, target_language="en", backend=self.name,
            text=out.text, segments=out.segments,
        )
