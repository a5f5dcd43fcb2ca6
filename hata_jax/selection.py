"""Top-`budget` token selection per (sequence, KV head) into a fixed-size index buffer."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from hata_jax import checks, dispatch
from hata_jax.config import check_score
from hata_jax.scoring import check_code_inputs, scores_reference
from pallas_kernels import hamming_topk as hamming_kernels
from pallas_kernels import topk_select
from pallas_kernels.topk_select import UNUSED, SelectState


def check_selection_args(budget: int, capacity: int, sink: int, recent: int) -> None:
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget <= 0:
        raise ValueError(f"budget must be a positive int, got {budget!r}")
    if budget > capacity:
        raise ValueError(f"budget ({budget}) must not exceed the cache capacity ({capacity})")
    if sink < 0 or recent < 0 or sink + recent > budget:
        raise ValueError(f"sink ({sink}) and recent ({recent}) must be >= 0 and sum to at most budget ({budget})")


def select_reference(scores, budget: int, lengths, sink: int, recent: int):
    """The exact selection by `lax.top_k` (see :func:`select_topk`): (idx, count), the slots in
    descending score order. Scores are ranked as `topk_select.order_keys` ranks them (NaN lowest,
    forced sink/recent positions highest); equal keys go to the lowest positions."""
    b, hkv, s = scores.shape
    pos = jnp.arange(s)[None, None, :]
    length = lengths[:, None, None].astype(jnp.int32)
    keys = topk_select.order_keys(scores.astype(jnp.float32), pos, length, sink=sink, recent=recent)
    keys = jnp.where(pos < length, keys, topk_select.INT32_MIN)  # after every valid key of its value
    _, idx = lax.top_k(keys, budget)
    count = jnp.broadcast_to(jnp.clip(lengths.astype(jnp.int32), 0, budget)[:, None], (b, hkv))
    idx = jnp.where(jnp.arange(budget)[None, None, :] < count[..., None], idx, UNUSED)
    return idx.astype(jnp.int32), count


def select_topk(
    scores: jax.Array,
    budget: int,
    lengths: jax.Array,
    *,
    sink: int = 0,
    recent: int = 0,
    state: SelectState | None = None,
    impl: str = "auto",
):
    """The `budget` best valid positions of each row.

    Args:
      scores: float[B, Hkv, S] (higher is better).
      budget: static int, 0 < budget <= S.
      lengths: int[B]; positions `>= lengths[b]` are never selected.
      sink, recent: the first `sink` and last `recent` valid positions are always selected;
        they count against `budget`.
      state: a :class:`SelectState` carried from the previous selection of the same rows (e.g.
        a :class:`HataCache`'s `select_state`): the kernel starts from its threshold hint. It
        never changes the answer; None: a fresh state (a long row without a hint is slower).

    Returns:
      idx: int32[B, Hkv, budget]: the first `count` slots hold distinct selected positions (in
        ascending order on the Pallas path); the rest hold `UNUSED` (-1).
      count: int32[B, Hkv] = min(lengths[b], budget): when `lengths[b] <= budget` every valid
        position is selected.
      With `state` given, also the new state (the reference path returns it unchanged).
    """
    checks.check_rank(scores, 3, "scores", "[batch, kv_heads, seq]")
    checks.check_floating(scores, "scores")
    b, _, s = scores.shape
    check_selection_args(budget, s, sink, recent)
    budget = int(budget)
    checks.check_lengths(lengths, b, s)
    path = dispatch.resolve("select_topk", impl)
    if path.pallas:
        idx, count, new_state = topk_select.select_topk(
            scores.astype(jnp.float32), budget, lengths, sink=sink, recent=recent, state=state,
            interpret=path.interpret,
        )
    else:
        (idx, count), new_state = select_reference(scores, budget, lengths, sink, recent), state
    return (idx, count) if state is None else (idx, count, new_state)


def hamming_topk(
    q_codes: jax.Array,
    k_codes: jax.Array,
    k_norms: jax.Array,
    lengths: jax.Array,
    *,
    budget: int,
    score: str = "key_norm",
    sink: int = 0,
    recent: int = 0,
    state: SelectState | None = None,
    impl: str = "auto",
):
    """`select_topk(hamming_scores(...))` in one call; the Pallas path fuses the two (one launch).

    Shapes as in :func:`hata_jax.hamming_scores` and :func:`select_topk`; returns (idx, count),
    and the new state when `state` is given (as :func:`select_topk`).
    """
    check_score(score)
    check_code_inputs(q_codes, k_codes, k_norms, lengths)
    check_selection_args(budget, k_codes.shape[2], sink, recent)
    budget = int(budget)
    path = dispatch.resolve("hamming_topk", impl)
    if path.pallas:
        idx, count, new_state = hamming_kernels.hamming_topk(
            q_codes, k_codes, k_norms, lengths, budget=budget, score=score,
            sink=sink, recent=recent, state=state, interpret=path.interpret,
        )
    else:
        scores = scores_reference(q_codes, k_codes, k_norms, lengths, score)
        (idx, count), new_state = select_reference(scores, budget, lengths, sink, recent), state
    return (idx, count) if state is None else (idx, count, new_state)
