"""One attention layer's whole HATA decode step."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from hata_jax import checks, explicit
from hata_jax.attention import scale_or_default, sparse_decode_attention
from hata_jax.cache import HataCache
from hata_jax.config import HataConfig
from hata_jax.hashing import encode_step_for
from hata_jax.rerank import rerank_candidates
from hata_jax.selection import check_selection_args, hamming_topk


def hata_decode_attention(
    q: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    cache: HataCache,
    w: jax.Array,
    config: HataConfig,
    *,
    scale: float | None = None,
    impl: str = "auto",
):
    """Append the new token, hash, score, select `config.budget` tokens and attend.

    Args:
      q: float[B, Hq, D] post-RoPE queries of the step.
      k_new, v_new: float[B, Hkv, D] the step's post-RoPE key and value.
      cache: the layer's :class:`HataCache` (donate it to the jitted step), over any storage
        (:mod:`hata_jax.kv_storage`: either layout, paged or not, float or quantized) and
        left-padded or not (e.g. :meth:`HataCache.from_kv` over the model's own K/V storage):
        the new token is written at `lengths[b]` of its k and v (quantized as the cache's
        scales say), and the selection and attention read the positions `[starts[b],
        lengths[b])` in place.
      w: float[Hkv, D, rbit] the layer's projection (rbit must match `config.rbit` and the cache).
      config: static :class:`HataConfig`.
      scale: logit scale, default `1 / sqrt(D)`.
      impl: "auto", "pallas" or "reference" for every op of the step.

    Returns:
      (out [B, Hq, D] in q's dtype, updated cache). When `lengths[b] - starts[b] <= config.budget`
      after the append, every cached token is selected and the output equals dense attention. A
      sequence whose cache overflowed or holds a token written without its code (`uncoded`) gets NaN
      (see :class:`HataCache`); with values known on the host an uncoded cache raises at once.
    """
    if not isinstance(config, HataConfig):
        raise ValueError(f"config must be a HataConfig, got {type(config).__name__}")
    q, k_new, v_new, w = (checks.as_array(x, name) for x, name in ((q, "q"), (k_new, "k"), (v_new, "v"), (w, "w")))
    checks.check_finite(w, "w")  # NaN in w would make every code 0 and the selection arbitrary
    checks.check_query(q)
    checks.check_dim(q, 0, cache.batch, "q", "batch size")
    checks.check_dim(q, 2, cache.head_dim, "q", "head_dim")
    if w.ndim == 3 and w.shape[2] != config.rbit:
        raise ValueError(f"w has rbit {w.shape[2]} (shape {tuple(w.shape)}) but config.rbit is {config.rbit}")
    if cache.rbit != config.rbit:
        raise ValueError(f"the cache holds {cache.rbit}-bit codes but config.rbit is {config.rbit}")
    check_selection_args(config.budget, cache.capacity, config.sink, config.recent)
    picked = config.candidate_budget(cache.capacity)  # tokens the codes pick (budget <= picked <= capacity)
    scale = scale_or_default(scale, q.shape[-1])
    cache.check_tokens(k_new, v_new, w, 0)
    cache.raise_if_uncoded()

    def run(q, k_new, v_new, cache, w):
        # A quantized cache: the codes of the key as stored (those from_kv computes from the cache).
        stored = cache.as_stored(k_new)
        q_codes, q_scales, k_codes, k_norms = encode_step_for(config, q, stored, w, impl=impl)
        cache = cache.append_encoded(k_new, v_new, k_codes, k_norms)
        # The codes count from each sequence's start; the selected slots become positions of k and v.
        lengths = cache.lengths - cache.starts
        idx, count = hamming_topk(
            q_codes, cache.codes, cache.norms, lengths, budget=picked, score=config.score, q_scales=q_scales,
            sink=config.sink, recent=config.recent, impl=impl,
        )
        if picked > config.budget:  # two-stage: the candidates' exact scores pick the budget
            idx, count = rerank_candidates(q, cache.k, idx, count, lengths, config.budget, scale=scale,
                                           sink=config.sink, recent=config.recent, offsets=cache.starts,
                                           seq_axis=cache.seq_axis, page_table=cache.page_table,
                                           k_scale=cache.k_scale, ring=cache.ring)
        slots = idx + cache.starts[:, None, None]
        idx = jnp.where(idx >= 0, slots % cache.capacity if cache.ring else slots, idx)
        out = sparse_decode_attention(q, cache.k, cache.v, idx, count, scale=scale, impl=impl, **cache.storage)
        out = jnp.where((cache.overflow | cache.uncoded)[:, None, None], jnp.nan, out).astype(q.dtype)
        return out, cache

    # Under an explicit mesh the whole step runs once per device on its (batch, KV head) rows.
    layout = cache.layout
    return explicit.per_shard(run, (q, k_new, v_new, cache, w), ("bh.", "bh.", "bh.", layout, "h.."), ("bh.", layout),
                              lead=3)
