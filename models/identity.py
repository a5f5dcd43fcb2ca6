"""Which model samples and checkpoints belong to: its architecture and a fingerprint of its weights.

The fingerprint hashes every layer's q and k projection (and bias) rounded to bfloat16, so the same
checkpoint loaded in float32 or bfloat16 matches, while another model (or a fine-tune of the
same architecture) does not.
"""
from __future__ import annotations

import dataclasses
import hashlib

import ml_dtypes
import numpy as np

# Architecture fields that decide the shape or the meaning of post-RoPE q and k.
ARCHITECTURE_FIELDS = ("model_type", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                       "head_dim", "rope_theta", "rope_scaling", "rope_freq_factors", "qkv_bias")


def architecture(config) -> dict:
    """The JSON-able architecture of a :class:`hata_jax.models.LlamaConfig` (the fields above)."""
    full = dataclasses.asdict(config)
    out = {}
    for name in ARCHITECTURE_FIELDS:
        value = full[name]
        out[name] = list(value) if isinstance(value, tuple) else value
    return out


def fingerprint(model) -> str:
    """sha256 of every layer's q/k projection weights (and biases) rounded to bfloat16."""
    digest = hashlib.sha256()
    for layer in model.layers:
        attn = layer.self_attn
        for proj in (attn.q_proj, attn.k_proj):
            parts = [proj.kernel] + ([proj.bias] if proj.bias is not None else [])
            for param in parts:
                array = np.asarray(param[...], np.float32).astype(ml_dtypes.bfloat16)
                digest.update(array.tobytes())
    return digest.hexdigest()


def model_identity(model, name: str) -> dict:
    """{"name", "architecture", "fingerprint"} of a loaded model; `name` is how it was given."""
    return {"name": name, "architecture": architecture(model.config), "fingerprint": fingerprint(model)}


def check_same_model(saved: dict, model, what: str) -> None:
    """Raise a ValueError unless `saved` (a :func:`model_identity`) describes `model`."""
    current = architecture(model.config)
    saved_arch = saved.get("architecture", {})
    differ = [f"{k}: {saved_arch.get(k)!r} there, {current[k]!r} here"
              for k in current if saved_arch.get(k) != current[k]]
    if differ:
        raise ValueError(f"{what} was made for another model ({saved.get('name')}): the architecture differs "
                         f"({'; '.join(differ)})")
    if saved.get("fingerprint") != fingerprint(model):
        raise ValueError(f"{what} was made for another model ({saved.get('name')}): same architecture, but the "
                         "q/k projection weights differ (fingerprint mismatch)")
