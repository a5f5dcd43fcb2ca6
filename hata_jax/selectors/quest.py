"""Quest (Tang et al., ICML 2024): pages of keys summarised by their element-wise min and max."""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from jax import lax

from hata_jax.selectors.base import Selector, token_rows


def _upper_bound(q_pos, q_neg, kmin, kmax, spec: str):
    """`sum_d max(q_d kmin_d, q_d kmax_d)` = q+ . kmax + q- . kmin (einsum `spec`), from the
    query's positive and negative parts; returns (scores, empty): an empty page (kmin > kmax, the
    +inf/-inf identities) is scored against zeros, the caller masks it.

    q_pos, q_neg: float32[B, T, Hkv, D] (summed over the group); kmin, kmax: [B, Hkv, X, D].
    """
    empty = kmin[..., 0] > kmax[..., 0]
    kmin = jnp.where(empty[..., None], 0.0, kmin.astype(jnp.float32))
    kmax = jnp.where(empty[..., None], 0.0, kmax.astype(jnp.float32))
    hi = lax.Precision.HIGHEST
    return jnp.einsum(spec, q_pos, kmax, precision=hi) + jnp.einsum(spec, q_neg, kmin, precision=hi), empty


@dataclasses.dataclass(frozen=True)
class QuestSelector(Selector):
    """Quest: a page of `page_size` consecutive tokens scores `sum_{i in group} sum_d max(q_{i,d}
    kmin_d, q_{i,d} kmax_d)` (an upper bound of q_i . k over the page), every token gets its
    page's rank among the pages (ties: the later page ranks higher), so whole pages win together.
    The budget stays in tokens.

    Options: page_size (default 16). No params (None). State: {"kmin", "kmax": [B, Hkv, P, D]} in
    the keys' dtype (exact: min/max of key values), P = ceil(S / page_size); pages past lengths
    hold +inf/-inf. The page being filled counts as a page: its bounds cover the tokens written
    so far, and for a query at position p the page holding p is bounded over the keys <= p only
    (read from `k`), so teacher forcing sees what a decode step at p sees. `append_state` must
    not be given positions >= the capacity: when the capacity is not a multiple of page_size they
    would fold into the last page instead of being dropped. Extra memory:
    `kv_heads * ceil(2 * head_dim * 2 / page_size)` bytes per token for a 16-bit key cache
    (2 * head_dim / page_size values per token; 16 B at D=64, 32 B at D=128).
    """

    page_size: int = 16

    name = "quest"

    def __post_init__(self):
        if isinstance(self.page_size, bool) or not isinstance(self.page_size, int) or self.page_size <= 0:
            raise ValueError(f"QuestSelector.page_size must be a positive int, got {self.page_size!r}")

    def extra_bytes_per_token(self, kv_heads: int, head_dim: int) -> int:
        return kv_heads * math.ceil(2 * head_dim * 2 / self.page_size)

    def _pages(self, x, valid):
        """x: [B, Hkv, S, D], valid: bool[B, 1, S] -> per-page (min, max) of the valid rows, [B, Hkv, P, D]."""
        b, hkv, s, d = x.shape
        p = -(-s // self.page_size)
        pad = p * self.page_size - s
        x = jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(b, hkv, p, self.page_size, d)
        valid = jnp.pad(valid, ((0, 0), (0, 0), (0, pad))).reshape(b, 1, p, self.page_size, 1)
        inf = jnp.array(jnp.inf, x.dtype)
        return jnp.min(jnp.where(valid, x, inf), axis=3), jnp.max(jnp.where(valid, x, -inf), axis=3)

    def _init_state(self, params, k, lengths):
        kmin, kmax = self._pages(k, token_rows(lengths, k.shape[2]))
        return {"kmin": kmin, "kmax": kmax}

    def _append_state(self, params, state, k_new, positions):
        rows = jnp.arange(k_new.shape[0])
        page = positions // self.page_size
        first = (positions % self.page_size == 0)[:, None, None]  # a new page starts from the token alone

        def update(buf, combine):
            old = buf[rows, :, jnp.minimum(page, buf.shape[2] - 1)]
            new = jnp.where(first, k_new.astype(buf.dtype), combine(old, k_new.astype(buf.dtype)))
            return buf.at[rows, :, page].set(new, mode="drop")

        return {"kmin": update(state["kmin"], jnp.minimum), "kmax": update(state["kmax"], jnp.maximum)}

    def page_scores(self, params, state, q, k, q_positions):
        """float32[B, H, T, P]: each query's score of every page (-inf for an empty page), H = Hkv
        (summed over the group) or Hq (per query head); the page holding the query's position is
        bounded over the keys up to that position."""
        self.check_score_inputs(params, q, k, q_positions)
        return self._page_scores(state, q, k, q_positions.astype(jnp.int32))

    def _page_scores(self, state, q, k, q_positions):
        b, t, hq, d = q.shape
        hkv, s = k.shape[1], k.shape[2]
        n_pages = state["kmin"].shape[2]
        qg = q.reshape(b, t, hkv, hq // hkv, d).astype(jnp.float32)
        q_pos, q_neg = jnp.maximum(qg, 0.0), jnp.minimum(qg, 0.0)  # [B, T, Hkv, G, D]
        if not self.per_query_head:
            q_pos, q_neg = q_pos.sum(axis=3, keepdims=True), q_neg.sum(axis=3, keepdims=True)
        scores, empty = _upper_bound(q_pos, q_neg, state["kmin"], state["kmax"], "bthgd,bhpd->bhgtp")
        scores = jnp.where(empty[:, :, None, None, :], -jnp.inf, scores)

        # The query's own page, bounded over the keys at positions <= q_positions only.
        own = jnp.clip(q_positions // self.page_size, 0, n_pages - 1)  # [B, T]
        slots = own[..., None] * self.page_size + jnp.arange(self.page_size)  # [B, T, page]
        rows = jnp.take_along_axis(k, jnp.minimum(slots, s - 1).reshape(b, 1, -1, 1), axis=2)
        rows = rows.reshape(b, hkv, t, self.page_size, d)
        seen = (slots <= q_positions[..., None])[:, None, :, :, None]
        inf = jnp.array(jnp.inf, k.dtype)
        own_min, own_max = jnp.min(jnp.where(seen, rows, inf), axis=3), jnp.max(jnp.where(seen, rows, -inf), axis=3)
        own_scores, own_empty = _upper_bound(q_pos, q_neg, own_min, own_max, "bthgd,bhtd->bhgt")
        own_scores = jnp.where(own_empty[:, :, None], -jnp.inf, own_scores)
        is_own = jnp.arange(n_pages) == own[:, None, None, :, None]
        scores = jnp.where(is_own, own_scores[..., None], scores)  # [B, Hkv, G or 1, T, P]
        return scores.reshape(b, -1, t, n_pages)

    def _token_scores(self, params, state, q, k, q_positions):
        scores = self._page_scores(state, q, k, q_positions)
        # Rank of each page (0 = worst); a stable sort ranks the later of two equal pages higher.
        ranks = jnp.argsort(jnp.argsort(scores, axis=-1, stable=True), axis=-1).astype(jnp.float32)
        return jnp.take(ranks, jnp.arange(k.shape[2]) // self.page_size, axis=-1)


@dataclasses.dataclass(frozen=True)
class QuestAuthorsSelector(QuestSelector):
    """Quest as its authors run it (mit-han-lab/Quest): pages of `page_size` tokens scored per
    query head (keys repeated over the group, `repeat_kv`), and the page being filled always kept.

    Policy of the authors' decode path (`quest/utils/controller.py`: `page_budget` "including the
    last page", the top-k taken over the other pages, the last page attended always): a query head
    at position p keeps every token of its own page (positions `page_size * (p // page_size)` to p),
    then whole pages by its own bound `sum_d max(q_d kmin_d, q_d kmax_d)` (ties: the later page).
    Budget: tokens per query head (the authors' "token budget" = `page_budget * page_size`); the
    union read per KV head is up to G times that (see :mod:`hata_jax.selectors.base`).

    Deviations from the original:
    - the common selection keeps exactly `min(visible, budget)` tokens, so where the authors'
      page budget counts the partly filled page as a whole page, the tokens it leaves free (at
      most `page_size - 1`) go here to the next-ranked page (its first positions, then cut);
      a budget that is not a multiple of `page_size` likewise ends in a partial page;
    - their accuracy script (`evaluation/quest_attention.py`) does not force the last page but
      scores it like any other (over its tokens so far) and takes at least 3 pages; we follow their
      kernel path, the one their speed results run;
    - ties between pages: the later page (their `topk` kernels leave the order unspecified);
    - layers: the plan's dense first layers apply, as to every method (the authors keep layers 0
      and 1 dense as well);
    - state and memory as :class:`QuestSelector` (per KV head: the bounds of repeated keys are the
      KV head's bounds, so per-query-head selection costs no extra metadata).
    """

    name = "quest_authors"
    per_query_head = True

    def _token_scores(self, params, state, q, k, q_positions):
        ranks = super()._token_scores(params, state, q, k, q_positions)  # [B, Hq, T, S], ranks < P
        own_page = (jnp.arange(k.shape[2]) // self.page_size) == (q_positions // self.page_size)[:, None, :, None]
        return jnp.where(own_page, jnp.float32(state["kmin"].shape[2]), ranks)
