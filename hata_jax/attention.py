"""Decode attention (one query token per sequence) over all or over selected cached tokens."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from hata_jax import checks, dispatch, explicit, kv_storage
from pallas_kernels import flash_decode


def _check_qkv(q, k, v, storage: dict) -> kv_storage.KVShape:
    """q: [B, Hq, D] and a K/V storage (:mod:`hata_jax.kv_storage`) of B sequences whose KV heads
    divide Hq; returns what the storage holds."""
    checks.check_query(q)
    checks.check_floating(q, "q")
    shape = kv_storage.check_storage(k, v, batch=q.shape[0], q_heads=q.shape[1], **storage)
    checks.check_dim(q, 2, shape.head_dim, "q", "head_dim")
    return shape


def head_major(x, seq_axis: int):
    """A cache [B, Hkv, S, D] from either layout (a view for the reference paths' einsums and gathers)."""
    return x if seq_axis == 2 else jnp.swapaxes(x, 1, 2)


def scale_or_default(scale, head_dim: int) -> float:
    """The logit scale: `scale`, or `1 / sqrt(head_dim)` when None."""
    scale = checks.check_scale(scale)
    return 1.0 / math.sqrt(head_dim) if scale is None else scale


def masked_attention(q, k_rows, v_rows, mask, scale: float):
    """Softmax attention of each group's query heads over given rows, in float32.

    q: [B, Hq, D]; k_rows, v_rows: [B, Hkv, N, D]; mask: bool broadcastable to [B, Hkv, 1, N].
    Returns (out float32[B, Hq, D], lse float32[B, Hq]); a head with no unmasked row gets
    out = 0 and lse = -inf.
    """
    b, hq, d = q.shape
    hkv = k_rows.shape[1]
    qg = q.reshape(b, hkv, hq // hkv, d).astype(jnp.float32)
    logits = jnp.einsum("bhgd,bhnd->bhgn", qg, k_rows.astype(jnp.float32), precision=lax.Precision.HIGHEST) * scale
    logits = jnp.where(mask, logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(logits - m)
    denom = jnp.sum(p, axis=-1)
    out = jnp.einsum("bhgn,bhnd->bhgd", p, v_rows.astype(jnp.float32), precision=lax.Precision.HIGHEST)
    out = out / jnp.where(denom > 0, denom, 1.0)[..., None]
    lse = jnp.where(denom > 0, m[..., 0] + jnp.log(denom), -jnp.inf)
    return out.reshape(b, hq, d), lse.reshape(b, hq)


def chunk_attention(q, k, v, mask, scale: float):
    """Attention of a chunk's queries (several per sequence) over rows, with the partial's
    log-sum-exp (:func:`masked_attention` with the chunk's tokens as more query heads).

    q: [B, C, Hq, D]; k, v: [B, Hkv, N, D]; mask: bool broadcastable to [B, 1, G * C, N] (query row
    `g * C + t`: head `g` of a KV head's group of G, token `t`) -> (out float32[B, C, Hq, D],
    lse float32[B, C, Hq]).
    """
    b, c, hq, d = q.shape
    rows = q.transpose(0, 2, 1, 3).reshape(b, hq * c, d)  # KV-head major: a head's G * C rows in a run
    out, lse = masked_attention(rows, k, v, mask, scale)
    return out.reshape(b, hq, c, d).transpose(0, 2, 1, 3), lse.reshape(b, hq, c).transpose(0, 2, 1)


def _finish(out, lse, dtype, return_lse: bool):
    out = out.astype(dtype)
    return (out, lse) if return_lse else out


_STORAGE_DOC = """      seq_axis, page_table, k_scale, v_scale: how k and v are stored (see
        :mod:`hata_jax.kv_storage`): `[B, Hkv, S, D]` (seq_axis 2, default) or `[B, S, Hkv, D]`
        (seq_axis 1); with `page_table` int32[B, pages_per_sequence], page pools
        `[pages, Hkv, page_size, D]` / `[pages, page_size, Hkv, D]`; with `k_scale`, `v_scale`,
        quantized K/V (int8 or fp8) and their float scales (k's shape without D, or [Hkv])."""


def sparse_decode_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    idx: jax.Array,
    count: jax.Array,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    seq_axis: int = 2,
    page_table: jax.Array | None = None,
    k_scale: jax.Array | None = None,
    v_scale: jax.Array | None = None,
    impl: str = "auto",
):
    """Attention of each query head over the cached rows its KV head selected.

    Args:
      q: float[B, Hq, D]; k, v: the cache's keys and values, read in place (see below).
      idx: int32[B, Hkv, K]: slots `< count` hold positions in [0, capacity); the rest are
        ignored. A position outside [0, capacity), or on a page the table does not hold, in a
        used slot makes that (b, h)'s output NaN (never a clipped or wrapped read).
      count: int32[B, Hkv] valid slots per row.
      scale: logit scale, default `1 / sqrt(D)`.
      return_lse: also return the log-sum-exp of the scaled logits, float32[B, Hq].
{storage}

    Returns:
      out [B, Hq, D] in q's dtype (softmax in float32), and lse if asked. A row with
      count 0 gives out = 0, lse = -inf.
    """
    q, k, v = checks.as_array(q, "q"), checks.as_array(k, "k", "number"), checks.as_array(v, "v", "number")
    idx, count = checks.as_array(idx, "idx", "int"), checks.as_array(count, "count", "int")
    storage = kv_storage.storage_args(seq_axis, page_table, k_scale, v_scale)
    shape = _check_qkv(q, k, v, storage)
    rows = (q.shape[0], shape.kv_heads)
    checks.check_rank(idx, 3, "idx", "[batch, kv_heads, budget]")
    checks.check_dtype(idx, [jnp.int32], "idx")
    if tuple(idx.shape[:2]) != rows:
        raise ValueError(f"idx must have shape [batch, kv_heads, budget] = {rows} + [budget], got {tuple(idx.shape)}")
    if tuple(jnp.shape(count)) != rows:
        raise ValueError(f"count must have shape {rows}, got {tuple(jnp.shape(count))}")
    checks.check_integer(count, "count")
    scale = scale_or_default(scale, q.shape[-1])
    path = dispatch.resolve("sparse_decode_attention", impl)

    def run(q, k, v, idx, count, page_table, k_scale, v_scale):
        kw = dict(storage, page_table=page_table, k_scale=k_scale, v_scale=v_scale)
        shape = kv_storage.shape_of(k, kw["seq_axis"], page_table)  # the local KV heads under shard_map
        if path.pallas:
            return flash_decode.sparse_decode_attention(q, k, v, idx, count.astype(jnp.int32), scale=scale,
                                                        return_lse=return_lse, interpret=path.interpret, **kw)
        used = jnp.arange(idx.shape[2])[None, None, :] < count[..., None]
        k_rows, held = kv_storage.gather_rows(k, k_scale, idx, seq_axis=kw["seq_axis"], page_table=page_table)
        v_rows, _ = kv_storage.gather_rows(v, v_scale, idx, seq_axis=kw["seq_axis"], page_table=page_table)
        out, lse = masked_attention(q, k_rows, v_rows, used[:, :, None, :], scale)
        outside = jnp.any(used & ~held, axis=2)  # [B, Hkv]
        out = jnp.where(jnp.repeat(outside, q.shape[1] // shape.kv_heads, axis=1)[..., None], jnp.nan, out)
        return _finish(out, lse, q.dtype, return_lse)

    return _per_shard(run, (q, k, v, idx, count), ("bh.", "bh"), storage, return_lse)


def _per_shard(run, args, row_layouts, storage, return_lse):
    """`explicit.per_shard` of an attention op: args (q, k, v, *rows) then the storage's arrays;
    k leads (a page pool splits by KV heads only)."""
    layouts = kv_storage.layouts(storage["seq_axis"], storage["page_table"] is not None,
                                 None if storage["k_scale"] is None else jnp.shape(storage["k_scale"]))
    extra = (storage["page_table"], storage["k_scale"], storage["v_scale"])
    arg_layouts = ("bh.", layouts["k"], layouts["v"], *row_layouts, layouts["page_table"], layouts["k_scale"],
                   layouts["v_scale"])
    return explicit.per_shard(run, (*args, *extra), arg_layouts, ("bh.", "bh") if return_lse else "bh.", lead=1)


def dense_decode_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    *,
    starts: jax.Array | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    seq_axis: int = 2,
    page_table: jax.Array | None = None,
    k_scale: jax.Array | None = None,
    v_scale: jax.Array | None = None,
    ring: bool = False,
    impl: str = "auto",
):
    """Attention of each query head over the cached rows `[starts[b], lengths[b])` of its KV head.

    Args:
      q: float[B, Hq, D]; k, v: the cache's keys and values, read in place (see below).
      lengths: int[B] in [0, capacity]: the end (exclusive) of each sequence's rows.
      starts: int[B] in [0, lengths[b]], the first row of each sequence (a left-padded cache:
        the padding before it is never attended); None: 0.
      ring: the rows wrap around the capacity S (a ring buffer, one buffer per sequence): row p
        is slot `p % S`, starts in [0, S) and lengths in [starts[b], starts[b] + S].
      scale: logit scale, default `1 / sqrt(D)`.
      return_lse: also return the log-sum-exp of the scaled logits, float32[B, Hq].
{storage}

    Returns:
      out [B, Hq, D] in q's dtype (softmax in float32), and lse float32[B, Hq] if asked. A
      sequence whose rows lie on a page the table does not hold gets NaN.
    """
    q, k, v = checks.as_array(q, "q"), checks.as_array(k, "k", "number"), checks.as_array(v, "v", "number")
    lengths = checks.as_array(lengths, "lengths", "int")
    storage = kv_storage.storage_args(seq_axis, page_table, k_scale, v_scale)
    shape = _check_qkv(q, k, v, storage)
    starts = None if starts is None else checks.as_array(starts, "starts", "int")
    if ring:
        if storage["page_table"] is not None:
            raise ValueError("ring=True reads one buffer per sequence: it does not go with a page_table")
        checks.check_ring(jnp.zeros_like(lengths) if starts is None else starts, lengths, q.shape[0], shape.capacity)
    else:
        checks.check_lengths(lengths, q.shape[0], shape.capacity)
        if starts is not None:
            checks.check_starts(starts, lengths, q.shape[0], shape.capacity)
    scale = scale_or_default(scale, q.shape[-1])
    path = dispatch.resolve("dense_decode_attention", impl)

    def run(q, k, v, lengths, starts, page_table, k_scale, v_scale):
        kw = dict(storage, page_table=page_table, k_scale=k_scale, v_scale=v_scale)
        shape = kv_storage.shape_of(k, kw["seq_axis"], page_table)  # the local KV heads under shard_map
        if path.pallas:
            return flash_decode.dense_decode_attention(q, k, v, lengths.astype(jnp.int32), starts=starts, scale=scale,
                                                       return_lse=return_lse, ring=ring, interpret=path.interpret,
                                                       **kw)
        pos = jnp.arange(shape.capacity)[None, :]
        first = jnp.zeros_like(lengths) if starts is None else starts
        if ring:  # slot p holds row first + ((p - first) mod S)
            valid = (pos - first[:, None]) % shape.capacity < (lengths - first)[:, None]
        else:
            valid = (pos < lengths[:, None]) & (pos >= first[:, None])
        if page_table is None:
            k_rows, v_rows = (kv_storage.dequantized(x, s, kw["seq_axis"]) for x, s in ((k, k_scale), (v, v_scale)))
            bad = jnp.zeros(q.shape[:1], bool)
        else:
            positions = jnp.broadcast_to(pos[:, None, :], (q.shape[0], shape.kv_heads, shape.capacity))
            (k_rows, held), (v_rows, _) = (
                kv_storage.gather_rows(x, s, positions, seq_axis=kw["seq_axis"], page_table=page_table)
                for x, s in ((k, k_scale), (v, v_scale)))
            bad = jnp.any(valid[:, None, :] & ~held, axis=(1, 2))
        out, lse = masked_attention(q, k_rows, v_rows, valid[:, None, None, :], scale)
        out = jnp.where(bad[:, None, None], jnp.nan, out)
        return _finish(out, lse, q.dtype, return_lse)

    return _per_shard(run, (q, k, v, lengths, starts), ("b", None if starts is None else "b"), storage, return_lse)


sparse_decode_attention.__doc__ = sparse_decode_attention.__doc__.format(storage=_STORAGE_DOC)
dense_decode_attention.__doc__ = dense_decode_attention.__doc__.format(storage=_STORAGE_DOC)


def combine(outs: jax.Array, lses: jax.Array, axis: int = 0):
    """Merge partial attention results by log-sum-exp.

    Args:
      outs: float[..., P, ..., D]: P partial outputs along `axis`, each normalised over its part.
      lses: float[..., P, ...]: their log-sum-exps (-inf for an empty part), `outs` without D.
      axis: the axis of the parts (in `lses`; the same axis in `outs`).

    Returns:
      (out float32, lse float32): the attention over the union of the parts.
    """
    if jnp.ndim(outs) != jnp.ndim(lses) + 1 or jnp.shape(outs)[:-1] != jnp.shape(lses):
        raise ValueError(f"outs must be lses' shape plus a head_dim axis, got {jnp.shape(outs)} and {jnp.shape(lses)}")
    checks.check_floating(outs, "outs")
    checks.check_floating(lses, "lses")
    axis = axis % jnp.ndim(lses)
    lses = lses.astype(jnp.float32)
    m = jnp.max(lses, axis=axis, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    wts = jnp.exp(lses - m)
    total = jnp.sum(wts, axis=axis)
    # An empty part (weight 0) contributes nothing, even if its output holds NaN.
    out = jnp.sum(jnp.where(wts[..., None] > 0, outs.astype(jnp.float32) * wts[..., None], 0.0), axis=axis)
    out = out / jnp.where(total > 0, total, 1.0)[..., None]
    lse = jnp.where(total > 0, jnp.squeeze(m, axis) + jnp.log(total), -jnp.inf)
    return out, lse
