"""The cache of a "sparse" layer (a HataCache plus its selector's state) and its decode attention.

A "sparse" layer (see :mod:`hata_jax.models.plan`) keeps the usual :class:`hata_jax.HataCache`, so
its keys, values, codes and norms stay what every other kind expects, and next to it the per-token
metadata its plan's selector reads (`Selector.init_state` / `append_state`). A step of any kind
keeps the state current: a dense step (the short-context policy) appends to it too, so a later
"sparse" step selects from exactly the state it would have had without the switch.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

import hata_jax
from hata_jax import HataCache
from hata_jax.models.plan import AttentionPlan
from hata_jax.selectors import select_indices


@functools.partial(jax.tree_util.register_dataclass, data_fields=["base", "state"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class SelectorCache:
    """One "sparse" layer's decode cache.

    Attributes:
      base: the layer's HataCache (k, v [B, Hkv, S, D], codes, norms, lengths, overflow).
      state: the selector's metadata of positions < `base.lengths[b]` (a pytree of arrays).

    `k`, `v`, `lengths`, `overflow`, `capacity` and :meth:`raise_if_overflowed` are the base's.
    """

    base: HataCache
    state: Any

    @property
    def k(self) -> jax.Array:
        return self.base.k

    @property
    def v(self) -> jax.Array:
        return self.base.v

    @property
    def lengths(self) -> jax.Array:
        return self.base.lengths

    @property
    def overflow(self) -> jax.Array:
        return self.base.overflow

    @property
    def capacity(self) -> int:
        return self.base.capacity

    def raise_if_overflowed(self) -> None:
        self.base.raise_if_overflowed()


def with_selector_states(caches: list[HataCache], plan: AttentionPlan, params) -> list[HataCache | SelectorCache]:
    """The caches to decode `plan` from: each "sparse" layer's HataCache wrapped in a SelectorCache
    whose state `plan.selector.init_state` makes from the cached keys; other layers unchanged.

    Args:
      caches: one filled HataCache per layer.
      params: one selector params entry per layer (read for the "sparse" layers only), or None
        for a selector without params.
    """
    params = [None] * len(caches) if params is None else params
    return [SelectorCache(cache, plan.selector.init_state(p, cache.k, cache.lengths)) if kind == "sparse" else cache
            for cache, kind, p in zip(caches, plan.layers, params)]


def append_token(cache: HataCache | SelectorCache, k_new: jax.Array, v_new: jax.Array, w: jax.Array,
                 plan: AttentionPlan, params) -> HataCache | SelectorCache:
    """Write one token per sequence at position `lengths[b]`: k_new, v_new [B, Hkv, D] (post-RoPE)
    into the HataCache (encoded with `w`), and for a SelectorCache its metadata into the state
    (`plan.selector.append_state` with the layer's `params`)."""
    if not isinstance(cache, SelectorCache):
        return cache.append(k_new, v_new, w, impl=plan.impl)
    state = plan.selector.append_state(params, cache.state, k_new, cache.lengths)
    return SelectorCache(cache.base.append(k_new, v_new, w, impl=plan.impl), state)


def selector_decode_attention(q: jax.Array, k_new: jax.Array, v_new: jax.Array, cache: SelectorCache, w: jax.Array,
                              plan: AttentionPlan, params):
    """A "sparse" layer's decode step: append the token (:func:`append_token`), then
    :func:`selector_attention`.

    Args:
      q: float[B, Hq, D] post-RoPE queries; k_new, v_new: float[B, Hkv, D] the step's key and value.
      cache: the layer's SelectorCache (donate it to the jitted step).
      w: float[Hkv, D, rbit] the layer's hash projection (the base cache's codes).
      params: the layer's selector params.

    Returns:
      (out [B, Hq, D] in q's dtype, updated cache). A sequence whose cache overflowed gets NaN
      (as :func:`hata_jax.hata_decode_attention`).
    """
    if not isinstance(cache, SelectorCache):
        raise ValueError(f"a 'sparse' layer needs a SelectorCache (models.with_selector_states), got "
                         f"{type(cache).__name__}")
    cache = append_token(cache, k_new, v_new, w, plan, params)
    return selector_attention(q, cache, plan, params), cache


def selector_attention(q: jax.Array, cache: SelectorCache, plan: AttentionPlan, params) -> jax.Array:
    """Attention of q: float[B, Hq, D] (the query of position `cache.lengths[b] - 1`, its token
    already appended) over `plan.hata.budget` tokens per KV head chosen by `plan.selector` (sink
    and recent as in `plan.hata`); a `per_query_head` selector chooses per query head (one sparse
    attention per position in the group, each over the cache as it is). Returns [B, Hq, D] in
    q's dtype, NaN for a sequence whose cache overflowed."""
    hata = plan.hata
    idx, count = select_indices(plan.selector, params, cache.state, q, cache.k, cache.lengths,
                                budget=hata.budget, sink=hata.sink, recent=hata.recent, impl=plan.impl)
    if plan.selector.per_query_head:  # idx, count [B, Hq, ...]: query head h * G + g reads its own rows of KV head h
        group = q.shape[1] // cache.k.shape[1]
        parts = [hata_jax.sparse_decode_attention(q[:, g::group], cache.k, cache.v, idx[:, g::group],
                                                  count[:, g::group], impl=plan.impl) for g in range(group)]
        out = jnp.stack(parts, axis=2).reshape(q.shape)  # [B, Hkv, G, D]: no copy of the cache per group
    else:
        out = hata_jax.sparse_decode_attention(q, cache.k, cache.v, idx, count, impl=plan.impl)
    return jnp.where(cache.overflow[:, None, None], jnp.nan, out).astype(q.dtype)
