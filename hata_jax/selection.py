"""Top-`budget` token selection per (sequence, KV head) into a fixed-size index buffer."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from hata_jax import checks, dispatch, explicit
from hata_jax.scoring import scores_reference, scoring_inputs
from pallas_kernels import hamming_topk as hamming_kernels
from pallas_kernels.backend import UNUSED, check_sink_recent

# The layouts of (idx, count) (see :mod:`hata_jax.explicit`).
SELECTION_LAYOUTS = ("bh.", "bh")


def check_selection_args(budget: int, capacity: int, sink: int, recent: int) -> None:
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget <= 0:
        raise ValueError(f"budget must be a positive int, got {budget!r}")
    if budget > capacity:
        raise ValueError(f"budget ({budget}) must not exceed the cache capacity ({capacity})")
    check_sink_recent(budget, sink, recent)


def ranking_keys(scores, positions, lengths, sink: int, recent: int):
    """float32 keys whose descending order (ties: lowest position first) is the selection order.

    scores: float[B, Hkv, S]; positions: int[S], the positions of the scores' columns in their
    sequence (a slice of a longer sequence gives its offset); lengths: int[B], the sequences'
    lengths. Forced positions (the first `sink` and last `recent` valid ones) get +inf, other
    valid ones their score made finite (NaN and -inf lowest, +inf highest of the finite
    floats), positions `>= lengths[b]` -inf.
    """
    pos = jnp.asarray(positions)[None, None, :]
    length = lengths[:, None, None].astype(jnp.int32)
    valid = pos < length
    forced = valid & ((pos < sink) | (pos >= length - recent))
    big = jnp.finfo(jnp.float32).max
    finite = jnp.nan_to_num(scores.astype(jnp.float32), nan=-big, posinf=big, neginf=-big)
    return jnp.where(forced, jnp.inf, jnp.where(valid, finite, -jnp.inf))


def _select_reference(scores, budget: int, lengths, sink: int, recent: int):
    b, hkv, s = scores.shape
    _, idx = lax.top_k(ranking_keys(scores, jnp.arange(s), lengths, sink, recent), budget)
    count = jnp.broadcast_to(jnp.minimum(lengths.astype(jnp.int32), budget)[:, None], (b, hkv))
    idx = jnp.where(jnp.arange(budget)[None, None, :] < count[..., None], idx, UNUSED)
    return idx.astype(jnp.int32), count


def select_topk(
    scores: jax.Array,
    budget: int,
    lengths: jax.Array,
    *,
    sink: int = 0,
    recent: int = 0,
    impl: str = "auto",
):
    """The `budget` best valid positions of each row.

    Args:
      scores: float[B, Hkv, S] (higher is better).
      budget: static int, 0 < budget <= S.
      lengths: int[B]; positions `>= lengths[b]` are never selected.
      sink, recent: the first `sink` and last `recent` valid positions are always selected;
        they count against `budget`.

    Returns:
      idx: int32[B, Hkv, budget]: the first `count` slots hold distinct selected positions in no
        particular order; the rest hold `UNUSED` (-1).
      count: int32[B, Hkv] = min(lengths[b], budget): when `lengths[b] <= budget` every valid
        position is selected.
    """
    scores, lengths = checks.as_array(scores, "scores"), checks.as_array(lengths, "lengths", "int")
    checks.check_rank(scores, 3, "scores", "[batch, kv_heads, seq]")
    checks.check_floating(scores, "scores")
    b, _, s = scores.shape
    check_selection_args(budget, s, sink, recent)
    budget = int(budget)
    checks.check_lengths(lengths, b, s)
    path = dispatch.resolve("select_topk", impl)

    def run(scores, lengths):
        if path.pallas:
            return hamming_kernels.select_topk(
                scores.astype(jnp.float32), budget, lengths, sink=sink, recent=recent, interpret=path.interpret
            )
        return _select_reference(scores, budget, lengths, sink, recent)

    return explicit.per_shard(run, (scores, lengths), ("bh.", "b"), SELECTION_LAYOUTS)


def hamming_topk(
    q_codes: jax.Array,
    k_codes: jax.Array,
    k_norms: jax.Array,
    lengths: jax.Array,
    *,
    budget: int,
    score: str = "key_norm",
    q_scales: jax.Array | None = None,
    sink: int = 0,
    recent: int = 0,
    impl: str = "auto",
):
    """`select_topk(hamming_scores(...))` in one call; the Pallas path fuses the two.

    Shapes (and `q_scales`, for score="asymmetric") as in :func:`hata_jax.hamming_scores` and
    :func:`select_topk`; returns (idx, count).
    """
    arrays, layouts = scoring_inputs(q_codes, k_codes, k_norms, lengths, q_scales, score)
    check_selection_args(budget, k_codes.shape[2], sink, recent)
    budget = int(budget)
    path = dispatch.resolve("hamming_topk", impl)

    def run(q_codes, k_codes, k_norms, lengths, q_scales=None):
        if path.pallas:
            return hamming_kernels.hamming_topk(
                q_codes, k_codes, k_norms, lengths, budget=budget, score=score, q_scales=q_scales,
                sink=sink, recent=recent, interpret=path.interpret,
            )
        scores = scores_reference(q_codes, k_codes, k_norms, lengths, score, q_scales)
        return _select_reference(scores, budget, lengths, sink, recent)

    return explicit.per_shard(run, arrays, layouts, SELECTION_LAYOUTS, lead=1)


def exact_slots(scores, lengths, budget: int, sink: int = 0, recent: int = 0) -> np.ndarray:
    """The selection kernels' exact answer in numpy, the oracle of their tests and GPU checks.

    scores: float[B, Hkv, S]; lengths: int[B]. Returns int32[B, Hkv, budget]: per row the
    `min(length, budget)` best valid positions in float order (NaN lowest, forced sink/recent
    positions first), ties to the lowest positions, in ascending position order, then -1.
    """
    scores = np.asarray(scores, np.float32)
    bits = scores.view(np.int32).astype(np.int64)
    keys = np.where(np.isnan(scores), -(2**31), np.where(bits < 0, bits ^ 0x7FFFFFFF, bits))
    batch, kv_heads, seq = scores.shape
    idx = np.full((batch, kv_heads, budget), -1, np.int32)
    pos = np.arange(seq)
    for b, h in np.ndindex(batch, kv_heads):
        n = int(lengths[b])
        row = np.where((pos < sink) | (pos >= n - recent), 2**31, keys[b, h])[:n]
        best = np.lexsort((pos[:n], -row))[: min(n, budget)]
        idx[b, h, : best.size] = np.sort(best)
    return idx
