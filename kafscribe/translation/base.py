"""What a translation backend offers."""

from __future__ import annotations

from typing import Protocol

from kafscribe.errors import PermanentError
from kafscribe.languages import language_name
from schemas.events import Transcript, Translation

__all__ = ["TranslationError", "Translator", "language_name"]


class TranslationError(PermanentError, ValueError):
    """The translation cannot succeed (the job fails with this message)."""


class Translator(Protocol):
    name: str

    def translate(self, transcript: Transcript, target: str) -> Translation: ...


