"""The job options that steer Whisper's decoder (``prompt``, ``temperature``), and ``EngineOptions``, all of them.

One set of rules for the door (``producers.submission.parse_options``) and the
consumers' check of events from direct producers (both through
``kafscribe.validation.check_options``) and the engines (``EngineOptions``),
so a value accepted in one place is never refused in another.

- ``prompt``: Whisper's initial prompt (names, spellings, style), at most
  ``MAX_PROMPT_CHARS`` characters: OpenAI documents 224 tokens for it, and
  English text averages about 4 characters a token. Whisper itself keeps only
  the last 223 tokens of a longer prompt. Newlines and tabs are allowed, other
  control characters are not.
- ``temperature``: 0..1 (OpenAI's range), used as the only temperature (no
  fallback to higher ones). Absent: the engine's fallback schedule
  (0.0, 0.2, ... 1.0: a window whose decoding looks degenerate is decoded
  again hotter).
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass
from typing import Any

from schemas.events import JobOptions

MAX_PROMPT_CHARS = 896
PROMPT_CONTROLS = "\n\r\t"  # the control characters a prompt may contain
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.0, 1.0


def prompt_problem(prompt: object) -> str | None:
    """Why ``prompt`` cannot be a job's prompt (None: it can; None and "" mean no prompt)."""
    if prompt is None:
        return None
    if not isinstance(prompt, str):
        return f"prompt must be text, not {type(prompt).__name__}"
    if len(prompt) > MAX_PROMPT_CHARS:
        return f"prompt is {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS} (about 224 tokens)"
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"prompt is not valid UTF-8 (at character {exc.start})"
    for i, char in enumerate(prompt):
        if char not in PROMPT_CONTROLS and unicodedata.category(char) in ("Cc", "Zl", "Zp"):
            return f"prompt contains a control character ({char!r} at {i})"
    return None


def temperature_problem(temperature: object) -> str | None:
    """Why ``temperature`` cannot be a job's temperature (None: it can; None means the fallback schedule)."""
    if temperature is None:
        return None
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature)
            or not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE):
        return f"temperature={_show(temperature)} must be a number from {MIN_TEMPERATURE:g} to {MAX_TEMPERATURE:g}"
    return None


def parse_temperature(raw: str) -> float | None:
    """A form or CLI value as a temperature (empty: None); ``ValueError`` names the rule it breaks."""
    raw = raw.strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(
            f"temperature={raw[:40]!r} must be a number from {MIN_TEMPERATURE:g} to {MAX_TEMPERATURE:g}"
        ) from None
    problem = temperature_problem(value)  # a number out of range: the words a worker uses for it too
    if problem:
        raise ValueError(problem)
    return value


@dataclass(frozen=True)
class EngineOptions:
    """How an engine decodes one job: what faster-whisper calls ``TranscriptionOptions``, in one value.

    Built from the job's options (``for_job``) by both call sites (the
    transcriber, the chunk transcriber) and read the same way by both engines,
    so a new decoding option is added here once rather than to every engine's
    signature and every call. What is not about decoding -- the job's deadline,
    its progress and cancellation hooks -- stays a keyword of ``transcribe``.

    ``language``: the spoken language (None: detected). ``task``: transcribe or
    translate (into English). ``word_timestamps``: each segment carries its
    words. ``vad_filter``: only what the Silero VAD hears as speech is decoded.
    ``prompt`` and ``temperature``: see the module. ``beam_size``: None is the
    engine's ``KAFSCRIBE_BEAM_SIZE``. An English-only model ignores
    ``language`` and ``task`` (it can only transcribe English).
    """

    language: str | None = None
    task: str = "transcribe"
    word_timestamps: bool = False
    vad_filter: bool = False
    prompt: str | None = None
    temperature: float | None = None
    beam_size: int | None = None

    @classmethod
    def for_job(cls, options: JobOptions) -> EngineOptions:
        """The decoding options a job asked for (the rest of ``JobOptions`` is not the engine's business)."""
        return cls(language=options.language, task=options.task, word_timestamps=bool(options.word_timestamps),
                   vad_filter=bool(options.vad_filter), prompt=options.prompt, temperature=options.temperature)

    def decoder_kwargs(self) -> dict[str, Any]:
        """The prompt and temperature as the keyword arguments both Whisper engines take (same names in both).

        An empty prompt is no prompt; no temperature leaves the engine's own
        fallback schedule in place. Absent options are omitted, not passed as None:
        faster-whisper given ``initial_prompt=None`` explicitly decoded the VAD test
        clip differently from its default (tests/e2e/test_words.py failed 4 of 4 runs).
        """
        kwargs: dict[str, Any] = {}
        if self.prompt:
            kwargs["initial_prompt"] = self.prompt
        if self.temperature is not None:
            kwargs["temperature"] = float(self.temperature)
        return kwargs


DEFAULT_ENGINE_OPTIONS = EngineOptions()  # detect the language, transcribe, the engine's own decoding defaults


def _show(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
