"""The exact top-k oracle: the true attention weights, the upper bound for any selector."""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

from hata_jax.selectors.base import StatelessSelector


@dataclasses.dataclass(frozen=True)
class ExactSelector(StatelessSelector):
    """Scores token t by `sum_{i in group} softmax_t(q_i . K / sqrt(D))`, the softmax of each
    query head over the keys it sees (positions <= its own), summed over the GQA group.

    No options, no params (None), no state (None). Extra memory: 0 bytes per token (it reads
    the keys themselves, so it costs a dense pass over K at every step).
    """

    name = "exact"

    def exact_keys(self, length: int, budget: int) -> int:
        return length  # every key

    def _token_scores(self, params, state, q, k, q_positions):
        visible = jnp.arange(k.shape[2])[None, None, None, :] <= q_positions[:, None, :, None]
        return group_softmax(q, k, visible)


def group_softmax(q, k, keep) -> jax.Array:
    """`sum_{i in group} softmax_t(q_i . k_t / sqrt(D))` over the keys `keep` marks.

    Args:
      q: float[B, T, Hq, D]; k: float[B, Hkv, S, D]; keep: bool broadcastable to [B, Hkv, T, S].

    Returns:
      float32[B, Hkv, T, S], 0 where `keep` is False (and for a query that keeps nothing).
    """
    b, t, hq, d = q.shape
    hkv = k.shape[1]
    qg = q.reshape(b, t, hkv, hq // hkv, d).astype(jnp.float32)
    logits = jnp.einsum("bthgd,bhsd->bhgts", qg, k.astype(jnp.float32),
                        precision=lax.Precision.HIGHEST) * (1.0 / math.sqrt(d))
    logits = jnp.where(keep[:, :, None], logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0))
    denom = jnp.sum(p, axis=-1, keepdims=True)
    return jnp.sum(p / jnp.where(denom > 0, denom, 1.0), axis=2)
