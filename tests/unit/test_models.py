"""Offline weights: packaged CTranslate2 models and their conversion to openai-whisper."""

from __future__ import annotations

import pytest
import torch
import whisper
from whisper.model import ModelDimensions, Whisper

from kafscribe.settings import Settings
from kafscribe.speech import audio
from kafscribe.speech.models import offline
from kafscribe.speech.models.ct2_format import CT2FormatError, read_model
from kafscribe.speech.models.ct2_to_whisper import convert

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache_dir():
    return Settings().cache_dir


def test_packaged_base_is_assembled_from_its_two_parts(cache_dir):
    path = offline.ct2_dir("base", cache_dir)
    model = read_model(path / "model.bin")
    assert model.spec == "WhisperSpec"
    assert model.variables["decoder/embeddings/weight"].shape == (51865, 512)  # multilingual base
    assert sum(1 for k in model.variables if k.endswith("self_attention/linear_0/weight")) == 12
    assert (path / "tokenizer.json").exists() and (path / "config.json").exists()


def test_conversion_matches_whisper_layout_exactly(cache_dir, tmp_path):
    out = convert(offline.ct2_dir("tiny.en", cache_dir), tmp_path / "tiny.en.pt")
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    dims = ModelDimensions(**ckpt["dims"])
    assert (dims.n_audio_layer, dims.n_text_layer, dims.n_audio_state, dims.n_vocab) == (4, 4, 384, 51864)
    reference = Whisper(dims).state_dict()
    assert set(ckpt["model_state_dict"]) == set(reference)
    for name, tensor in ckpt["model_state_dict"].items():
        assert tuple(tensor.shape) == tuple(reference[name].shape), name
    # q|k|v were split: the key projection has no bias, query and value do.
    assert "encoder.blocks.0.attn.key.bias" not in ckpt["model_state_dict"]
    assert "decoder.blocks.0.cross_attn.value.bias" in ckpt["model_state_dict"]


def test_converted_checkpoint_transcribes(cache_dir, clips):
    model = whisper.load_model(str(offline.openai_checkpoint("tiny.en", cache_dir)), device="cpu")
    text = model.transcribe(audio.decode(clips["en"].read_bytes()), fp16=False)["text"].lower()
    assert "quick" in text and "lazy dog" in text


def test_not_a_model_is_refused(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"\x07\x00\x00\x00junk")
    with pytest.raises(CT2FormatError):
        read_model(tmp_path / "model.bin")
    with pytest.raises(offline.ModelUnavailable):
        offline.ct2_dir("large-v9", tmp_path)
