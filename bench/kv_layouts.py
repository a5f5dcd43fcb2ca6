"""Caller storages of K/V built from a plain cache, for the checks, benchmarks and tests of
:mod:`hata_jax.kv_storage`: the layouts, pages and quantizations that models keep."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from hata_jax import kv_storage

# The storages the checks and benchmarks cover: (seq_axis, paged, quantization).
KINDS = {
    "head-major": (2, False, None),
    "seq-major": (1, False, None),
    "paged": (1, True, None),
    "paged head-major": (2, True, None),
    "int8": (2, False, "int8"),
    "paged int8": (1, True, "int8"),
    "fp8 per-head": (1, False, "fp8-head"),
}


def make_storage(rng, k, v, seq_axis: int, paged: bool, quant: str | None, *, page_size: int = 16,
                 spare_pages: int = 3, logical: bool = True):
    """The plain cache k, v [B, Hkv, S, D] stored as a model might keep it.

    seq_axis: 2 or 1 (the layout of k and v, or of the pages); paged: in a pool of `page_size`
    pages (`spare_pages` more than the batch needs, shuffled: a sequence's pages lie anywhere);
    quant: None, "int8" (per-row absmax scales) or "fp8-head" (e4m3 with fixed per-KV-head
    scales drawn from `rng`). Returns (the storage keywords of the attention ops with k and v,
    the dequantized plain k, v float32[B, Hkv, S, D], or None, None unless `logical`)."""
    b, hkv, s, d = k.shape
    storage = {"seq_axis": seq_axis, "page_table": None, "k_scale": None, "v_scale": None}
    if quant == "int8":
        (k, ks), (v, vs) = kv_storage.quantize(k, jnp.int8), kv_storage.quantize(v, jnp.int8)
    elif quant == "fp8-head":  # fixed scales: |x| / scale stays below fp8 e4m3's 448
        ks = jnp.asarray(rng.uniform(0.015, 0.03, hkv), jnp.float32)
        vs = 1.5 * ks
        k, v = (kv_storage.quantize(x, jnp.float8_e4m3fn, scale[None, :, None])[0] for x, scale in ((k, ks), (v, vs)))
    if quant is None:
        ks = vs = None
    logical_k = kv_storage.dequantized(k, ks, 2) if logical else None
    logical_v = kv_storage.dequantized(v, vs, 2) if logical else None
    if seq_axis == 1:
        k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
        if ks is not None and ks.ndim == 3:
            ks, vs = jnp.swapaxes(ks, 1, 2), jnp.swapaxes(vs, 1, 2)
    if paged:
        per_seq = -(-s // page_size)
        pages = b * per_seq + spare_pages
        table = rng.permutation(pages)[: b * per_seq].reshape(b, per_seq).astype(np.int32)

        def to_pool(x):  # [B, S, ...] or [B, h, S, ...] by seq_axis -> pool of pages
            x = x if seq_axis == 1 else jnp.moveaxis(x, 2, 1)  # sequence axis second
            x = jnp.pad(x, [(0, 0), (0, per_seq * page_size - s)] + [(0, 0)] * (x.ndim - 2))
            x = x.reshape(b * per_seq, page_size, *x.shape[2:])
            pool = jnp.zeros((pages, *x.shape[1:]), x.dtype).at[table.reshape(-1)].set(x)
            return pool if seq_axis == 1 else jnp.moveaxis(pool, 1, 2)

        k, v = to_pool(k), to_pool(v)
        if ks is not None and ks.ndim == 3:
            ks, vs = to_pool(ks), to_pool(vs)
        storage["page_table"] = jnp.asarray(table)
    storage.update(k_scale=ks, v_scale=vs)
    return dict(storage, k=k, v=v), logical_k, logical_v
