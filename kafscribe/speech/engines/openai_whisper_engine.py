"""openai-whisper (PyTorch), the reference implementation.

Offline, a packaged CTranslate2 model is converted once into a Whisper
checkpoint (``kafscribe.speech.models.ct2_to_whisper``).
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from kafscribe.settings import Settings
from kafscribe.speech.decoding import DEFAULT_ENGINE_OPTIONS, EngineOptions
from kafscribe.speech.engines import vad
from kafscribe.speech.engines.base import (
    EngineError,
    OnSegment,
    ShouldContinue,
    TranscriptionOutput,
    check_continue,
    check_deadline,
    is_multilingual,
    join_text,
    resolve_device,
    word,
)
from kafscribe.speech.models import offline
from schemas.events import Segment


def checkpoint_for(settings: Settings, model: str) -> str:
    path = Path(model).expanduser()
    if path.is_file():
        return str(path)
    if path.is_dir():  # a CTranslate2 directory
        return str(offline.openai_checkpoint(path, settings.cache_dir))
    if model in offline.PACKAGED:
        return str(offline.openai_checkpoint(model, settings.cache_dir))
    return model  # whisper downloads known names where the network allows


class OpenAIWhisperEngine:
    name = "openai-whisper"

    def __init__(self, settings: Settings, model: str) -> None:
        import torch
        import whisper

        self.device = resolve_device(settings.device)
        self.model_name = model
        self.multilingual = is_multilingual(model)
        self.beam_size = settings.beam_size
        if settings.cpu_threads:
            torch.set_num_threads(settings.cpu_threads)
        try:
            self._model = whisper.load_model(checkpoint_for(settings, model), device=self.device)
        except Exception as exc:  # noqa: BLE001
            raise EngineError(f"cannot load openai-whisper model {model!r}: {exc}") from exc
        self.multilingual = self._model.is_multilingual

    def transcribe(
        self, audio: np.ndarray, options: EngineOptions = DEFAULT_ENGINE_OPTIONS, *, deadline: float | None = None,
        on_segment: OnSegment | None = None, should_continue: ShouldContinue | None = None,
    ) -> TranscriptionOutput:
        """``base.Engine.transcribe``."""
        import torch
        import whisper

        language, task = options.language, options.task

        check_deadline(deadline)
        check_continue(should_continue)
        duration = len(audio) / whisper.audio.SAMPLE_RATE
        clips: str | list[float] = "0"  # whisper's default: from the start to the end
        first_speech = 0.0  # where language detection listens
        if options.vad_filter:  # openai-whisper has no VAD: decode only where Silero hears speech
            # A clip may not end past whisper's last frame: there it would never advance (a hang).
            last = (len(audio) // whisper.audio.HOP_LENGTH) / whisper.audio.FRAMES_PER_SECOND
            speech = [(start, min(end, last)) for start, end in vad.speech_clips(audio) if min(end, last) - start >= 0.02]
            if not speech:
                return TranscriptionOutput(language=language or "en", language_probability=0.0,
                                           duration=duration, text="", segments=[])
            clips = [t for clip in speech for t in clip]
            first_speech = speech[0][0]
        probability = 1.0
        if not self.multilingual:
            language, task = "en", "transcribe"
        elif language is None:
            mel = whisper.log_mel_spectrogram(
                whisper.pad_or_trim(audio[int(first_speech * whisper.audio.SAMPLE_RATE):]), self._model.dims.n_mels
            ).to(self._model.device)
            with torch.no_grad():
                _, probs = self._model.detect_language(mel)
            language = max(probs, key=probs.get)
            probability = float(probs[language])
        model = self._model
        decode_window = model.decode

        def decode_before_deadline(*args, **kwargs):  # whisper.transcribe decodes window by window
            check_deadline(deadline)
            check_continue(should_continue)
            return decode_window(*args, **kwargs)

        sent = 0

        def window_done(state: dict[str, Any], fraction: float) -> None:  # after each window's segments
            nonlocal sent
            new = state.get("all_segments", [])[sent:]
            sent += len(new)
            for s in new:
                on_segment(_segment(s), min(fraction, max(float(s["end"]) / duration, 0.0)) if duration else 1.0)
            if on_segment is not None and not new:
                on_segment(None, fraction)

        model.decode = decode_before_deadline  # one job at a time per engine
        hook = _after_each_window(window_done) if on_segment is not None else contextlib.nullcontext()
        try:
            with hook:
                result = model.transcribe(
                    audio,
                    language=language,
                    task=task,
                    fp16=self.device.startswith("cuda"),
                    beam_size=options.beam_size or self.beam_size,
                    verbose=None,
                    word_timestamps=options.word_timestamps,
                    clip_timestamps=clips,
                    **options.decoder_kwargs(),  # initial_prompt=, and temperature= when given
                )
        finally:
            del model.decode  # back to the class's method
        segments = [_segment(s) for s in result["segments"]]
        return TranscriptionOutput(
            language=language,
            language_probability=probability,
            duration=duration,
            text=join_text(segments),
            segments=segments,
        )


def _segment(s: dict[str, Any]) -> Segment:
    """Our ``Segment`` of one of whisper's segment dicts."""
    return Segment(
        id=int(s["id"]), start=float(s["start"]), end=float(s["end"]), text=s["text"],
        avg_logprob=float(s["avg_logprob"]), no_speech_prob=float(s["no_speech_prob"]),
        words=[word(w["word"], w["start"], w["end"], w["probability"]) for w in s.get("words") or ()],
        temperature=None if s.get("temperature") is None else float(s["temperature"]),
    )


@contextlib.contextmanager
def _after_each_window(callback: Callable[[dict[str, Any], float], None]) -> Iterator[None]:
    """Call ``callback(transcribe's locals, fraction done)`` after each window ``whisper.transcribe`` decodes.

    whisper has no per-segment callback, but it updates a tqdm bar right after it
    appends a window's segments to ``all_segments``: for the duration of the call
    the bar is replaced by one that reads those segments and the window's end
    (``seek`` of ``content_frames``) from the caller's frame. If a future whisper
    renames them, segments arrive with the result instead, and progress from the
    bar's own counts. Module state: one transcription at a time per process.
    """
    # The module, not the function: ``whisper.transcribe`` the attribute is the function.
    transcribe_module = importlib.import_module("whisper.transcribe")

    class Bar:
        def __init__(self, *args: Any, total: int | None = None, **kwargs: Any) -> None:
            self.total, self.done = total or 0, 0

        def __enter__(self) -> Bar:
            return self

        def __exit__(self, *exc: Any) -> None:
            return None

        def update(self, n: int) -> None:
            self.done += n
            state = sys._getframe(1).f_locals
            total = state.get("content_frames", self.total)
            seek = state.get("seek", self.done)
            callback(state, min(1.0, max(min(seek, total) / total, 0.0)) if total else 1.0)

    real = transcribe_module.tqdm
    transcribe_module.tqdm = types.SimpleNamespace(tqdm=Bar)
    try:
        yield
    finally:
        transcribe_module.tqdm = real
