"""Two-stage selection: the exact scores of HATA's candidates pick the final budget.

HATA's Hamming scores pick `candidates x budget` tokens per (sequence, KV head); this module
ranks those candidates again by their exact group score, `sum_{i in group} softmax(scale *
q_i . k_t)` with each query head's softmax over the candidates only (the policy of
:class:`hata_jax.selectors.HataRerankSelector`), and keeps the best `budget`. It reads the keys of
the candidates (gathered from the cache in place) and nothing else.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from hata_jax import checks, kv_storage
from pallas_kernels.backend import check_sink_recent


def _check_args(q, k, positions, count, lengths, budget, offsets, storage: dict) -> kv_storage.KVShape:
    checks.check_query(q)
    checks.check_floating(q, "q")
    shape = kv_storage.check_storage(k, k, batch=q.shape[0], q_heads=q.shape[1], **storage)
    rows = (q.shape[0], shape.kv_heads)
    checks.check_dim(q, 2, shape.head_dim, "q", "head_dim")
    checks.check_rank(positions, 3, "positions", "[batch, kv_heads, candidates]")
    checks.check_dtype(positions, [jnp.int32], "positions")
    if tuple(positions.shape[:2]) != rows:
        raise ValueError(f"positions must have shape [batch, kv_heads, candidates] = {rows} + [n], got "
                         f"{tuple(positions.shape)}")
    checks.check_integer(count, "count")
    if tuple(jnp.shape(count)) != rows:
        raise ValueError(f"count must have shape [batch, kv_heads] = {rows}, got {tuple(jnp.shape(count))}")
    for name, x in (("lengths", lengths), ("offsets", offsets)):
        if x is not None:
            checks.check_rank(x, 1, name, "[batch]")
            checks.check_dim(x, 0, rows[0], name, "batch size")
            checks.check_integer(x, name)
    if not 0 < budget <= positions.shape[2]:
        raise ValueError(f"budget must lie in [1, {positions.shape[2]}] (the candidates per row), got {budget}")
    return shape


def rerank_candidates(q, k, positions, count, lengths, budget: int, *, scale: float, sink: int = 0,
                      recent: int = 0, offsets=None, seq_axis: int = 2, page_table=None, k_scale=None,
                      ring: bool = False):
    """The `budget` best of each row's candidates by their exact group score.

    Args:
      q: float[B, Hq, D] the step's queries.
      k: the cache's keys, read in place: float[B, Hkv, S, D] (seq_axis 2) or float[B, S, Hkv, D]
        (seq_axis 1), or as `page_table` and `k_scale` say (:mod:`hata_jax.kv_storage`).
      positions: int32[B, Hkv, n] the candidates, ascending, then -1 (as :func:`hata_jax.hamming_topk`
        returns them), counted from each row's start.
      count: int32[B, Hkv] the candidates per row (the same for every KV head of a sequence).
      lengths: int32[B] each row's valid positions (counted from its start): the first `sink`
        and the last `recent` of them stay selected whatever their score.
      budget: static int, 0 < budget <= n, sink + recent <= budget.
      scale: the attention's logit scale.
      offsets: int32[B] or None: the row's start in k (positions + offsets index k).
      seq_axis: k's sequence axis, 2 or 1.
      page_table: int32[B, pages_per_sequence] for a paged k, or None.
      k_scale: the float scales of a quantized k (k's shape without D, or [Hkv]), or None.
      ring: k is a ring buffer: positions + offsets index k modulo its capacity.

    Returns:
      (positions int32[B, Hkv, budget] ascending then -1, count int32[B, Hkv] = min(count, budget)),
      positions counted from each row's start as given. The second stage is one sort of each
      row's `n` candidate scores (XLA), the same on both impls. Bad shapes, dtypes or a budget
      outside [1, n] raise a ValueError naming the argument.
    """
    q, k = checks.as_array(q, "q"), checks.as_array(k, "k", "number")
    positions, count = checks.as_array(positions, "positions", "int"), checks.as_array(count, "count", "int")
    lengths = checks.as_array(lengths, "lengths", "int")
    offsets = None if offsets is None else checks.as_array(offsets, "offsets", "int")
    storage = kv_storage.storage_args(seq_axis, page_table, k_scale, k_scale)  # v is k here
    budget = checks.as_int(budget, "budget", 1)
    shape = _check_args(q, k, positions, count, lengths, budget, offsets, storage)
    check_sink_recent(budget, sink, recent)
    batch, hq, d = q.shape
    kv_heads = positions.shape[1]
    valid = jnp.arange(positions.shape[2]) < count[..., None]
    safe = jnp.where(valid, positions, 0)
    rows = safe if offsets is None else safe + offsets[:, None, None]
    rows = rows % shape.capacity if ring else rows
    keys, _ = kv_storage.gather_rows(k, storage["k_scale"], rows, seq_axis=storage["seq_axis"],
                                     page_table=storage["page_table"])
    qg = q.reshape(batch, kv_heads, hq // kv_heads, d).astype(jnp.float32)
    logits = jnp.einsum("bhgd,bhnd->bhgn", qg, keys, precision=jax.lax.Precision.HIGHEST) * scale
    probs = jax.nn.softmax(jnp.where(valid[:, :, None], logits, -jnp.inf), axis=-1)
    scores = jnp.sum(jnp.where(valid[:, :, None], probs, 0.0), axis=2)
    forced = (safe < sink) | (safe >= lengths[:, None, None] - recent) if sink or recent else False
    # Valid scores lie in [0, G] (+inf forced, NaN read as 0); unused slots rank below them all.
    scores = jnp.where(valid & forced, jnp.inf, jnp.where(valid, jnp.nan_to_num(scores, nan=0.0), -1.0))
    order = jnp.argsort(-scores, axis=-1, stable=True)[..., :budget]  # ties: the earlier candidate first
    kept = jnp.minimum(count, budget)
    chosen = jnp.take_along_axis(positions, order, axis=2)
    last = jnp.iinfo(jnp.int32).max
    chosen = jnp.sort(jnp.where(jnp.arange(budget) < kept[..., None], chosen, last), axis=2)  # ascending
    return jnp.where(chosen == last, -1, chosen).astype(jnp.int32), kept
