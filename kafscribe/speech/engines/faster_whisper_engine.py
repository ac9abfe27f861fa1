"""faster-whisper (CTranslate2): int8 on CPU, float16 on CUDA by default.

Batched option (``KAFSCRIBE_ENGINE_BATCH_SIZE`` > 0): audio of at least
``KAFSCRIBE_ENGINE_BATCH_MIN_AUDIO_S`` goes through faster-whisper's
``BatchedInferencePipeline``: its bundled Silero VAD (works offline) cuts the
speech into windows of up to 30 s that are decoded ``batch_size`` at a time.
Shorter audio, and every job when the size is 0, is decoded window after
window. Measured speed-up and word recall: docs/benchmarks.md, "Batched vs sequential".
"""

from __future__ import annotations

import numpy as np

from kafscribe.settings import Settings
from kafscribe.speech.decoding import DEFAULT_ENGINE_OPTIONS, EngineOptions
from kafscribe.speech.engines.base import (
    EngineError,
    OnSegment,
    ShouldContinue,
    TranscriptionOutput,
    check_continue,
    check_deadline,
    ct2_model_dir,
    is_multilingual,
    join_text,
    resolve_device,
    split_device,
    word,
)
from kafscribe.speech.sizing import usable_cores
from schemas.events import Segment


class FasterWhisperEngine:
    name = "faster-whisper"

    def __init__(self, settings: Settings, model: str) -> None:
        from faster_whisper import WhisperModel

        self.device = resolve_device(settings.device)
        kind, index = split_device(self.device)  # CTranslate2 takes cuda:1 as device="cuda", device_index=1
        compute_type = settings.compute_type
        if compute_type == "default":
            compute_type = "float16" if kind == "cuda" else "int8"
        self.model_name = model
        self.multilingual = is_multilingual(model)
        self.beam_size = settings.beam_size
        try:
            self._model = WhisperModel(
                ct2_model_dir(settings, model),
                device=kind,
                device_index=index,
                compute_type=compute_type,
                cpu_threads=settings.cpu_threads or usable_cores(),  # 0: alone on this host
            )
        except Exception as exc:  # noqa: BLE001 - report any loader failure with the model named
            raise EngineError(f"cannot load faster-whisper model {model!r}: {exc}") from exc
        self.batch_size = settings.engine_batch_size
        self.batch_min_audio_s = settings.engine_batch_min_audio_s
        self._batched = None
        if self.batch_size > 0:
            from faster_whisper import BatchedInferencePipeline

            self._batched = BatchedInferencePipeline(self._model)

    def transcribe(
        self, audio: np.ndarray, options: EngineOptions = DEFAULT_ENGINE_OPTIONS, *, deadline: float | None = None,
        on_segment: OnSegment | None = None, should_continue: ShouldContinue | None = None,
    ) -> TranscriptionOutput:
        """``base.Engine.transcribe``."""
        decoding = options.decoder_kwargs()  # initial_prompt=, and temperature= when given
        language, task = (options.language, options.task) if self.multilingual else ("en", "transcribe")
        beam_size = options.beam_size or self.beam_size
        check_deadline(deadline)
        check_continue(should_continue)
        # vad_filter runs the Silero model bundled in faster-whisper's package (ONNX): no download.
        if self._batched is not None and len(audio) >= self.batch_min_audio_s * 16000:
            # the batched pipeline cuts the audio at VAD speech stretches itself (vad_filter is its default)
            segments_iter, info = self._batched.transcribe(
                audio, language=language, task=task, beam_size=beam_size, batch_size=self.batch_size,
                word_timestamps=options.word_timestamps, vad_filter=True, **decoding,
            )
        else:
            segments_iter, info = self._model.transcribe(
                audio, language=language, task=task, beam_size=beam_size,
                word_timestamps=options.word_timestamps, vad_filter=options.vad_filter, **decoding,
            )
        segments = []
        for i, s in enumerate(segments_iter):  # a generator: each step decodes a window
            check_deadline(deadline)
            check_continue(should_continue)
            segments.append(Segment(
                id=i, start=float(s.start), end=float(s.end), text=s.text,
                avg_logprob=float(s.avg_logprob), no_speech_prob=float(s.no_speech_prob),
                words=[word(w.word, w.start, w.end, w.probability) for w in s.words or ()],
                temperature=None if s.temperature is None else float(s.temperature),
            ))
            if on_segment is not None:
                on_segment(segments[-1], min(1.0, float(s.end) / info.duration) if info.duration else 1.0)
        return TranscriptionOutput(
            language=info.language,
            language_probability=float(info.language_probability),
            duration=float(info.duration),
            text=join_text(segments),
            segments=segments,
        )
