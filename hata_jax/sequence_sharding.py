"""Sequence-sharded decode attention (context parallelism): one layer's cache split along the
positions over a mesh axis, so a sequence longer than one device's memory decodes on several.

Layouts over mesh axis `axis` of size n (the capacity S must be a multiple of n; device d holds
positions `[d S/n, (d + 1) S/n)` of every sequence):

    q [B, Hq, D], k_new, v_new [B, Hkv, D], outputs [B, Hq, D]          replicated, P()
    cache k, v [B, Hkv, S, D], codes [B, Hkv, S, W], norms [B, Hkv, S]   P(None, None, axis)
    cache lengths, overflow [B]                                           replicated, P()
    hash projection w [Hkv, D, rbit]                                      replicated, P()

(:func:`cache_shardings` gives the cache's; other mesh axes replicate everything). A step, on
every device at once (`shard_map`):

1. Encode the step (the query codes, the new key's code and norm): the same on every device.
2. Append: the device that holds position `lengths[b]` writes the new token there; every device
   advances the (replicated) lengths, with :class:`hata_jax.HataCache`'s overflow rule.
3. HATA: each device scores its slice and selects its own top `min(budget, S/n)`, by the keys
   of :func:`hata_jax.selection.ranking_keys` at the slice's global positions (forced sink and
   recent positions included). The global top-`budget` lies in the union of the local ones, so
   exchanging only the local candidates' keys and positions (an all-gather of `n x budget`
   numbers per (sequence, KV head)) decides it exactly: every device ranks the gathered
   candidates by (key descending, position ascending) and keeps its own candidates that rank
   among the first `min(lengths[b], budget)`: the same tokens as one device selects.
4. Each device attends over its own selected rows (dense: its valid rows) and the partial
   outputs merge by log-sum-exp (:func:`hata_jax.combine` over an all-gather of `[B, Hq, D]`
   plus the LSE): the attention over the whole selection.

A prompt is written with :func:`sequence_sharded_prefill` (each device keeps its slice of the
whole prompt's K/V) or, chunk by chunk, with :func:`sequence_sharded_prefill_chunk`, which also
computes the chunk's causal attention over the positions before it the same way (each device over
its slice, merged by log-sum-exp): no device ever holds the whole prompt's attention.

Per step and layer the devices exchange `2 n budget` int/float32 per (sequence, KV head) and
`n (D + 1)` float32 per (sequence, query head); every other byte stays on its device. `mesh=None`
is not accepted: on one device use :func:`hata_jax.hata_decode_attention`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from hata_jax import checks
from hata_jax.attention import (
    chunk_attention,
    combine,
    dense_decode_attention,
    scale_or_default,
    sparse_decode_attention,
)
from hata_jax.cache import HataCache, tokens_encoded
from hata_jax.config import HataConfig
from hata_jax.hashing import encode_step, encode_step_for
from hata_jax.scoring import hamming_scores
from hata_jax.selection import check_selection_args, ranking_keys, select_topk
from hata_jax.sharding import axis_size, shard_map


def check_sequence_split(mesh: Mesh, axis: str, capacity: int) -> int:
    """Raise unless the cache capacity splits evenly over `axis`; returns the axis size."""
    n = axis_size(mesh, axis)
    if capacity % n:
        raise ValueError(
            f"cannot split a cache of capacity {capacity} over mesh axis {axis!r} of {n} devices: sequence-sharded "
            f"decoding needs a capacity that is a multiple of the axis size (e.g. {capacity + n - capacity % n})"
        )
    return n


def positions_spec(axis: str) -> P:
    """Cache arrays with the positions on axis 2: k, v, codes, norms."""
    return P(None, None, axis)


def cache_specs(axis: str) -> HataCache:
    """A head-major HataCache of PartitionSpecs: k, v, codes, norms split along the positions;
    lengths, starts, overflow and uncoded replicated."""
    positions = positions_spec(axis)
    return HataCache(k=positions, v=positions, codes=positions, norms=positions, lengths=P(), starts=P(),
                     overflow=P(), uncoded=P())


def check_cache(cache: HataCache) -> None:
    """Raise unless `cache` is a head-major HataCache whose sequences start at position 0 (the
    layout this module splits; with `starts` known on the host)."""
    if not isinstance(cache, HataCache):
        raise ValueError(f"cache must be a HataCache, got {type(cache).__name__}")
    if cache.page_table is not None or cache.k_scale is not None or cache.ring:
        raise ValueError("sequence-sharded decoding splits plain caches (no page table, scales or ring)")
    if cache.seq_axis != 2:
        raise ValueError(f"sequence-sharded decoding splits head-major caches [B, Hkv, S, D] (seq_axis 2), got a cache "
                         f"with seq_axis {cache.seq_axis}")
    if checks.is_concrete(cache.starts) and np.asarray(cache.starts).any():
        raise ValueError(f"sequence-sharded decoding needs sequences that start at position 0, got starts "
                         f"{np.asarray(cache.starts).tolist()}")


def cache_shardings(mesh: Mesh, axis: str) -> HataCache:
    """A HataCache of NamedShardings for `jax.device_put(cache, cache_shardings(mesh, axis))`."""
    axis_size(mesh, axis)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), cache_specs(axis),
                        is_leaf=lambda x: isinstance(x, P))


def init_cache(batch: int, kv_heads: int, capacity: int, head_dim: int, *, rbit: int = 128, dtype=None,
               mesh: Mesh, axis: str) -> HataCache:
    """An empty :meth:`HataCache.init` cache made directly split along the positions (no device
    ever holds the whole cache)."""
    check_sequence_split(mesh, axis, capacity)
    kwargs = {"rbit": rbit} | ({} if dtype is None else {"dtype": dtype})
    make = jax.jit(lambda: HataCache.init(batch, kv_heads, capacity, head_dim, **kwargs),
                   out_shardings=cache_shardings(mesh, axis))
    return make()


def sequence_sharded_prefill(cache: HataCache, k: jax.Array, v: jax.Array, w: jax.Array, lengths: jax.Array, *,
                             mesh: Mesh, axis: str, impl: str = "auto") -> HataCache:
    """:meth:`HataCache.prefill` on a cache split along the positions: k, v [B, Hkv, T, D]
    (replicated, T <= capacity), w [Hkv, D, rbit], lengths int[B] <= T; each device writes the
    prompt positions it holds (their codes and norms too)."""
    check_cache(cache)
    n = check_sequence_split(mesh, axis, cache.capacity)
    k, v, w, lengths = cache.check_prompt(k, v, w, lengths)
    t = k.shape[2]
    local = cache.capacity // n
    # Padded by one shard, so every device's slice start (clamped to T) is in range; a device
    # whose positions all lie past T reads padding and keeps none of it (local length 0).
    k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, local), (0, 0))) for x in (k, v))

    def step(cache, k, v, w, lengths):
        offset = lax.axis_index(axis) * local
        start = jnp.minimum(offset, t)
        take = functools.partial(lax.dynamic_slice_in_dim, start_index=start, slice_size=local, axis=2)
        mine = cache.prefill(take(k), take(v), w, jnp.clip(lengths - offset, 0, local), impl=impl)
        nonfinite = lax.pmax(mine.overflow.astype(jnp.int32), axis) > 0  # a non-finite key on any device
        return dataclasses.replace(mine, lengths=jnp.clip(lengths, 0, t),
                                   overflow=(lengths > t) | (lengths < 0) | nonfinite)

    return shard_map(
        step, mesh=mesh, in_specs=(cache_specs(axis), P(), P(), P(), P()), out_specs=cache_specs(axis)
    )(cache, k, v, w, lengths)


def sequence_sharded_prefill_chunk(q: jax.Array, k: jax.Array, v: jax.Array, cache: HataCache, w: jax.Array | None,
                                   lengths: jax.Array, first: jax.Array, *, prompt_tokens: int, mesh: Mesh, axis: str,
                                   scale: float | None = None, impl: str = "auto"):
    """One chunk of a chunked prefill on a cache split along the positions: the prompt's tokens
    at positions `[first, first + C)` written to the cache, and their causal attention over the
    prompt up to them.

    The prompts are `prompt_tokens` (T, static) tokens right-padded to `lengths` int[B] <= T;
    the chunks before this one (positions `[0, first)`) are already in the cache. Each device
    writes the chunk's positions it holds (below T; k, v and, as :meth:`HataCache.prefill`, the
    keys' codes under `w` and their norms), then attends the chunk's queries over its slice,
    query `first + t` to the positions `p <= first + t` with `p < lengths[b]` (what dense causal
    attention over the whole prompt gives it), and the partial outputs merge by log-sum-exp.
    Per device this holds `[B, Hq x C, S/n]` float32 logits: memory in chunk x slice, whatever T.
    Earlier chunks' keys are read at the cache's dtype.

    Args:
      q: float[B, C, Hq, D], the chunk's post-RoPE queries (replicated).
      k, v: float[B, Hkv, C, D], its keys and values (replicated); positions past T are dropped.
      cache: the split cache (capacity >= T); w: float[Hkv, D, rbit] (replicated) or None
        (codes left zero, sequences marked `uncoded`).
      lengths: int[B] in [0, T]; first: int32 scalar (may be traced), the chunk's first position.

    Returns:
      (out [B, C, Hq, D] in q's dtype, the cache holding positions `[0, min(first + C, T))`:
      lengths `min(lengths, first + C)` (clipped to [0, T]), `overflow` set for lengths outside
      [0, T] or a non-finite key; `overflow` and `uncoded` start afresh at `first == 0`).
    """
    check_cache(cache)
    n = check_sequence_split(mesh, axis, cache.capacity)
    q = checks.as_array(q, "q")
    checks.check_rank(q, 4, "q", "[batch, chunk, q_heads, head_dim]")
    checks.check_dim(q, 0, cache.batch, "q", "batch size")
    checks.check_dim(q, 3, cache.head_dim, "q", "head_dim")
    t = checks.as_int(prompt_tokens, "prompt_tokens", low=1)
    k, v, w, lengths = cache.check_prompt(k, v, w, lengths, prompt_tokens=t)
    c = k.shape[2]
    checks.check_dim(q, 1, c, "q", "chunk length (that of k)")
    first = jnp.asarray(checks.as_array(first, "first", "int"), jnp.int32)
    checks.check_rank(first, 0, "first", "[] (a scalar)")
    scale = scale_or_default(scale, q.shape[-1])
    local = cache.capacity // n

    def step(cache, q, k, v, w, lengths, first):
        offset = lax.axis_index(axis) * local
        pos = first + jnp.arange(c)  # the chunk's global positions
        slot = jnp.where((pos >= offset) & (pos < offset + local) & (pos < t), pos - offset, local)  # local: dropped
        codes, norms = tokens_encoded(k, w, cache.rbit, 2, impl)

        def put(buf, val):
            return buf.at[:, :, slot].set(val.astype(buf.dtype), mode="drop")

        held = jnp.clip(jnp.minimum(lengths, first + c), 0, t)
        fresh = first == 0
        nonfinite = jnp.any((pos[None, None, :] < lengths[:, None, None]) & ~jnp.isfinite(norms), axis=(1, 2))
        cache = dataclasses.replace(
            cache, k=put(cache.k, k), v=put(cache.v, v), codes=put(cache.codes, codes), norms=put(cache.norms, norms),
            lengths=held, starts=jnp.zeros_like(cache.starts),
            overflow=(cache.overflow & ~fresh) | (lengths > t) | (lengths < 0) | nonfinite,
            uncoded=(cache.uncoded & ~fresh) | (jnp.full_like(cache.uncoded, w is None) & (held > 0)))
        keys = offset + jnp.arange(local)
        group = q.shape[2] // cache.kv_heads
        causal = jnp.tile(keys[None, :] <= pos[:, None], (group, 1))  # [G * C, S/n], row g * C + t
        mask = causal[None, None] & (keys < jnp.clip(lengths, 0, t)[:, None])[:, None, None, :]
        out, lse = chunk_attention(q, cache.k, cache.v, mask, scale)
        return _merge(out, lse, axis).astype(q.dtype), cache

    return shard_map(
        step, mesh=mesh, in_specs=(cache_specs(axis), P(), P(), P(), P(), P(), P()),
        out_specs=(P(), cache_specs(axis)),
    )(cache, q, k, v, w, lengths, first)


def _append(k_new, v_new, k_codes, k_norms, cache: HataCache, axis: str, n: int) -> HataCache:
    """This device's slice of the cache with the step's token written where it belongs (see the
    module docstring); `cache` holds the local slices and the global lengths."""
    local = cache.capacity
    capacity = n * local
    offset = lax.axis_index(axis) * local
    ok = (cache.lengths >= 0) & (cache.lengths < capacity)
    mine = ok & (cache.lengths >= offset) & (cache.lengths < offset + local)
    pos = jnp.where(mine, cache.lengths - offset, local)  # local: an out-of-bounds write, dropped
    rows = jnp.arange(cache.batch)

    def put(buf, val):
        return buf.at[rows, :, pos].set(val.astype(buf.dtype), mode="drop")

    return dataclasses.replace(
        cache,
        k=put(cache.k, k_new),
        v=put(cache.v, v_new),
        codes=put(cache.codes, k_codes),
        norms=put(cache.norms, k_norms),
        lengths=jnp.where(ok, cache.lengths + 1, jnp.clip(cache.lengths, 0, capacity)),
        overflow=cache.overflow | ~ok | jnp.any(~jnp.isfinite(k_norms), axis=1),
    )


def _local_lengths(cache: HataCache, axis: str):
    """int32[B]: the valid positions of this device's slice."""
    offset = lax.axis_index(axis) * cache.capacity
    return jnp.clip(cache.lengths - offset, 0, cache.capacity)


def _merge(out, lse, axis: str):
    """The attention over every device's part: log-sum-exp merge of the all-gathered partials."""
    outs = lax.all_gather(out.astype(jnp.float32), axis)
    lses = lax.all_gather(lse, axis)
    merged, _ = combine(outs, lses, axis=0)
    return merged


def _global_selection(q_codes, q_scales, cache: HataCache, config: HataConfig, axis: str, n: int, impl: str):
    """(idx int32[B, Hkv, min(budget, S/n)], count int32[B, Hkv]): this device's rows of the
    global top-`budget` (slots `< count`, local positions)."""
    local = cache.capacity
    offset = lax.axis_index(axis) * local
    local_lengths = _local_lengths(cache, axis)
    scores = hamming_scores(q_codes, cache.codes, cache.norms, local_lengths, score=config.score, q_scales=q_scales,
                            impl=impl)
    keys = ranking_keys(scores, offset + jnp.arange(local), cache.lengths, config.sink, config.recent)
    budget = min(config.budget, local)
    # Hamming scores are finite, so the keys are finite but for the forced (+inf) and invalid
    # (-inf, never selected: positions past local_lengths) ones, and select_topk ranks them alike.
    idx, count = select_topk(keys, budget, local_lengths, impl=impl)
    slot = jnp.arange(budget)[None, None, :] < count[..., None]
    mine_key = jnp.where(slot, jnp.take_along_axis(keys, jnp.clip(idx, 0, local - 1), axis=2), -jnp.inf)
    mine_pos = jnp.where(slot, offset + idx, n * local)
    all_key = lax.all_gather(mine_key, axis, axis=2, tiled=True)
    all_pos = lax.all_gather(mine_pos, axis, axis=2, tiled=True)
    total = jnp.minimum(cache.lengths, config.budget)[:, None]  # the global count, [B, 1]
    neg_key, pos = lax.sort((-all_key, all_pos), dimension=2, num_keys=2)
    last = jnp.clip(total - 1, 0, all_key.shape[2] - 1)[..., None]
    last_neg, last_pos = jnp.take_along_axis(neg_key, last, axis=2), jnp.take_along_axis(pos, last, axis=2)
    ranked_before = (-mine_key < last_neg) | ((-mine_key == last_neg) & (mine_pos <= last_pos))
    chosen = slot & (total[..., None] > 0) & ranked_before
    order = jnp.argsort(~chosen, axis=2, stable=True)  # chosen slots first
    return jnp.take_along_axis(idx, order, axis=2), jnp.sum(chosen, axis=2, dtype=jnp.int32)


def _check_step(q, k_new, v_new, cache: HataCache, w, mesh: Mesh, axis: str):
    check_cache(cache)
    q, k_new, v_new, w = (checks.as_array(x, name) for x, name in ((q, "q"), (k_new, "k"), (v_new, "v"), (w, "w")))
    checks.check_rank(q, 3, "q", "[batch, q_heads, head_dim]")
    checks.check_dim(q, 0, cache.batch, "q", "batch size")
    checks.check_dim(q, 2, cache.head_dim, "q", "head_dim")
    cache.check_tokens(k_new, v_new, w, 0)
    return check_sequence_split(mesh, axis, cache.capacity), (q, k_new, v_new, w)


def _run(step, mesh: Mesh, axis: str, q, k_new, v_new, cache: HataCache, w):
    """`step(q, k_new, v_new, local cache, w) -> (out, local cache)` on every device of `axis`."""
    return shard_map(
        step,
        mesh=mesh,
        in_specs=(P(), P(), P(), cache_specs(axis), P()),
        out_specs=(P(), cache_specs(axis)),
    )(q, k_new, v_new, cache, w)


def sequence_sharded_decode_attention(
    q: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    cache: HataCache,
    w: jax.Array,
    config: HataConfig,
    *,
    mesh: Mesh,
    axis: str,
    scale: float | None = None,
    impl: str = "auto",
):
    """:func:`hata_jax.hata_decode_attention` on a cache split along the positions over `axis`
    (layouts and algorithm in the module docstring): the same tokens selected, the same output
    up to the order of floating-point sums.

    Returns (out [B, Hq, D] in q's dtype, the updated cache, still split); NaN for an
    overflowed sequence, as on one device.
    """
    if not isinstance(config, HataConfig):
        raise ValueError(f"config must be a HataConfig, got {type(config).__name__}")
    n, (q, k_new, v_new, w) = _check_step(q, k_new, v_new, cache, w, mesh, axis)
    if cache.rbit != config.rbit:
        raise ValueError(f"the cache holds {cache.rbit}-bit codes but config.rbit is {config.rbit}")
    check_selection_args(config.budget, cache.capacity, config.sink, config.recent)
    config.require_one_stage("sequence_sharded_decode_attention")
    cache.raise_if_uncoded()
    scale = scale_or_default(scale, q.shape[-1])

    def step(q, k_new, v_new, cache, w):
        q_codes, q_scales, k_codes, k_norms = encode_step_for(config, q, k_new, w, impl=impl)
        cache = _append(k_new, v_new, k_codes, k_norms, cache, axis, n)
        idx, count = _global_selection(q_codes, q_scales, cache, config, axis, n, impl)
        out, lse = sparse_decode_attention(q, cache.k, cache.v, idx, count, scale=scale, return_lse=True, impl=impl)
        out = _merge(out, lse, axis)
        return jnp.where((cache.overflow | cache.uncoded)[:, None, None], jnp.nan, out).astype(q.dtype), cache

    return _run(step, mesh, axis, q, k_new, v_new, cache, w)


def sequence_sharded_dense_decode_attention(
    q: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    cache: HataCache,
    w: jax.Array,
    *,
    mesh: Mesh,
    axis: str,
    scale: float | None = None,
    impl: str = "auto",
):
    """A dense layer's step on a cache split along the positions over `axis`: append the token
    (its code under `w` and its norm too, as a dense layer of the models does) and attend over
    every valid position. Returns (out [B, Hq, D] in q's dtype, the updated cache, still split).
    """
    n, (q, k_new, v_new, w) = _check_step(q, k_new, v_new, cache, w, mesh, axis)
    scale = scale_or_default(scale, q.shape[-1])

    def step(q, k_new, v_new, cache, w):
        _, k_codes, k_norms = encode_step(q, k_new, w, impl=impl)
        cache = _append(k_new, v_new, k_codes, k_norms, cache, axis, n)
        out, lse = dense_decode_attention(
            q, cache.k, cache.v, _local_lengths(cache, axis), scale=scale, return_lse=True, impl=impl
        )
        out = _merge(out, lse, axis)
        return jnp.where(cache.overflow[:, None, None], jnp.nan, out).astype(q.dtype), cache

    return _run(step, mesh, axis, q, k_new, v_new, cache, w)
