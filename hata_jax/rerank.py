"""Two-stage selection: the exact scores of HATA's candidates pick the final budget.

HATA's Hamming scores pick `candidates x budget` tokens per (sequence, KV head); this module
ranks those candidates again by their exact group score, `sum_{i in group} softmax(scale *
q_i . k_t)` with each query head's softmax over the candidates only (the policy of
:class:`hata_jax.selectors.HataRerankSelector`), and keeps the best `budget`. It reads the keys of
the candidates (gathered from the cache in place) and nothing else.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def gather_rows(x, positions, seq_axis: int):
    """x: [B, Hkv, S, D] (seq_axis 2) or [B, S, Hkv, D] (seq_axis 1); positions: int[B, Hkv, n]
    in [0, S). Returns x's rows at `positions`, [B, Hkv, n, D]."""
    heads_major = x if seq_axis == 2 else jnp.swapaxes(x, 1, 2)
    return jnp.take_along_axis(heads_major, positions[..., None], axis=2)


def rerank_candidates(q, k, positions, count, lengths, budget: int, *, scale: float, sink: int = 0,
                      recent: int = 0, offsets=None, seq_axis: int = 2):
    """The `budget` best of each row's candidates by their exact group score.

    Args:
      q: float[B, Hq, D] the step's queries.
      k: the cache's keys, float[B, Hkv, S, D] (seq_axis 2) or float[B, S, Hkv, D] (seq_axis 1).
      positions: int32[B, Hkv, n] the candidates, ascending, then -1 (as :func:`hata_jax.hamming_topk`
        returns them), counted from each row's start.
      count: int32[B, Hkv] the candidates per row (the same for every KV head of a sequence).
      lengths: int32[B] each row's valid positions (counted from its start): the first `sink`
        and the last `recent` of them stay selected whatever their score.
      budget: static int, 0 < budget <= n, sink + recent <= budget.
      scale: the attention's logit scale.
      offsets: int32[B] or None: the row's start in k (positions + offsets index k).

    Returns:
      (positions int32[B, Hkv, budget] ascending then -1, count int32[B, Hkv] = min(count, budget)),
      positions counted from each row's start as given. The second stage is one sort of each
      row's `n` candidate scores (XLA), the same on both impls.
    """
    batch, hq, d = q.shape
    kv_heads = positions.shape[1]
    valid = jnp.arange(positions.shape[2]) < count[..., None]
    safe = jnp.where(valid, positions, 0)
    rows = safe if offsets is None else safe + offsets[:, None, None]
    keys = gather_rows(k, rows, seq_axis).astype(jnp.float32)  # [B, Hkv, n, D]
    qg = q.reshape(batch, kv_heads, hq // kv_heads, d).astype(jnp.float32)
    logits = jnp.einsum("bhgd,bhnd->bhgn", qg, keys, precision=jax.lax.Precision.HIGHEST) * scale
    probs = jax.nn.softmax(jnp.where(valid[:, :, None], logits, -jnp.inf), axis=-1)
    scores = jnp.sum(jnp.where(valid[:, :, None], probs, 0.0), axis=2)
    forced = (safe < sink) | (safe >= lengths[:, None, None] - recent) if sink or recent else False
    # Valid scores lie in [0, G] (+inf forced, NaN read as 0); unused slots rank below them all.
    scores = jnp.where(valid & forced, jnp.inf, jnp.where(valid, jnp.nan_to_num(scores, nan=0.0), -1.0))
    order = jnp.argsort(-scores, axis=-1, stable=True)[..., :budget]  # ties: the earlier candidate first
    kept = jnp.minimum(count, budget)
    chosen = jnp.take_along_axis(positions, order, axis=2)
    last = jnp.iinfo(jnp.int32).max
    chosen = jnp.sort(jnp.where(jnp.arange(budget) < kept[..., None], chosen, last), axis=2)  # ascending
    return jnp.where(chosen == last, -1, chosen).astype(jnp.int32), kept
