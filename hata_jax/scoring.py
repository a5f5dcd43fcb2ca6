"""Hamming scores of every cached token against the step's query codes (or, for the
"asymmetric" score, its query planes)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from hata_jax import checks, dispatch, explicit
from hata_jax.config import check_score
from pallas_kernels import hamming_topk
from pallas_kernels.backend import MAX_QUERY_PLANES

# The layouts of (q_codes, k_codes, k_norms, lengths) (see :mod:`hata_jax.explicit`), and of
# q_scales, which the "asymmetric" score adds after them.
CODE_LAYOUTS = ("bh.", "bh..", "bh.", "b")
SCALES_LAYOUT = "bh"


def scoring_inputs(q_codes, k_codes, k_norms, lengths, q_scales, score: str):
    """Check the scoring inputs; returns (arrays, layouts): the four of :data:`CODE_LAYOUTS`, then
    q_scales for the "asymmetric" score (which needs it; the others take none)."""
    check_score(score)
    lengths = checks.as_array(lengths, "lengths", "int")
    check_code_inputs(q_codes, k_codes, k_norms, lengths)
    arrays = (q_codes, k_codes, k_norms, lengths)
    if score != "asymmetric":
        if q_scales is not None:
            raise ValueError(f"q_scales belongs to the 'asymmetric' score only, got it with score={score!r}")
        return arrays, CODE_LAYOUTS
    if q_scales is None:
        raise ValueError("score='asymmetric' needs q_scales: float32[batch, kv_heads] (from hata_jax.query_planes)")
    q_scales = checks.as_array(q_scales, "q_scales")
    checks.check_dtype(q_scales, [jnp.float32], "q_scales")
    b, hkv = k_codes.shape[:2]
    if tuple(q_scales.shape) != (b, hkv):
        raise ValueError(f"q_scales must have shape [batch, kv_heads] = {(b, hkv)}, got {tuple(q_scales.shape)}")
    planes = q_codes.shape[1] // hkv
    if planes > MAX_QUERY_PLANES:
        raise ValueError(f"q_codes holds {planes} query planes per KV head; at most {MAX_QUERY_PLANES}")
    return (*arrays, q_scales), (*CODE_LAYOUTS, SCALES_LAYOUT)


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


def _hamming_sum(q_codes, k_codes, weighted: bool = False):
    """Hamming distances summed over each KV head's query rows: int32[B, Hkv, S]; `weighted`:
    row r (a query plane) counts 2**r times."""
    b, hkv, _, words = k_codes.shape
    qg = q_codes.reshape(b, hkv, -1, 1, words)
    dist = jnp.sum(lax.population_count(qg ^ k_codes[:, :, None]).astype(jnp.int32), axis=4)
    if weighted:
        dist = dist << jnp.arange(qg.shape[2], dtype=jnp.int32)[:, None]
    return jnp.sum(dist, axis=2)


def scores_reference(q_codes, k_codes, k_norms, lengths, score: str, q_scales=None):
    """:func:`hamming_scores` in plain JAX (inputs already checked)."""
    g = q_codes.shape[1] // k_codes.shape[1]
    rbit = 32 * k_codes.shape[-1]
    ham = _hamming_sum(q_codes, k_codes, weighted=score == "asymmetric")
    if score == "key_norm":
        # ||k|| * sum_i (1 - 2 h_i / rbit) = ||k|| * ((G * rbit - 2 * sum_i h_i) * (1 / rbit)).
        # The integer is exact in float32, so kernels that do the same two products match bit for bit.
        vals = k_norms * ((g * rbit - 2 * ham).astype(jnp.float32) * jnp.float32(1.0 / rbit))
    elif score == "asymmetric":
        # ||k|| * scale * sum_p 2^p (rbit - 2 h_p) / rbit, the integer sum exact; three products in
        # the kernels' order.
        top = 2**g - 1
        vals = k_norms * ((top * rbit - 2 * ham).astype(jnp.float32) * (q_scales[:, :, None] * jnp.float32(1.0 / rbit)))
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
    q_scales: jax.Array | None = None,
    impl: str = "auto",
) -> jax.Array:
    """Score every cached token for selection (higher is better).

    Args:
      q_codes: uint32[B, Hq, W] codes of the step's query heads; for score="asymmetric"
        uint32[B, Hkv * P, W], each KV head's P query planes (:func:`hata_jax.query_planes`).
      k_codes: uint32[B, Hkv, S, W] cached key codes.
      k_norms: float32[B, Hkv, S] cached key norms.
      lengths: int[B] valid cached tokens per sequence.
      score: "key_norm": `||k_t|| * sum_{i in group} (1 - 2 hamming(q_i, k_t) / rbit)`;
        "hamming": `-sum_{i in group} hamming(q_i, k_t)`. The group is the `G = Hq / Hkv` query
        heads of each KV head. "asymmetric": `||k_t|| * q_scale * sum_p 2**p (1 - 2
        hamming(plane_p, k_t) / rbit)`, i.e. `||k_t|| * v . b(k_t) / rbit` for the quantized
        summed query projection v.
      q_scales: float32[B, Hkv], the query planes' scales (score="asymmetric" only).

    Returns:
      float32[B, Hkv, S]; positions `>= lengths[b]` are `-inf`.
    """
    arrays, layouts = scoring_inputs(q_codes, k_codes, k_norms, lengths, q_scales, score)
    path = dispatch.resolve("hamming_scores", impl)

    def run(q_codes, k_codes, k_norms, lengths, q_scales=None):
        if path.pallas:
            return hamming_topk.hamming_scores(q_codes, k_codes, k_norms, lengths, score=score, q_scales=q_scales,
                                              interpret=path.interpret)
        return scores_reference(q_codes, k_codes, k_norms, lengths, score, q_scales)

    return explicit.per_shard(run, arrays, layouts, "bh.", lead=1)
