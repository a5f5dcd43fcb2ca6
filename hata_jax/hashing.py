"""Hash codes: sign of a per-KV-head projection, packed LSB-first into uint32 words."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from hata_jax import checks, dispatch, explicit
from hata_jax.config import check_rbit
from pallas_kernels import hash_encode


def check_projection(w, head_dim: int | None = None, name: str = "w") -> tuple[int, int, int]:
    checks.check_rank(w, 3, name, "[kv_heads, head_dim, rbit]")
    checks.check_floating(w, name)
    kv_heads, d, rbit = w.shape
    check_rbit(rbit, f"{name}.shape[2] (rbit)")
    if head_dim is not None and d != head_dim:
        raise ValueError(f"{name} has head_dim {d} (shape {w.shape}), expected {head_dim} to match the inputs")
    return kv_heads, d, rbit


def pack_bits(bits: jax.Array) -> jax.Array:
    """bits: bool[..., rbit] -> uint32[..., rbit // 32]; bit j of word c is column 32*c + j."""
    checks.check_dtype(bits, [jnp.bool_], "bits")
    if jnp.ndim(bits) < 1 or bits.shape[-1] % 32:
        raise ValueError(
            f"bits must have a last axis (rbit) that is a multiple of 32, got shape {tuple(jnp.shape(bits))}"
        )
    *lead, rbit = bits.shape
    words = bits.reshape(*lead, rbit // 32, 32).astype(jnp.uint32)
    return jnp.sum(words << jnp.arange(32, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)


def unpack_bits(codes: jax.Array) -> jax.Array:
    """codes: uint32[..., W] -> bool[..., 32 * W] (inverse of :func:`pack_bits`)."""
    checks.check_dtype(codes, [jnp.uint32], "codes")
    if jnp.ndim(codes) < 1:
        raise ValueError(f"codes must have shape [..., words], got shape {tuple(jnp.shape(codes))}")
    bits = (codes[..., None] >> jnp.arange(32, dtype=jnp.uint32)) & jnp.uint32(1)
    return bits.reshape(*codes.shape[:-1], codes.shape[-1] * 32).astype(bool)


def _encode_reference(x, w, head_axis: int):
    x = jnp.moveaxis(x, head_axis, -2)
    *lead, heads, d = x.shape
    kv_heads = w.shape[0]
    g = heads // kv_heads
    xg = x.reshape(*lead, kv_heads, g, d).astype(jnp.float32)
    proj = jnp.einsum("...hgd,hdr->...hgr", xg, w.astype(jnp.float32), precision=lax.Precision.HIGHEST)
    codes = pack_bits(proj > 0).reshape(*lead, heads, -1)
    return jnp.moveaxis(codes, -2, head_axis)


def encode(x: jax.Array, w: jax.Array, *, head_axis: int = -2, impl: str = "auto") -> jax.Array:
    """Hash codes of post-RoPE queries or keys.

    Args:
      x: float[..., heads, ..., head_dim]: `heads` (at `head_axis`, default -2) is the KV head
        count or a multiple of it (query heads: head `h` uses projection `h // (heads // kv_heads)`,
        the GQA grouping); the last axis is `head_dim`.
      w: float[kv_heads, head_dim, rbit], rbit a multiple of 32.
      head_axis: the axis of `x` that holds the heads (e.g. 1 for a `[B, Hkv, S, D]` cache).
      impl: "auto", "pallas" or "reference" (see :mod:`hata_jax.dispatch`).

    Returns:
      uint32 codes, the shape of `x` with `head_dim` replaced by `rbit // 32`: bit j of word c is
      set iff `x . w[:, 32*c + j] > 0` (strictly), computed in float32.
    """
    x, w = checks.as_array(x, "x"), checks.as_array(w, "w")
    checks.check_finite(w, "w")
    checks.check_floating(x, "x")
    if jnp.ndim(x) < 2:
        raise ValueError(f"x must have shape [..., heads, head_dim], got shape {jnp.shape(x)}")
    kv_heads, _, _ = check_projection(w, x.shape[-1])
    axis = head_axis % x.ndim
    if axis == x.ndim - 1:
        raise ValueError("head_axis must not be the last axis of x (that is head_dim)")
    checks.group_size(x.shape[axis], kv_heads, "encode: x heads vs w")
    path = dispatch.resolve("encode", impl)

    def run(x, w):
        if path.pallas:
            return hash_encode.encode(x, w, head_axis=axis, interpret=path.interpret)
        return _encode_reference(x, w, axis)

    # Every axis but head_dim may stay split under an explicit mesh (a role letter of its own).
    layout = "".join("h" if i == axis else "." if i == x.ndim - 1 else "abcdefgijklmnopqrstuvwxyz"[i]
                     for i in range(x.ndim))
    return explicit.per_shard(run, (x, w), (layout, "h.."), layout)


def key_norms(k: jax.Array) -> jax.Array:
    """L2 norms of keys along the last axis, computed in float32: float[...] for k: float[..., D]."""
    checks.check_floating(k, "k")
    if jnp.ndim(k) < 1:
        raise ValueError(f"k must have shape [..., head_dim], got shape {tuple(jnp.shape(k))}")
    kf = k.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(kf * kf, axis=-1))


def encode_step(q: jax.Array, k_new: jax.Array, w: jax.Array, *, impl: str = "auto"):
    """One decode step's hashing: the query heads' codes, the new key's code and norm.

    Args:
      q: float[B, Hq, D] post-RoPE queries.
      k_new: float[B, Hkv, D] post-RoPE new keys.
      w: float[Hkv, D, rbit].

    Returns:
      (q_codes uint32[B, Hq, rbit//32], k_codes uint32[B, Hkv, rbit//32], k_norms float32[B, Hkv]).
      The Pallas path does all three in one launch.
    """
    q, k_new, w = checks.as_array(q, "q"), checks.as_array(k_new, "k_new"), checks.as_array(w, "w")
    checks.check_finite(w, "w")
    checks.check_query(q)
    checks.check_rank(k_new, 3, "k_new", "[batch, kv_heads, head_dim]")
    checks.check_floating(q, "q")
    checks.check_floating(k_new, "k_new")
    kv_heads, d, _ = check_projection(w, q.shape[-1])
    checks.check_dim(k_new, 0, q.shape[0], "k_new", "batch size")
    checks.check_dim(k_new, 1, kv_heads, "k_new", "KV heads")
    checks.check_dim(k_new, 2, d, "k_new", "head_dim")
    checks.group_size(q.shape[1], kv_heads, "encode_step: q heads vs w")
    path = dispatch.resolve("encode_step", impl)

    def run(q, k_new, w):
        if path.pallas:
            return hash_encode.encode_step(q, k_new, w, interpret=path.interpret)
        return _encode_reference(q, w, 1), _encode_reference(k_new, w, 1), key_norms(k_new)

    return explicit.per_shard(run, (q, k_new, w), ("bh.", "bh.", "h.."), ("bh.", "bh.", "bh"), lead=1)
