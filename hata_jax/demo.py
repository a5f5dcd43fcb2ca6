"""The synthetic demo (`hata-jax demo --synthetic`): what top-k selection by hash codes recovers, on
planted heavy hitters.

Each KV head's cache holds random keys plus a few planted "heavy hitter" keys aligned with the
group's queries. For several budgets we compare the attention mass and the output error of
exact top-k (the oracle), HATA-style codes from untrained random projections (SimHash, the
learning-free ablation) with HATA's key-norm score and with the plain Hamming score, and a
recency window (StreamingLLM-like): the share of the exact softmax mass each selection keeps,
and the share of the oracle's tokens it finds.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from hata_jax.hashing import encode, key_norms
from hata_jax.selection import hamming_topk, select_topk


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Shapes of the synthetic cache (Llama-like heads) and the budgets to sweep."""

    context: int = 8192
    q_heads: int = 8
    kv_heads: int = 2
    head_dim: int = 128
    rbit: int = 128
    heavy_hitters: int = 512
    budgets: tuple[int, ...] = (32, 64, 128, 256, 512)
    seed: int = 0

    def __post_init__(self):
        for name in ("context", "q_heads", "kv_heads", "head_dim", "rbit", "heavy_hitters"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DemoConfig.{name} must be an int >= 1, got {value!r}")
        if self.heavy_hitters > self.context:
            raise ValueError(f"DemoConfig.context ({self.context}) must hold the {self.heavy_hitters} planted heavy "
                             "hitters")
        if not self.budgets or any(not 1 <= b <= self.context for b in self.budgets):
            raise ValueError(f"DemoConfig.budgets must lie in [1, context={self.context}], got {self.budgets}")


def planted_problem(cfg: DemoConfig):
    """q [1, Hq, D], k, v [1, Hkv, S, D] with `heavy_hitters` keys per KV head aligned with its queries."""
    rng = np.random.default_rng(cfg.seed)
    g = cfg.q_heads // cfg.kv_heads
    direction = rng.standard_normal((cfg.kv_heads, cfg.head_dim))
    direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
    q = 3.0 * direction[:, None, :] + 0.5 * rng.standard_normal((cfg.kv_heads, g, cfg.head_dim))
    k = rng.standard_normal((cfg.kv_heads, cfg.context, cfg.head_dim))
    # Graded strengths: a few strong hitters, many weak ones, so budgets and scores matter.
    strength = 2.0 * rng.power(4.0, (cfg.kv_heads, cfg.heavy_hitters, 1))
    for h in range(cfg.kv_heads):
        pos = rng.choice(cfg.context, cfg.heavy_hitters, replace=False)
        k[h, pos] = strength[h] * direction[h] * np.sqrt(cfg.head_dim) + rng.standard_normal((cfg.heavy_hitters,
                                                                                              cfg.head_dim))
    v = rng.standard_normal((cfg.kv_heads, cfg.context, cfg.head_dim))
    f32 = lambda x: jnp.asarray(x[None], jnp.float32)  # noqa: E731
    return f32(q.reshape(cfg.q_heads, cfg.head_dim)), f32(k), f32(v)


def attention_mass(q, k, lengths, idx, count):
    """Share of each query head's exact softmax mass inside the selected tokens, averaged: float."""
    b, hq, d = q.shape
    hkv = k.shape[1]
    logits = jnp.einsum("bhgd,bhsd->bhgs", q.reshape(b, hkv, hq // hkv, d), k) / np.sqrt(d)
    probs = jax.nn.softmax(jnp.where(jnp.arange(k.shape[2]) < lengths[:, None, None, None], logits, -jnp.inf), axis=-1)
    chosen = selected_mask(idx, count, k.shape[2])
    return float(jnp.mean(jnp.sum(probs * chosen[:, :, None, :], axis=-1)))


def selected_mask(idx, count, seq: int):
    """bool[B, Hkv, seq]: which positions the index buffer selects."""
    b, hkv, _ = idx.shape
    return jnp.zeros((b, hkv, seq), bool).at[
        jnp.arange(b)[:, None, None], jnp.arange(hkv)[None, :, None], jnp.clip(idx, 0)
    ].max(jnp.arange(idx.shape[2]) < count[..., None])


def run_demo(cfg: DemoConfig = DemoConfig(), impl: str = "auto") -> list[dict]:
    """Rows of {method, budget, mass, oracle_recall} for each selector and budget."""
    q, k, v = planted_problem(cfg)
    lengths = jnp.array([cfg.context], jnp.int32)
    w = jax.random.normal(jax.random.PRNGKey(cfg.seed), (cfg.kv_heads, cfg.head_dim, cfg.rbit), jnp.float32)
    q_codes = encode(q, w, impl=impl)
    k_codes = encode(k, w, head_axis=1, impl=impl)
    norms = key_norms(k)
    g = cfg.q_heads // cfg.kv_heads
    exact_scores = jnp.sum(
        jax.nn.softmax(jnp.einsum("bhgd,bhsd->bhgs", q.reshape(1, cfg.kv_heads, g, -1), k) / np.sqrt(cfg.head_dim),
                       axis=-1),
        axis=2,
    )
    recency = jnp.broadcast_to(jnp.arange(cfg.context, dtype=jnp.float32), exact_scores.shape)
    rows = []
    for budget in cfg.budgets:
        selections = {
            "exact top-k": select_topk(exact_scores, budget, lengths, impl=impl),
            "simhash key-norm": hamming_topk(q_codes, k_codes, norms, lengths, budget=budget, score="key_norm",
                                             impl=impl),
            "simhash hamming": hamming_topk(q_codes, k_codes, norms, lengths, budget=budget, score="hamming",
                                            impl=impl),
            "recent window": select_topk(recency, budget, lengths, impl=impl),
        }
        oracle = selected_mask(*selections["exact top-k"], cfg.context)
        for method, (idx, count) in selections.items():
            found = jnp.sum(selected_mask(idx, count, cfg.context) & oracle) / jnp.sum(oracle)
            rows.append({"method": method, "budget": budget, "mass": attention_mass(q, k, lengths, idx, count),
                         "oracle_recall": float(found)})
    return rows


def format_table(rows: list[dict], cfg: DemoConfig) -> str:
    budgets = sorted({r["budget"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["method"], r["budget"]): r for r in rows}
    head = f"{'method':<18}" + "".join(f"{f'k={b} ({b / cfg.context:.1%})':>18}" for b in budgets)
    lines = [
        f"Planted heavy hitters: context {cfg.context}, {cfg.q_heads} q heads / {cfg.kv_heads} KV heads, "
        f"D={cfg.head_dim}, rbit={cfg.rbit}, {cfg.heavy_hitters} heavy hitters per KV head",
        "cell = share of the exact attention mass kept / share of the exact top-k tokens found",
        head,
        "-" * len(head),
    ]
    for m in methods:
        lines.append(f"{m:<18}" + "".join(
            f"{cell[m, b]['mass']:>10.3f} / {cell[m, b]['oracle_recall']:<5.3f}" for b in budgets))
    return "\n".join(lines)
