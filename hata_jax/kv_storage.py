"""A caller's K/V storage as the ops read and write it: layout, pages and quantization.

The ops of :mod:`hata_jax` read keys and values where the caller keeps them. A storage is the
arrays `k`, `v` plus four static or array choices, passed by keyword to every op that reads it:

- `seq_axis`: 2 for `[.., kv_heads, seq, head_dim]`, 1 for `[.., seq, kv_heads, head_dim]`.
- `page_table`: None for one buffer per sequence, `k, v: [batch, ...]` (capacity `seq`); or
  int32[batch, pages_per_sequence] for page pools `k, v: [pages, ...]` shared by the batch
  (vLLM's `[pages, page_size, kv_heads, head_dim]` is `seq_axis=1`): position `p` of sequence
  `b` is row `p % page_size` of page `page_table[b, p // page_size]` (capacity
  `pages_per_sequence x page_size`). A table entry outside `[0, pages)` marks a page not held:
  reading a position on it gives NaN for that (sequence, KV head), a write to it is dropped.
- `k_scale`, `v_scale`: None for float K/V (bf16, fp16, fp32); for quantized K/V (int8, fp8
  e4m3 or e5m2) float scales, either one per row and KV head (laid out as k without head_dim)
  or one per KV head (`[kv_heads]`); a stored row means `scale x row`.

Nothing here copies the storage: the reference paths gather the rows they read, the Pallas
kernels (:mod:`pallas_kernels.flash_decode`) address them in place.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from hata_jax import checks
from pallas_kernels.backend import QUANTIZED_DTYPES

# The largest magnitude a quantized row stores (symmetric absmax quantization, see `quantize`).
QUANT_MAX = {jnp.dtype(jnp.int8): 127.0, jnp.dtype(jnp.float8_e4m3fn): 448.0, jnp.dtype(jnp.float8_e5m2): 57344.0}


def storage_layout(paged: bool, seq_axis: int) -> str:
    """k's axes in words, for error messages."""
    if not paged:
        return checks.CACHE_LAYOUTS[seq_axis]
    return "[pages, kv_heads, page_size, head_dim]" if seq_axis == 2 else "[pages, page_size, kv_heads, head_dim]"


@dataclasses.dataclass(frozen=True)
class KVShape:
    """What a storage holds: `kv_heads`, `head_dim`, `capacity` positions per sequence (and
    `page_size`, 0 when unpaged)."""

    kv_heads: int
    head_dim: int
    capacity: int
    page_size: int


def check_storage(k, v, *, batch: int, seq_axis: int, page_table=None, k_scale=None, v_scale=None,
                  q_heads: int | None = None, batch_of: str = "q") -> KVShape:
    """Raise a ValueError naming the argument (and the expected layout) unless k, v, page_table,
    k_scale and v_scale form a storage (module docstring) for `batch` sequences (the batch size
    of the argument `batch_of`) whose KV heads divide `q_heads` (when given)."""
    paged = page_table is not None
    layout = storage_layout(paged, seq_axis)
    checks.check_rank(k, 4, "k", layout)
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if k_scale is None and v_scale is None:
        checks.check_floating(k, "k")
        checks.check_floating(v, "v")
    if jnp.result_type(v) != jnp.result_type(k):
        raise ValueError(f"k and v must share a dtype, got {jnp.result_type(k)} and {jnp.result_type(v)}")
    heads_axis = 3 - seq_axis
    kv_heads, seq, head_dim = k.shape[heads_axis], k.shape[seq_axis], k.shape[3]
    if q_heads is not None and not paged:
        checks.check_kv_heads(k, q_heads, "k", seq_axis, f"pass seq_axis={3 - seq_axis}")
    elif q_heads is not None and (kv_heads <= 0 or q_heads % kv_heads):
        raise ValueError(f"k must be {layout} with KV heads dividing the {q_heads} query heads; got shape "
                         f"{tuple(k.shape)}")
    if (k_scale is None) != (v_scale is None):
        raise ValueError("k_scale and v_scale must be given together (a quantized cache) or both be None")
    dtype = jnp.dtype(jnp.result_type(k))
    if k_scale is not None:
        if dtype not in QUANTIZED_DTYPES:
            raise ValueError(f"k and v with scales must be quantized: int8, float8_e4m3fn or float8_e5m2, got {dtype}")
        token_shape = tuple(k.shape[:3])
        for name, x in (("k_scale", k_scale), ("v_scale", v_scale)):
            checks.check_floating(x, name)
            if tuple(jnp.shape(x)) not in (token_shape, (kv_heads,)):
                raise ValueError(f"{name} must have shape {list(token_shape)} (one scale per row: k's layout "
                                 f"{layout} without head_dim) or [{kv_heads}] (one per KV head), got "
                                 f"{list(jnp.shape(x))}")
        if jnp.shape(k_scale) != jnp.shape(v_scale):
            raise ValueError(f"k_scale and v_scale must have one shape, got {list(jnp.shape(k_scale))} and "
                             f"{list(jnp.shape(v_scale))}")
    if not paged:
        if k.shape[0] != batch:
            raise ValueError(f"{batch_of} has batch size {batch} but k has {k.shape[0]} (shape {tuple(k.shape)}, "
                             f"{layout})")
        return KVShape(kv_heads, head_dim, seq, 0)
    checks.check_rank(page_table, 2, "page_table", "[batch, pages_per_sequence]")
    checks.check_dtype(page_table, [jnp.int32], "page_table")
    checks.check_dim(page_table, 0, batch, "page_table", "batch size")
    return KVShape(kv_heads, head_dim, page_table.shape[1] * seq, seq)


def shape_of(k, seq_axis: int, page_table=None) -> KVShape:
    """What a (checked) storage holds, read from the arrays themselves: inside `shard_map` these
    are the local KV heads."""
    capacity, page_size = _capacity(k, seq_axis, page_table)
    return KVShape(k.shape[3 - seq_axis], k.shape[3], capacity, page_size)


def _capacity(x, seq_axis: int, page_table) -> tuple[int, int]:
    """(positions per sequence, page size or 0) of k, v or a per-row scale (k without D: the
    sequence axis at the same place)."""
    if page_table is None:
        return x.shape[seq_axis], 0
    return page_table.shape[1] * x.shape[seq_axis], x.shape[seq_axis]


def storage_args(seq_axis, page_table, k_scale, v_scale) -> dict:
    """The storage keywords with the arrays as jax arrays (lists and numpy too) and seq_axis
    checked; a ValueError names a bad one (the rest is :func:`check_storage`'s)."""
    return {
        "seq_axis": checks.check_seq_axis(seq_axis),
        "page_table": None if page_table is None else checks.as_array(page_table, "page_table", "int"),
        "k_scale": None if k_scale is None else checks.as_array(k_scale, "k_scale"),
        "v_scale": None if v_scale is None else checks.as_array(v_scale, "v_scale"),
    }


def layouts(seq_axis: int, paged: bool, scales_shape) -> dict:
    """The :mod:`hata_jax.explicit` layout strings of a storage's arrays ("k", "v", "page_table",
    "k_scale", "v_scale"): a page pool is not split by batch (its pages belong to any sequence),
    only by KV heads."""
    kv = ("bh.." if seq_axis == 2 else "b.h.") if not paged else (".h.." if seq_axis == 2 else "..h.")
    token = kv[:3]
    scale = None if scales_shape is None else "h" if len(scales_shape) == 1 else token
    return {"k": kv, "v": kv, "page_table": "b." if paged else None, "k_scale": scale, "v_scale": scale}


def _locate(x, positions, seq_axis: int, page_table):
    """Where rows at int[B, Hkv, N] positions are in x (k, v or a per-row scale): (lead, row) with
    x[lead, head, row] / x[lead, row, head] the row, and inside bool[B, Hkv, N]: the position is in
    [0, capacity) and, paged, on a page of the pool (the others index row 0 of entry 0)."""
    capacity, page_size = _capacity(x, seq_axis, page_table)
    inside = (positions >= 0) & (positions < capacity)
    positions = jnp.where(inside, positions, 0)
    if page_table is None:
        return jnp.arange(positions.shape[0])[:, None, None], positions, inside
    page = jnp.take_along_axis(page_table[:, None, :], positions // page_size, axis=2)
    inside = inside & (page >= 0) & (page < x.shape[0])
    return jnp.where(inside, page, 0), jnp.where(inside, positions % page_size, 0), inside


def _index(lead, row, heads: int, seq_axis: int) -> tuple:
    head = jnp.arange(heads)[None, :, None]
    return (lead, head, row) if seq_axis == 2 else (lead, row, head)


def gather_rows(x, scale, positions, *, seq_axis: int, page_table):
    """The rows of k or v (with its scale, or None) at positions int[B, Hkv, N], dequantized to
    float32[B, Hkv, N, D], and which were held (bool[B, Hkv, N]; rows not held are 0)."""
    lead, row, inside = _locate(x, positions, seq_axis, page_table)
    index = _index(lead, row, positions.shape[1], seq_axis)
    rows = x[index].astype(jnp.float32)
    if scale is not None:
        rows = rows * (scale[index] if jnp.ndim(scale) == 3 else scale[None, :, None]).astype(jnp.float32)[..., None]
    return jnp.where(inside[..., None], rows, 0.0), inside


def dequantized(x, scale, seq_axis: int):
    """An unpaged storage's k or v as float32 [B, Hkv, S, D] (head-major), scaled if quantized."""
    x = (x if seq_axis == 2 else jnp.swapaxes(x, 1, 2)).astype(jnp.float32)
    if scale is None:
        return x
    scale = scale[None, :, None] if jnp.ndim(scale) == 1 else (scale if seq_axis == 2 else jnp.swapaxes(scale, 1, 2))
    return x * scale.astype(jnp.float32)[..., None]


def quantize(x, dtype, scale=None):
    """Symmetric absmax quantization of rows x float[..., D] into `dtype` (int8 or fp8).

    scale: None for one scale per row (`max |x| / QUANT_MAX[dtype]`, 1 for an all-zero row), or
    given (broadcastable to x without D, e.g. a per-KV-head scale). Returns (stored rows in
    `dtype`, float32 scales of x's shape without D).
    """
    if jnp.dtype(dtype) not in QUANT_MAX:
        raise ValueError(f"quantize: dtype must be one of {[str(d) for d in QUANT_MAX]}, got {jnp.dtype(dtype)}")
    x = x.astype(jnp.float32)
    qmax = QUANT_MAX[jnp.dtype(dtype)]
    if scale is None:
        amax = jnp.max(jnp.abs(x), axis=-1)
        scale = jnp.where(amax > 0, amax / qmax, 1.0)
    scale = jnp.broadcast_to(jnp.asarray(scale, jnp.float32), x.shape[:-1])
    scaled = jnp.clip(x / scale[..., None], -qmax, qmax)
    stored = jnp.round(scaled) if jnp.issubdtype(dtype, jnp.integer) else scaled
    return stored.astype(dtype), scale


def write_rows(x, values, positions, *, seq_axis: int, page_table):
    """x (k, v or a per-row scale) with rows written: values [B, Hkv, T, (D)] at positions
    int[B, T]. Returns (x, written bool[B, Hkv, T]): a position outside [0, capacity) or on a page
    outside the pool is dropped, never wrapped."""
    positions = jnp.broadcast_to(positions[:, None, :], values.shape[:3])
    lead, row, inside = _locate(x, positions, seq_axis, page_table)
    lead = jnp.where(inside, lead, x.shape[0])  # an out-of-bounds lead index: the scatter drops the write
    index = _index(lead, row, values.shape[1], seq_axis)
    return x.at[index].set(values.astype(x.dtype), mode="drop"), inside
