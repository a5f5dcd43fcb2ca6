"""HashAttention (Desai et al., ICML 2025) as a second learned selector, trained on the same samples.

Per layer: one query MLP per query head and one key MLP per KV head, `D -> hidden -> hidden ->
bits` with SiLU (defaults 128, 128, 32). Training relaxes the codes with tanh and fits a
class-weighted BCE: the logit of pair (query head i, key t) is `<tanh(f_i(q)), tanh(g(k_t))> -
threshold_i`, its target 1 when t is among the query head's `top_k` keys by raw q.k (default 32),
positives weighted `pos_weight` (20). At selection the codes are signs (+-1) and a KV head scores
token t by `sum_{i in group} <sign(f_i(q)), sign(g(k_t))>`.

Key codes are per KV head (HATA's layout: one code per cached token and KV head), where the
original code repeats keys over the group and keeps one key code per query head.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from hata_jax.selectors.hashattention import mlp_signs
from hata_jax.selectors.hashing import group_sum
from hata_jax.selectors.mlp import mlp_apply, mlp_init


def top_k_targets(scores: jax.Array, k: int) -> jax.Array:
    """float32[..., L]: 1 at the `k` largest scores of each row (all of them if fewer are finite), else 0."""
    k = min(k, scores.shape[-1])
    _, idx = jax.lax.top_k(scores, k)
    hits = jnp.zeros(scores.shape, jnp.float32)
    hits = jnp.put_along_axis(hits, idx, 1.0, axis=-1, inplace=False)
    return jnp.where(jnp.isfinite(scores), hits, 0.0)


def weighted_bce(logits, targets, valid, pos_weight: float):
    """Mean over the valid pairs of `pos_weight * y * softplus(-z) + (1 - y) * softplus(z)`."""
    loss = pos_weight * targets * jax.nn.softplus(-logits) + (1.0 - targets) * jax.nn.softplus(logits)
    return jnp.sum(jnp.where(valid, loss, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


@dataclasses.dataclass(frozen=True)
class HashAttentionObjective:
    """HashAttention's trainable selector: per-head query and key MLPs and a threshold per query head."""

    bits: int = 32
    hidden: int = 128
    top_k: int = 32
    pos_weight: float = 20.0

    name = "hashattention"
    # TrainConfig defaults: the reference optimiser; steps on 4 sequences x 512 key positions (the MLPs cost more)
    default_training = dict(optimizer="adam", learning_rate=1e-3, momentum=0.0, weight_decay=0.0, steps=300,
                            batch_sequences=4, batch_keys=512)

    def init(self, key, q_heads: int, kv_heads: int, head_dim: int):
        kq, kk = jax.random.split(key)
        widths = (head_dim, self.hidden, self.hidden, self.bits)
        return {"query": mlp_init(kq, q_heads, widths), "key": mlp_init(kk, kv_heads, widths),
                "threshold": jnp.zeros((q_heads,), jnp.float32)}

    def targets(self, scores, valid):
        """scores [..., Hq, L] (raw q.k, -inf where invalid) -> 1 at each query head's top_k keys."""
        return top_k_targets(jnp.where(valid, scores, -jnp.inf), self.top_k)

    def loss(self, params, batch):
        q, k, targets, valid = batch["q"], batch["k"], batch["targets"], batch["valid"]
        n, m, hq, _ = q.shape
        hkv = k.shape[2]
        cq = jnp.tanh(mlp_apply(params["query"], q)).reshape(n, m, hkv, hq // hkv, self.bits)
        ck = jnp.tanh(mlp_apply(params["key"], k))  # [n, S, Hkv, bits]
        logits = jnp.einsum("nmhgb,nshb->nmhgs", cq, ck).reshape(n, m, hq, -1)
        logits = logits - params["threshold"][:, None]
        bce = weighted_bce(logits, targets, jnp.broadcast_to(valid[:, :, None], logits.shape), self.pos_weight)
        return bce, {"bce": bce}

    def scores(self, params, q, k):
        """q [m, Hq, D] (post-RoPE) and the keys they share, k [S, Hkv, D] -> float32[m, Hkv, S]:
        `sum_{i in group} <sign(f_i(q)), sign(g(k))>` (bit = x > 0, as HATA's codes)."""
        cq = group_sum(mlp_signs(params["query"], q)[None], k.shape[1])[0]  # [m, Hkv, bits]
        ck = mlp_signs(params["key"], k)  # [S, Hkv, bits]
        return jnp.einsum("mhc,shc->mhs", cq, ck)
