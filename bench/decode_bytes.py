"""Bytes a decode step moves and a benchmark job holds, from the model config (the floors of
bench.decode and bench.multi_gpu; the byte model is stated in bench.decode's docstring)."""
from __future__ import annotations

import jax

from hata_jax import HataConfig
from hata_jax.models import LlamaConfig


def param_bytes(state) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


def weight_bytes(config: LlamaConfig, itemsize: int) -> int:
    """Bytes of the parameters of a model with `config` at `itemsize` bytes each (before building it)."""
    per_layer = (config.hidden_size * config.head_dim * 2 * (config.num_heads + config.num_kv_heads)
                 + 3 * config.hidden_size * config.intermediate_size + 2 * config.hidden_size)
    tables = (1 if config.tie_word_embeddings else 2) * config.vocab_size * config.hidden_size
    return (config.num_layers * per_layer + tables + config.hidden_size) * itemsize


def weight_read_bytes(config: LlamaConfig, total_param_bytes: int, itemsize: int) -> int:
    """Weights one step reads: all but the embedding table, unless it doubles as the LM head."""
    table = config.vocab_size * config.hidden_size * itemsize
    return total_param_bytes if config.tie_word_embeddings else total_param_bytes - table


def attention_bytes(config: LlamaConfig, method: str, batch: int, length: int, hata: HataConfig, itemsize: int,
                    selection_bytes: float | None = None) -> int:
    """Bytes one layer's attention reads for `batch` sequences of `length` tokens (see the module
    docstring): dense and cudnn K and V; a selecting method what choosing reads per token and KV head
    (hata: its codes and norm; exact: the key; any other selector: `selection_bytes`, required for it,
    as :func:`hata_jax.evaluation.frontier.selection_bytes_per_token` gives it) plus the chosen
    tokens' K, V and index."""
    row = config.head_dim * itemsize
    if method in ("dense", "cudnn"):
        return batch * config.num_kv_heads * 2 * length * row
    choosing = {"hata": hata.rbit // 8 + 4, "exact": row}.get(method, selection_bytes)
    if choosing is None:
        raise ValueError(f"method {method!r}: pass selection_bytes (bytes per token and KV head its choosing reads)")
    per_head = length * choosing + min(hata.budget, length) * (2 * row + 4)
    return int(batch * config.num_kv_heads * per_head)


def step_bytes(config, method, batch, length, hata, itemsize, weights_read, dense_layers: int,
               selection_bytes: float | None = None) -> int:
    """Bytes one decode step reads: the weights, `dense_layers` dense layers and the rest `method`'s
    (`selection_bytes` as :func:`attention_bytes` takes it)."""
    hata_layers = 0 if method in ("dense", "cudnn") else config.num_layers - min(dense_layers, config.num_layers)
    dense = attention_bytes(config, "dense", batch, length, hata, itemsize)
    sparse = attention_bytes(config, method, batch, length, hata, itemsize, selection_bytes) if hata_layers else 0
    return weights_read + (config.num_layers - hata_layers) * dense + hata_layers * sparse


def cache_bytes(config: LlamaConfig, batch: int, capacity: int, rbit: int, itemsize: int, token_major: bool) -> int:
    """All layers' caches: K, V (+ codes and norms for the head-major HataCache)."""
    per_token = config.num_kv_heads * (2 * config.head_dim * itemsize + (0 if token_major else rbit // 8 + 4))
    return config.num_layers * batch * capacity * per_token
