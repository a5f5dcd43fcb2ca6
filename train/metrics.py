"""The share of exact attention mass that a selection keeps, at budgets given as context fractions.

For a query at position p (n = p + 1 keys) and budget fraction f, a selector keeps the
`ceil(f * n)` best tokens of each KV head by its scores (shared by the group's query heads);
the metric is the exact attention mass `softmax(q.k / sqrt(D))` of each query head inside the
kept tokens, averaged over the query heads. Ties at the budget boundary (codes give integer
scores) count in expectation over a uniformly random tie-break, so no selector gains or loses
from the order of positions.

The two-stage selection (:func:`reranked_mass`, :class:`hata_jax.selectors.HataRerankSelector`'s
policy) keeps, at budget b, the b best of the top `factor * b` candidates by the selector's
scores, ranked again by their exact group score over the candidates.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

FRACTIONS = (1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4)


def probs_from_raw(raw_scores: jax.Array, head_dim: int, kv_heads: int) -> jax.Array:
    """Exact attention probabilities float32[m, Hkv, G, L] from raw q.k float32[m, Hq, L]
    (no 1/sqrt(D) applied; -inf at the keys a query does not attend)."""
    m, hq, length = raw_scores.shape
    probs = jax.nn.softmax(raw_scores / math.sqrt(head_dim), axis=-1)
    return probs.reshape(m, kv_heads, hq // kv_heads, length)


def exact_scores(probs: jax.Array) -> jax.Array:
    """The oracle's scores [m, Hkv, L]: attention probabilities summed over each group."""
    return jnp.sum(probs, axis=2)


@jax.jit
def _budget_mass(probs, scores, valid, budgets):
    s = jnp.where(valid[:, None, :], scores, -jnp.inf)
    top, _ = jax.lax.top_k(s, s.shape[-1])
    masses = []
    for i in range(budgets.shape[0]):
        k = budgets[i]  # [m]
        threshold = jnp.take_along_axis(top, jnp.broadcast_to((k - 1)[:, None, None], (*top.shape[:2], 1)), axis=-1)
        above = s > threshold
        tie = s == threshold
        n_above = jnp.sum(above, axis=-1, keepdims=True)
        n_tie = jnp.maximum(jnp.sum(tie, axis=-1, keepdims=True), 1)
        share = (k[:, None, None] - n_above) / n_tie  # [m, Hkv, 1]
        mass = jnp.sum(probs * above[:, :, None], axis=-1) + share * jnp.sum(probs * tie[:, :, None], axis=-1)
        masses.append(jnp.mean(mass, axis=(1, 2)))
    return jnp.stack(masses)


def captured_mass(probs: jax.Array, scores: jax.Array, valid: jax.Array,
                  fractions=FRACTIONS) -> np.ndarray:
    """float64[len(fractions), m]: per query, the mass kept by the top-`ceil(f * n)` tokens.

    Args:
      probs: float32[m, Hkv, G, L] exact attention probabilities of each query head (0 at invalid keys).
      scores: float[m, Hkv, L] the selector's scores (higher is kept first).
      valid: bool[m, L] the keys each query attends to (n = their count).
      fractions: budget fractions of n.
    """
    n = np.asarray(jnp.sum(valid, axis=-1))
    budgets = np.stack([np.maximum(1, np.ceil(np.asarray(f) * n)) for f in fractions]).astype(np.int32)
    return np.asarray(_budget_mass(probs, scores.astype(jnp.float32), valid, jnp.asarray(budgets)), np.float64)


@jax.jit
def _reranked_scores(probs, scores, valid, candidates):
    """Exact group scores of each row's `candidates[m]` best tokens by `scores`, -1 elsewhere."""
    s = jnp.where(valid[:, None, :], scores.astype(jnp.float32), -jnp.inf)
    order = jnp.argsort(-s, axis=-1, stable=True)  # ties: the earlier position first, as lax.top_k
    rank = jnp.argsort(order, axis=-1)
    chosen = (rank < candidates[:, None, None]) & valid[:, None, :]
    # Each query head's softmax restricted to the candidates, summed over the group.
    kept = jnp.sum(jnp.where(chosen[:, :, None], probs, 0.0), axis=-1, keepdims=True)
    exact = jnp.sum(probs / jnp.maximum(kept, jnp.finfo(jnp.float32).tiny), axis=2)
    return jnp.where(chosen, exact, -1.0)


def reranked_mass(probs: jax.Array, scores: jax.Array, valid: jax.Array, factor: int,
                  fractions=FRACTIONS) -> np.ndarray:
    """float64[len(fractions), m]: per query, the mass kept by the two-stage selection at each
    budget b = ceil(f * n): the top `min(factor * b, n)` tokens by `scores` (ties to the earlier
    position), ranked again by `sum_{i in group} softmax_candidates(q_i . k / sqrt(D))`, the
    best b kept. Arguments as :func:`captured_mass`; `factor` an int >= 1."""
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be an int >= 1, got {factor!r}")
    n = np.asarray(jnp.sum(valid, axis=-1))
    rows = []
    for f in fractions:
        budget = np.maximum(1, np.ceil(np.asarray(f) * n)).astype(np.int32)
        candidates = jnp.asarray(np.minimum(factor * budget, n).astype(np.int32))
        rows.append(captured_mass(probs, _reranked_scores(probs, scores, valid, candidates), valid, (f,))[0])
    return np.stack(rows)
