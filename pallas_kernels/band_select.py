"""Exact top-`budget` selection: a sample-band fast path, and one program per row as its fallback.

The pipeline behind :func:`select_topk` (scores given) and :func:`pallas_kernels.hamming_topk.
hamming_topk` (scores computed from the codes in launches A and B). Per row `(b, h)` with
`L = lengths[b]` valid positions and `k = min(L, budget)`; keys are `radix_select.order_keys`
(forced sink/recent positions INT32_MAX, NaN INT32_MIN). Three launches, static shapes, no sort,
no host sync, and no launch that only fallback rows use; one atomic counter per row (which of
its band programs finishes last) and otherwise no atomics; every path gives the same
deterministic answer (all keys above the threshold key, then keys equal to it lowest position
first; slots in ascending position), whichever program decides.

A. **sample** (`*_sample`, grid `(B, Hkv, sample / sample_slice)`): the row's sample is
   `n_s = min(L, sample)` positions, one per stratum of `L / n_s` positions at an offset hashed
   from `(j, row)` (periodic structure cannot alias). Each program computes the row's sample
   keys once as one vector (strata in float32, no division), stores them (every program of the
   row stores the same values), and after a barrier loads its slice and the keys it compares
   with: for each key of its slice, how many sample keys are `>` and `>=` it (exact ranks, ties
   included; the compare adds both counts, packed in one int32, to a `[slice, step]` tile and
   reduces once after the loop). With `r = budget n_s / L`, the programs holding the sample's
   `r_hi = max(1, floor(r - 5 sqrt(r) - 4))`-th, `r_top`-th and `r_lo = ceil(r + 5 sqrt(r) +
   4)`-th largest keys write them as `t_hi`, `t_top`, `t_lo` (equal keys write equal values), so
   the k-th largest key lies in `[t_lo, t_hi]` unless the sample is a >5-sigma outlier, or, when
   `r_hi` is clipped to 1 (small r), unless no sample key lies above it (`~exp(-r)`: see the
   tunables below); `t_lo = INT32_MIN` when `r_lo > n_s`. `r_top` counts from below the sample's
   forced keys (`r_top = max(r_hi, forced + top_rank)`; top_rank 1: the largest unforced sample
   key), so sink/recent positions do not stretch the band digits up to INT32_MAX.
   `L <= budget` gives `t_lo = t_hi = INT32_MIN`: the band is the NaN keys, the row is taken whole.
B. **band pass and decision** (`*_band`, grid `(B, Hkv, chunks)`, fused with scoring for
   `hamming_topk`, which also writes the scores for the later launches): per chunk `n_above`
   (keys `> t_hi`, only counted: clusters of high scores overflow nothing) and the band keys
   (`t_lo <= key <= t_hi`) compacted into the chunk's `slots` (a scan per loop step; `n_band`
   counts them all, more than `slots` is an overflow). Then, after a block barrier, the
   histogram of the band digit over those slots (the radix select's one-hot MMA), stored as
   suffix counts (coarse and fine). The band digit is `(key - t_lo) >> shift`, with `shift`
   making `[t_lo, t_top]` span 8 bits, and 255 above `t_top`. Each program then adds 1 to its
   row's arrival counter (zeroed by launch A; an atomic add, acquire-release at GPU scope, after
   a block barrier), and the program that sees `chunks - 1` arrivals before its own is the
   row's last and decides it (`_decide`) from all the row's counts: `row_plan` gives the
   threshold bucket, the band digit holding the `(k - n_above)`-th largest band key (from the
   summed coarse suffix counts and one row of the fine ones). The fast path holds iff
   `n_above <= k <= n_above + n_band`, no chunk overflowed (or `t_lo == t_hi`), and the
   threshold is settled here (PATH_NO_BAND_KEY, PATH_ONE_KEY_BAND, PATH_ONE_KEY_BUCKET: the
   bucket is one key value) or the bucket holds at most `list_cap` keys (PATH_RANKED): then
   it writes every chunk's counts; on PATH_RANKED it copies the bucket keys, with their chunk
   indices, into the row's list from the band keys every listed chunk appended to a row-contiguous
   array (at an offset from an atomic counter, so in no chunk order; contiguous loads, COPY_LANES
   a step) and finds the threshold among them (`list_threshold`: 8-bit radix passes over the
   keys' offsets from the least, from the top digit of their spread). A row the fast path cannot
   take has its candidates known from the counts (`fallback_candidates`: the keys above t_hi
   when more than k are, else those below t_lo when fewer than k reach it, else the band's);
   if at most `list_cap`, one scan of the row (L2-resident) lists them with their chunk indices
   and the threshold is found among them as for a bucket (PATH_LISTED); else the program selects
   the row whole (PATH_FALLBACK, `radix_select.row_select`: four histogram passes and a
   counting scan). A missed row costs its launch that one program's time (`bench.kernels
   --select-variants`, "band miss"), and a row on the fast path nothing.
C. **compaction** (`hata_select_compact`, `radix_select.compact_launch`): every row; writes the
   index buffer from each chunk's counts (`chunk_plan_of`; on a listed row each program splits
   its chunk's listed keys, and those of the chunks before it (by the list's chunk indices),
   into keys above and equal to the threshold).

`select_topk_with_path` / `hamming_topk_with_path` also return how each row was selected
(`PATH_*`).

Tunables (:class:`BandConfig`):
- `sample = 512`: pairwise ranks cost `n_s**2` pairs per row (262K, a quarter of 1024's);
  r = 8 sample ranks for k at the Llama shape, so the band spans sample ranks 1..27 (~6.9K
  keys, ~108 per chunk against 1024 slots). `r - 5 sqrt(r) - 4 < 1` there, so t_hi is the
  sample's largest key and a band miss is "no sample key above the k-th key": probability
  `~exp(-r)` = 3.4e-4 per row (the row takes the radix fallback, still exact). Smaller
  `budget / L` raises it (r = 4: 1.8%).
- `sample_slice = 32`, `sample_step = 128`, `sample_warps = 4`: 16 programs per row (128 in
  all, one per SM), a `[32, 128]` tile (32 accumulators per thread, 110 registers); `[64,
  256]` with 8 warps needed 184 registers and 2x the loop body.
- `sigmas = 5`, `slack = 4`: the band spans r -+ (5 sqrt(r) + 4) sample ranks.
- `top_rank = 1`: t_top is the largest unforced sample key, so the threshold lands in the
  lumped digit 255 only on a band miss. With 3 it landed there whenever the sample held fewer
  than 3 keys above the k-th (`P(Poisson(8) <= 2)` = 1.4% of rows at r = 8), and that bucket
  (keys between the 3rd and 1st sample keys, up to ~3K) overflowed the bucket cap of the time (2048) in ~0.6% of
  rows (simulated), sending them to the fallback.
- `slots_divisor = 2`: half a chunk of band slots (1024 per 2048-chunk); keys above the band
  are only counted. Real scores cluster: on SmolLM2's (8K, budget 1/64,
  `bench/results/issue13_real_scores/`) the recent tokens fill most of the last chunk's band,
  and a quarter chunk of slots sent 66 of 120 rows (512-position chunks) to the fallback, half
  a chunk 1 (same registers: ptxas counts on the CPU).
- `list_block = 128` band keys per histogram MMA step (one step per chunk at the Llama shape).
- `list_cap = 16384`: a 64 KiB list per row, which the deciding program ranks in up to four
  histogram passes (`cdiv(found, list_block)` MMA steps each): a threshold bucket, or a missed
  row's candidates (the band of ~6.9K keys at the Llama shape, r = 8; ~16K at budget 1/16,
  r = 32). More candidates (a row far from its band, heavy ties over a long row) take the
  whole-row select.
The tiling (chunks, loop blocks, warps) is :class:`pallas_kernels.radix_select.Tiling`'s, with
its tunables in :mod:`pallas_kernels.hamming_topk`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import radix_select as rs
from pallas_kernels.backend import block_barrier, last_to_arrive, triton_call
from pallas_kernels.radix_select import INT32_MAX, INT32_MIN, Tiling, count, iota

# How a row was selected (launch B's decision; `*_with_path` return it per row).
PATH_FALLBACK = 0  # one program's radix select of the whole row (more candidates than the list holds)
PATH_NO_BAND_KEY = 1  # k keys above the band: the threshold is t_hi
PATH_ONE_KEY_BAND = 2  # t_lo == t_hi (ties, all equal, lengths[b] <= budget)
PATH_ONE_KEY_BUCKET = 3  # the threshold bucket is one key value ([t_lo, t_top] spans < 256 keys)
# 4..6 were an earlier design's cases; PATH_RANKED keeps its number (recorded results count rows by path).
PATH_RANKED = 7  # the threshold found among the bucket's listed keys by the deciding program
PATH_LISTED = 8  # a row the band cannot take: its candidates listed by a scan of the row, the threshold among them

BOUND_LO, BOUND_HI, BOUND_TOP = 0, 1, 2  # a row's band bounds: keys t_lo, t_hi, t_top
BOUNDS_WIDTH = 4
TOP_DIGIT = 2**rs.DIGIT_BITS - 1  # the band digit of keys above t_top
MIN_SLOTS = 16  # band slots per chunk at least (the band histogram's MMA contracts over >= 16)
MAX_SAMPLE = 4096  # most sample positions (well inside count_ranks' 2**RANK_BITS and budget * n_s < 2**31)
COPY_LANES = 1024  # appended band keys per loop step of the bucket copy
ARRIVALS, APPENDED, COUNTERS = 0, 1, 2  # a row's counters of launch B (zeroed by launch A), and their number
SCAN_LANES = 512  # positions per loop step of the candidates' scan of a row the band cannot take (1024: 122 registers)
LIST_STEP = 1024  # listed keys per loop step of the compaction's split of a listed row's counts


@dataclasses.dataclass(frozen=True)
class BandConfig:
    """Tunables of the sample-band fast path (powers of two but sigmas, slack and top_rank; see
    the module docstring)."""

    sample: int = 512  # most sample positions per row
    sample_slice: int = 32  # sample positions ranked per program of launch A
    sample_step: int = 128  # sample keys compared per loop step of launch A
    sample_warps: int = 4
    sigmas: float = 5.0  # the band spans r -+ (sigmas sqrt(r) + slack) sample ranks
    slack: float = 4.0
    top_rank: int = 1  # t_top: the sample key of this rank (or r_hi's, when lower) caps the band digits
    slots_divisor: int = 2  # band slots per chunk = chunk / slots_divisor
    list_block: int = 128  # band keys per histogram MMA step in launch B
    list_cap: int = 16384  # most keys listed (a threshold bucket, a missed row's candidates); more: row_select

    def __post_init__(self):
        for name in (
            "sample",
            "sample_slice",
            "sample_step",
            "sample_warps",
            "slots_divisor",
            "list_block",
            "list_cap",
        ):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"BandConfig.{name} must be a power of two, got {value}")
        if self.sample > MAX_SAMPLE:
            raise ValueError(f"BandConfig.sample must be <= {MAX_SAMPLE}, got {self.sample}")
        if self.list_block < MIN_SLOTS:
            raise ValueError(f"BandConfig.list_block must be >= {MIN_SLOTS}, got {self.list_block}")
        if self.list_cap < self.list_block:
            raise ValueError(f"BandConfig.list_cap must be >= list_block ({self.list_block}), got {self.list_cap}")
        if self.top_rank < 1:
            raise ValueError(f"BandConfig.top_rank must be >= 1, got {self.top_rank}")


class BandLayout(NamedTuple):
    """Static sizes of one call, from its BandConfig, Tiling and capacity."""

    sample: int  # sample lanes (n_s <= sample)
    sample_slice: int
    sample_step: int
    sample_programs: int
    slots: int  # band slots per chunk
    list_block: int
    list_cap: int  # most keys listed


def band_layout(config: BandConfig, tiling: Tiling, seq: int) -> BandLayout:
    sample = min(config.sample, pl.next_power_of_2(seq))
    sample_slice = min(config.sample_slice, sample)
    slots = min(tiling.chunk, max(MIN_SLOTS, tiling.chunk // config.slots_divisor))
    return BandLayout(
        sample=sample,
        sample_slice=sample_slice,
        sample_step=min(config.sample_step, sample),
        sample_programs=sample // sample_slice,
        slots=slots,
        list_block=min(config.list_block, slots),
        list_cap=config.list_cap,
    )


# ----------------------------------------------------------------------------------------------
# Score sources: how launches A and B get float32 scores.


class BoundScores(Protocol):
    def at(self, pos, valid):
        """float32[n] scores at positions pos[n] (< S everywhere; only `valid` lanes matter)."""

    def block(self, first, valid):
        """float32[block] scores of positions [first, first + block) (only `valid` lanes matter)."""


class ScoreSource(Protocol):
    """Static description of the score inputs (their arrays are passed next to it)."""

    writes_scores: bool  # launch B writes the float32 scores for the later launches

    def in_specs(self) -> list: ...

    def bind(self, refs, *, interpret: bool) -> BoundScores: ...


class _ScoresRefs(NamedTuple):
    scores_ref: Any

    def at(self, pos, valid):
        return self.scores_ref[pos]

    def block(self, first, valid):
        return pltriton.load(self.scores_ref.at[pl.ds(first, valid.shape[0])], mask=valid, other=0.0)


@dataclasses.dataclass(frozen=True)
class GivenScores:
    """Scores read from a float32[B, Hkv, S] array (the only array)."""

    seq: int
    writes_scores = False

    def in_specs(self):
        return [rs.row_spec(self.seq)]

    def bind(self, refs, *, interpret):
        return _ScoresRefs(*refs)


# ----------------------------------------------------------------------------------------------
# In-kernel helpers.


def bit_length(x):
    """Bits of the int32 scalar `x` read as uint32."""
    return count(lax.shift_right_logical(x, iota((32,))) != 0)


def band_shift(t_lo, t_top):
    """The shift that maps [t_lo, t_top] onto 8-bit digits (its width read as uint32)."""
    return jnp.maximum(bit_length(t_top - t_lo) - rs.DIGIT_BITS, 0)


def band_digit(keys, bounds, shift):
    """The band digit of band keys, in [0, 256): (key - t_lo) >> shift up to t_top, 255 above."""
    return jnp.where(keys > bounds.top, TOP_DIGIT, lax.shift_right_logical(keys - bounds.lo, shift))


def _mix(j, row):
    """uint32 hash of the stratum index j (a vector) and the row (a scalar)."""
    x = j.astype(jnp.uint32) * jnp.uint32(0x9E3779B1) + row.astype(jnp.uint32) * jnp.uint32(0x85EBCA77)
    x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
    return x ^ (x >> 15)


def strided_positions(j, n_s, length, row):
    """One position of [0, length) per stratum j < n_s, in float32 arithmetic without integer
    divisions: stratum j is [floor(j s), floor((j+1) s)) with s = L / n_s (rounded), the offset
    a hashed fraction of its width. Which positions are sampled only moves the band, never the
    answer."""
    stride = length.astype(jnp.float32) / jnp.maximum(n_s, 1).astype(jnp.float32)
    low = (j.astype(jnp.float32) * stride).astype(jnp.int32)
    width = jnp.maximum(((j + 1).astype(jnp.float32) * stride).astype(jnp.int32) - low, 1)
    fraction = (_mix(j, row) >> 8).astype(jnp.int32).astype(jnp.float32) * jnp.float32(2.0**-24)
    offset = jnp.minimum((fraction * width.astype(jnp.float32)).astype(jnp.int32), width - 1)
    return jnp.clip(low + offset, 0, jnp.maximum(length - 1, 0))


def sample_ranks(n_s, length, budget: int, config: BandConfig, forced):
    """(r_hi, r_top, r_lo): the sample ranks (1 = largest) of t_hi, t_top and t_lo; r_top
    counts from below the sample's `forced` (sink/recent) keys, which all hold INT32_MAX."""
    r = (budget * n_s).astype(jnp.float32) / jnp.maximum(length, 1).astype(jnp.float32)
    spread = config.sigmas * jnp.sqrt(r) + config.slack
    r_hi = jnp.clip(jnp.floor(r - spread).astype(jnp.int32), 1, jnp.maximum(n_s, 1))
    r_lo = jnp.maximum(jnp.ceil(r + spread).astype(jnp.int32), 1)
    r_top = jnp.maximum(r_hi, jnp.minimum(jnp.minimum(forced + config.top_rank, r_lo), n_s))
    return r_hi, r_top, r_lo


class Bounds(NamedTuple):
    lo: jax.Array
    hi: jax.Array
    top: jax.Array


def load_bounds(bounds_ref) -> Bounds:
    return Bounds(bounds_ref[BOUND_LO], bounds_ref[BOUND_HI], bounds_ref[BOUND_TOP])


RANK_BITS = 16  # count_ranks packs its two counts (each < 2**16) into one int32


def count_ranks(mine, steps, n: int, keys_of_step):
    """(keys > each of `mine`, keys >= each) over `steps` loop steps of `keys_of_step(i) ->
    keys [n]`, whose lanes past the listed keys hold INT32_MIN (mine: [m]; fewer than 2**16
    keys). Exact ranks, ties included, except that a padding lane counts as a key equal to a
    `mine` of INT32_MIN: `write_ranked` then finds INT32_MIN only where it is the answer (fewer
    listed keys than the rank are above INT32_MIN). The loop adds both comparisons, packed in
    one int32, to an [m, n] tile; the cross-thread reduction runs once, after it."""

    def compare(i, tile):
        keys = keys_of_step(i)[None, :]
        mine_column = mine[:, None]
        return tile + jnp.where(keys > mine_column, 2**RANK_BITS + 1, (keys >= mine_column).astype(jnp.int32))

    packed = jnp.sum(lax.fori_loop(0, steps, compare, jnp.zeros((mine.shape[0], n), jnp.int32)), axis=1)
    return packed >> RANK_BITS, packed & (2**RANK_BITS - 1)


def write_ranked(out_ref, index, rank, mine, mine_valid, above, at_least) -> None:
    """out_ref[index] = the rank-th largest key (1 = largest) if it is one of `mine` (equal keys
    write equal values, so programs holding ties agree)."""
    hit = mine_valid & (above < rank) & (rank <= at_least)

    @pl.when(jnp.max(hit.astype(jnp.int32)) > 0)
    def _():
        out_ref[index] = jnp.max(jnp.where(hit, mine, INT32_MIN))


# ----------------------------------------------------------------------------------------------
# Launch A: sample thresholds.


def _write_bounds(bounds_ref, mine, mine_valid, above, at_least, *, program, n_s, length, budget, config, forced):
    """The band bounds this program's ranked sample keys hold (program 0 also the fixed ones)."""
    select_all = length <= budget
    r_hi, r_top, r_lo = sample_ranks(n_s, length, budget, config, forced)
    for rank, slot in ((r_hi, BOUND_HI), (r_top, BOUND_TOP), (r_lo, BOUND_LO)):
        write_ranked(bounds_ref, slot, jnp.where(select_all, 0, rank), mine, mine_valid, above, at_least)

    first = program == 0

    @pl.when(first & (select_all | (r_lo > n_s)))
    def _():
        bounds_ref[BOUND_LO] = jnp.int32(INT32_MIN)

    @pl.when(first & select_all)
    def _():
        bounds_ref[BOUND_HI] = jnp.int32(INT32_MIN)
        bounds_ref[BOUND_TOP] = jnp.int32(INT32_MIN)


def _sample_kernel(len_ref, *refs, source, layout, seq, budget, sink, recent, config, interpret):
    """Every program computes the row's sample keys once, as one vector, and stores them (all
    programs of a row store the same values); after a barrier it ranks its slice against them.
    Program 0 also zeroes the row's counters of launch B (arrivals, band keys appended)."""
    *source_refs, keys_ref, bounds_ref, counters_ref = refs
    scores = source.bind(source_refs, interpret=interpret)
    program = pl.program_id(2)

    @pl.when(program == 0)
    def _():
        counters_ref[ARRIVALS] = jnp.int32(0)  # counted up by the row's band programs
        counters_ref[APPENDED] = jnp.int32(0)
    row = pl.program_id(0) * pl.num_programs(1) + pl.program_id(1)
    length = jnp.clip(len_ref[()], 0, seq)
    n_s = jnp.minimum(length, layout.sample)
    j = iota((layout.sample,))
    valid = j < n_s
    pos = jnp.where(valid, strided_positions(j, n_s, length, row), 0)
    keys = jnp.where(valid, rs.order_keys(scores.at(pos, valid), pos, length, sink=sink, recent=recent), INT32_MIN)
    keys_ref[...] = keys
    forced = count(keys == INT32_MAX)  # sink/recent positions in the sample
    block_barrier(interpret)
    first = program * layout.sample_slice
    mine = keys_ref[pl.ds(first, layout.sample_slice)]
    mine_valid = first + iota((layout.sample_slice,)) < n_s
    step = layout.sample_step
    above, at_least = count_ranks(mine, pl.cdiv(n_s, step), step, lambda i: keys_ref[pl.ds(i * step, step)])
    _write_bounds(
        bounds_ref,
        mine,
        mine_valid,
        above,
        at_least,
        program=program,
        n_s=n_s,
        length=length,
        budget=budget,
        config=config,
        forced=forced,
    )


# ----------------------------------------------------------------------------------------------
# Launch B: the band pass.


def _band_kernel(len_ref, bounds_ref, *refs, source, layout, tiling, seq, budget, sink, recent, interpret):
    """Every program: its chunk's band pass and band-digit histogram (each output indexed by
    the chunk); then it counts its arrival, and the row's last program to arrive decides the
    row (`_decide`)."""
    num_sources = len(source.in_specs())
    source_refs, (table_ref, _, *outs) = refs[:num_sources], refs[num_sources:]  # _: the arrivals, aliased below
    scores_out_ref = outs.pop(0) if source.writes_scores else None
    counts_ref, slots_ref, coarse_ref, fine_ref, decision_ref, plan_counts_ref, *lists, counters_ref = outs
    list_ref, list_chunks_ref, band_keys_ref, band_chunks_ref = lists
    scores = source.bind(source_refs, interpret=interpret)
    geo = rs.chunk_geometry(len_ref, tiling, seq)
    chunk = geo.chunk_index
    bounds = load_bounds(bounds_ref)
    block, slots = tiling.scan, layout.slots

    def step(i, carry):
        n_above, n_band = carry
        first, pos, valid = rs.block_positions(geo, i, block)
        values = scores.block(first, valid)
        if scores_out_ref is not None:
            pltriton.store(scores_out_ref.at[pl.ds(first, block)], values, mask=pos < seq)
        keys = rs.order_keys(values, pos, geo.length, sink=sink, recent=recent)
        band = valid & (keys >= bounds.lo) & (keys <= bounds.hi)
        slot = n_band + jnp.cumsum(band.astype(jnp.int32)) - 1
        keep = band & (slot < slots)
        pltriton.store(slots_ref.at[chunk, jnp.where(keep, slot, slots)], keys, mask=keep)
        return n_above + count(valid & (keys > bounds.hi)), n_band + count(band)

    zero = jnp.int32(0)
    n_above, n_band = lax.fori_loop(0, geo.blocks(geo.length, block), step, (zero, zero))
    counts_ref[chunk, 0] = n_above
    counts_ref[chunk, 1] = n_band

    # The band digits' histogram, read back from the slots (only a row with t_lo < t_hi whose
    # chunks all fit their slots uses it).
    shift = band_shift(bounds.lo, bounds.top)
    hist_block = layout.list_block
    block_barrier(interpret)

    def members(i):
        return i * hist_block + iota((hist_block,)) < n_band

    def load_block(i):
        return pltriton.load(slots_ref.at[chunk, pl.ds(i * hist_block, hist_block)], mask=members(i), other=0)

    listed = (n_band <= slots) & (bounds.lo != bounds.hi)
    # A listed chunk also appends its band keys and its index to the row's band list, at an offset
    # counted atomically (so in no particular chunk order): the decision reads them contiguously.
    base = pltriton.atomic_add(counters_ref, (jnp.int32(APPENDED),), jnp.where(listed, n_band, 0))

    def digits_of_block(i, keys):
        member = members(i)
        at = pl.ds(base + i * hist_block, hist_block)
        pltriton.store(band_keys_ref.at[at], keys, mask=member)
        pltriton.store(band_chunks_ref.at[at], jnp.full((hist_block,), chunk, jnp.int32), mask=member)
        return band_digit(keys, bounds, shift), member

    blocks = jnp.where(listed, pl.cdiv(n_band, hist_block), 0)
    coarse, fine = rs.suffix_counts(rs.histogram_loop(blocks, load_block, digits_of_block, table_ref, ahead=True))
    coarse_ref[chunk, :] = coarse
    fine_ref[chunk, :, :] = fine
    # The row's last program to arrive sees every program's counts and slots.
    @pl.when(last_to_arrive(counters_ref, pl.num_programs(2), interpret=interpret))
    def _():
        _decide(
            bounds,
            geo.length,
            counts_ref,
            coarse_ref,
            fine_ref,
            scores.scores_ref if scores_out_ref is None else scores_out_ref,
            table_ref,
            decision_ref,
            plan_counts_ref,
            list_ref,
            list_chunks_ref,
            band_keys_ref,
            band_chunks_ref,
            layout=layout,
            tiling=tiling,
            seq=seq,
            budget=budget,
            sink=sink,
            recent=recent,
            interpret=interpret,
        )


# ----------------------------------------------------------------------------------------------
# The decision (a fallback row selected whole by one program).


class RowPlan(NamedTuple):
    """A row's decision, computed alike by every program of the row (chunk-indexed vectors are
    [chunks])."""

    path: jax.Array
    threshold: jax.Array  # the threshold key (PATH_RANKED: unused; `list_threshold` finds it)
    remaining: jax.Array  # keys equal to the threshold to take (PATH_RANKED: the threshold's rank in the bucket)
    found: jax.Array  # PATH_RANKED: the bucket's keys (else 0)
    greater: jax.Array  # keys above the threshold (PATH_RANKED: above the bucket)
    equal: jax.Array  # keys equal to the threshold (PATH_RANKED: in the bucket)
    digit: jax.Array  # the bucket's band digit
    shift: jax.Array


def row_plan(bounds: Bounds, n_above, n_band, band_coarse_ref, band_fine_ref, k_eff, layout: BandLayout) -> RowPlan:
    """The row's path from its band counts alone: the k-th key is in the band, every chunk's
    band keys fit its slots, and the threshold bucket is one key value or holds at most
    `list_cap` keys; else PATH_FALLBACK."""
    above, in_band = jnp.sum(n_above), jnp.sum(n_band)
    listed = (jnp.max(n_band) <= layout.slots) | (bounds.lo == bounds.hi)
    in_reach = (above <= k_eff) & (k_eff <= above + in_band) & listed
    need = k_eff - above  # band keys to take
    digit, _, digit_above = rs.boundary_digit(band_coarse_ref, band_fine_ref, need)
    chunk_at_least, chunk_above = rs.chunk_counts(band_fine_ref, digit)
    bucket = chunk_at_least - chunk_above
    found = jnp.sum(bucket)
    rank = need - digit_above  # the threshold's rank in the bucket, 1 = largest
    shift = band_shift(bounds.lo, bounds.top)
    no_band_key = need == 0
    one_key_band = jnp.logical_not(no_band_key) & (bounds.lo == bounds.hi)
    by_band = no_band_key | one_key_band
    one_key_bucket = jnp.logical_not(by_band) & (shift == 0) & (digit < TOP_DIGIT)
    ranked = jnp.logical_not(by_band | one_key_bucket) & (found <= layout.list_cap)
    path = rs.traced(PATH_FALLBACK, need)  # a select of two constants does not lower to Triton
    for case, code in (
        (ranked, PATH_RANKED),
        (one_key_bucket, PATH_ONE_KEY_BUCKET),
        (one_key_band, PATH_ONE_KEY_BAND),
        (no_band_key, PATH_NO_BAND_KEY),
    ):
        path = jnp.where(in_reach & case, code, path)
    threshold = jnp.where(no_band_key, bounds.hi, jnp.where(one_key_band, bounds.lo, bounds.lo + digit))
    return RowPlan(
        path=path,
        threshold=threshold,
        remaining=jnp.where(no_band_key, 0, jnp.where(one_key_band, need, rank)),
        found=jnp.where(path == PATH_RANKED, found, 0),
        greater=jnp.where(by_band, n_above, n_above + chunk_above),
        equal=jnp.where(no_band_key, 0, jnp.where(one_key_band, n_band, bucket)),
        digit=digit,
        shift=shift,
    )


def _decide(
    bounds,
    length,
    counts_ref,
    band_coarse_ref,
    band_fine_ref,
    scores_ref,
    table_ref,
    decision_ref,
    plan_counts_ref,
    list_ref,
    list_chunks_ref,
    band_keys_ref,
    band_chunks_ref,
    *,
    layout,
    tiling,
    seq,
    budget,
    sink,
    recent,
    interpret,
):
    """A row's decision, by the last of its band programs (refs: the whole row's): every
    chunk's counts (keys above the threshold or the listed keys, and keys listed or equal to the
    threshold) and the decision. A row whose threshold the band counts settle needs no more. A
    listed row (PATH_RANKED: the threshold bucket, copied from the band slots; PATH_LISTED: a
    row the band cannot take, whose candidates one scan of the row lists) has its keys listed in
    list_ref, their chunks in list_chunks_ref, and the threshold found among them
    (`list_threshold`). A row
    with more candidates than the list holds is selected whole (`radix_select.row_select`)."""
    n_above, n_band = counts_ref[:, 0], counts_ref[:, 1]
    k_eff = rs.k_effective(length, budget)
    plan = row_plan(bounds, n_above, n_band, band_coarse_ref, band_fine_ref, k_eff, layout)
    fast = plan.path != PATH_FALLBACK
    ranked = plan.path == PATH_RANKED
    missed = fallback_candidates(bounds, n_above, n_band, length, k_eff, tiling.chunk)
    scanned = jnp.logical_not(fast) & (missed.count <= layout.list_cap)

    @pl.when(fast & jnp.logical_not(ranked))
    def _():
        plan_counts_ref[:, 0] = plan.greater
        plan_counts_ref[:, 1] = plan.equal
        write_decision(decision_ref, plan.path, plan.threshold, plan.remaining, 0, 0)

    @pl.when(ranked | scanned)
    def _():
        plan_counts_ref[:, 0] = jnp.where(ranked, plan.greater, missed.greater)
        plan_counts_ref[:, 1] = jnp.where(ranked, plan.equal, missed.listed)
        least, most = lax.cond(
            ranked,
            lambda: copy_bucket(band_keys_ref, band_chunks_ref, list_ref, list_chunks_ref, jnp.sum(n_band), plan,
                                bounds, interpret=interpret),
            lambda: list_candidates(scores_ref, list_ref, list_chunks_ref, missed, length, seq=seq, chunk=tiling.chunk,
                                    sink=sink, recent=recent, interpret=interpret),
        )
        found = jnp.where(ranked, plan.found, missed.count)
        block_barrier(interpret)  # the list stored before it is read back
        threshold, remaining = list_threshold(
            list_ref, table_ref, found=found, rank=jnp.where(ranked, plan.remaining, missed.rank), least=least,
            spread=most - least, block=layout.list_block
        )
        path = jnp.where(ranked, rs.traced(PATH_RANKED, found), PATH_LISTED)  # not a select of two constants
        write_decision(decision_ref, path, threshold, remaining, found, 0)

    @pl.when(jnp.logical_not(fast | scanned))
    def _():
        state = rs.row_select(
            scores_ref, table_ref, plan_counts_ref, length, seq=seq, tiling=tiling, budget=budget, sink=sink,
            recent=recent
        )
        write_decision(decision_ref, PATH_FALLBACK, state.prefix, state.remaining, 0, state.shift)


class Candidates(NamedTuple):
    """The keys of a row the band cannot take that hold its threshold: those above the band
    (the k-th key is above t_hi), the band's (it overflowed a chunk's slots, or its threshold
    bucket is over `list_cap`), or those below it. Chunk-indexed vectors are [chunks]."""

    low: jax.Array  # the candidates are the keys in [low, high]
    high: jax.Array
    greater: jax.Array  # keys above `high` per chunk
    listed: jax.Array  # candidates per chunk
    count: jax.Array
    rank: jax.Array  # the threshold's rank among them (1 = largest)


def fallback_candidates(bounds: Bounds, n_above, n_band, length, k_eff, chunk: int) -> Candidates:
    above, in_band = jnp.sum(n_above), jnp.sum(n_band)
    valid = jnp.clip(length - iota(n_above.shape) * chunk, 0, chunk)
    over = above > k_eff  # then t_hi < INT32_MAX: t_hi + 1 does not wrap
    under = jnp.logical_not(over) & (above + in_band < k_eff)  # then t_lo > INT32_MIN
    listed = jnp.where(over, n_above, jnp.where(under, valid - n_above - n_band, n_band))
    return Candidates(
        low=jnp.where(over, bounds.hi + 1, jnp.where(under, INT32_MIN, bounds.lo)),
        high=jnp.where(over, INT32_MAX, jnp.where(under, bounds.lo - 1, bounds.hi)),
        greater=jnp.where(over, 0, jnp.where(under, n_above + n_band, n_above)),
        listed=listed,
        count=jnp.sum(listed),
        rank=jnp.where(over, k_eff, jnp.where(under, k_eff - above - in_band, k_eff - above)),
    )


def list_candidates(scores_ref, list_ref, list_chunks_ref, missed: Candidates, length, *, seq: int, chunk: int,
                    sink: int, recent: int, interpret: bool):
    """List a row's candidate keys in list_ref and their chunks in list_chunks_ref (one scan of
    the row's scores, L2-resident, in steps of SCAN_LANES positions, each step's load issued one
    step ahead; there are at most `list_cap`). Returns (least, most): the candidates' bounds."""
    row = rs.ChunkGeometry(jnp.int32(0), jnp.int32(0), length, pl.next_power_of_2(seq))
    block = min(SCAN_LANES, row.chunk)

    def load(i):  # past the row: every lane masked, no memory touched
        first, _, valid = rs.block_positions(row, i, block)
        return pltriton.load(scores_ref.at[pl.ds(first, block)], mask=valid, other=0.0)

    def step(i, carry):
        written, scores = carry
        upcoming = load(i + 1)  # its latency overlaps this step's work
        _, pos, valid = rs.block_positions(row, i, block)
        keys = rs.order_keys(scores, pos, length, sink=sink, recent=recent)
        member = valid & (keys >= missed.low) & (keys <= missed.high)
        slot = written + jnp.cumsum(member.astype(jnp.int32)) - 1
        if interpret:  # masked lanes index past the list: interpreted, a masked scatter writes old values back
            slot = jnp.where(member, slot, list_ref.shape[0])
        # (On the GPU masked lanes touch no memory, and that select cost the band launch 29 registers.)
        pltriton.store(list_ref.at[slot], keys, mask=member)
        pltriton.store(list_chunks_ref.at[slot], pos // chunk, mask=member)
        return written + count(member), upcoming

    lax.fori_loop(0, row.blocks(length, block), step, (rs.traced(0, length), load(0)))
    return missed.low, missed.high


def copy_bucket(band_keys_ref, band_chunks_ref, list_ref, list_chunks_ref, total, plan: RowPlan, bounds: Bounds, *,
                interpret: bool):
    """List the threshold bucket's keys in list_ref and their chunks in list_chunks_ref, from the
    `total` band keys the row's programs appended (band_keys_ref, band_chunks_ref): contiguous
    loads, COPY_LANES a loop step, however the band keys spread over the chunks (one step per
    chunk took ~60 us at the Llama shape on the H100; a binary search for each slot's chunk
    through L2 made the band launch 7 us longer). Returns (least, most) of the listed keys."""

    def step(i, carry):
        written, least, most = carry
        valid = i * COPY_LANES + iota((COPY_LANES,)) < total
        keys = pltriton.load(band_keys_ref.at[pl.ds(i * COPY_LANES, COPY_LANES)], mask=valid, other=0)
        chunks = pltriton.load(band_chunks_ref.at[pl.ds(i * COPY_LANES, COPY_LANES)], mask=valid, other=0)
        member = valid & (band_digit(keys, bounds, plan.shift) == plan.digit)
        slot = written + jnp.cumsum(member.astype(jnp.int32)) - 1
        if interpret:  # see list_candidates
            slot = jnp.where(member, slot, list_ref.shape[0])
        pltriton.store(list_ref.at[slot], keys, mask=member)
        pltriton.store(list_chunks_ref.at[slot], chunks, mask=member)
        least = jnp.minimum(least, jnp.min(jnp.where(member, keys, INT32_MAX)))
        most = jnp.maximum(most, jnp.max(jnp.where(member, keys, INT32_MIN)))
        return written + count(member), least, most

    start = (rs.traced(0, total), rs.traced(INT32_MAX, total), rs.traced(INT32_MIN, total))
    _, least, most = lax.fori_loop(0, pl.cdiv(total, COPY_LANES), step, start)
    return least, most


def write_decision(decision_ref, path, threshold, remaining, found, shift) -> None:
    fields = (rs.DECISION_PATH, rs.DECISION_THRESHOLD, rs.DECISION_REMAINING, rs.DECISION_FOUND, rs.DECISION_SHIFT)
    for index, value in zip(fields, (path, threshold, remaining, found, shift)):
        decision_ref[index] = rs.traced(value, path)


def list_threshold(list_ref, table_ref, *, found, rank, least, spread, block: int):
    """The `rank`-th largest (1 = largest) of the `found` keys listed in list_ref, whose least
    is `least` and whose offsets from it are at most `spread` (read as uint32): a radix select
    of 8-bit passes over the offsets, from the spread's top digit (a bucket spanning `2**16`
    keys takes two passes, not four). The list is L1/L2-resident: its writer reads it back.
    Returns (the threshold key, how many keys equal to it to take)."""
    def listed_lanes(i):
        return i * block + iota((block,)) < found

    def load_block(i):
        return pltriton.load(list_ref.at[pl.ds(i * block, block)], mask=listed_lanes(i), other=0)

    prefix, remaining = jnp.int32(0), rank
    for pass_index in range(rs.NUM_PASSES):
        low = 32 - rs.DIGIT_BITS * (pass_index + 1)
        # A pass above the spread's top digit has every offset on digit 0: no steps (an empty
        # histogram resolves digit 0 with nothing above it).
        steps = jnp.where(lax.shift_right_logical(spread, low) == 0, 0, pl.cdiv(found, block))

        def digits_of_block(i, keys, low=low, prefix=prefix, pass_index=pass_index):
            listed = listed_lanes(i)
            offsets = keys - least
            if pass_index:
                listed = listed & (lax.shift_right_logical(offsets, low + rs.DIGIT_BITS) == prefix)
            return lax.shift_right_logical(offsets, low) & (2**rs.DIGIT_BITS - 1), listed

        hist = rs.histogram_loop(steps, load_block, digits_of_block, table_ref, ahead=True)
        digit, _, above = rs.histogram_boundary(hist, remaining)
        prefix, remaining = (prefix << rs.DIGIT_BITS) | digit, remaining - above
    return least + prefix, remaining


# ----------------------------------------------------------------------------------------------
# Launch C, the compaction: each program's plan.


def chunk_plan_of(decision_ref, plan_counts_ref, list_ref, list_chunks_ref, *, chunk_index) -> rs.ChunkPlan:
    """A row's ChunkPlan (plan_counts_ref: [chunks, 2], the decision's counts). On a listed row
    (PATH_RANKED, PATH_LISTED) the list (its keys in list_ref, their chunks in list_chunks_ref,
    in any order) splits the listed keys of the chunks before this one and of its own into keys
    above and equal to the threshold: a loop over the whole list."""
    path = decision_ref[rs.DECISION_PATH]
    listed_row = (path == PATH_RANKED) | (path == PATH_LISTED)
    threshold = decision_ref[rs.DECISION_THRESHOLD]
    plan = rs.chunk_plan(
        plan_counts_ref[:, 0],
        plan_counts_ref[:, 1],
        decision_ref[rs.DECISION_REMAINING],
        decision_ref[rs.DECISION_SHIFT],
        threshold,
        chunk_index,
    )
    found = jnp.where(listed_row, decision_ref[rs.DECISION_FOUND], 0)
    block = min(LIST_STEP, list_ref.shape[0])

    def step(i, counts):
        listed = i * block + iota((block,)) < found
        keys = pltriton.load(list_ref.at[pl.ds(i * block, block)], mask=listed, other=0)
        chunks = pltriton.load(list_chunks_ref.at[pl.ds(i * block, block)], mask=listed, other=0)
        before, own = listed & (chunks < chunk_index), listed & (chunks == chunk_index)
        above, equal = keys > threshold, keys == threshold
        return tuple(
            total + count(part & kind)
            for total, part, kind in zip(counts, (before, before, own, own), (above, equal, above, equal))
        )

    zero = jnp.int32(0)
    greater_before, equal_before, own_greater, own_equal = lax.fori_loop(
        0, pl.cdiv(found, block), step, (zero, zero, zero, zero)
    )
    return plan._replace(
        greater_before=plan.greater_before + greater_before,
        equal_before=jnp.where(listed_row, equal_before, plan.equal_before),
        own_greater=plan.own_greater + own_greater,
        own_equal=jnp.where(listed_row, own_equal, plan.own_equal),
    )


# ----------------------------------------------------------------------------------------------
# The pipeline.


def select_with_path(
    source: ScoreSource,
    arrays,
    lengths,
    *,
    shape,
    budget: int,
    sink: int,
    recent: int,
    tiling: Tiling,
    config: BandConfig,
    interpret: bool,
):
    """The band select's launches on the scores `source` describes, from `arrays` (rows of
    `shape` = (B, Hkv, S)).

    Returns (idx int32[B, Hkv, budget], count int32[B, Hkv], path int32[B, Hkv]: how each row
    was selected, PATH_FALLBACK or the fast path's PATH_* case).
    """
    batch, kv_heads, seq = shape
    layout = band_layout(config, tiling, seq)
    chunks = tiling.chunks(seq)
    grid = (batch, kv_heads, chunks)
    lengths = lengths.astype(jnp.int32)
    table = rs.one_hot_table()
    prefix = "hata_hamming" if source.writes_scores else "hata_select"
    common = dict(seq=seq, sink=sink, recent=recent)
    finish = dict(budget=budget, sink=sink, recent=recent, tiling=tiling, interpret=interpret)
    launch = dict(num_warps=tiling.num_warps, num_stages=tiling.num_stages, interpret=interpret)

    def shaped(*tail, dtype=jnp.int32):
        return jax.ShapeDtypeStruct((batch, kv_heads, *tail), dtype)

    _, bounds, arrivals = triton_call(
        functools.partial(
            _sample_kernel, source=source, layout=layout, budget=budget, config=config, interpret=interpret, **common
        ),
        out_shape=[shaped(layout.sample), shaped(BOUNDS_WIDTH), shaped(COUNTERS)],
        grid=(batch, kv_heads, layout.sample_programs),
        in_specs=[rs.length_spec(), *source.in_specs()],
        out_specs=[rs.row_spec(layout.sample), rs.row_spec(BOUNDS_WIDTH), rs.row_spec(COUNTERS)],
        num_warps=config.sample_warps,
        num_stages=tiling.num_stages,
        interpret=interpret,
        name=f"{prefix}_sample",
    )(lengths, *arrays)

    band_shapes = [
        shaped(chunks, 2),
        shaped(chunks, layout.slots),
        shaped(chunks, rs.NIBBLE),
        shaped(chunks, rs.NIBBLE, rs.NIBBLE),
        shaped(rs.DECISION_WIDTH),
        shaped(chunks, 2),
        shaped(layout.list_cap),
        shaped(layout.list_cap),
        shaped(chunks * layout.slots),
        shaped(chunks * layout.slots),
        shaped(COUNTERS),
    ]
    if source.writes_scores:
        band_shapes.insert(0, shaped(seq, dtype=jnp.float32))
    band_inputs = [lengths, bounds, *arrays, table, arrivals]
    band_out = triton_call(
        functools.partial(
            _band_kernel, source=source, layout=layout, tiling=tiling, budget=budget, interpret=interpret, **common
        ),
        out_shape=band_shapes,
        grid=grid,
        in_specs=[
            rs.length_spec(), rs.row_spec(BOUNDS_WIDTH), *source.in_specs(), rs.table_spec(), rs.row_spec(COUNTERS)
        ],
        out_specs=[rs.row_spec(*x.shape[2:]) for x in band_shapes],
        name=f"{prefix}_band",
        input_output_aliases={len(band_inputs) - 1: len(band_shapes) - 1},
        **launch,
    )(*band_inputs)
    scores = band_out[0] if source.writes_scores else arrays[0]
    decision, plan_counts, key_list, key_chunks = band_out[-7:-3]  # then the appended band keys, the counters
    plan_inputs = [(x, rs.row_spec(*x.shape[2:])) for x in (plan_counts, key_list, key_chunks)]
    idx, count_out = rs.compact_launch(scores, lengths, decision, plan_inputs, chunk_plan_of, **finish)
    return idx, count_out, decision[..., rs.DECISION_PATH]


def select_topk_with_path(
    scores,
    budget: int,
    lengths,
    *,
    sink: int = 0,
    recent: int = 0,
    interpret: bool = False,
    tiling: Tiling | None = None,
    config: BandConfig = BandConfig(),
):
    """:func:`select_topk`, also returning how each row was selected (int32[B, Hkv] of PATH_*)."""
    if scores.ndim != 3 or scores.dtype != jnp.float32:
        raise ValueError(f"scores must be float32[batch, kv_heads, seq], got {scores.dtype}{list(scores.shape)}")
    batch, kv_heads, seq = scores.shape
    rs.check_selection(seq, budget, sink, recent)
    return select_with_path(
        GivenScores(seq),
        (scores,),
        jnp.asarray(lengths),
        shape=scores.shape,
        budget=budget,
        sink=sink,
        recent=recent,
        tiling=tiling or rs.default_tiling(batch * kv_heads, seq),
        config=config,
        interpret=interpret,
    )


def select_topk(
    scores,
    budget: int,
    lengths,
    *,
    sink: int = 0,
    recent: int = 0,
    interpret: bool = False,
    tiling: Tiling | None = None,
):
    """Kernel form of :func:`hata_jax.select_topk` (same contract; slots in ascending position).

    scores: float32[B, Hkv, S]; lengths: int[B]. Returns (idx int32[B, Hkv, budget],
    count int32[B, Hkv]).
    """
    idx, count_out, _ = select_topk_with_path(
        scores, budget, lengths, sink=sink, recent=recent, interpret=interpret, tiling=tiling
    )
    return idx, count_out
