"""Token selectors for sparse attention: HATA and the baselines it is compared with.

Plain functions on arrays (no Flax). Each selector is a frozen dataclass (a jit static argument)
with per-token metadata (`init_state`, `append_state`) and token scores (`token_scores`); the
common functions turn scores into a decode step's index buffer (:func:`select_indices`), a
teacher-forcing keep mask (:func:`selection_mask`) and attention over the kept keys
(:func:`sparse_causal_attention`). `make_selector("quest", page_size=16)` builds one by name.
"""
from __future__ import annotations

import dataclasses

from hata_jax.selectors.base import Selector, select_indices, selection_mask, sparse_causal_attention
from hata_jax.selectors.exact import ExactSelector
from hata_jax.selectors.hashattention import HashAttentionAuthorsSelector, HashAttentionSelector
from hata_jax.selectors.hashing import HataRerankSelector, HataSelector, SimHashSelector
from hata_jax.selectors.loki import LokiSelector, loki_basis
from hata_jax.selectors.quest import QuestAuthorsSelector, QuestSelector
from hata_jax.selectors.streaming import StreamingSelector

SELECTORS: dict[str, type[Selector]] = {
    cls.name: cls
    for cls in (ExactSelector, HataSelector, HataRerankSelector, SimHashSelector, HashAttentionSelector,
                HashAttentionAuthorsSelector, QuestSelector, QuestAuthorsSelector, LokiSelector, StreamingSelector)
}


def params_source(name: str) -> str:
    """The selector whose params the selector `name` reads (e.g. "hata" for "hata_rerank")."""
    if name not in SELECTORS:
        raise ValueError(f"name must be one of {sorted(SELECTORS)}, got {name!r}")
    return SELECTORS[name].params_of or name


def make_selector(name: str, **options) -> Selector:
    """The selector called `name` (a key of :data:`SELECTORS`) with the given options."""
    if name not in SELECTORS:
        raise ValueError(f"name must be one of {sorted(SELECTORS)}, got {name!r}")
    cls = SELECTORS[name]
    allowed = sorted(field.name for field in dataclasses.fields(cls))
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"options {unknown} are not options of the {name!r} selector (its options: {allowed})")
    return cls(**options)


__all__ = [
    "SELECTORS",
    "ExactSelector",
    "HashAttentionAuthorsSelector",
    "HashAttentionSelector",
    "HataRerankSelector",
    "HataSelector",
    "LokiSelector",
    "QuestAuthorsSelector",
    "QuestSelector",
    "Selector",
    "SimHashSelector",
    "StreamingSelector",
    "loki_basis",
    "make_selector",
    "params_source",
    "select_indices",
    "selection_mask",
    "sparse_causal_attention",
]
