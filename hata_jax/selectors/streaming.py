"""StreamingLLM (Xiao et al., ICLR 2024): attention sinks plus a window of recent tokens."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from hata_jax.selection import UNUSED
from hata_jax.selectors.base import StatelessSelector


@dataclasses.dataclass(frozen=True)
class StreamingSelector(StatelessSelector):
    """StreamingLLM: the first `sink` positions, then the most recent ones, whatever the query.

    Scores: position t scores `S + sink - t` if t < sink (above every other position, earliest
    first), else t (later is better); so a budget keeps min(sink, budget) sink tokens and fills the
    rest with the most recent tokens the query sees (the query's own position included).

    A decode step's selection (:func:`hata_jax.selectors.select_indices`) is built from the lengths
    alone, without scores or a top-k: the same (idx, count) as ranking these scores with
    :func:`hata_jax.select_topk` (forced `sink`/`recent` first), so the step reads nothing to choose
    and launches no selection kernel, as StreamingLLM's own cache eviction costs nothing per step.

    Options: sink (default 4). No params (None), no state (None). Extra memory: 0 bytes per token.
    """

    sink: int = 4

    name = "streaming"

    def __post_init__(self):
        if isinstance(self.sink, bool) or not isinstance(self.sink, int) or self.sink < 0:
            raise ValueError(f"StreamingSelector.sink must be an int >= 0, got {self.sink!r}")

    def _token_scores(self, params, state, q, k, q_positions):
        b, hkv, s = k.shape[0], k.shape[1], k.shape[2]
        pos = jnp.arange(s, dtype=jnp.float32)
        scores = jnp.where(pos < self.sink, s + self.sink - pos, pos)
        return jnp.broadcast_to(scores, (b, hkv, q.shape[1], s))

    def _select(self, params, state, q, k, lengths, *, budget, sink, recent, impl):
        """Per row: kept = min(lengths[b], budget) slots, the first `prefix` positions then the last
        kept - prefix ones; prefix = the forced sink, raised to this selector's sink as far as the
        forced recent tokens leave room. Slots in ascending position, then UNUSED."""
        b, hkv = k.shape[0], k.shape[1]
        kept = jnp.minimum(lengths, budget)[:, None]  # [B, 1]
        prefix = jnp.clip(jnp.maximum(sink, jnp.minimum(self.sink, kept - recent)), 0, kept)
        slot = jnp.arange(budget, dtype=jnp.int32)[None, :]
        idx = jnp.where(slot < prefix, slot, lengths[:, None] - kept + slot)
        idx = jnp.where(slot < kept, idx, UNUSED)
        return jnp.broadcast_to(idx[:, None, :], (b, hkv, budget)), jnp.broadcast_to(kept, (b, hkv))
