"""Exact top-`budget` selection: a sample-band fast path with the radix select as fallback.

The pipeline behind :func:`select_topk` (scores given) and :func:`pallas_kernels.hamming_topk.
hamming_topk` (scores computed from the codes in launches A and B), in two designs
(`BandConfig.design`): **parallel** (the default, :class:`BandConfig`) and **serial**
(:data:`SERIAL`). Per row `(b, h)` with `L = lengths[b]` valid
positions and `k = min(L, budget)`; keys are `radix_select.order_keys` (forced sink/recent
positions INT32_MAX, NaN INT32_MIN). Seven launches, static shapes, no sort, no atomics, no host
sync; every design and path gives the same deterministic answer (all keys above the threshold
key, then keys equal to it lowest position first; slots in ascending position).

A. **sample** (`*_sample`, grid `(B, Hkv, sample / sample_slice)`): the row's sample is
   `n_s = min(L, sample)` positions, one per stratum of `L / n_s` positions at an offset hashed
   from `(j, row)` (periodic structure cannot alias). Each program finds, for its slice of the
   sample, how many sample keys are `>` and `>=` each of its keys: exact ranks, ties included.
   With `r = budget n_s / L`, the programs holding the sample's `r_hi = max(1, floor(r - 5
   sqrt(r) - 4))`-th, `r_top`-th and `r_lo = ceil(r + 5 sqrt(r) + 4)`-th largest keys write
   them as `t_hi`, `t_top`, `t_lo` (equal keys write equal values), so the k-th largest key
   lies in `[t_lo, t_hi]` unless the sample is a >5-sigma outlier, or, when `r_hi` is clipped
   to 1 (small r), unless no sample key lies above it (`~exp(-r)`: see the tunables below);
   `t_lo = INT32_MIN` when `r_lo > n_s`.
   `L <= budget` gives `t_lo = t_hi = INT32_MIN`: the band is the NaN keys, the row is taken whole.
   - serial: `r_top = max(r_hi, 3)`; every program recomputes every sample key (integer
     divisions for the strata) at each loop step, and the compare reduces across threads at
     every step.
   - parallel: each program computes the row's sample keys once as one vector (strata in
     float32, no division), stores them (every program of the row stores the same values),
     and after a barrier loads its slice and the keys it compares with; the compare adds both
     counts, packed in one int32, to a `[slice, step]` tile and reduces once after the loop.
     `r_top` counts from below the sample's forced keys (`r_top = max(r_hi, forced + 1)`: the
     largest unforced sample key), so sink/recent positions do not stretch the band digits up
     to INT32_MAX.
B. **band pass** (`*_band`, grid `(B, Hkv, chunks)`, fused with scoring for `hamming_topk`,
   which also writes the scores for the later launches): per chunk `n_above` (keys `> t_hi`,
   only counted: clusters of high scores overflow nothing) and the band keys (`t_lo <= key <=
   t_hi`) compacted into the chunk's `slots` (a scan per loop step; `n_band` counts them all,
   more than `slots` is an overflow). Then, after a block barrier, the histogram of the band
   digit over those slots (the radix select's one-hot MMA), stored as suffix counts (coarse and
   fine). The band digit is `(key - t_lo) >> shift`, with `shift` making `[t_lo, t_top]` span 8
   bits, and 255 above `t_top`.
C. **decide** (`hata_select_decide`, grid `(B, Hkv, chunks)`): the fast path holds iff
   `n_above <= k <= n_above + n_band` and (no chunk overflowed or `t_lo == t_hi`); the band
   digit holding the `(k - n_above)`-th largest band key is the threshold bucket. Rows not on
   the fast path run radix pass 0 in every program.
   - serial: the chunk-0 program of a row finds the exact threshold alone: from the whole
     row's suffix counts, then one scan of every chunk's slots copying the bucket's keys to a
     dense list, then a 16-way search in registers (`probe_search`), or by counting scans of
     the slots for a bucket of more than `dense` keys (see `band_threshold`).
   - parallel: every program computes the row's plan from the counts alone (`row_plan`: the
     bucket from the coarse suffix counts and one row of the fine ones, the same in every
     program), writes its own chunk's counts, and on PATH_RANKED copies its own chunk's bucket
     keys (one scan of its slots) into the row's bucket list after those of the chunks before
     it. The threshold is settled here when no ranking is needed (PATH_NO_BAND_KEY,
     PATH_ONE_KEY_BAND, PATH_ONE_KEY_BUCKET); a bucket of more than `bucket_cap` keys of more
     than one value goes to the radix fallback.
D. **fallback passes 1..3** (`hata_select_pass{1,2,3}`): return at once on fast rows, except
   (parallel) pass 1 on PATH_RANKED rows: program c ranks bucket keys `[j rank_slice, (j+1)
   rank_slice)` for `j = c, c + chunks, ...` against the whole list (pairwise, as in A) and the
   program holding the threshold's rank writes it.
E. **compaction** (`hata_select_compact`): both paths; writes the index buffer. On PATH_RANKED
   each program splits its chunk's bucket count (and those of the chunks before it) into keys
   above and equal to the threshold from the bucket list (`ranked_plan`).

`select_topk_with_path` / `hamming_topk_with_path` also return how each row was selected
(`PATH_*`).

Tunables (parallel design):
- `sample = 512`: pairwise ranks cost `n_s**2` pairs per row (262K, a quarter of 1024's);
  r = 8 sample ranks for k at the Llama shape, so the band spans sample ranks 1..27 (~6.9K
  keys, ~108 per chunk against 1024 slots). `r - 5 sqrt(r) - 4 < 1` there, so t_hi is the
  sample's largest key and a band miss is "no sample key above the k-th key": probability
  `~exp(-r)` = 3.4e-4 per row (the row takes the radix fallback, still exact). Smaller
  `budget / L` raises it (r = 4: 1.8%).
- `sample_slice = 32`, `sample_step = 128`, `sample_warps = 4`: 16 programs per row (128 in
  all, one per SM), a `[32, 128]` tile (32 accumulators per thread, 110 registers); `[64,
  256]` with 8 warps needed 184 registers and 2x the loop body.
- `bucket_cap = 2048`: an 8 KiB bucket list per row; ranking costs `found**2` pairs spread over
  the row's programs (~1M pairs for the ~1000-key buckets of integer "hamming" scores, 32K
  per program). A larger bucket of more than one value (heavy ties: e.g. few distinct scores
  over a long row) takes the radix fallback.
- `rank_slice = 32`, `rank_step = 128`: the pass-1 ranking tile `[32, 128]` keeps that launch
  at the refine pass's 128 registers (`[32, 256]` needed 168).
- `decide_warps = 4`: the decision holds `[chunks, 16]` tiles and 1024 slots; the radix pass 0
  it also holds fixes the register count (116).
- `top_rank = 1`: t_top is the largest unforced sample key, so the threshold lands in the
  lumped digit 255 only on a band miss. With the serial design's 3 it landed there whenever
  the sample held fewer than 3 keys above the k-th (`P(Poisson(8) <= 2)` = 1.4% of rows at
  r = 8), and that bucket (keys between the 3rd and 1st sample keys, up to ~3K) overflowed
  `bucket_cap` in ~0.6% of rows (simulated), sending them to the fallback.
- `sigmas = 5`, `slack = 4`, `slots_divisor = 2`, `list_block = 128`: as in the serial design
  (reasons in :mod:`pallas_kernels.hamming_topk`).
The serial design's tunables (`SERIAL`: sample 1024, slice 32, step 1024, 16 warps, `dense`,
`slab_lanes`, 8 decide warps) are described in :mod:`pallas_kernels.hamming_topk`.
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
from pallas_kernels.backend import triton_call
from pallas_kernels.radix_select import INT32_MAX, INT32_MIN, Tiling, count, iota

# How a row was selected (launch C's decision; `*_with_path` return it per row).
PATH_FALLBACK = 0  # the radix passes
PATH_NO_BAND_KEY = 1  # k keys above the band: the threshold is t_hi
PATH_ONE_KEY_BAND = 2  # t_lo == t_hi (ties, all equal, lengths[b] <= budget)
PATH_ONE_KEY_BUCKET = 3  # the threshold bucket is one key value ([t_lo, t_top] spans < 256 keys)
PATH_EQUAL_BUCKET = 4  # the bucket's keys are all equal
PATH_DENSE = 5  # the bucket's keys ranked in a dense list
PATH_SCANNED = 6  # a bucket of more than `dense` keys, ranked by counting scans of the slots
PATH_RANKED = 7  # parallel design: the bucket's keys ranked pairwise by the programs of fallback pass 1's launch

BOUND_LO, BOUND_HI, BOUND_TOP = 0, 1, 2  # a row's band bounds: keys t_lo, t_hi, t_top
BOUNDS_WIDTH = 4
TOP_DIGIT = 2**rs.DIGIT_BITS - 1  # the band digit of keys above t_top
PROBES = 16  # keys counted per step of the threshold's search in a bucket
MIN_SLOTS = 16  # band slots per chunk at least (the band histogram's MMA contracts over >= 16)
MAX_SAMPLE = 4096  # stratum bounds j * L stay below 2**31
DESIGNS = ("parallel", "serial")


@dataclasses.dataclass(frozen=True)
class BandConfig:
    """Tunables of the sample-band fast path (powers of two but design, sigmas, slack and top_rank).

    The defaults are the parallel design's; :data:`SERIAL` holds the serial design's. Fields
    marked (serial) or (parallel) are read by that design only.
    """

    design: str = "parallel"  # "parallel" or "serial" (see the module docstring)
    sample: int = 512  # most sample positions per row
    sample_slice: int = 32  # sample positions ranked per program of launch A
    sample_step: int = 128  # sample keys compared per loop step of launch A
    sample_warps: int = 4
    sigmas: float = 5.0  # the band spans r -+ (sigmas sqrt(r) + slack) sample ranks
    slack: float = 4.0
    top_rank: int = 1  # t_top: the sample key of this rank (or r_hi's, when lower) caps the band digits
    slots_divisor: int = 2  # band slots per chunk = chunk / slots_divisor
    list_block: int = 128  # band keys per histogram MMA step in launch B
    slab_lanes: int = 16384  # (serial) band slots read per loop step of the decision (all chunks)
    dense: int = 128  # (serial) most bucket keys ranked in registers
    decide_warps: int = 4
    bucket_cap: int = 2048  # (parallel) most threshold-bucket keys ranked; a larger bucket: radix fallback
    rank_slice: int = 32  # (parallel) most bucket keys ranked per program of fallback pass 1's launch
    rank_step: int = 128  # (parallel) bucket keys compared per loop step of that ranking

    def __post_init__(self):
        if self.design not in DESIGNS:
            raise ValueError(f"BandConfig.design must be one of {DESIGNS}, got {self.design!r}")
        for name in (
            "sample",
            "sample_slice",
            "sample_step",
            "sample_warps",
            "slots_divisor",
            "list_block",
            "slab_lanes",
            "dense",
            "decide_warps",
            "bucket_cap",
            "rank_slice",
            "rank_step",
        ):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"BandConfig.{name} must be a power of two, got {value}")
        if self.sample > MAX_SAMPLE:
            raise ValueError(f"BandConfig.sample must be <= {MAX_SAMPLE}, got {self.sample}")
        for name in ("list_block", "dense", "rank_slice", "rank_step"):
            if getattr(self, name) < MIN_SLOTS:
                raise ValueError(f"BandConfig.{name} must be >= {MIN_SLOTS}, got {getattr(self, name)}")
        if self.top_rank < 1:
            raise ValueError(f"BandConfig.top_rank must be >= 1, got {self.top_rank}")


# The serial design's tunables.
SERIAL = BandConfig(
    design="serial", sample=1024, sample_slice=32, sample_step=1024, sample_warps=16, top_rank=3, decide_warps=8
)


class BandLayout(NamedTuple):
    """Static sizes of one call, from its BandConfig, Tiling and capacity."""

    sample: int  # sample lanes (n_s <= sample)
    sample_slice: int
    sample_step: int
    sample_programs: int
    slots: int  # band slots per chunk
    list_block: int
    slab: int  # (serial) slots of every chunk per decision loop step
    dense: int  # (serial)
    rank_slice: int  # (parallel) bucket keys ranked per program and round
    rank_step: int  # (parallel)
    bucket_cap: int  # (parallel) most bucket keys ranked


def band_layout(config: BandConfig, tiling: Tiling, seq: int) -> BandLayout:
    sample = min(config.sample, pl.next_power_of_2(seq))
    sample_slice = min(config.sample_slice, sample)
    slots = min(tiling.chunk, max(MIN_SLOTS, tiling.chunk // config.slots_divisor))
    chunks = tiling.chunks(seq)
    return BandLayout(
        sample=sample,
        sample_slice=sample_slice,
        sample_step=min(config.sample_step, sample),
        sample_programs=sample // sample_slice,
        slots=slots,
        list_block=min(config.list_block, slots),
        slab=min(slots, max(MIN_SLOTS, config.slab_lanes // chunks)),
        dense=config.dense,
        rank_slice=min(config.rank_slice, config.bucket_cap),
        rank_step=min(config.rank_step, config.bucket_cap),
        bucket_cap=config.bucket_cap,
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


def sample_positions(j, n_s, length, row):
    """One position of [0, length) per stratum j < n_s: [j L / n_s, (j+1) L / n_s) at a hashed offset."""
    strata = jnp.maximum(n_s, 1)
    low = lax.div(j * length, strata)
    width = jnp.maximum(lax.div((j + 1) * length, strata) - low, 1)
    return low + lax.rem(_mix(j, row), width.astype(jnp.uint32)).astype(jnp.int32)


def strided_positions(j, n_s, length, row):
    """Like `sample_positions` in float32 arithmetic, without integer divisions: stratum j is
    [floor(j s), floor((j+1) s)) with s = L / n_s (rounded), the offset a hashed fraction of
    its width. Which positions are sampled only moves the band, never the answer."""
    stride = length.astype(jnp.float32) / jnp.maximum(n_s, 1).astype(jnp.float32)
    low = (j.astype(jnp.float32) * stride).astype(jnp.int32)
    width = jnp.maximum(((j + 1).astype(jnp.float32) * stride).astype(jnp.int32) - low, 1)
    fraction = (_mix(j, row) >> 8).astype(jnp.int32).astype(jnp.float32) * jnp.float32(2.0**-24)
    offset = jnp.minimum((fraction * width.astype(jnp.float32)).astype(jnp.int32), width - 1)
    return jnp.clip(low + offset, 0, jnp.maximum(length - 1, 0))


def sample_ranks(n_s, length, budget: int, config: BandConfig, forced=0):
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


def probe_search(low, high, rank, count_at_least):
    """The largest key t in [low, high] with count_at_least(t) >= rank, given that low has it:
    a 16-way search, each step counting PROBES evenly spaced keys at once
    (`count_at_least(probes int32[PROBES]) -> int32[PROBES]`), cdiv(bits of high - low, 4) steps."""
    j = iota((PROBES,))

    def step(_, bounds):
        lo, hi = bounds
        width = (hi - lo).astype(jnp.uint32)  # the keys' order is signed; their distances are unsigned
        offsets = j.astype(jnp.uint32) * ((width >> 4) + 1)
        inside = (offsets <= width).astype(jnp.int32)
        probes = lo + offsets.astype(jnp.int32)
        best = jnp.max(jnp.where((inside == 1) & (count_at_least(probes) >= rank), j, 0))
        nxt = jnp.minimum(best + 1, PROBES - 1)
        has_next = (best < PROBES - 1) & (rs.pick(inside, nxt) == 1)
        return rs.pick(probes, best), jnp.where(has_next, rs.pick(probes, nxt) - 1, hi)

    low, _ = lax.fori_loop(0, pl.cdiv(bit_length(high - low), 4), step, (low, high))
    return low


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


def _write_bounds(bounds_ref, mine, mine_valid, above, at_least, *, program, n_s, length, budget, config, forced=0):
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
    """Serial design: every program computes every sample key at each loop step."""
    *source_refs, bounds_ref = refs
    scores = source.bind(source_refs, interpret=interpret)
    program = pl.program_id(2)
    row = pl.program_id(0) * pl.num_programs(1) + pl.program_id(1)
    length = jnp.clip(len_ref[()], 0, seq)
    n_s = jnp.minimum(length, layout.sample)

    def keys_at(j):
        valid = j < n_s
        pos = jnp.where(valid, sample_positions(j, n_s, length, row), 0)
        return rs.order_keys(scores.at(pos, valid), pos, length, sink=sink, recent=recent), valid

    mine, mine_valid = keys_at(program * layout.sample_slice + iota((layout.sample_slice,)))

    def compare(i, carry):
        above, at_least = carry
        keys, valid = keys_at(i * layout.sample_step + iota((layout.sample_step,)))
        valid, keys = valid[None, :], keys[None, :]
        return (
            above + count(valid & (keys > mine[:, None]), axis=1),
            at_least + count(valid & (keys >= mine[:, None]), axis=1),
        )

    zeros = jnp.zeros((layout.sample_slice,), jnp.int32)
    above, at_least = lax.fori_loop(0, pl.cdiv(n_s, layout.sample_step), compare, (zeros, zeros))
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
    )


def _stored_sample_kernel(len_ref, *refs, source, layout, seq, budget, sink, recent, config, interpret):
    """Parallel design: every program computes the row's sample keys once, as one vector, and
    stores them (all programs of a row store the same values); after a barrier it ranks its
    slice against them, loading instead of recomputing."""
    *source_refs, keys_ref, bounds_ref = refs
    scores = source.bind(source_refs, interpret=interpret)
    program = pl.program_id(2)
    row = pl.program_id(0) * pl.num_programs(1) + pl.program_id(1)
    length = jnp.clip(len_ref[()], 0, seq)
    n_s = jnp.minimum(length, layout.sample)
    j = iota((layout.sample,))
    valid = j < n_s
    pos = jnp.where(valid, strided_positions(j, n_s, length, row), 0)
    keys = jnp.where(valid, rs.order_keys(scores.at(pos, valid), pos, length, sink=sink, recent=recent), INT32_MIN)
    keys_ref[...] = keys
    forced = count(keys == INT32_MAX)  # sink/recent positions in the sample
    rs.block_barrier(interpret)
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


def _band_kernel(len_ref, bounds_ref, *refs, source, layout, tiling, seq, sink, recent, interpret):
    num_sources = len(source.in_specs())
    source_refs, (table_ref, *outs) = refs[:num_sources], refs[num_sources:]
    scores_out_ref = outs.pop(0) if source.writes_scores else None
    counts_ref, slots_ref, coarse_ref, fine_ref = outs
    scores = source.bind(source_refs, interpret=interpret)
    geo = rs.chunk_geometry(len_ref, tiling, seq)
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
        pltriton.store(slots_ref.at[jnp.where(keep, slot, slots)], keys, mask=keep)
        return n_above + count(valid & (keys > bounds.hi)), n_band + count(band)

    zero = jnp.int32(0)
    n_above, n_band = lax.fori_loop(0, geo.blocks(geo.length, block), step, (zero, zero))
    counts_ref[0] = n_above
    counts_ref[1] = n_band

    # The band digits' histogram, read back from the slots (only a row with t_lo < t_hi whose
    # chunks all fit their slots uses it).
    shift = band_shift(bounds.lo, bounds.top)
    hist_block = layout.list_block
    rs.block_barrier(interpret)

    def digits_of_block(i):
        member = i * hist_block + iota((hist_block,)) < n_band
        keys = pltriton.load(slots_ref.at[pl.ds(i * hist_block, hist_block)], mask=member, other=0)
        return band_digit(keys, bounds, shift), member

    listed = (n_band <= slots) & (bounds.lo != bounds.hi)
    blocks = jnp.where(listed, pl.cdiv(n_band, hist_block), 0)
    rs.store_suffix_counts(coarse_ref, fine_ref, rs.histogram_loop(blocks, digits_of_block, table_ref))


# ----------------------------------------------------------------------------------------------
# Launch C: the decision, the fast path's threshold, fallback pass 0.


class Band(NamedTuple):
    """One row's band as the decision reads it (chunk-indexed vectors are [chunks])."""

    bounds: Bounds
    n_above: jax.Array
    n_band: jax.Array
    suffix_counts: jax.Array  # [chunks, 16, 16]: [c, a, b] = band keys of chunk c with digit >= 16a + b
    slots_ref: Any  # [chunks, slots] band keys


def threshold_digit(suffix_counts, rank):
    """(digit, keys with a larger digit, per chunk: keys with digit >= it, keys with a larger
    one) of the band digit holding the rank-th largest band key, from the whole row's suffix
    counts at once."""
    chunks = suffix_counts.shape[0]
    per_chunk = jnp.reshape(suffix_counts, (chunks, 2**rs.DIGIT_BITS))
    digit = jnp.maximum(count(jnp.sum(per_chunk, axis=0) >= rank) - 1, 0)
    digits = iota(per_chunk.shape, 1)
    chunk_at_least = jnp.sum(jnp.where(digits == digit, per_chunk, 0), axis=1)
    chunk_above = jnp.sum(jnp.where(digits == digit + 1, per_chunk, 0), axis=1)  # 0 past the last digit
    return digit, jnp.sum(chunk_above), chunk_at_least, chunk_above


class Bucket(NamedTuple):
    """The band digit `digit` that holds the threshold, and how to scan its keys in the slots."""

    band: Band
    shift: jax.Array
    digit: jax.Array
    layout: BandLayout

    def scan(self, visit, init):
        """Fold `visit(keys [chunks, slab], member [chunks, slab], carry)` over the slots."""
        band, slab = self.band, self.layout.slab
        n_band = band.n_band[:, None]

        def step(s, carry):
            listed = s * slab + iota((n_band.shape[0], slab), 1) < n_band
            keys = pltriton.load(band.slots_ref.at[:, pl.ds(s * slab, slab)], mask=listed, other=0)
            return visit(keys, listed & (band_digit(keys, band.bounds, self.shift) == self.digit), carry)

        return lax.fori_loop(0, pl.cdiv(jnp.max(band.n_band), slab), step, init)

    def per_chunk(self, threshold):
        """Per chunk, the bucket's keys above `threshold` and equal to it ([chunks] each)."""

        def visit(keys, member, carry):
            return (
                carry[0] + count(member & (keys > threshold), axis=1),
                carry[1] + count(member & (keys == threshold), axis=1),
            )

        zeros = rs.traced(0, self.band.n_band)
        return self.scan(visit, (zeros, zeros))

    def count_at_least(self, probes):
        """Keys of the bucket >= each probe ([PROBES]), by one scan."""
        j = iota((PROBES,))

        def visit(keys, member, counts):
            for p in range(PROBES):
                counts = counts + jnp.where(j == p, count(member & (keys >= rs.pick(probes, p))), 0)
            return counts

        return self.scan(visit, rs.traced(0, probes))


def _collect(bucket: Bucket, dense_keys_ref, dense_chunks_ref):
    """Copy the bucket's keys and their chunks to the dense lists (the first `dense` of them);
    returns (keys found, their min, their max)."""
    dense = bucket.layout.dense

    def visit(keys, member, carry):
        found, low, high = carry
        members = member.astype(jnp.int32)
        per_chunk = jnp.sum(members, axis=1)
        slot = found + (jnp.cumsum(per_chunk) - per_chunk)[:, None] + jnp.cumsum(members, axis=1) - 1
        keep = member & (slot < dense)
        where = jnp.reshape(jnp.where(keep, slot, dense), (-1,))
        keep = jnp.reshape(keep, (-1,))
        pltriton.store(dense_keys_ref.at[where], jnp.reshape(keys, (-1,)), mask=keep)
        pltriton.store(dense_chunks_ref.at[where], jnp.reshape(iota(keys.shape, 0), (-1,)), mask=keep)
        return (
            found + jnp.sum(per_chunk),
            jnp.minimum(low, jnp.min(jnp.where(member, keys, INT32_MAX))),
            jnp.maximum(high, jnp.max(jnp.where(member, keys, INT32_MIN))),
        )

    return bucket.scan(visit, (jnp.int32(0), jnp.int32(INT32_MAX), jnp.int32(INT32_MIN)))


def _rank_dense(found, rank, low, high, chunks: int, layout: BandLayout, dense_keys_ref, dense_chunks_ref):
    """(rank-th largest of the `found` <= dense keys of the dense list, per chunk: those above it,
    those equal to it), in registers."""
    present = iota((layout.dense,)) < found
    keys = pltriton.load(dense_keys_ref.at[pl.ds(0, layout.dense)], mask=present, other=0)
    key_chunks = pltriton.load(dense_chunks_ref.at[pl.ds(0, layout.dense)], mask=present, other=0)

    def count_at_least(probes):
        return count(present[:, None] & (keys[:, None] >= probes[None, :]), axis=0)

    threshold = probe_search(low, high, rank, count_at_least)
    in_chunk = present[None, :] & (key_chunks[None, :] == iota((chunks, 1), 0))
    return (
        threshold,
        count(in_chunk & (keys[None, :] > threshold), axis=1),
        count(in_chunk & (keys[None, :] == threshold), axis=1),
    )


def band_threshold(band: Band, need, layout: BandLayout, dense_keys_ref, dense_chunks_ref, interpret: bool):
    """The fast path's plan of a row whose k-th largest key is in its band: (threshold key,
    keys equal to it still to take, per chunk keys above it, per chunk keys equal to it, PATH_*).

    need: band keys to take (k - n_above, in [0, n_band]).
    """
    chunks = band.n_above.shape[0]
    bounds = band.bounds

    def path(code):
        return rs.traced(code, need)

    zeros = rs.traced(0, band.n_above)

    def take_no_band_key():
        return bounds.hi, path(0), band.n_above, zeros, path(PATH_NO_BAND_KEY)

    def band_of_one_key():
        return bounds.lo, need, band.n_above, band.n_band, path(PATH_ONE_KEY_BAND)

    def from_bucket():
        shift = band_shift(bounds.lo, bounds.top)
        digit, above, chunk_at_least, chunk_above = threshold_digit(band.suffix_counts, need)
        rank = need - above  # of the threshold among the bucket's keys, 1 = largest
        greater, in_bucket = band.n_above + chunk_above, chunk_at_least - chunk_above

        def bucket_of_one_key():
            return bounds.lo + digit, rank, greater, in_bucket, path(PATH_ONE_KEY_BUCKET)

        def ranked():
            bucket = Bucket(band, shift, digit, layout)
            found, low, high = _collect(bucket, dense_keys_ref, dense_chunks_ref)
            rs.block_barrier(interpret)

            def equal_keys():
                return low, rank, greater, in_bucket, path(PATH_EQUAL_BUCKET)

            def rank_keys(code, threshold, bucket_above, bucket_equal):
                return threshold, rank - jnp.sum(bucket_above), greater + bucket_above, bucket_equal, path(code)

            def dense():
                return rank_keys(
                    PATH_DENSE, *_rank_dense(found, rank, low, high, chunks, layout, dense_keys_ref, dense_chunks_ref)
                )

            def scanned():
                threshold = probe_search(low, high, rank, bucket.count_at_least)
                return rank_keys(PATH_SCANNED, threshold, *bucket.per_chunk(threshold))

            return lax.cond(low == high, equal_keys, lambda: lax.cond(found <= layout.dense, dense, scanned))

        return lax.cond((shift == 0) & (digit < TOP_DIGIT), bucket_of_one_key, ranked)

    return lax.cond(need == 0, take_no_band_key, lambda: lax.cond(bounds.lo == bounds.hi, band_of_one_key, from_bucket))


def _decide_kernel(
    len_ref,
    bounds_ref,
    counts_ref,
    band_fine_ref,
    slots_ref,
    scores_ref,
    table_ref,
    decision_ref,
    fast_counts_ref,
    dense_keys_ref,
    dense_chunks_ref,
    state_ref,
    coarse_ref,
    fine_ref,
    *,
    layout,
    tiling,
    seq,
    budget,
    sink,
    recent,
    interpret,
):
    geo = rs.chunk_geometry(len_ref, tiling, seq)
    k_eff = rs.k_effective(geo.length, budget)
    first = geo.chunk_index == 0
    # Chunk 0 loads the row's band histograms (64 KiB at the Llama shape) with the counts rather
    # than after deciding: one dependent round trip fewer; a masked load costs the others nothing.
    suffix_counts = pltriton.load(band_fine_ref, mask=jnp.broadcast_to(first, band_fine_ref.shape), other=0)
    band = Band(load_bounds(bounds_ref), counts_ref[:, 0], counts_ref[:, 1], suffix_counts, slots_ref)
    above, in_band = jnp.sum(band.n_above), jnp.sum(band.n_band)
    listed = (jnp.max(band.n_band) <= layout.slots) | (band.bounds.lo == band.bounds.hi)
    fast = (above <= k_eff) & (k_eff <= above + in_band) & listed

    @pl.when(fast & first)
    def _():
        threshold, remaining, greater, equal, path = band_threshold(
            band, k_eff - above, layout, dense_keys_ref, dense_chunks_ref, interpret
        )
        decision_ref[rs.DECISION_PATH] = path
        decision_ref[rs.DECISION_THRESHOLD] = threshold
        decision_ref[rs.DECISION_REMAINING] = remaining
        fast_counts_ref[0, :] = greater
        fast_counts_ref[1, :] = equal

    @pl.when(jnp.logical_not(fast))
    def _():
        rs.first_pass(
            scores_ref,
            table_ref,
            state_ref,
            coarse_ref,
            fine_ref,
            geo,
            tiling=tiling,
            budget=budget,
            sink=sink,
            recent=recent,
        )

        @pl.when(first)
        def _():
            decision_ref[rs.DECISION_PATH] = jnp.int32(PATH_FALLBACK)


# ----------------------------------------------------------------------------------------------
# Parallel design: launch C decides in every program; fallback pass 1's launch ranks the bucket.


class RowPlan(NamedTuple):
    """A row's decision in the parallel design, computed alike by every program of the row
    (chunk-indexed vectors are [chunks])."""

    path: jax.Array
    threshold: jax.Array  # the threshold key (PATH_RANKED: found by the ranking launch)
    remaining: jax.Array  # keys equal to the threshold to take (PATH_RANKED: the threshold's rank in the bucket)
    found: jax.Array  # PATH_RANKED: the bucket's keys (else 0)
    greater: jax.Array  # keys above the threshold (PATH_RANKED: above the bucket)
    equal: jax.Array  # keys equal to the threshold (PATH_RANKED: in the bucket)
    digit: jax.Array  # the bucket's band digit
    shift: jax.Array


def row_plan(bounds: Bounds, n_above, n_band, band_coarse_ref, band_fine_ref, k_eff, layout: BandLayout) -> RowPlan:
    """The row's path from its band counts alone: the k-th key is in the band, every chunk's
    band keys fit its slots, and the threshold bucket is one key value or holds at most
    `bucket_cap` keys; else PATH_FALLBACK."""
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
    ranked = jnp.logical_not(by_band | one_key_bucket) & (found <= layout.bucket_cap)
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


def _chunk_decide_kernel(
    len_ref,
    bounds_ref,
    counts_ref,
    band_coarse_ref,
    band_fine_ref,
    slots_ref,
    scores_ref,
    table_ref,
    decision_ref,
    fast_counts_ref,
    bucket_ref,
    state_ref,
    coarse_ref,
    fine_ref,
    *,
    layout,
    tiling,
    seq,
    budget,
    sink,
    recent,
):
    """Every program: the row's plan, its own chunk's counts, and on PATH_RANKED its chunk's
    bucket keys appended to the row's bucket list (chunk order: chunk c's keys start after
    the buckets of chunks < c). Fallback rows: radix pass 0."""
    geo = rs.chunk_geometry(len_ref, tiling, seq)
    chunk = geo.chunk_index
    own_keys = slots_ref[...]  # loaded with the counts: the first n_band[chunk] are this chunk's band keys
    bounds = load_bounds(bounds_ref)
    n_band = counts_ref[:, 1]
    plan = row_plan(
        bounds, counts_ref[:, 0], n_band, band_coarse_ref, band_fine_ref, rs.k_effective(geo.length, budget), layout
    )
    fast_counts_ref[0] = rs.pick(plan.greater, chunk)
    fast_counts_ref[1] = rs.pick(plan.equal, chunk)
    lanes = iota(own_keys.shape)
    member = (
        (plan.path == PATH_RANKED)
        & (lanes < rs.pick(n_band, chunk))
        & (band_digit(own_keys, bounds, plan.shift) == plan.digit)
    )
    first_slot = jnp.sum(jnp.where(iota(plan.equal.shape) < chunk, plan.equal, 0))
    slot = first_slot + jnp.cumsum(member.astype(jnp.int32)) - 1
    keep = member & (slot < layout.bucket_cap)
    pltriton.store(bucket_ref.at[jnp.where(keep, slot, layout.bucket_cap)], own_keys, mask=keep)

    @pl.when(chunk == 0)
    def _():
        decision_ref[rs.DECISION_PATH] = plan.path
        decision_ref[rs.DECISION_THRESHOLD] = plan.threshold
        decision_ref[rs.DECISION_REMAINING] = plan.remaining
        decision_ref[rs.DECISION_FOUND] = plan.found

    @pl.when(plan.path == PATH_FALLBACK)
    def _():
        rs.first_pass(
            scores_ref,
            table_ref,
            state_ref,
            coarse_ref,
            fine_ref,
            geo,
            tiling=tiling,
            budget=budget,
            sink=sink,
            recent=recent,
        )


def _rank_or_refine_kernel(
    len_ref,
    scores_ref,
    table_ref,
    decision_ref,
    bucket_ref,
    state_in_ref,
    coarse_in_ref,
    fine_in_ref,
    state_ref,
    coarse_ref,
    fine_ref,
    threshold_ref,
    *,
    layout,
    tiling,
    seq,
    sink,
    recent,
):
    """Fallback pass 1 on fallback rows; on PATH_RANKED rows program c ranks the bucket keys
    [j rank_slice, (j+1) rank_slice) for j = c, c + chunks, c + 2 chunks, ... against all of
    them, and the one holding the threshold's rank writes it."""
    geo = rs.chunk_geometry(len_ref, tiling, seq)
    chunks = pl.num_programs(2)
    path = decision_ref[rs.DECISION_PATH]

    @pl.when(path == PATH_FALLBACK)
    def _():
        rs.refine_pass(
            scores_ref,
            table_ref,
            state_in_ref,
            coarse_in_ref,
            fine_in_ref,
            state_ref,
            coarse_ref,
            fine_ref,
            geo,
            pass_index=1,
            tiling=tiling,
            sink=sink,
            recent=recent,
        )

    @pl.when(path == PATH_RANKED)
    def _():
        found = decision_ref[rs.DECISION_FOUND]
        rank = decision_ref[rs.DECISION_REMAINING]
        size, step = layout.rank_slice, layout.rank_step

        def listed_keys(start, n):
            listed = start + iota((n,)) < found
            return pltriton.load(bucket_ref.at[pl.ds(start, n)], mask=listed, other=INT32_MIN), listed

        def rank_slice(j, carry):
            mine, mine_valid = listed_keys((j * chunks + geo.chunk_index) * size, size)
            above, at_least = count_ranks(mine, pl.cdiv(found, step), step, lambda i: listed_keys(i * step, step)[0])
            write_ranked(threshold_ref, (), rank, mine, mine_valid, above, at_least)
            return carry

        rounds = pl.cdiv(jnp.maximum(found - geo.chunk_index * size, 0), chunks * size)
        lax.fori_loop(0, rounds, rank_slice, 0)


def ranked_plan(decision_ref, fast_counts_ref, bucket_ref, threshold_ref, *, chunk_index) -> rs.ChunkPlan:
    """A fast row's ChunkPlan in the parallel design (fast_counts_ref: [chunks, 2]); on
    PATH_RANKED the bucket list splits its chunk's bucket count into keys above and equal to
    the ranked threshold (its keys before `first` are the earlier chunks')."""
    ranked = decision_ref[rs.DECISION_PATH] == PATH_RANKED
    found = jnp.where(ranked, decision_ref[rs.DECISION_FOUND], 0)
    threshold = jnp.where(ranked, threshold_ref[()], decision_ref[rs.DECISION_THRESHOLD])
    base = rs.chunk_plan(
        fast_counts_ref[:, 0],
        fast_counts_ref[:, 1],
        decision_ref[rs.DECISION_REMAINING],
        rs.traced(0, found),
        threshold,
        chunk_index,
    )
    keys = bucket_ref[...]  # unmasked: loaded with the decision; lanes >= found are never read
    lanes = iota(keys.shape)
    listed = lanes < found
    first = base.equal_before  # PATH_RANKED: bucket keys of the earlier chunks
    before = listed & (lanes < first)
    own = listed & (lanes >= first) & (lanes < first + base.own_equal)
    above, equal = keys > threshold, keys == threshold
    return rs.ChunkPlan(
        greater_before=base.greater_before + count(before & above),
        equal_before=jnp.where(ranked, count(before & equal), base.equal_before),
        own_greater=base.own_greater + count(own & above),
        own_equal=jnp.where(ranked, count(own & equal), base.own_equal),
        need=base.need - count(listed & above),
        shift=base.shift,
        prefix=threshold,
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
    `shape` = (B, Hkv, S)), in `config.design`.

    Returns (idx int32[B, Hkv, budget], count int32[B, Hkv], path int32[B, Hkv]: how each row
    was selected, PATH_FALLBACK or the fast path's PATH_* case).
    """
    batch, kv_heads, seq = shape
    parallel = config.design == "parallel"
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

    sample_kernel = _stored_sample_kernel if parallel else _sample_kernel
    sample_shapes = [shaped(layout.sample)] if parallel else []
    *_, bounds = triton_call(
        functools.partial(
            sample_kernel, source=source, layout=layout, budget=budget, config=config, interpret=interpret, **common
        ),
        out_shape=[*sample_shapes, shaped(BOUNDS_WIDTH)],
        grid=(batch, kv_heads, layout.sample_programs),
        in_specs=[rs.length_spec(), *source.in_specs()],
        out_specs=[rs.row_spec(layout.sample)] * len(sample_shapes) + [rs.row_spec(BOUNDS_WIDTH)],
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
    ]
    band_specs = [
        rs.chunk_spec(2),
        rs.chunk_spec(layout.slots),
        rs.chunk_spec(rs.NIBBLE),
        rs.chunk_spec(rs.NIBBLE, rs.NIBBLE),
    ]
    if source.writes_scores:
        band_shapes.insert(0, shaped(seq, dtype=jnp.float32))
        band_specs.insert(0, rs.row_spec(seq))
    band_out = triton_call(
        functools.partial(_band_kernel, source=source, layout=layout, tiling=tiling, interpret=interpret, **common),
        out_shape=band_shapes,
        grid=grid,
        in_specs=[rs.length_spec(), rs.row_spec(BOUNDS_WIDTH), *source.in_specs(), rs.table_spec()],
        out_specs=band_specs,
        name=f"{prefix}_band",
        **launch,
    )(lengths, bounds, *arrays, table)
    scores = band_out[0] if source.writes_scores else arrays[0]
    counts, slots, band_coarse, band_fine = band_out[-4:]
    band_in_specs = [rs.length_spec(), rs.row_spec(BOUNDS_WIDTH), rs.row_spec(chunks, 2)]
    decide = dict(
        grid=grid,
        num_warps=config.decide_warps,
        num_stages=tiling.num_stages,
        interpret=interpret,
        name="hata_select_decide",
    )

    if not parallel:
        decision, fast_counts, _, _, *first_pass_out = triton_call(
            functools.partial(
                _decide_kernel, layout=layout, tiling=tiling, budget=budget, interpret=interpret, **common
            ),
            out_shape=[
                shaped(rs.DECISION_WIDTH),
                shaped(2, chunks),
                shaped(layout.dense),
                shaped(layout.dense),
                *rs.pass_out_shapes(batch, kv_heads, chunks),
            ],
            in_specs=[
                *band_in_specs,
                rs.row_spec(chunks, rs.NIBBLE, rs.NIBBLE),
                rs.row_spec(chunks, layout.slots),
                rs.row_spec(seq),
                rs.table_spec(),
            ],
            out_specs=[
                rs.row_spec(rs.DECISION_WIDTH),
                rs.row_spec(2, chunks),
                rs.row_spec(layout.dense),
                rs.row_spec(layout.dense),
                *rs.pass_out_specs(),
            ],
            **decide,
        )(lengths, bounds, counts, band_fine, slots, scores, table)
        fast_inputs = [(fast_counts, rs.row_spec(2, chunks))]
        fast_plan = rs.fast_plan_from_counts
        pass_out, fines = first_pass_out, [first_pass_out[2]]
        first_refine = 1
    else:
        decision, fast_counts, bucket, *first_pass_out = triton_call(
            functools.partial(_chunk_decide_kernel, layout=layout, tiling=tiling, budget=budget, **common),
            out_shape=[
                shaped(rs.DECISION_WIDTH),
                shaped(chunks, 2),
                shaped(layout.bucket_cap),
                *rs.pass_out_shapes(batch, kv_heads, chunks),
            ],
            in_specs=[
                *band_in_specs,
                rs.row_spec(chunks, rs.NIBBLE),
                rs.row_spec(chunks, rs.NIBBLE, rs.NIBBLE),
                rs.chunk_spec(layout.slots),
                rs.row_spec(seq),
                rs.table_spec(),
            ],
            out_specs=[
                rs.row_spec(rs.DECISION_WIDTH),
                rs.chunk_spec(2),
                rs.row_spec(layout.bucket_cap),
                *rs.pass_out_specs(),
            ],
            **decide,
        )(lengths, bounds, counts, band_coarse, band_fine, slots, scores, table)
        *pass_out, bucket_threshold = triton_call(
            functools.partial(_rank_or_refine_kernel, layout=layout, tiling=tiling, **common),
            out_shape=[*rs.pass_out_shapes(batch, kv_heads, chunks), shaped()],
            grid=grid,
            in_specs=[
                rs.length_spec(),
                rs.row_spec(seq),
                rs.table_spec(),
                rs.row_spec(rs.DECISION_WIDTH),
                rs.row_spec(layout.bucket_cap),
                *rs.row_counts_specs(chunks),
            ],
            out_specs=[*rs.pass_out_specs(), rs.row_spec()],
            name="hata_select_pass1",
            **launch,
        )(lengths, scores, table, decision, bucket, *first_pass_out)
        fast_inputs = [
            (fast_counts, rs.row_spec(chunks, 2)),
            (bucket, rs.row_spec(layout.bucket_cap)),
            (bucket_threshold, rs.row_spec()),
        ]
        fast_plan = ranked_plan
        fines = [first_pass_out[2], pass_out[2]]
        first_refine = 2

    for pass_index in range(first_refine, rs.NUM_PASSES):
        pass_out = rs.refine_launch(
            pass_index,
            scores,
            lengths,
            decision,
            pass_out,
            tiling=tiling,
            sink=sink,
            recent=recent,
            interpret=interpret,
        )
        fines.append(pass_out[2])
    state, coarse, _ = pass_out
    idx, count_out = rs.compact_launch(
        scores, lengths, decision, state, coarse, fines, fast_inputs, fast_plan, **finish
    )
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
