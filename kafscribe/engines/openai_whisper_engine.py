"""openai-whisper (PyTorch), the reference implementation.

Offline, a packaged CTranslate2 model is converted once into a Whisper
checkpoint (``kafscribe.models.ct2_to_whisper``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from schemas.events import Segment

from ..models import offline
from ..settings import Settings
from .base import EngineError, TranscriptionOutput, check_deadline, is_multilingual, join_text, resolve_device


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
        self, audio: np.ndarray, *, language: str | None, task: str, deadline: float | None = None
    ) -> TranscriptionOutput:
        import torch
        import whisper

        check_deadline(deadline)
        probability = 1.0
        if not self.multilingual:
            language, task = "en", "transcribe"
        elif language is None:
            mel = whisper.log_mel_spectrogram(
                whisper.pad_or_trim(audio), self._model.dims.n_mels
            ).to(self._model.device)
            with torch.no_grad():
                _, probs = self._model.detect_language(mel)
            language = max(probs, key=probs.get)
            probability = float(probs[language])
        model = self._model
        decode_window = model.decode

        def decode_before_deadline(*args, **kwargs):  # whisper.transcribe decodes window by window
            check_deadline(deadline)
            return decode_window(*args, **kwargs)

        model.decode = decode_before_deadline  # one job at a time per engine
        try:
            result = model.transcribe(
                audio,
                language=language,
                task=task,
                fp16=self.device.startswith("cuda"),
                beam_size=self.beam_size,
                verbose=None,
            )
        finally:
            del model.decode  # back to the class's method
        segments = [
            Segment(
                id=i, start=float(s["start"]), end=float(s["end"]), text=s["text"],
                avg_logprob=float(s["avg_logprob"]), no_speech_prob=float(s["no_speech_prob"]),
            )
            for i, s in enumerate(result["segments"])
        ]
        return TranscriptionOutput(
            language=language,
            language_probability=probability,
            duration=len(audio) / whisper.audio.SAMPLE_RATE,
            text=join_text(segments),
            segments=segments,
        )
