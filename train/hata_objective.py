"""HATA's learned hash projections: labels, the multi-objective loss, and selection scores.

Per layer the parameters are one projection per KV head, `W: float32[Hkv, D, rbit]` (init
N(0, 1)). Training relaxes the sign with `h(x) = tanh(sigma * x / 2) = 2 * sigmoid(sigma * x) - 1`
and minimises (HATA, Gong et al., ACL Findings 2025, section 3)

    similarity      eps * sum_pairs(s * ||h(q W) - h(k W)||^2) / N_pairs
    bit balance     lambda * sum_heads ||mean_pairs(h(q W) + h(k W)) / rbit||^2
    decorrelation   eta * ||W^T W - I||_F   (unsquared, over all KV heads jointly)

over the (query head, key) pairs of the batch, where a pair's weight `s` is its label: the top
`top_fraction` of the query's keys by raw q.k get rank weights from `max_weight` (best) down to
`min_weight`, every other key `negative_weight`.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from hata_jax import encode, hamming_scores, key_norms, query_planes
from hata_jax.config import check_rbit


@dataclasses.dataclass(frozen=True)
class LabelConfig:
    """Pair weights from the raw q.k ranking of each query head's keys."""

    top_fraction: float = 0.1
    max_weight: float = 20.0
    min_weight: float = 1.0
    negative_weight: float = -1.0

    def __post_init__(self):
        if not 0 < self.top_fraction <= 1:
            raise ValueError(f"LabelConfig.top_fraction must lie in (0, 1], got {self.top_fraction}")


@dataclasses.dataclass(frozen=True)
class HataLoss:
    """Loss hyperparameters; the defaults are the paper's.

    With rbit > head_dim the decorrelation term cannot reach 0: its minimum, `sqrt(rbit - head_dim)`
    per KV head, holds exactly when `W W^T = I`. The paper's eta pins W there, where, with the
    relaxation linear (small `sigma * q.W`, as SmolLM2's activations give), the similarity term is
    nearly the same for every W; a lower eta lets the data shape W (BENCHMARKS.md, "Learned codes,
    loss-weight lever").

    Attributes:
      sigma: the relaxation's slope, `h(x) = tanh(sigma * x / 2)`; a finite float > 0.
      eps: the similarity term's weight; a finite float >= 0.
      balance: the bit balance term's weight (lambda); a finite float >= 0.
      decorrelation: the decorrelation term's weight (eta); a finite float >= 0.

    Raises:
      ValueError naming the field when a value is not a finite number in its range.
    """

    sigma: float = 0.1
    eps: float = 0.01
    balance: float = 1.0  # lambda
    decorrelation: float = 2.0  # eta

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            positive = field.name == "sigma"
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                    or value < 0 or (positive and value == 0)):
                raise ValueError(f"HataLoss.{field.name} must be a finite float {'>' if positive else '>='} 0, "
                                 f"got {value!r}")


def rank_weights(scores: jax.Array, valid: jax.Array, labels: LabelConfig = LabelConfig()) -> jax.Array:
    """Pair weights float32[..., L] from raw scores float[..., L] over the valid keys bool[..., L].

    Of the `n` valid keys, the best `max(1, round(top_fraction * n))` by score (ties: the earlier
    position first) get weights spaced evenly from `max_weight` (rank 0) down to `min_weight`
    (last positive rank); the other valid keys get `negative_weight`, invalid keys 0 (not a pair).
    """
    length = scores.shape[-1]
    positives = jnp.maximum(1, jnp.round(labels.top_fraction * jnp.sum(valid, axis=-1, keepdims=True)))
    most = max(1, round(labels.top_fraction * length))  # >= positives, as n <= length
    _, top = jax.lax.top_k(jnp.where(valid, scores, -jnp.inf), most)
    rank = jnp.arange(most, dtype=jnp.float32)
    step = (labels.max_weight - labels.min_weight) / jnp.maximum(positives - 1, 1)
    top_weights = jnp.where(rank < positives, labels.max_weight - step * rank, labels.negative_weight)
    weights = jnp.put_along_axis(jnp.full(scores.shape, labels.negative_weight, jnp.float32), top,
                                 top_weights.astype(jnp.float32), axis=-1, inplace=False)
    return jnp.where(valid, weights, 0.0)


def relax(x: jax.Array, sigma: float) -> jax.Array:
    """The training relaxation of sign(x): tanh(sigma * x / 2) = 2 * sigmoid(sigma * x) - 1."""
    return jnp.tanh(0.5 * sigma * x)


def similarity_term(hq, hk, weights, valid, eps: float):
    """eps * sum(s * ||hq - hk||^2) / N over the (query head, valid key) pairs.

    hq: [n, m, Hkv, G, r]; hk: [n, S, Hkv, r]; weights: [n, m, Hkv, G, S]; valid: bool[n, m, S].
    """
    sq = jnp.sum(hq * hq, axis=-1)  # [n, m, Hkv, G]
    sk = jnp.sum(hk * hk, axis=-1)  # [n, S, Hkv]
    dot = jnp.einsum("nmhgr,nshr->nmhgs", hq, hk)
    dist = sq[..., None] + jnp.moveaxis(sk, 1, -1)[:, None, :, None, :] - 2.0 * dot
    pairs = jnp.sum(valid) * hq.shape[2] * hq.shape[3]
    return eps * jnp.sum(weights * dist) / jnp.maximum(pairs, 1)


def balance_term(hq, hk, valid, strength: float):
    """lambda * sum over KV heads of ||mean over the head's pairs of (hq + hk) / rbit||^2."""
    g, rbit = hq.shape[3], hq.shape[-1]
    per_query = jnp.sum(valid, axis=-1).astype(hq.dtype)  # keys of each query: [n, m]
    per_key = jnp.sum(valid, axis=1).astype(hq.dtype)  # queries of each key: [n, S]
    total_q = jnp.einsum("nm,nmhgr->hr", per_query, hq)
    total_k = g * jnp.einsum("ns,nshr->hr", per_key, hk)
    pairs = jnp.maximum(g * jnp.sum(valid), 1)
    mean = (total_q + total_k) / pairs
    return strength * jnp.sum((mean / rbit) ** 2)


def decorrelation_term(w, strength: float):
    """eta * ||W^T W - I||_F over all KV heads jointly: w [Hkv, D, rbit]."""
    gram = jnp.einsum("hdr,hds->hrs", w, w) - jnp.eye(w.shape[-1], dtype=w.dtype)
    return strength * jnp.sqrt(jnp.sum(gram * gram))


@dataclasses.dataclass(frozen=True)
class HataObjective:
    """HATA's trainable selector: projections [Hkv, D, rbit] per layer. `score` is the selection
    score :meth:`scores` ranks with ("key_norm" or "asymmetric", see :class:`hata_jax.HataConfig`);
    training does not use it."""

    rbit: int = 128
    loss_config: HataLoss = HataLoss()
    labels: LabelConfig = LabelConfig()
    score: str = "key_norm"

    name = "hata"
    # TrainConfig defaults: the reference optimiser; 300 full-batch steps on 256 key positions per sequence
    default_training = dict(optimizer="sgd", learning_rate=0.1, momentum=0.9, weight_decay=1e-6, steps=300,
                            batch_sequences=0, batch_keys=256)

    def __post_init__(self):
        check_rbit(self.rbit, "rbit")
        if self.score not in ("key_norm", "asymmetric"):
            raise ValueError(f"HataObjective.score must be 'key_norm' or 'asymmetric', got {self.score!r}")

    def init(self, key, q_heads: int, kv_heads: int, head_dim: int):
        return jax.random.normal(key, (kv_heads, head_dim, self.rbit), jnp.float32)

    def targets(self, scores, valid):
        """scores [..., Hq, L], valid bool[..., 1 or Hq, L] -> pair weights [..., Hq, L]."""
        return rank_weights(scores, jnp.broadcast_to(valid, scores.shape), self.labels)

    def loss(self, w, batch):
        """(total, {term: value}) on a batch (see :func:`hata_jax.train.trainer.sample_batch`)."""
        cfg = self.loss_config
        q, k, weights, valid = batch["q"], batch["k"], batch["targets"], batch["valid"]
        n, m, hq, d = q.shape
        hkv = w.shape[0]
        qg = q.reshape(n, m, hkv, hq // hkv, d)
        h_q = relax(jnp.einsum("nmhgd,hdr->nmhgr", qg, w), cfg.sigma)
        h_k = relax(jnp.einsum("nshd,hdr->nshr", k, w), cfg.sigma)
        terms = {
            "similarity": similarity_term(h_q, h_k, weights.reshape(n, m, hkv, hq // hkv, -1), valid, cfg.eps),
            "balance": balance_term(h_q, h_k, valid, cfg.balance),
            "decorrelation": decorrelation_term(w, cfg.decorrelation),
        }
        return sum(terms.values()), terms

    def scores(self, w, q, k):
        """Selection scores as decoding computes them with `self.score`, e.g. HATA's `||k|| *
        sum_group (1 - 2 hamming / rbit)` (hata_jax's reference path, exact on any backend): q
        [m, Hq, D] (post-RoPE) and the keys they share, k [S, Hkv, D] -> float32[m, Hkv, S]."""
        m = q.shape[0]
        keys = jnp.swapaxes(k, 0, 1)[None]  # [1, Hkv, S, D]
        codes_k = encode(keys, w, head_axis=1, impl="reference")
        codes_k = jnp.broadcast_to(codes_k, (m, *codes_k.shape[1:]))
        norms = jnp.broadcast_to(key_norms(keys), (m, *keys.shape[1:3]))
        lengths = jnp.full((m,), k.shape[0], jnp.int32)
        if self.score == "asymmetric":
            q_planes, q_scales = query_planes(q, w, impl="reference")
            return hamming_scores(q_planes, codes_k, norms, lengths, score="asymmetric", q_scales=q_scales,
                                  impl="reference")
        return hamming_scores(encode(q, w, impl="reference"), codes_k, norms, lengths, impl="reference")
