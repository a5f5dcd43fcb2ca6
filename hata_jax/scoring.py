"""Hamming scores of every cached token against the step's query codes."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from hata_jax import checks, dispatch, explicit
from hata_jax.config import check_score
from pallas_kernels import hamming_topk

# The layouts of (q_codes, k_codes, k_norms, lengths) (see :mod:`hata_jax.explicit`).
CODE_LAYOUTS = ("bh.", "bh..", "bh.", "b")


def check_code_inputs(q_codes, k_codes, k_norms, lengths) -> tuple[int, int]:
    """Validate the scoring inputs (lengths already an array); returns (group size G, rbit)."""
    checks.check_rank(q_codes, 3, "q_codes", "[batch, q_heads, words]")
    checks.check_rank(k_codes, 4, "k_codes", "[batch, kv_heads, seq, words]")
    checks.check_rank(k_norms, 3, "k_norms", "[batch, kv_heads, seq]")
    checks.check_dtype(q_codes, [jnp.uint32], "q_codes")
    checks.check_dtype(k_codes, [jnp.uint32], "k_codes")
    checks.check_dtype(k_norms, [jnp.float32], "k_norms")
    b, hkv, s, words = k_codes.shape
    checks.check_dim(q_codes, 0, b, "q_codes", "batch size")
    checks.check_dim(q_codes, 2, words, "q_codes", "code words")
    if tuple(k_norms.shape) != (b, hkv, s):
        raise ValueError(f"k_norms must have shape {(b, hkv, s)} to match k_codes, got {tuple(k_norms.shape)}")
    g = checks.group_size(q_codes.shape[1], hkv, "q_codes heads vs k_codes heads")
    checks.check_lengths(lengths, b, s)
    return g, 32 * words


def _hamming_sum(q_codes, k_codes):
    """Summed Hamming distance over each GQA group: int32[B, Hkv, S]."""
    b, hkv, _, words = k_codes.shape
    qg = q_codes.reshape(b, hkv, -1, 1, words)
    dist = lax.population_count(qg ^ k_codes[:, :, None]).astype(jnp.int32)
    return jnp.sum(dist, axis=(2, 4))


def scores_reference(q_codes, k_codes, k_norms, lengths, score: str):
    """:func:`hamming_scores` in plain JAX (inputs already checked)."""
    g = q_codes.shape[1] // k_codes.shape[1]
    rbit = 32 * k_codes.shape[-1]
    ham = _hamming_sum(q_codes, k_codes)
    if score == "key_norm":
        # ||k|| * sum_i (1 - 2 h_i / rbit) = ||k|| * ((G * rbit - 2 * sum_i h_i) * (1 / rbit)).
        # The integer is exact in float32, so kernels that do the same two products match bit for bit.
        vals = k_norms * ((g * rbit - 2 * ham).astype(jnp.float32) * jnp.float32(1.0 / rbit))
    else:
        vals = -ham.astype(jnp.float32)
    valid = jnp.arange(k_codes.shape[2])[None, None, :] < lengths[:, None, None]
    return jnp.where(valid, vals, -jnp.inf)


def hamming_scores(
    q_codes: jax.Array,
    k_codes: jax.Array,
    k_norms: jax.Array,
    lengths: jax.Array,
    *,
    score: str = "key_norm",
    impl: str = "auto",
) -> jax.Array:
    """Score every cached token for selection (higher is better).

    Args:
      q_codes: uint32[B, Hq, W] codes of the step's query heads.
      k_codes: uint32[B, Hkv, S, W] cached key codes.
      k_norms: float32[B, Hkv, S] cached key norms.
      lengths: int[B] valid cached tokens per sequence.
      score: "key_norm": `||k_t|| * sum_{i in group} (1 - 2 hamming(q_i, k_t) / rbit)`;
        "hamming": `-sum_{i in group} hamming(q_i, k_t)`. The group is the `G = Hq / Hkv` query
        heads of each KV head.

    Returns:
      float32[B, Hkv, S]; positions `>= lengths[b]` are `-inf`.
    """
    check_score(score)
    lengths = checks.as_array(lengths, "lengths", "int")
    check_code_inputs(q_codes, k_codes, k_norms, lengths)
    path = dispatch.resolve("hamming_scores", impl)

    def run(q_codes, k_codes, k_norms, lengths):
        if path.pallas:
            return hamming_topk.hamming_scores(q_codes, k_codes, k_norms, lengths, score=score,
                                              interpret=path.interpret)
        return scores_reference(q_codes, k_codes, k_norms, lengths, score)

    return explicit.per_shard(run, (q_codes, k_codes, k_norms, lengths), CODE_LAYOUTS, "bh.", lead=1)
