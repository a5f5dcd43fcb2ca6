"""The token-selector interface and the selection/attention functions every selector shares.

A selector scores cached tokens for a query (higher = keep); the common code here turns scores
into a fixed-size index buffer for a decode step (:func:`select_indices`) or into a causal keep
mask for teacher forcing (:func:`selection_mask`), and attends over the kept keys
(:func:`sparse_causal_attention`). Budgets are tokens per (sequence, KV head), shared by the
group's query heads; `sink`/`recent` force the first/last visible positions as in
:func:`hata_jax.select_topk`. A selector with `per_query_head = True` (the baselines as their
authors run them) selects for every query head on its own: its rows are query heads, each keeps
`budget` tokens (the same attention work per query head as a per-KV-head selection), and the
KV head reads the union of its G query heads' selections, up to `G * budget` rows.

Memory: teacher forcing over T queries and S keys works on chunks of queries (`lax.map`) so that
no float32 array of more than about :data:`QUERY_CHUNK_ELEMENTS` elements per chunk is built
(e.g. `[B, Hq, chunk, S]` logits), never `[B, Hq, T, S]` at once.
"""
from __future__ import annotations

import abc
import dataclasses
import numbers
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax import lax

from hata_jax import checks
from hata_jax.attention import masked_attention, scale_or_default
from hata_jax.selection import check_selection_args, select_topk

# Upper bound on the elements of one query chunk's [B, Hq, chunk, S] float32 intermediates.
QUERY_CHUNK_ELEMENTS = 1 << 24


def check_keys(k, name: str = "k") -> tuple[int, int, int, int]:
    """k: float[B, Hkv, S, D]; returns its shape."""
    checks.check_rank(k, 4, name, "[batch, kv_heads, seq, head_dim]")
    checks.check_floating(k, name)
    return tuple(k.shape)


def check_queries(q, k, name: str = "q") -> int:
    """q: float[B, T, Hq, D] against k: float[B, Hkv, S, D]; returns the group size G."""
    checks.check_rank(q, 4, name, "[batch, queries, q_heads, head_dim]")
    checks.check_floating(q, name)
    b, hkv, _, d = check_keys(k)
    checks.check_dim(q, 0, b, name, "batch size")
    checks.check_dim(q, 3, d, name, "head_dim")
    return checks.group_size(q.shape[2], hkv, f"{name} heads vs k heads")


def check_positions(positions, shape: tuple[int, ...], name: str, layout: str) -> None:
    checks.check_rank(positions, len(shape), name, layout)
    checks.check_integer(positions, name)
    if tuple(positions.shape) != shape:
        raise ValueError(f"{name} must have shape {layout} = {shape}, got {tuple(positions.shape)}")


def token_rows(lengths, capacity: int) -> jax.Array:
    """bool[B, 1, S]: positions < lengths[b] (broadcasts over KV heads)."""
    return (jnp.arange(capacity)[None, :] < lengths[:, None])[:, None, :]


def write_token(buf, value, positions):
    """buf: [B, Hkv, S, ...] with value: [B, Hkv, ...] written at positions[b] (dropped if >= S)."""
    rows = jnp.arange(buf.shape[0])
    return buf.at[rows, :, positions].set(value.astype(buf.dtype), mode="drop")


@dataclasses.dataclass(frozen=True)
class Selector(abc.ABC):
    """A token selector: per-token metadata (`state`) plus a score of each cached token per query.

    Frozen dataclass (hashable: usable as a jit static argument). The public methods validate
    their inputs (ValueError naming the argument) and call the subclass's `_init_state`,
    `_append_state` and `_token_scores`. `params` are the selector's learned or calibrated
    arrays for one layer (None where it has none).

    `per_query_head`: False: scores and selections have one row per KV head (H = Hkv), shared by
    the group's query heads; True: one row per query head (H = Hq), keys repeated over the group.
    `params_of`: the name of the selector whose params this one reads (its own by default).
    """

    name: ClassVar[str]
    per_query_head: ClassVar[bool] = False
    params_of: ClassVar[str | None] = None

    @abc.abstractmethod
    def extra_bytes_per_token(self, kv_heads: int, head_dim: int) -> int:
        """Metadata bytes per cached token, all KV heads of one layer."""

    def selection_bytes(self, length: int, budget: int, kv_heads: int, head_dim: int) -> int:
        """Bytes one decode step reads to choose `budget` of `length` cached tokens, all KV heads
        of one layer, for a 16-bit key cache: every token's metadata
        (:meth:`extra_bytes_per_token`), plus the keys it scores exactly (:meth:`exact_keys`).
        The attention over the chosen tokens, the same for every selector at a budget, is not
        counted. length >= 0; budget, kv_heads, head_dim >= 1."""
        for name, value, low in (("length", length, 0), ("budget", budget, 1), ("kv_heads", kv_heads, 1),
                                 ("head_dim", head_dim, 1)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f"selection_bytes: {name} must be an int >= {low}, got {value!r}")
        keys = self.exact_keys(length, budget)
        return int(length * self.extra_bytes_per_token(kv_heads, head_dim) + keys * kv_heads * head_dim * 2)

    def exact_keys(self, length: int, budget: int) -> int:
        """Keys per KV head a step reads to score them exactly (0: it ranks by metadata only)."""
        return 0

    def check_params(self, params, kv_heads: int, head_dim: int, q_heads: int | None = None) -> None:
        """Raise a ValueError unless `params` fit this selector and the given head shapes."""
        if params is not None:
            raise ValueError(f"params must be None for the {self.name!r} selector, got {type(params).__name__}")

    def init_state(self, params, k: jax.Array, lengths: jax.Array):
        """The metadata of keys at positions < lengths[b].

        Args:
          k: float[B, Hkv, S, D] post-RoPE keys (capacity S).
          lengths: int[B] in [0, S].
        """
        b, hkv, s, d = check_keys(k)
        checks.check_lengths(lengths, b, s)
        self.check_params(params, hkv, d)
        return self._init_state(params, k, lengths.astype(jnp.int32))

    def append_state(self, params, state, k_new: jax.Array, positions: jax.Array):
        """Write the metadata of the key at positions[b].

        Args:
          k_new: float[B, Hkv, D] post-RoPE new keys.
          positions: int[B] their positions (< capacity; later positions are dropped).
        """
        checks.check_rank(k_new, 3, "k_new", "[batch, kv_heads, head_dim]")
        checks.check_floating(k_new, "k_new")
        b, hkv, d = k_new.shape
        check_positions(positions, (b,), "positions", "[batch]")
        self.check_params(params, hkv, d)
        return self._append_state(params, state, k_new, positions.astype(jnp.int32))

    def token_scores(self, params, state, q: jax.Array, k: jax.Array, q_positions: jax.Array) -> jax.Array:
        """Scores of every cached token for every query (higher = keep).

        Args:
          q: float[B, T, Hq, D] post-RoPE queries (Hq = G * Hkv; head h belongs to KV head h // G).
          k: float[B, Hkv, S, D] the keys of :meth:`init_state`.
          q_positions: int[B, T] the queries' positions.

        Returns:
          float32[B, H, T, S], H = Hq if `per_query_head` else Hkv. Causality and validity are
          applied by the common code.
        """
        self.check_score_inputs(params, q, k, q_positions)
        return self._token_scores(params, state, q, k, q_positions.astype(jnp.int32))

    def selection_scores(self, params, state, q: jax.Array, k: jax.Array, q_positions: jax.Array, *,
                         budget: int) -> jax.Array:
        """The scores a selection of `budget` tokens per row ranks: :meth:`token_scores` unless the
        selector's policy depends on the budget (forced tokens, a candidate stage). Arguments and
        result as :meth:`token_scores`; `budget` a static int > 0."""
        return self.token_scores(params, state, q, k, q_positions)

    def check_score_inputs(self, params, q, k, q_positions) -> None:
        """The checks of :meth:`token_scores`."""
        check_queries(q, k)
        b, t, hq, d = q.shape
        check_positions(q_positions, (b, t), "q_positions", "[batch, queries]")
        self.check_params(params, k.shape[1], d, hq)

    def _select(self, params, state, q, k, lengths, *, budget: int, sink: int, recent: int, impl: str):
        """:func:`select_indices` after its checks (lengths int32): rank :meth:`selection_scores` with
        :func:`hata_jax.select_topk`. A selector whose choice depends on the positions only may build
        the same (idx, count) without scores."""
        q_positions = (lengths - 1)[:, None]
        scores = self.selection_scores(params, state, q[:, None], k, q_positions, budget=budget)[:, :, 0]
        return select_topk(scores, budget, lengths, sink=sink, recent=recent, impl=impl)

    @abc.abstractmethod
    def _init_state(self, params, k, lengths): ...

    @abc.abstractmethod
    def _append_state(self, params, state, k_new, positions): ...

    @abc.abstractmethod
    def _token_scores(self, params, state, q, k, q_positions): ...


class StatelessSelector(Selector):
    """A selector that keeps nothing per token (it scores from the keys or the positions)."""

    def extra_bytes_per_token(self, kv_heads: int, head_dim: int) -> int:
        return 0

    def _init_state(self, params, k, lengths):
        return None

    def _append_state(self, params, state, k_new, positions):
        return state


def _check_selector(selector) -> None:
    if not isinstance(selector, Selector):
        raise ValueError(f"selector must be a hata_jax.selectors.Selector, got {type(selector).__name__}")


def select_indices(selector: Selector, params, state, q, k, lengths, *, budget: int, sink: int = 0,
                   recent: int = 0, impl: str = "reference"):
    """One decode step's selection.

    Args:
      selector, params, state: the layer's selector, its params and its state (the current
        token's key already appended).
      q: float[B, Hq, D], the query of position lengths[b] - 1.
      k: float[B, Hkv, S, D] the cached keys.
      lengths: int[B] in [0, S]: keys at positions < lengths[b] are candidates.
      budget: static tokens per (sequence, KV head), 0 < budget <= S.
      sink, recent: forced first/last positions (count against `budget`).
      impl: passed to :func:`hata_jax.select_topk`.

    Returns:
      (idx int32[B, H, budget], count int32[B, H]) as :func:`hata_jax.select_topk` returns
      them (H = Hq for a `per_query_head` selector, else Hkv): slots >= count hold
      `hata_jax.UNUSED`.
    """
    _check_selector(selector)
    checks.check_rank(q, 3, "q", "[batch, q_heads, head_dim]")
    b, _, s, _ = check_keys(k)
    checks.check_lengths(lengths, b, s)
    check_selection_args(budget, s, sink, recent)
    selector.check_score_inputs(params, q[:, None], k, jnp.zeros((b, 1), jnp.int32))
    return selector._select(params, state, q, k, lengths.astype(jnp.int32), budget=int(budget), sink=sink,
                            recent=recent, impl=impl)


def query_chunk(batch: int, q_heads: int, queries: int, keys: int) -> int:
    """Queries per chunk: the largest power of two with batch * q_heads * chunk * keys <=
    QUERY_CHUNK_ELEMENTS (at least 1), or all the queries when they fit."""
    fit = max(1, QUERY_CHUNK_ELEMENTS // max(1, batch * q_heads * keys))
    return min(queries, 1 << (fit.bit_length() - 1))


def map_query_chunks(fn, args, pads, axes, chunk: int, out_axis: int):
    """`fn(*args)` computed `chunk` queries at a time with `lax.map`.

    args[i] holds the queries along axes[i]; it is padded with pads[i] to a multiple of `chunk`.
    The result holds the queries along `out_axis`, cut back to the original count.
    """
    t = args[0].shape[axes[0]]
    if chunk >= t:
        return fn(*args)
    n = -(-t // chunk)

    def split(x, pad, axis):
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, n * chunk - t)
        x = jnp.moveaxis(jnp.pad(x, widths, constant_values=pad), axis, 0)
        return x.reshape(n, chunk, *x.shape[1:])

    chunks = [split(x, pad, axis) for x, pad, axis in zip(args, pads, axes)]
    out = lax.map(lambda xs: jnp.moveaxis(fn(*[jnp.moveaxis(x, 0, axis) for x, axis in zip(xs, axes)]), out_axis, 0),
                  chunks)
    out = out.reshape(n * chunk, *out.shape[2:])[:t]
    return jnp.moveaxis(out, 0, out_axis)


def selection_mask(selector: Selector, params, state, q, k, q_positions, lengths, *, budget: int, sink: int = 0,
                   recent: int = 0, impl: str = "reference") -> jax.Array:
    """Teacher forcing: the keys each query keeps.

    Args:
      q: float[B, T, Hq, D]; query t of row b sits at q_positions[b, t] and sees keys at
        positions <= q_positions[b, t] that are also < lengths[b].
      k: float[B, Hkv, S, D] the keys (state from ``selector.init_state(params, k, lengths)``).
      q_positions: int[B, T]; lengths: int[B] in [0, S].
      budget, sink, recent, impl: as in :func:`select_indices`; `sink`/`recent` force the first
        and last positions each query sees (the query's own position is its last).

    Returns:
      bool[B, H, T, S] (H = Hq for a `per_query_head` selector, else Hkv): each query (head)
      keeps its min(visible, budget) best-scoring visible keys,
      visible = min(q_positions + 1, lengths) (0 for a negative position). For a query at a
      position < lengths[b] this is the selection :func:`select_indices` makes at the decode step
      of that position (lengths = q_positions + 1).
    """
    _check_selector(selector)
    check_queries(q, k)
    b, t, hq, _ = q.shape
    s = k.shape[2]
    check_positions(q_positions, (b, t), "q_positions", "[batch, queries]")
    checks.check_lengths(lengths, b, s)
    check_selection_args(budget, s, sink, recent)
    budget = int(budget)
    lengths = lengths.astype(jnp.int32)

    def keep(q_chunk, positions):
        tc = q_chunk.shape[1]
        scores = selector.selection_scores(params, state, q_chunk, k, positions, budget=budget)  # [B, H, Tc, S]
        visible = jnp.clip(jnp.minimum(positions + 1, lengths[:, None]), 0, s)  # [B, Tc]
        rows = jnp.swapaxes(scores, 1, 2).reshape(b * tc, -1, s)
        idx, count = select_topk(rows, budget, visible.reshape(-1), sink=sink, recent=recent, impl=impl)
        # Unused slots write to an extra column s, cut off afterwards.
        slots = jnp.where(jnp.arange(budget) < count[..., None], idx, s)
        mask = jnp.put_along_axis(jnp.zeros(rows.shape[:2] + (s + 1,), bool), slots, True, axis=-1, inplace=False)
        return jnp.swapaxes(mask[..., :s].reshape(b, tc, -1, s), 1, 2)

    chunk = query_chunk(b, hq, t, s)
    return map_query_chunks(keep, (q, q_positions.astype(jnp.int32)), (0, -1), (1, 1), chunk, 2)


def sparse_causal_attention(q, k, v, mask, *, scale: float | None = None) -> jax.Array:
    """Softmax attention of every query over the keys its KV head keeps.

    Args:
      q: float[B, T, Hq, D]; k, v: float[B, Hkv, S, D]; mask: bool[B, Hkv, T, S] (shared by each
        group's query heads) or bool[B, Hq, T, S] (per query head), from :func:`selection_mask`;
        scale: logit scale, default 1 / sqrt(D).

    Returns:
      [B, T, Hq, D] in q's dtype (softmax in float32); a query that keeps no key gets 0.
    """
    check_queries(q, k)
    checks.check_floating(v, "v")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    b, t, hq, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    checks.check_dtype(mask, [jnp.bool_], "mask")
    if tuple(mask.shape) not in ((b, hkv, t, s), (b, hq, t, s)):
        raise ValueError(f"mask must have shape [batch, kv_heads or q_heads, queries, seq] = {(b, hkv, t, s)} or "
                         f"{(b, hq, t, s)}, got {tuple(mask.shape)}")
    scale = scale_or_default(scale, d)
    group = mask.shape[1] // hkv  # 1: one row per KV head, broadcast over its query heads

    def attend(q_chunk, mask_chunk):
        per_query = jax.vmap(lambda qt, mt: masked_attention(qt, k, v, mt.reshape(b, hkv, group, s), scale)[0],
                             in_axes=(1, 2), out_axes=1)
        return per_query(q_chunk, mask_chunk)

    chunk = query_chunk(b, hq, t, s)
    return map_query_chunks(attend, (q, mask), (0, False), (1, 2), chunk, 1).astype(q.dtype)
