"""Load a GGUF file (llama.cpp's format) into HF-named float32 tensors and a :class:`LlamaConfig`.

The `gguf` package reads and dequantizes (Q4_1, Q8_0, F16, ...). llama.cpp's converter permutes
the rows of the q and k projections of "llama" models, within each head, from HF's split-half
RoPE layout `(half, pair)` to the interleaved `(pair, half)` one; :func:`unpermute_rows` undoes it.
"""
from __future__ import annotations

import pathlib
import re

import numpy as np

from hata_jax.models.config import LlamaConfig, RopeScaling

SUPPORTED_ARCHS = ("llama", "qwen2")
# GGUF per-layer tensor name -> HF name (without the `model.layers.{i}.` prefix).
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
ROPE_FREQS = "rope_freqs.weight"


def open_gguf(path: str | pathlib.Path):
    """A `gguf.GGUFReader` on `path`, with a clear error for a missing or corrupt file."""
    import gguf

    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"GGUF file {path} does not exist")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as err:  # the reader raises ValueError/IndexError/struct errors on a bad file
        raise ValueError(f"cannot read {path} as GGUF: {type(err).__name__}: {err}") from None


def metadata(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation: rows `[heads * D]` (+ any trailing axes) back to split-half."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_config(reader) -> LlamaConfig:
    arch = metadata(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"unknown architecture {arch!r} in GGUF metadata; supported: {SUPPORTED_ARCHS}")
    names = {t.name for t in reader.tensors}

    def need(key):
        value = metadata(reader, f"{arch}.{key}")
        if value is None:
            raise ValueError(f"GGUF metadata lacks {arch}.{key}")
        return value

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(metadata(reader, f"{arch}.attention.key_length", hidden // heads))
    rope_dim = int(metadata(reader, f"{arch}.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(f"partial rotary embeddings (rope dim {rope_dim} < head dim {head_dim}) are not supported")
    tokens = metadata(reader, "tokenizer.ggml.tokens")
    vocab = metadata(reader, f"{arch}.vocab_size") or (len(tokens) if tokens is not None else None)
    freq_factors = None
    if ROPE_FREQS in names:
        freq_factors = tuple(float(f) for f in _tensor(reader, ROPE_FREQS))
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")),
        num_heads=heads,
        num_kv_heads=int(metadata(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_theta=float(metadata(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(reader, arch),
        rope_freq_factors=freq_factors,
        max_position_embeddings=int(metadata(reader, f"{arch}.context_length", 8192)),
        tie_word_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
        o_bias="blk.0.attn_output.bias" in names,
        mlp_bias="blk.0.ffn_gate.bias" in names,
        model_type=arch,
    )


def _rope_scaling(reader, arch: str) -> RopeScaling | None:
    kind = metadata(reader, f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind != "linear":
        raise ValueError(f"unsupported RoPE scaling {kind!r} in GGUF metadata (supported: linear, rope_freqs)")
    return RopeScaling(rope_type="linear", factor=float(metadata(reader, f"{arch}.rope.scaling.factor", 1.0)))


def _tensor(reader, name: str) -> np.ndarray:
    import gguf

    [t] = [t for t in reader.tensors if t.name == name]
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)


def hf_tensor_name(gguf_name: str) -> str:
    """GGUF tensor name -> HF name, e.g. 'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if match and match.group(2) in LAYER_NAMES:
        layer, part, leaf = match.groups()
        return f"model.layers.{layer}.{LAYER_NAMES[part]}.{leaf}"
    match = re.fullmatch(r"(\w+)\.(weight|bias)", gguf_name)
    if match and match.group(1) in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[match.group(1)]}.{match.group(2)}"
    raise ValueError(f"unexpected GGUF tensor {gguf_name!r} (not part of a supported Llama-family model)")


def gguf_tensors(reader, config: LlamaConfig) -> dict[str, np.ndarray]:
    """{HF name: float32 array in the HF layout} of every weight tensor, dequantized."""
    import gguf

    tensors = {}
    for t in reader.tensors:
        if t.name == ROPE_FREQS:
            continue
        name = hf_tensor_name(t.name)
        array = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        expected_size = int(np.prod(t.shape))
        if array.size != expected_size:
            raise ValueError(f"GGUF tensor {t.name} is truncated: {array.size} values, expected {expected_size}")
        array = array.reshape(tuple(int(n) for n in reversed(t.shape)))
        if config.model_type == "llama" and ".q_proj." in name:
            array = unpermute_rows(array, config.num_heads)
        elif config.model_type == "llama" and ".k_proj." in name:
            array = unpermute_rows(array, config.num_kv_heads)
        tensors[name] = array
    return tensors


def load_gguf(path: str | pathlib.Path):
    """(config, {HF tensor name: float32 array}, reader) of a GGUF file; the reader feeds the tokenizer."""
    reader = open_gguf(path)
    config = gguf_config(reader)
    return config, gguf_tensors(reader, config), reader
