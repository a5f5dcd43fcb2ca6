"""Exact top-`budget` selection in one launch: a carried threshold hint, a candidate filter in
every program, and the row's last program finishing the selection.

Kernel form of :func:`hata_jax.select_topk` (scores given); :mod:`pallas_kernels.hamming_topk`
plugs Hamming scoring (and the fused encode and cache append of a HATA decode step) into the
same kernel through a score source.

Algorithm
---------
A row is `(b, h)` with `L = clip(lengths[b], 0, S)` valid positions and `k = min(L, budget)`
to select. Keys are `order_keys(scores)`: int32 in the order of the float32 scores, NaN lowest,
forced (sink/recent) positions highest. A row carries a :class:`SelectState` between calls:
a hint `(t_lo, shift)` and a `NUM_BINS`-bin histogram and a ticket counter that are zero
between calls.

One launch, grid `(B, Hkv, chunks)`. Every program scores its chunk of positions and keeps the
*candidates*, keys `>= t_lo`: it writes them compacted (in position order) at the start of its
chunk's region of the row's scratch `keys`/`positions` arrays, stores their number, and adds
them to the row's histogram of bins `min((key - t_lo) >> shift, NUM_BINS - 1)` (global
atomics). Then it takes a ticket (an atomic increment with acquire-release semantics at GPU
scope, after a block barrier, so every store of the program happens before it and the
finishing program's later loads see them); the program that draws the row's last ticket
*finishes* the row, alone:

1. `N` = number of candidates. When `N < k` (the hint was too high: keys below `t_lo` are
   missing) it re-scores the whole row into the scratch arrays (`N = L`, histogram unusable):
   correct, slower, rare.
2. It compacts the chunk regions into one dense list `D` of `N` (key, position) pairs in
   position order (in place: every entry moves towards the front).
3. The k-th largest key `T`: the histogram names the bin holding rank `k` (`n` keys in it,
   `A` keys above it). While `n > SMALL`, a round counts `D`'s keys at `PROBES` probes evenly
   spaced over the current key interval and narrows it (value bisection; also the path of a
   re-scored row, starting from `[min D, max D]`). Then the `n <= SMALL` keys of the interval
   are copied to a small list and ranked pairwise: `T` is the key with rank `k - A`.
4. One pass over `D` writes the index buffer: keys `> T`, then keys `== T` in position order
   until `k` are taken (ties at the threshold go to the lowest positions); slots come out in
   ascending position, slots `>= k` hold `UNUSED`.
5. The next hint: `t_lo` = the lowest bin edge with at least `2 k` keys above it (or a lower
   one when there were fewer candidates), `shift` such that `NUM_BINS` bins span twice
   `T - t_lo`; the histogram and the ticket are reset to zero.

A hint only decides speed, never the answer: a stale or missing hint (`t_lo = INT32_MIN`, the
state of :func:`init_state`) gives the same set, at the cost of more candidates or a re-score.
Deterministic: the answer, the slot order and the work do not depend on which program draws
the last ticket.

Byte floor, selection on given scores, [8, 131072] float32, k = 2048: read 4 MiB once (1.5 us
at ~2.9 TB/s); with a good hint the candidate traffic is ~2 x k entries per row.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels._backend import triton_call

UNUSED = -1  # index-buffer slot that holds no position
MAX_SEQ = 262144
MAX_BUDGET = 8192
INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1

NUM_BINS = 256  # histogram bins over [t_lo, t_lo + NUM_BINS << shift); higher keys in the last bin
SMALL = 64  # keys ranked pairwise at the end of the threshold search (a [SMALL, SMALL] compare)
PROBES = 16  # probes per value-bisection round (a [FINISH_BLOCK, PROBES] compare per step)
HINT_TARGET = 2  # the next hint aims at HINT_TARGET * k candidates
NO_HINT_SHIFT = 24  # bins of the top 8 bits of the unsigned key: the whole int32 range
HINT_WIDTH = 2  # a row's hint: (t_lo, shift)
SAMPLE = 256  # positions of a row sampled for a first hint (a call without one)
SAMPLE_TARGET = 4  # the sampled hint aims at SAMPLE_TARGET * k candidates

MIN_CHUNK = 1024
MAX_CHUNK = 16384
TARGET_PROGRAMS = 512
BLOCK = 1024  # positions per loop step of a program's scan
FINISH_BLOCK = 512  # list entries per loop step of the finishing program


@dataclasses.dataclass(frozen=True)
class Tiling:
    """How a row is cut: `chunk` positions per program (a power of two), scanned `block` at a time."""

    chunk: int
    block: int
    num_warps: int = 4

    def __post_init__(self):
        for name in ("chunk", "block"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"Tiling.{name} must be a power of two >= 16, got {value}")
        if self.chunk % self.block:
            raise ValueError(f"Tiling.chunk ({self.chunk}) must be a multiple of Tiling.block ({self.block})")

    def chunks(self, seq: int) -> int:
        """Programs per row (a power of two, so the per-chunk counts load as one tensor)."""
        return pl.next_power_of_2(pl.cdiv(seq, self.chunk))


def default_tiling(rows: int, seq: int) -> Tiling:
    """About TARGET_PROGRAMS programs over `rows` rows of `seq` positions."""
    chunk = pl.next_power_of_2(pl.cdiv(rows * seq, TARGET_PROGRAMS))
    chunk = min(max(chunk, MIN_CHUNK), MAX_CHUNK, max(16, pl.next_power_of_2(seq)))
    return Tiling(chunk=chunk, block=min(BLOCK, chunk))


class SelectState(NamedTuple):
    """What a row carries between selections (see the module docstring).

    hint: int32[B, Hkv, 2] = (t_lo, shift); hist: int32[B, Hkv, NUM_BINS] and tickets:
    int32[B, Hkv, 1], both zero between calls.
    """

    hint: jax.Array
    hist: jax.Array
    tickets: jax.Array


def init_state(batch: int, kv_heads: int) -> SelectState:
    """A state without a hint (the first selection takes every valid key as a candidate)."""
    hint = jnp.broadcast_to(jnp.array([INT32_MIN, NO_HINT_SHIFT], jnp.int32), (batch, kv_heads, HINT_WIDTH))
    return SelectState(
        hint=hint,
        hist=jnp.zeros((batch, kv_heads, NUM_BINS), jnp.int32),
        tickets=jnp.zeros((batch, kv_heads, 1), jnp.int32),
    )


def check_selection(seq: int, budget: int, sink: int, recent: int) -> None:
    if not 0 < seq <= MAX_SEQ:
        raise ValueError(f"sequence capacity {seq} not supported (1 to {MAX_SEQ})")
    if not 0 < budget <= min(seq, MAX_BUDGET):
        raise ValueError(f"budget {budget} not supported (1 to min(capacity {seq}, {MAX_BUDGET}))")
    if sink < 0 or recent < 0 or sink + recent > budget:
        raise ValueError(f"sink ({sink}) and recent ({recent}) must be >= 0 and sum to at most budget ({budget})")


# ----------------------------------------------------------------------------------------------
# In-kernel helpers (plain jnp on refs and tensors: they run in Triton and in the interpreter).


def iota(shape, dim=0):
    return lax.broadcasted_iota(jnp.int32, shape, dim)


def count(mask, axis=None):
    return jnp.sum(mask.astype(jnp.int32), axis=axis)


def barrier(interpret: bool) -> None:
    """Order this program's global stores before its later loads (a no-op when interpreted)."""
    if not interpret:
        pltriton.debug_barrier()


def order_keys(scores, pos, length, *, sink: int, recent: int):
    """int32 keys in the order of the float32 `scores`, NaN lowest; positions forced in (the
    first `sink`, the last `recent` before `length`) get the highest key."""
    bits = lax.bitcast_convert_type(scores, jnp.int32)
    keys = jnp.where(bits < 0, bits ^ INT32_MAX, bits)
    keys = jnp.where(scores != scores, INT32_MIN, keys)
    if sink or recent:
        keys = jnp.where((pos < sink) | (pos >= length - recent), INT32_MAX, keys)
    return keys


def _unsigned(x):
    return lax.bitcast_convert_type(x, jnp.uint32)


def _signed(x):
    return lax.bitcast_convert_type(x, jnp.int32)


def bins_of(keys, t_lo, shift):
    """Histogram bin of keys `>= t_lo`: `min((key - t_lo) >> shift, NUM_BINS - 1)` (unsigned)."""
    offset = lax.shift_right_logical(_unsigned(keys - t_lo), _unsigned(shift))
    return _signed(jnp.minimum(offset, jnp.uint32(NUM_BINS - 1)))


HIST_BLOCK = 128  # candidate keys per histogram product


def _add_chunk_histogram(row: "_Row", start, found, t_lo, shift) -> None:
    """Add the bins of this program's `found` candidates (keys_ref[start:start + found], reloaded
    compacted, so only candidates issue atomics) to the row's histogram, HIST_BLOCK keys at a
    time: one atomic add per key of a 1-D vector (a tensor whose layout replicates elements
    across threads, e.g. a dot's result, would add them more than once)."""

    def step(i, carry):
        slot = i * HIST_BLOCK + iota((HIST_BLOCK,))
        member = slot < found
        keys = pltriton.load(row.keys_ref.at[start + jnp.where(member, slot, 0)], mask=member, other=0)
        bins = jnp.where(member, bins_of(keys, t_lo, shift), 0)
        if row.interpret:  # the interpreter's atomic add of an index vector drops repeated indices
            one_hot = (bins[:, None] == iota((1, NUM_BINS), 1)) & member[:, None]
            pltriton.atomic_add(row.hist_ref, (pl.ds(0, NUM_BINS),), count(one_hot, axis=0))
        else:
            pltriton.atomic_add(row.hist_ref, (bins,), jnp.ones((HIST_BLOCK,), jnp.int32), mask=member)
        return carry

    lax.fori_loop(0, pl.cdiv(found, HIST_BLOCK), step, 0)


def _bit_length(x):
    """Bits of a non-negative int32 (0 for 0)."""
    return 32 - lax.clz(x)


def row_spec(*tail: int):
    """The whole row (b, h) of an array [B, Hkv, *tail], for program (b, h, c)."""
    return pl.BlockSpec((None, None, *tail), lambda b, h, c: (b, h) + (0,) * len(tail))


def batch_spec():
    """Element b of an array [B], for program (b, h, c)."""
    return pl.BlockSpec((None,), lambda b, h, c: (b,))


def _scalar(vector, index):
    """vector[index] for a traced scalar index (0 when out of range)."""
    return jnp.sum(jnp.where(iota(vector.shape) == index, vector, 0))


# ----------------------------------------------------------------------------------------------
# Score sources: what a program scores. `bind(refs, interpret=...)` returns an object with
# `block(first, pos, valid) -> float32[block]` (scores of positions `first + arange(block)`; only
# valid ones are read) and `length() -> int32` (the row's valid length, after any append).


@dataclasses.dataclass(frozen=True)
class GivenScores:
    """Scores given as float32[B, Hkv, S] (:func:`select_topk`)."""

    seq: int

    def in_specs(self):
        return [row_spec(self.seq)]

    def inputs(self, scores):
        return [scores.astype(jnp.float32)]

    def aliases(self):
        return {}

    def out_shapes(self):
        return []

    def out_specs(self):
        return []

    def bind(self, len_ref, refs, *, interpret: bool):
        (scores_ref,) = refs
        return _BoundGiven(scores_ref, jnp.clip(len_ref[...], 0, self.seq))


class _BoundGiven(NamedTuple):
    scores_ref: Any
    row_length: jax.Array

    def length(self):
        return self.row_length

    def block(self, first, pos, valid):
        return pltriton.load(self.scores_ref.at[pl.ds(first, valid.shape[0])], mask=valid, other=0.0)

    def at(self, pos, valid):
        return pltriton.load(self.scores_ref.at[jnp.where(valid, pos, 0)], mask=valid, other=0.0)


# ----------------------------------------------------------------------------------------------
# The kernel.


class _Row(NamedTuple):
    """Refs of this program's row and the static shape of the selection."""

    source: Any  # bound score source
    hint_ref: Any  # int32[2]
    hist_ref: Any  # int32[NUM_BINS]
    tickets_ref: Any  # int32[1]
    keys_ref: Any  # int32[S] scratch: candidate keys, per chunk region, then the dense list
    pos_ref: Any  # int32[S] scratch: their positions
    counts_ref: Any  # int32[chunks]
    small_ref: Any  # int32[SMALL] scratch: the keys ranked pairwise
    idx_ref: Any  # int32[budget]
    count_ref: Any  # int32[] (scalar block)
    seq: int
    chunk: int
    chunks: int
    block: int
    budget: int
    sink: int
    recent: int
    carry_hint: bool  # compute the next call's hint (False: the caller drops the state)
    interpret: bool


def _scan_chunk(row: _Row, chunk_index, length, t_lo, shift):
    """Write this program's candidates to its chunk region and (with a hint) the histogram;
    returns their number."""
    hinted = t_lo > INT32_MIN  # without a hint every key is a candidate: no histogram (contention)
    start = chunk_index * row.chunk
    steps = pl.cdiv(jnp.clip(length - start, 0, row.chunk), row.block)

    def step(i, base):
        first = start + i * row.block
        pos = first + iota((row.block,))
        valid = pos < length
        keys = order_keys(row.source.block(first, pos, valid), pos, length, sink=row.sink, recent=row.recent)
        cand = valid & (keys >= t_lo)
        flag = cand.astype(jnp.int32)
        dest = start + base + jnp.cumsum(flag) - flag
        pltriton.store(row.keys_ref.at[dest], keys, mask=cand)
        pltriton.store(row.pos_ref.at[dest], pos, mask=cand)
        return base + jnp.sum(flag)

    found = lax.fori_loop(0, steps, step, jnp.int32(0))
    barrier(row.interpret)

    @pl.when(hinted)
    def _():
        _add_chunk_histogram(row, start, found, t_lo, shift)

    return found


def _rescore_row(row: _Row, length):
    """Every valid key of the row into the scratch list, in position order; returns (min, max) key."""

    def step(i, bounds):
        first = i * FINISH_BLOCK
        pos = first + iota((FINISH_BLOCK,))
        valid = pos < length
        keys = order_keys(row.source.block(first, pos, valid), pos, length, sink=row.sink, recent=row.recent)
        pltriton.store(row.keys_ref.at[pl.ds(first, FINISH_BLOCK)], keys, mask=valid)
        pltriton.store(row.pos_ref.at[pl.ds(first, FINISH_BLOCK)], pos, mask=valid)
        lo, hi = bounds
        return (jnp.minimum(lo, jnp.min(jnp.where(valid, keys, INT32_MAX))),
                jnp.maximum(hi, jnp.max(jnp.where(valid, keys, INT32_MIN))))

    return lax.fori_loop(0, pl.cdiv(length, FINISH_BLOCK), step, (jnp.int32(INT32_MAX), jnp.int32(INT32_MIN)))


def _gather_candidates(row: _Row, counts, total):
    """Move the chunk regions' candidates into one dense list at the front (in place, in position
    order); returns the (min, max) key."""
    # counts_ref := exclusive prefix of the counts; entry j of the list lies in the last chunk
    # whose prefix is <= j, found by binary search (log2(chunks) gathers from that small array).
    pltriton.store(row.counts_ref.at[pl.ds(0, row.chunks)], jnp.cumsum(counts) - counts)
    barrier(row.interpret)

    def step(i, bounds):
        j = i * FINISH_BLOCK + iota((FINISH_BLOCK,))
        valid = j < total
        chunk = jnp.zeros((FINISH_BLOCK,), jnp.int32)
        for bit in reversed(range(row.chunks.bit_length() - 1)):
            probe = chunk + (1 << bit)
            chunk = jnp.where(pltriton.load(row.counts_ref.at[probe]) <= j, probe, chunk)
        first = pltriton.load(row.counts_ref.at[chunk])
        src = jnp.where(valid, chunk * row.chunk + j - first, 0)
        keys = pltriton.load(row.keys_ref.at[src], mask=valid, other=0)
        pos = pltriton.load(row.pos_ref.at[src], mask=valid, other=0)
        barrier(row.interpret)  # every lane has read before any lane overwrites (src >= j)
        pltriton.store(row.keys_ref.at[j], keys, mask=valid)
        pltriton.store(row.pos_ref.at[j], pos, mask=valid)
        lo, hi = bounds
        return (jnp.minimum(lo, jnp.min(jnp.where(valid, keys, INT32_MAX))),
                jnp.maximum(hi, jnp.max(jnp.where(valid, keys, INT32_MIN))))

    return lax.fori_loop(0, pl.cdiv(total, FINISH_BLOCK), step, (jnp.int32(INT32_MAX), jnp.int32(INT32_MIN)))


def _list_keys(row: _Row, i, total):
    j = i * FINISH_BLOCK + iota((FINISH_BLOCK,))
    valid = j < total
    return j, valid, pltriton.load(row.keys_ref.at[pl.ds(i * FINISH_BLOCK, FINISH_BLOCK)], mask=valid,
                                   other=INT32_MIN)


def _count_at_least(row: _Row, total, probes, probe_valid):
    """int32[PROBES]: keys of the dense list >= each probe."""

    def step(i, acc):
        _, valid, keys = _list_keys(row, i, total)
        return acc + count((keys[:, None] >= probes[None, :]) & valid[:, None], axis=0)

    counts = lax.fori_loop(0, pl.cdiv(total, FINISH_BLOCK), step, jnp.zeros((PROBES,), jnp.int32))
    return jnp.where(probe_valid, counts, -1)


def _narrow(row: _Row, total, k, state):
    """One value-bisection round: (lo, hi, above, n) -> a narrower interval holding rank k."""
    lo, hi, above, _ = state
    span = _unsigned(hi - lo)
    step = lax.shift_right_logical(span, jnp.uint32(PROBES.bit_length() - 1)) + jnp.uint32(1)
    offsets = iota((PROBES,)).astype(jnp.uint32) * step
    probe_valid = offsets <= span
    probes = lo + _signed(offsets)
    counts = _count_at_least(row, total, probes, probe_valid)  # -1 for invalid probes
    best = jnp.max(jnp.where(counts >= k, iota((PROBES,)), 0))
    nxt = best + 1
    has_next = (nxt < PROBES) & (_scalar(jnp.where(probe_valid, 1, 0), nxt) > 0)
    new_lo = _scalar(probes, best)
    new_hi = jnp.where(has_next, _scalar(probes, nxt) - 1, hi)
    new_above = jnp.where(has_next, _scalar(counts, nxt), above)
    return new_lo, new_hi, new_above, _scalar(counts, best) - new_above


def _threshold(row: _Row, total, k, lo, hi, above, n):
    """(T, number of keys > T) for the k-th largest key of the dense list, given an interval
    [lo, hi] holding it with `n` keys inside and `above` keys over it."""
    lo, hi, above, n = lax.while_loop(
        lambda s: (s[3] > SMALL) & (s[0] < s[1]),
        functools.partial(_narrow, row, total, k),
        (lo, hi, above, n),
    )

    def ranked():
        def collect(i, base):
            _, valid, keys = _list_keys(row, i, total)
            inside = valid & (keys >= lo) & (keys <= hi)
            flag = inside.astype(jnp.int32)
            pltriton.store(row.small_ref.at[base + jnp.cumsum(flag) - flag], keys, mask=inside)
            return base + jnp.sum(flag)

        found = lax.fori_loop(0, pl.cdiv(total, FINISH_BLOCK), collect, jnp.int32(0))
        barrier(row.interpret)
        slot = iota((SMALL,))
        keys = pltriton.load(row.small_ref.at[pl.ds(0, SMALL)], mask=slot < found, other=INT32_MIN)
        member = slot < found
        rank = k - above
        greater = count((keys[None, :] > keys[:, None]) & member[None, :], axis=1)
        at_least = count((keys[None, :] >= keys[:, None]) & member[None, :], axis=1)
        hit = member & (greater < rank) & (rank <= at_least)
        threshold = jnp.max(jnp.where(hit, keys, INT32_MIN))
        return threshold, above + count(member & (keys > threshold))

    return lax.cond(lo < hi, ranked, lambda: (lo, above))


def _write_indices(row: _Row, total, k, threshold, need) -> None:
    """idx = the selected positions in ascending order, then UNUSED."""

    def step(i, carry):
        taken, equal_seen = carry
        j, valid, keys = _list_keys(row, i, total)
        pos = pltriton.load(row.pos_ref.at[pl.ds(i * FINISH_BLOCK, FINISH_BLOCK)], mask=valid, other=0)
        equal = (valid & (keys == threshold)).astype(jnp.int32)
        equal_rank = equal_seen + jnp.cumsum(equal) - equal
        chosen = (valid & (keys > threshold)) | ((equal > 0) & (equal_rank < need))
        flag = chosen.astype(jnp.int32)
        slot = taken + jnp.cumsum(flag) - flag
        pltriton.store(row.idx_ref.at[slot], pos, mask=chosen & (slot < row.budget))
        return taken + jnp.sum(flag), equal_seen + jnp.sum(equal)

    lax.fori_loop(0, pl.cdiv(total, FINISH_BLOCK), step, (jnp.int32(0), jnp.int32(0)))
    _fill_unused(row, k)


def _fill_unused(row: _Row, start) -> None:
    width = min(FINISH_BLOCK, pl.next_power_of_2(row.budget))

    def step(i, carry):
        slot = i * width + iota((width,))
        pltriton.store(row.idx_ref.at[pl.ds(i * width, width)], jnp.full((width,), UNUSED, jnp.int32),
                       mask=(slot >= start) & (slot < row.budget))
        return carry

    lax.fori_loop(0, pl.cdiv(row.budget, width), step, 0)


def _order_unsigned(x):
    """uint32 in the order of the int32 x (INT32_MIN -> 0)."""
    return _unsigned(x) ^ jnp.uint32(2**31)


def _lowered(threshold, t_lo):
    """A key twice as far below `threshold` as `t_lo` (>= INT32_MIN), for a hint that was too high."""
    room = _order_unsigned(threshold)
    distance = _unsigned(threshold - t_lo)
    out = jnp.where(distance > room - distance, jnp.uint32(0), room - distance * jnp.uint32(2))
    return _signed(out ^ jnp.uint32(2**31))


def _shift_for(threshold, t_lo):
    """The bin shift that makes NUM_BINS bins span twice `threshold - t_lo`."""
    width = _unsigned(threshold - t_lo)
    span = jnp.where(width > jnp.uint32(INT32_MAX // 2), jnp.int32(INT32_MAX), _signed(width) * 2)
    return jnp.maximum(_bit_length(span) - NUM_BINS.bit_length() + 1, 0)


def _finish_row(row: _Row, length, t_lo, shift) -> None:
    k = jnp.minimum(length, row.budget)
    counts = pltriton.load(row.counts_ref.at[pl.ds(0, row.chunks)])
    candidates = jnp.sum(counts)
    rescore = candidates < k
    listed = rescore | (t_lo == INT32_MIN)  # no histogram: search the whole list

    def from_rescore():
        lo, hi = _rescore_row(row, length)
        return length, lo, hi

    def from_candidates():
        lo, hi = _gather_candidates(row, counts, candidates)
        return candidates, lo, hi

    total, lo_key, hi_key = lax.cond(rescore, from_rescore, from_candidates)
    barrier(row.interpret)
    hist = pltriton.load(row.hist_ref.at[pl.ds(0, NUM_BINS)])
    cum = jnp.cumsum(hist)  # keys in bins <= b
    cum_at_least = jnp.sum(hist) - cum + hist  # keys in bins >= b
    bin_ids = iota((NUM_BINS,))
    best = jnp.max(jnp.where(cum_at_least >= k, bin_ids, 0))
    width = lax.shift_left(jnp.int32(1), shift)
    bin_lo = t_lo + best * width
    last = best == NUM_BINS - 1
    bin_hi = jnp.where(last | (bin_lo > INT32_MAX - (width - 1)), INT32_MAX, bin_lo + (width - 1))
    bin_above = jnp.where(last, 0, _scalar(cum_at_least, best + 1))
    lo = jnp.where(listed, lo_key, jnp.maximum(bin_lo, lo_key))
    hi = jnp.where(listed, hi_key, jnp.minimum(bin_hi, hi_key))
    above = jnp.where(listed, 0, bin_above)
    inside = jnp.where(listed, total, _scalar(hist, best))
    threshold, greater = _threshold(row, total, k, lo, hi, above, inside)
    _write_indices(row, total, k, threshold, k - greater)
    row.count_ref[...] = k
    if row.carry_hint:
        _store_next_hint(row, cum_at_least, bin_ids, total, k, t_lo, width, threshold, listed, lo_key, hi_key)
    pltriton.store(row.hist_ref.at[pl.ds(0, NUM_BINS)], jnp.zeros((NUM_BINS,), jnp.int32))
    pltriton.store(row.tickets_ref.at[pl.ds(0, 1)], jnp.zeros((1,), jnp.int32))


def _store_next_hint(row: _Row, cum_at_least, bin_ids, total, k, t_lo, width, threshold, listed, lo_key, hi_key):
    target = HINT_TARGET * k

    def hint_from_histogram():  # the lowest bin edge with >= target keys above, else reach lower
        edge = jnp.max(jnp.where(cum_at_least >= target, bin_ids, 0))
        raised = t_lo + edge * width
        return jnp.where(total >= target, raised, jnp.minimum(t_lo, _lowered(threshold, t_lo)))

    def hint_from_list():  # after a re-score: the exact target-th key
        return _threshold(row, total, jnp.minimum(target, total), lo_key, hi_key, jnp.int32(0), total)[0]

    new_lo = lax.cond(listed, hint_from_list, hint_from_histogram)
    new_shift = _shift_for(threshold, new_lo)
    pltriton.store(row.hint_ref.at[pl.ds(0, HINT_WIDTH)], jnp.where(iota((HINT_WIDTH,)) == 0, new_lo, new_shift))


def _write_all(row: _Row, length) -> None:
    """A row of at most `budget` valid positions: select them all (positions 0 .. length - 1)."""
    width = min(FINISH_BLOCK, pl.next_power_of_2(row.budget))

    def step(i, carry):
        slot = i * width + iota((width,))
        pltriton.store(row.idx_ref.at[pl.ds(i * width, width)], jnp.where(slot < length, slot, UNUSED),
                       mask=slot < row.budget)
        return carry

    lax.fori_loop(0, pl.cdiv(row.budget, width), step, 0)
    row.count_ref[...] = length
    pltriton.store(row.tickets_ref.at[pl.ds(0, 1)], jnp.zeros((1,), jnp.int32))


def _kth_sample_key(keys, valid, rank):
    """The rank-th largest of the valid keys (rank >= 1, at most their number): 8 rounds of a
    16-way value bisection over [SAMPLE] keys."""
    lo = jnp.min(jnp.where(valid, keys, INT32_MAX))
    hi = jnp.max(jnp.where(valid, keys, INT32_MIN))

    def narrow(_, bounds):
        lo, hi = bounds
        span = _unsigned(hi - lo)
        step = lax.shift_right_logical(span, jnp.uint32(PROBES.bit_length() - 1)) + jnp.uint32(1)
        offsets = iota((PROBES,)).astype(jnp.uint32) * step
        probes = lo + _signed(offsets)
        ok = (offsets <= span) & (count((keys[:, None] >= probes[None, :]) & valid[:, None], axis=0) >= rank)
        best = jnp.max(jnp.where(ok, iota((PROBES,)), 0))
        new_lo = _scalar(probes, best)
        nxt = jnp.minimum(best + 1, PROBES - 1)
        has_next = (best + 1 < PROBES) & (_scalar(offsets, nxt) <= span)
        return new_lo, jnp.where(has_next, _scalar(probes, nxt) - 1, hi)

    lo, _ = lax.fori_loop(0, 32 // (PROBES.bit_length() - 1) + 1, narrow, (lo, hi))
    return lo


def _sampled_hint(row: _Row, length):
    """(t_lo, shift) from SAMPLE evenly spread positions of [0, length - 1) (the newest position
    may still be being written): ~SAMPLE_TARGET k keys are expected at or above t_lo, the bins
    span up to the sample's largest unforced key. Every program of the row computes the same."""
    n = jnp.maximum(length - 1, 1)
    j = iota((SAMPLE,))
    pos = ((j.astype(jnp.float32) + 0.5) * (n.astype(jnp.float32) / SAMPLE)).astype(jnp.int32)
    valid = (pos < n) & (j < n)
    keys = order_keys(row.source.at(pos, valid), pos, length, sink=row.sink, recent=row.recent)
    k = jnp.minimum(length, row.budget)
    wanted = (SAMPLE_TARGET * k).astype(jnp.float32) * (jnp.minimum(n, SAMPLE).astype(jnp.float32) / n.astype(jnp.float32))
    rank = jnp.clip(jnp.ceil(wanted).astype(jnp.int32), 1, SAMPLE)
    enough = count(valid) > rank  # else: every key is a candidate
    unforced = valid & (keys < INT32_MAX)
    t_lo = jnp.where(enough, _kth_sample_key(keys, valid, rank), INT32_MIN)
    top = jnp.max(jnp.where(unforced, keys, INT32_MIN))
    width = _unsigned(top - t_lo)
    span = jnp.where(width > jnp.uint32(INT32_MAX), jnp.int32(INT32_MAX), _signed(width))
    shift = jnp.maximum(_bit_length(span) - NUM_BINS.bit_length() + 1, 0)
    return t_lo, jnp.where(enough & (top > t_lo), shift, NO_HINT_SHIFT)


def _select_kernel(len_ref, *refs, source, n_source: int, **static):
    source_refs = refs[:n_source]
    (hint_in, _hist_in, _tickets_in, *rest) = refs[n_source:]
    n_out_source = len(source.out_shapes())
    source_out = rest[:n_out_source]
    (hint_ref, hist_ref, tickets_ref, keys_ref, pos_ref, counts_ref, small_ref, idx_ref, count_ref) = rest[n_out_source:]
    interpret = static["interpret"]
    bound = source.bind(len_ref, list(source_refs) + list(source_out), interpret=interpret)
    length = bound.length()
    row = _Row(bound, hint_ref, hist_ref, tickets_ref, keys_ref, pos_ref, counts_ref, small_ref, idx_ref, count_ref,
               **static)
    hint = pltriton.load(hint_in.at[pl.ds(0, HINT_WIDTH)])
    t_lo, shift = _scalar(hint, 0), _scalar(hint, 1)
    everything = length <= row.budget
    t_lo, shift = lax.cond((t_lo == INT32_MIN) & ~everything, lambda: _sampled_hint(row, length),
                           lambda: (t_lo, shift))
    chunk_index = pl.program_id(2)  # read outside the conditionals (the interpreter needs that)

    @pl.when(~everything)
    def _():
        found = _scan_chunk(row, chunk_index, length, t_lo, shift)
        pltriton.store(counts_ref.at[pl.ds(chunk_index, 1)], found[None])

    barrier(interpret)
    ticket = pltriton.atomic_add(tickets_ref, (jnp.int32(0),), jnp.ones((), jnp.int32))  # scalar: one thread, once
    last = ticket == row.chunks - 1

    @pl.when(last & everything)
    def _():
        _write_all(row, length)

    @pl.when(last & ~everything)
    def _():
        _finish_row(row, length, t_lo, shift)


def run_select(source, len_array, source_inputs, state: SelectState | None, *, batch: int, kv_heads: int,
               seq: int, budget: int, sink: int, recent: int, tiling: Tiling, interpret: bool, name: str,
               debug: bool = False):
    """Launch the selection kernel with a score source; returns (idx, count, state, source outputs).

    state None: a fresh state, and no next hint is computed (the returned state is a fresh one too).
    """
    carry_hint = state is not None
    state = state if state is not None else init_state(batch, kv_heads)
    chunks = tiling.chunks(seq)
    state_specs = [row_spec(HINT_WIDTH), row_spec(NUM_BINS), row_spec(1)]
    n_source = len(source_inputs)
    first_state = 1 + n_source
    aliases = {1 + i: o for i, o in source.aliases().items()}
    n_out_source = len(source.out_shapes())
    aliases.update({first_state + j: n_out_source + j for j in range(3)})
    out_shape = [
        *source.out_shapes(),
        jax.ShapeDtypeStruct(state.hint.shape, jnp.int32),
        jax.ShapeDtypeStruct(state.hist.shape, jnp.int32),
        jax.ShapeDtypeStruct(state.tickets.shape, jnp.int32),
        jax.ShapeDtypeStruct((batch, kv_heads, seq), jnp.int32),
        jax.ShapeDtypeStruct((batch, kv_heads, seq), jnp.int32),
        jax.ShapeDtypeStruct((batch, kv_heads, chunks), jnp.int32),
        jax.ShapeDtypeStruct((batch, kv_heads, SMALL), jnp.int32),
        jax.ShapeDtypeStruct((batch, kv_heads, budget), jnp.int32),
        jax.ShapeDtypeStruct((batch, kv_heads), jnp.int32),
    ]
    out_specs = [
        *source.out_specs(),
        *state_specs,
        row_spec(seq),
        row_spec(seq),
        row_spec(chunks),
        row_spec(SMALL),
        row_spec(budget),
        pl.BlockSpec((None, None), lambda b, h, c: (b, h)),
    ]
    kernel = functools.partial(
        _select_kernel, source=source, n_source=n_source, seq=seq, chunk=tiling.chunk, chunks=chunks,
        block=tiling.block, budget=budget, sink=sink, recent=recent, carry_hint=carry_hint, interpret=interpret,
    )
    results = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(batch, kv_heads, chunks),
        in_specs=[
            batch_spec(),
            *source.in_specs(),
            *state_specs,
        ],
        out_specs=out_specs,
        input_output_aliases=aliases,
        interpret=interpret,
        name=name,
        compiler_params=pltriton.CompilerParams(num_warps=tiling.num_warps, num_stages=1),
    )(len_array, *source_inputs, state.hint, state.hist, state.tickets)
    source_results = results[:n_out_source]
    hint, hist, tickets, keys, positions, counts, small, idx, count_out = results[n_out_source:]
    if debug:
        return idx, count_out, SelectState(hint, hist, tickets), (keys, positions, counts, small)
    return idx, count_out, SelectState(hint, hist, tickets), source_results


def select_topk(scores, budget: int, lengths, *, sink: int = 0, recent: int = 0, state: SelectState | None = None,
                interpret: bool = False, tiling: Tiling | None = None):
    """Kernel form of :func:`hata_jax.select_topk`.

    scores: float32[B, Hkv, S]; lengths: int[B]; state: the rows' :class:`SelectState` (None:
    a fresh one without a hint, and no hint computed for later). Returns (idx int32[B, Hkv,
    budget] with the selected positions in ascending order then UNUSED, count int32[B, Hkv] =
    min(lengths[b], budget), new state).
    """
    if scores.ndim != 3:
        raise ValueError(f"scores must be float[batch, kv_heads, seq], got shape {scores.shape}")
    batch, kv_heads, seq = scores.shape
    check_selection(seq, budget, sink, recent)
    tiling = tiling or default_tiling(batch * kv_heads, seq)
    source = GivenScores(seq)
    idx, count_out, state, _ = run_select(
        source, lengths.astype(jnp.int32), source.inputs(scores), state, batch=batch, kv_heads=kv_heads, seq=seq,
        budget=budget, sink=sink, recent=recent, tiling=tiling, interpret=interpret, name="hata_select",
    )
    return idx, count_out, state
