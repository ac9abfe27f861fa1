"""What a translation backend offers."""

from __future__ import annotations

from typing import Protocol

from schemas.events import Transcript, Translation


class TranslationError(ValueError):
    """The translation cannot succeed (the job fails with this message)."""


class Translator(Protocol):
    name: str

    def translate(self, transcript: Transcript, target: str) -> Translation: ...


def language_name(code: str) -> str:
    from whisper.tokenizer import LANGUAGES

    return LANGUAGES.get(code, code).title()
