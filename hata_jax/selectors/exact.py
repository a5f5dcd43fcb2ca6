"""The exact top-k oracle: the true attention weights, the upper bound for any selector."""
from __future__ import annotations

import dataclasses
import math

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

    def _token_scores(self, params, state, q, k, q_positions):
        b, t, hq, d = q.shape
        hkv, s = k.shape[1], k.shape[2]
        qg = q.reshape(b, t, hkv, hq // hkv, d).astype(jnp.float32)
        logits = jnp.einsum("bthgd,bhsd->bhgts", qg, k.astype(jnp.float32),
                            precision=lax.Precision.HIGHEST) * (1.0 / math.sqrt(d))
        visible = jnp.arange(s)[None, None, None, None, :] <= q_positions[:, None, None, :, None]
        logits = jnp.where(visible, logits, -jnp.inf)
        m = jnp.max(logits, axis=-1, keepdims=True)
        p = jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0))
        denom = jnp.sum(p, axis=-1, keepdims=True)
        return jnp.sum(p / jnp.where(denom > 0, denom, 1.0), axis=2)
