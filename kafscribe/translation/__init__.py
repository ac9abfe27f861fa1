"""Translation backends behind one interface (``base.Translator``)."""

from __future__ import annotations

from ..settings import Settings
from .base import TranslationError, Translator

BACKENDS = ("whisper", "llm")

__all__ = ["BACKENDS", "TranslationError", "Translator", "backend_name"]


def backend_name(settings: Settings, target: str) -> str:
    """Which backend translates into ``target`` under the configured policy."""
    if settings.translator == "auto":
        return "whisper" if target == "en" else "llm"
    if settings.translator not in BACKENDS:
        raise TranslationError(f"unknown translator {settings.translator!r}; choose auto, whisper or llm")
    return settings.translator
