"""Decode attention (one query token per sequence) over all or over selected cached tokens."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from hata_jax import checks, dispatch, explicit
from pallas_kernels import flash_decode


def _check_qkv(q, k, v, seq_axis: int) -> int:
    """q: [B, Hq, D], k, v: [B, Hkv, S, D] (seq_axis 2) or [B, S, Hkv, D] (seq_axis 1); returns
    the group size."""
    checks.check_query(q)
    checks.check_rank(k, 4, "k", checks.CACHE_LAYOUTS[seq_axis])
    checks.check_floating(q, "q")
    checks.check_floating(k, "k")
    checks.check_floating(v, "v")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    checks.check_dim(q, 0, k.shape[0], "q", "batch size")
    checks.check_dim(q, 2, k.shape[3], "q", "head_dim")
    checks.check_kv_heads(k, q.shape[1], "k", seq_axis, f"pass seq_axis={3 - seq_axis}")
    return checks.group_size(q.shape[1], k.shape[3 - seq_axis], "q heads vs k heads")


def head_major(x, seq_axis: int):
    """A cache [B, Hkv, S, D] from either layout (a view for the reference paths' einsums and gathers)."""
    return x if seq_axis == 2 else jnp.swapaxes(x, 1, 2)


def check_kernel_layout(op: str, seq_axis: int, starts=None) -> None:
    """Raise for a cache the Pallas kernels cannot read: they read [B, Hkv, S, D] caches from
    position 0 (`starts` None)."""
    if seq_axis != 2 or starts is not None:
        raise ValueError(f"{op}: the Pallas kernel reads [batch, kv_heads, seq, head_dim] caches from position 0; "
                         f"seq_axis={seq_axis}{'' if starts is None else ' and starts'} run with impl='reference' "
                         "for now")



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


def _finish(out, lse, dtype, return_lse: bool):
    out = out.astype(dtype)
    return (out, lse) if return_lse else out


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
    impl: str = "auto",
):
    """Attention of each query head over the cached rows its KV head selected.

    Args:
      q: float[B, Hq, D]; k, v: float[B, Hkv, S, D] (seq_axis 2, head-major) or
        float[B, S, Hkv, D] (seq_axis 1, sequence-major; reference path only so far).
      idx: int32[B, Hkv, K]: slots `< count` hold positions in [0, S); the rest are ignored. A
        position outside [0, S) in a used slot makes that (b, h)'s output NaN (never a clipped
        or wrapped read).
      count: int32[B, Hkv] valid slots per row.
      scale: logit scale, default `1 / sqrt(D)`.
      return_lse: also return the log-sum-exp of the scaled logits, float32[B, Hq].
      seq_axis: the sequence axis of k and v, 2 or 1 (see above).

    Returns:
      out [B, Hq, D] in q's dtype (softmax in float32), and lse if asked. A row with
      count 0 gives out = 0, lse = -inf.
    """
    q, k, v = (checks.as_array(x, name) for x, name in ((q, "q"), (k, "k"), (v, "v")))
    idx, count = checks.as_array(idx, "idx", "int"), checks.as_array(count, "count", "int")
    seq_axis = checks.check_seq_axis(seq_axis)
    _check_qkv(q, k, v, seq_axis)
    rows = (k.shape[0], k.shape[3 - seq_axis])
    checks.check_rank(idx, 3, "idx", "[batch, kv_heads, budget]")
    checks.check_dtype(idx, [jnp.int32], "idx")
    if tuple(idx.shape[:2]) != rows:
        raise ValueError(f"idx must have shape [batch, kv_heads, budget] = {rows} + [budget], got {tuple(idx.shape)}")
    if tuple(jnp.shape(count)) != rows:
        raise ValueError(f"count must have shape {rows}, got {tuple(jnp.shape(count))}")
    checks.check_integer(count, "count")
    scale = scale_or_default(scale, q.shape[-1])
    path = dispatch.resolve("sparse_decode_attention", impl)
    if path.pallas:
        check_kernel_layout("sparse_decode_attention", seq_axis)

    def run(q, k, v, idx, count):
        if path.pallas:
            return flash_decode.sparse_decode_attention(
                q, k, v, idx, count.astype(jnp.int32), scale=scale, return_lse=return_lse, interpret=path.interpret
            )
        return _sparse_reference(q, head_major(k, seq_axis), head_major(v, seq_axis), idx, count, scale, return_lse)

    cache = "bh.." if seq_axis == 2 else "b.h."
    return explicit.per_shard(run, (q, k, v, idx, count), ("bh.", cache, cache, "bh.", "bh"),
                              ("bh.", "bh") if return_lse else "bh.", lead=1)


def _sparse_reference(q, k, v, idx, count, scale: float, return_lse: bool):
    """k, v: [B, Hkv, S, D]."""
    safe = jnp.clip(idx, 0, k.shape[2] - 1)[..., None]
    k_rows = jnp.take_along_axis(k, safe, axis=2)
    v_rows = jnp.take_along_axis(v, safe, axis=2)
    used = jnp.arange(idx.shape[2])[None, None, :] < count[..., None]
    outside = jnp.any(used & ((idx < 0) | (idx >= k.shape[2])), axis=2)  # [B, Hkv]
    out, lse = masked_attention(q, k_rows, v_rows, used[:, :, None, :], scale)
    out = jnp.where(jnp.repeat(outside, q.shape[1] // k.shape[1], axis=1)[..., None], jnp.nan, out)
    return _finish(out, lse, q.dtype, return_lse)


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
    impl: str = "auto",
):
    """Attention of each query head over the cached rows `[starts[b], lengths[b])` of its KV head.

    Args:
      q: float[B, Hq, D].
      k, v: float[B, Hkv, S, D] (seq_axis 2, head-major) or float[B, S, Hkv, D] (seq_axis 1,
        sequence-major; reference path only so far).
      lengths: int[B] in [0, S]: the end (exclusive) of each sequence's rows.
      starts: int[B] in [0, lengths[b]], the first row of each sequence (a left-padded cache:
        the padding before it is never attended); None: 0 (reference path only so far).
      seq_axis: the sequence axis of k and v, 2 or 1 (see above).

    Returns:
      out [B, Hq, D] in q's dtype (softmax in float32), and lse float32[B, Hq] if asked.
    """
    q, k, v = (checks.as_array(x, name) for x, name in ((q, "q"), (k, "k"), (v, "v")))
    lengths = checks.as_array(lengths, "lengths", "int")
    seq_axis = checks.check_seq_axis(seq_axis)
    _check_qkv(q, k, v, seq_axis)
    checks.check_lengths(lengths, k.shape[0], k.shape[seq_axis])
    if starts is not None:
        starts = checks.as_array(starts, "starts", "int")
        checks.check_starts(starts, lengths, k.shape[0], k.shape[seq_axis])
    scale = scale_or_default(scale, q.shape[-1])
    path = dispatch.resolve("dense_decode_attention", impl)
    if path.pallas:
        check_kernel_layout("dense_decode_attention", seq_axis, starts)

    def run(q, k, v, lengths, starts):
        if path.pallas:
            return flash_decode.dense_decode_attention(
                q, k, v, lengths.astype(jnp.int32), scale=scale, return_lse=return_lse, interpret=path.interpret
            )
        pos = jnp.arange(k.shape[seq_axis])[None, :]
        valid = (pos < lengths[:, None]) & (True if starts is None else pos >= starts[:, None])
        out, lse = masked_attention(q, head_major(k, seq_axis), head_major(v, seq_axis), valid[:, None, None, :],
                                    scale)
        return _finish(out, lse, q.dtype, return_lse)

    cache = "bh.." if seq_axis == 2 else "b.h."
    layouts = ("bh.", cache, cache, "b", None if starts is None else "b")
    return explicit.per_shard(run, (q, k, v, lengths, starts), layouts, ("bh.", "bh") if return_lse else "bh.", lead=1)


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
