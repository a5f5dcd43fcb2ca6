"""StreamingLLM (Xiao et al., ICLR 2024): attention sinks plus a window of recent tokens."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from hata_jax.selectors.base import StatelessSelector


@dataclasses.dataclass(frozen=True)
class StreamingSelector(StatelessSelector):
    """StreamingLLM: the first `sink` positions, then the most recent ones, whatever the query.

    Scores: position t scores `S + sink - t` if t < sink (above every other position, earliest
    first), else t (later is better); so a budget keeps min(sink, budget) sink tokens and fills the
    rest with the most recent tokens the query sees (the query's own position included).

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
