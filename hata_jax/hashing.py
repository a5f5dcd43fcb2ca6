"""Hash codes: sign of a per-KV-head projection, packed LSB-first into uint32 words."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from hata_jax import checks, dispatch, explicit
from hata_jax.config import QUERY_PLANES, HataConfig, check_rbit
from pallas_kernels import hash_encode
from pallas_kernels.backend import MAX_QUERY_PLANES


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


def check_query_planes(planes, name: str = "query_planes") -> int:
    if isinstance(planes, bool) or not isinstance(planes, int) or not 1 <= planes <= MAX_QUERY_PLANES:
        raise ValueError(f"{name} must be an int in [1, {MAX_QUERY_PLANES}], got {planes!r}")
    return planes


def planes_from_projection(qsum: jax.Array, planes: int) -> tuple[jax.Array, jax.Array]:
    """Quantize summed query projections to sign planes (the "asymmetric" score's query).

    qsum: float32[..., rbit] -> (codes uint32[..., planes, rbit // 32], scale float32[...]).
    With `top = 2**planes - 1` and `scale = max_j |qsum_j| / top`, each coordinate is rounded to
    the nearest odd level `v_j = 2 u_j - top` (u_j in [0, top]) of `qsum_j / scale`; plane p holds
    bit p of u_j, so `v_j = sum_p 2**p (2 bit_p,j - 1)` and, for a key's +-1 code b,
    `v . b = sum_p 2**p (rbit - 2 hamming(plane_p, code))`: the scoring needs only popcounts.
    """
    top = 2**planes - 1
    scale = jnp.maximum(jnp.max(jnp.abs(qsum), axis=-1), jnp.finfo(jnp.float32).tiny) / jnp.float32(top)
    level = jnp.floor(qsum / scale[..., None] * 0.5 + jnp.float32((top + 1) * 0.5))
    level = jnp.clip(level, 0, top).astype(jnp.uint32)
    bits = (level[..., None, :] >> jnp.arange(planes, dtype=jnp.uint32)[:, None]) & jnp.uint32(1)
    return pack_bits(bits.astype(bool)), scale


def summed_query_planes(q, w, planes: int) -> tuple[jax.Array, jax.Array]:
    """q: float[..., Hq, D] (the caller checks q and w) -> the planes of each KV head's summed query projection in
    plain JAX: (codes uint32[..., Hkv, planes, rbit // 32], scale float32[..., Hkv])."""
    *lead, hq, d = q.shape
    kv_heads = w.shape[0]
    qg = q.reshape(*lead, kv_heads, hq // kv_heads, d).astype(jnp.float32)
    qsum = jnp.einsum("...hgd,hdr->...hr", qg, w.astype(jnp.float32), precision=lax.Precision.HIGHEST)
    return planes_from_projection(qsum, planes)


def _query_planes_reference(q, w, planes: int):
    codes, scale = summed_query_planes(q, w, planes)
    return codes.reshape(q.shape[0], -1, codes.shape[-1]), scale


def query_planes(q: jax.Array, w: jax.Array, *, planes: int = QUERY_PLANES, impl: str = "auto"):
    """The "asymmetric" score's query: each KV head's summed query projection as sign planes.

    Args:
      q: float[B, Hq, D] post-RoPE queries (head i belongs to KV head i // (Hq / Hkv)).
      w: float[Hkv, D, rbit].
      planes: P in [1, 8] (default :data:`hata_jax.config.QUERY_PLANES`).
      impl: "auto", "pallas" or "reference"; the Pallas path is :func:`encode_step`'s kernel.

    Returns:
      (q_planes uint32[B, Hkv * P, rbit // 32], q_scales float32[B, Hkv]): row `h * P + p` is plane
      p of KV head h (see :func:`planes_from_projection`); `q_scales * sum_p 2**p (2 bit_p - 1)`
      approximates `sum_{i in group} q_i . w[h]` to within one scale per coordinate. These are the
      `q_codes` and `q_scales` of :func:`hata_jax.hamming_scores` with `score="asymmetric"`.
    """
    q, w = checks.as_array(q, "q"), checks.as_array(w, "w")
    checks.check_finite(w, "w")
    checks.check_query(q)
    checks.check_floating(q, "q")
    kv_heads, _, _ = check_projection(w, q.shape[-1])
    checks.group_size(q.shape[1], kv_heads, "query_planes: q heads vs w")
    check_query_planes(planes, "planes")
    path = dispatch.resolve("encode_step", impl)

    def run(q, w):
        if path.pallas:
            return hash_encode.query_planes(q, w, planes=planes, interpret=path.interpret)
        return _query_planes_reference(q, w, planes)

    return explicit.per_shard(run, (q, w), ("bh.", "h.."), ("bh.", "bh"), lead=1)


def key_norms(k: jax.Array) -> jax.Array:
    """L2 norms of keys along the last axis, computed in float32: float[...] for k: float[..., D]."""
    checks.check_floating(k, "k")
    if jnp.ndim(k) < 1:
        raise ValueError(f"k must have shape [..., head_dim], got shape {tuple(jnp.shape(k))}")
    kf = k.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(kf * kf, axis=-1))


def encode_step(q: jax.Array, k_new: jax.Array, w: jax.Array, *, query_planes: int = 0, impl: str = "auto"):
    """One decode step's hashing: the query heads' codes, the new key's code and norm.

    Args:
      q: float[B, Hq, D] post-RoPE queries.
      k_new: float[B, Hkv, D] post-RoPE new keys.
      w: float[Hkv, D, rbit].
      query_planes: 0: the query heads' sign codes; P in [1, 8]: the "asymmetric" score's query
        instead, P sign planes per KV head and their scale (:func:`query_planes`).

    Returns:
      (q_codes uint32[B, Hq, rbit//32], k_codes uint32[B, Hkv, rbit//32], k_norms float32[B, Hkv]),
      or with query_planes = P: (q_planes uint32[B, Hkv * P, rbit//32], q_scales float32[B, Hkv],
      k_codes, k_norms). The Pallas path does it all in one launch.
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
    if query_planes != 0:
        check_query_planes(query_planes)
    path = dispatch.resolve("encode_step", impl)

    def run(q, k_new, w):
        if path.pallas:
            return hash_encode.encode_step(q, k_new, w, query_planes=query_planes, interpret=path.interpret)
        query = _query_planes_reference(q, w, query_planes) if query_planes else (_encode_reference(q, w, 1),)
        return *query, _encode_reference(k_new, w, 1), key_norms(k_new)

    out_layouts = ("bh.", "bh", "bh.", "bh") if query_planes else ("bh.", "bh.", "bh")
    return explicit.per_shard(run, (q, k_new, w), ("bh.", "bh.", "h.."), out_layouts, lead=1)


def encode_step_for(config: HataConfig, q: jax.Array, k_new: jax.Array, w: jax.Array, *, impl: str = "auto"):
    """:func:`encode_step` for `config.score`: (q_codes, q_scales, k_codes, k_norms), the first two
    as :func:`hata_jax.hamming_topk` takes them (q_scales None but for the "asymmetric" score)."""
    out = encode_step(q, k_new, w, query_planes=config.query_planes, impl=impl)
    return out if config.query_planes else (out[0], None, *out[1:])
