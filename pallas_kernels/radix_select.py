"""Exact radix select over order-preserving keys: the key machinery, the fallback's one-program
radix select of a row and the output compaction that both selection paths end with.

The pipeline (a sample-band fast path, these passes as its exact fallback) and its tunables
are described in :mod:`pallas_kernels.band_select`; the byte floor and the tiling's tunables in
:mod:`pallas_kernels.hamming_topk`. For each row `(b, h)` of `scores: float32[B, Hkv, S]`:

- **keys**: `order_keys` maps a float32 score to an int32 whose signed order is the float order
  (bits ^ 0x7FFFFFFF for negative floats); NaN gets the lowest key, a forced (sink/recent)
  position the highest. The digits are the four bytes of `key ^ 0x80000000` (the same order read
  as uint32), most significant first.
- **histograms**: a 256-bin histogram of 8-bit digits is the `[16, 16]` product
  `dot(onehot(digit >> 4)^T, onehot(digit & 15))` over a loop step's keys, with the one-hot rows
  gathered from a 1 KiB bf16 table (`one_hot_table`; a non-member's high row is zero) and float32
  accumulation (exact): no atomics, no per-element compares. A program stores its chunk's
  histogram as suffix counts (`fine[a, b]` = keys with digit >= 16a+b, `coarse[a]` = keys with
  digit >= 16a); `boundary_digit` finds the digit holding a rank from the per-chunk suffix counts
  of a row (sum `coarse` over chunks, pick the high nibble, sum that nibble's row of `fine`, pick
  the low nibble: 128 B per chunk instead of the whole 1 KiB histogram). The band select's
  band-digit histograms are built the same way.
- **the fallback** (`row_select`, run inside the band select's band launch by the program that
  decides a row the fast path cannot take): four passes over the row, each histogramming the pass's digit
  over the keys that share the prefix resolved so far (a loop step with no such key skips the
  histogram) and refining the row state (resolved prefix, rank still to take, passes used, done
  flag: once the boundary bucket is taken whole later passes skip the row); then one scan writes
  each chunk's keys above and equal to the final prefix.
- **compaction** (the last `pallas_call`, both paths): the row's plan is the threshold (a key,
  or a fallback row's prefix), the number of keys equal to it still to take, and per chunk how
  many keys lie above it and how many equal it; the band select's `chunk_plan_of` gives each
  program its `ChunkPlan`. Each program takes the counts of the chunks before its own and
  scatters its selected positions: every key above the threshold, and equal keys in position
  order until the rank is filled. Slots come out in ascending position; slots `>= count` get
  `UNUSED`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.backend import MAX_BUDGET, MAX_SEQ, UNUSED, check_sink_recent, dot, triton_call

NUM_PASSES = 4
DIGIT_BITS = 8
NIBBLE = 16  # a digit d = NIBBLE * high + low
HIST_DTYPE = jnp.bfloat16  # one-hot operands of the histogram MMA (float32 accumulation, exact)
INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1

# The band select's decision, one int32 vector per row: how the row was selected (its PATH_*);
# the threshold as the keys' top `32 - shift` bits (`keys >> shift`, signed; every path but the
# whole-row select: shift 0 and the threshold key); the number of keys equal to it still to
# take; on a listed row, how many keys the list holds; and the shift.
DECISION_PATH, DECISION_THRESHOLD, DECISION_REMAINING, DECISION_FOUND, DECISION_SHIFT = range(5)
DECISION_WIDTH = 8  # a power of two (Triton blocks)

BLOCK = 256
SCAN_BLOCK = 2048
MIN_BLOCK = 32  # keys per histogram MMA contraction (Triton dots need >= 16)
MAX_BLOCK = 2**15  # the compaction counts two things in one 32-bit scan
MIN_CHUNK = 2048
MAX_CHUNK = 16384
TARGET_PROGRAMS = 512
FILL_BLOCK = 1024
# Keys per loop step of the fallback (`row_select`). Its one program runs inside the band launch,
# whose registers it must not raise: on sm_90a (ptxas via pip's Triton 3.9, indicative) the band
# launch takes 96 registers with 128, 154 with 256 (3 programs per SM instead of 5).
FALLBACK_BLOCK = 128


@dataclasses.dataclass(frozen=True)
class Tiling:
    """How a row is cut: `chunk` positions per program, walked in loop steps of `block`
    positions by `hamming_scores` and of `scan_block` (clipped to the chunk) by the band pass
    with its fused scoring and by the compaction."""

    chunk: int
    block: int
    scan_block: int = SCAN_BLOCK
    num_warps: int = 4
    num_stages: int = 1

    def __post_init__(self):
        for name in ("chunk", "block", "scan_block"):
            value = getattr(self, name)
            if value < MIN_BLOCK or value & (value - 1):
                raise ValueError(f"Tiling.{name} must be a power of two >= {MIN_BLOCK}, got {value}")
        for name in ("block", "scan_block"):
            if getattr(self, name) > MAX_BLOCK:
                raise ValueError(f"Tiling.{name} must be <= {MAX_BLOCK}, got {getattr(self, name)}")
        if self.chunk % self.block:
            raise ValueError(f"Tiling.chunk ({self.chunk}) must be a multiple of Tiling.block ({self.block})")

    def chunks(self, seq: int) -> int:
        """Programs per row: a power of two, so per-chunk counts load as one tensor."""
        return pl.next_power_of_2(pl.cdiv(seq, self.chunk))

    @property
    def scan(self) -> int:
        return min(self.scan_block, self.chunk)


def default_tiling(rows: int, seq: int) -> Tiling:
    """About TARGET_PROGRAMS programs over `rows` rows of `seq` positions (see hamming_topk)."""
    chunk = pl.next_power_of_2(pl.cdiv(rows * seq, TARGET_PROGRAMS))
    chunk = min(max(chunk, MIN_CHUNK), MAX_CHUNK, max(MIN_BLOCK, pl.next_power_of_2(seq)))
    return Tiling(chunk=chunk, block=min(BLOCK, chunk), scan_block=min(SCAN_BLOCK, chunk))


def check_selection(seq: int, budget: int, sink: int, recent: int) -> None:
    if not 0 < seq <= MAX_SEQ:
        raise ValueError(f"sequence capacity {seq} not supported (1 to {MAX_SEQ})")
    if not 0 < budget <= min(seq, MAX_BUDGET):
        raise ValueError(f"budget {budget} not supported (1 to min(capacity {seq}, {MAX_BUDGET}))")
    check_sink_recent(budget, sink, recent)


# ----------------------------------------------------------------------------------------------
# In-kernel helpers (plain jnp on refs and tensors: they run in Triton and in the interpreter).


def iota(shape, dim=0):
    return lax.broadcasted_iota(jnp.int32, shape, dim)


def pick(vector, index):
    """vector[index] for a dynamic scalar index (0 when out of range)."""
    return jnp.sum(jnp.where(iota(vector.shape) == index, vector, 0))


def count(mask):
    return jnp.sum(mask.astype(jnp.int32))


def traced(value, like):
    """`value` computed from the traced `like`: a conditional (`lax.cond`) in a Triton kernel must
    yield values, not constants."""
    return like * 0 + value


def order_keys(scores, pos, length, *, sink: int, recent: int):
    """int32 keys whose signed order is the order of `scores` (float32), NaN lowest; positions
    forced in (the first `sink`, the last `recent` before `length`) get the highest key."""
    bits = lax.bitcast_convert_type(scores, jnp.int32)
    keys = jnp.where(bits < 0, bits ^ INT32_MAX, bits)
    keys = jnp.where(scores != scores, INT32_MIN, keys)
    if sink or recent:
        keys = jnp.where((pos < sink) | (pos >= length - recent), INT32_MAX, keys)
    return keys


def key_digit(keys, pass_index: int):
    """Byte `pass_index` (0 = most significant) of the keys read as uint32, in [0, 256)."""
    return ((keys ^ INT32_MIN) >> (32 - DIGIT_BITS * (pass_index + 1))) & (2**DIGIT_BITS - 1)


def one_hot_table():
    """bfloat16[32, 16]: row r < 16 is the one-hot of r, rows >= 16 are zero (the histogram's lookup table).

    Made from a NumPy array, so under jit it is a literal of the program: built with `jnp.eye` it
    was an XLA fusion run before every selection (0.9 us per layer and step on the H100).
    """
    return jnp.asarray(np.eye(2 * NIBBLE, NIBBLE, dtype=HIST_DTYPE))


def _digit_histogram(digits, member, table_ref):
    """int32[16, 16]: [a, b] = members with digit 16a + b (digits, member: [block]).

    The one-hot rows of the digit's two nibbles are gathered from `table_ref` (`one_hot_table`,
    L1-resident): one 32 B row per nibble, no per-element compares or byte shuffles, and a dot
    that contracts over the block counts the pairs (float32 accumulation of 0/1: exact).
    """
    block = digits.shape[0]
    high = jnp.where(member, digits >> 4, NIBBLE)  # row NIBBLE is zero: not counted
    columns = iota((block, NIBBLE), 1)

    def rows(index):
        return table_ref[jnp.broadcast_to(index[:, None], (block, NIBBLE)), columns]

    return dot(rows(high).T, rows(digits & (NIBBLE - 1))).astype(jnp.int32)


def suffix_counts(hist):
    """(coarse[16], fine[16, 16]): keys with digit >= 16a, and with digit >= 16a + b."""
    rows = jnp.sum(hist, axis=1)
    coarse = jnp.sum(rows) - jnp.cumsum(rows) + rows
    fine = coarse[:, None] - jnp.cumsum(hist, axis=1) + hist
    return coarse, fine


class ChunkGeometry(NamedTuple):
    """This program's chunk of row (b, h): positions [start, start + chunk)."""

    chunk_index: jax.Array
    start: jax.Array
    length: jax.Array  # lengths[b], clipped to [0, seq]
    chunk: int

    def blocks(self, stop, block: int):
        """Loop steps of `block` positions that hold positions < stop."""
        return pl.cdiv(jnp.clip(stop - self.start, 0, self.chunk), block)


def chunk_geometry(len_ref, tiling: Tiling, seq: int) -> ChunkGeometry:
    chunk_index = pl.program_id(2)
    length = jnp.clip(len_ref[()], 0, seq)  # out-of-range lengths must not read out of bounds
    return ChunkGeometry(chunk_index, chunk_index * tiling.chunk, length, tiling.chunk)


def block_positions(geo: ChunkGeometry, i, block: int):
    """(first position, positions[block], valid[block]) of loop step i."""
    first = geo.start + i * block
    pos = first + iota((block,))
    return first, pos, pos < geo.length


def block_keys(scores_ref, geo: ChunkGeometry, i, block: int, *, sink: int, recent: int):
    """(positions, valid, keys) of loop step i, reading scores only at valid positions."""
    first, pos, valid = block_positions(geo, i, block)
    scores = pltriton.load(scores_ref.at[pl.ds(first, block)], mask=valid, other=0.0)
    return pos, valid, order_keys(scores, pos, geo.length, sink=sink, recent=recent)


def histogram_loop(num_blocks, load_block: Callable, digits_of_block: Callable, table_ref, *, ahead: bool):
    """Sum of `_digit_histogram(*digits_of_block(i, load_block(i)))` over loop steps i <
    num_blocks; a step without members skips the histogram (later passes: most steps hold no
    candidate). With `ahead`, each step's load is issued a step earlier, so its latency
    overlaps the step before (load_block(i) must mask every lane past the data: steps 0 and
    num_blocks load too), for one more loaded block held in registers."""

    def step(i, carry):
        if ahead:
            hist, loaded = carry
            upcoming = load_block(i + 1)  # issued before this step's work
        else:
            hist, loaded = carry, load_block(i)
        digits, member = digits_of_block(i, loaded)
        hist = lax.cond(
            jnp.max(member.astype(jnp.int32)) > 0,
            lambda: hist + _digit_histogram(digits, member, table_ref),
            lambda: hist,
        )
        return (hist, upcoming) if ahead else hist

    zeros = jnp.zeros((NIBBLE, NIBBLE), jnp.int32)
    if ahead:
        return lax.fori_loop(0, num_blocks, step, (zeros, load_block(0)))[0]
    return lax.fori_loop(0, num_blocks, step, zeros)


def pick_boundary(coarse, fine_of_high, rank):
    """(digit, keys with digit >= it, keys with digit > it): the largest digit with at least `rank`
    keys at or above it, from the suffix counts `coarse[16]` and `fine_of_high(a) -> fine[a, :]`.
    Clamped to digit 0 when even all keys are fewer than `rank`, so the digit always indexes
    inside the counts."""
    high = jnp.maximum(count(coarse >= rank) - 1, 0)
    fine = fine_of_high(high)
    low = jnp.maximum(count(fine >= rank) - 1, 0)
    above = jnp.where(low < NIBBLE - 1, pick(fine, low + 1), pick(coarse, high + 1))
    return NIBBLE * high + low, pick(fine, low), above


def boundary_digit(coarse_ref, fine_ref, rank):
    """`pick_boundary` of a row's per-chunk suffix counts (coarse_ref: [chunks, 16], fine_ref:
    [chunks, 16, 16])."""
    return pick_boundary(jnp.sum(coarse_ref[...], axis=0), lambda high: jnp.sum(fine_ref[:, high, :], axis=0), rank)


def histogram_boundary(hist, rank):
    """`pick_boundary` of one histogram held in registers (hist: int32[16, 16])."""
    coarse, fine = suffix_counts(hist)
    return pick_boundary(coarse, lambda high: jnp.sum(jnp.where(iota(fine.shape) == high, fine, 0), axis=0), rank)


def chunk_counts(fine_ref, digit):
    """(keys with digit >= `digit`, keys with digit > `digit`) in every chunk ([chunks]);
    fine_ref: [chunks, 16, 16] suffix counts of one histogram."""
    nxt = jnp.minimum(digit + 1, 2**DIGIT_BITS - 1)
    at_least = fine_ref[:, digit >> 4, digit & (NIBBLE - 1)]
    above = jnp.where(digit < 2**DIGIT_BITS - 1, fine_ref[:, nxt >> 4, nxt & (NIBBLE - 1)], 0)
    return at_least, above


class RowState(NamedTuple):
    threshold: jax.Array  # int32 bits of the resolved uint32 key prefix (unresolved bits 0)
    remaining: jax.Array  # keys still to take among those sharing the prefix
    refined: jax.Array  # passes that refined the prefix: the prefix has 8 * refined bits
    done: jax.Array  # bool: all keys sharing the prefix are taken; later passes are idle

    @property
    def shift(self):
        """The prefix is the keys' top `32 - shift` bits (`keys >> shift`)."""
        return 32 - DIGIT_BITS * self.refined

    @property
    def prefix(self):
        """The resolved prefix, comparable with `keys >> shift`."""
        return self.signed_prefix(DIGIT_BITS * self.refined)

    def signed_prefix(self, bits):
        """The top `bits` bits of the threshold, comparable with `keys >> (32 - bits)`."""
        return (self.threshold ^ INT32_MIN) >> (32 - bits)


def advance(state: RowState, hist, pass_index: int) -> RowState:
    """The row state after pass `pass_index`, from that pass's histogram of the keys sharing
    the prefix (hist: int32[16, 16]); a done row stays as it is."""
    rank = state.remaining
    digit, at_least, above = histogram_boundary(hist, rank)
    refine = jnp.logical_not(state.done)
    shift = 32 - DIGIT_BITS * (pass_index + 1)
    return RowState(
        threshold=jnp.where(refine, state.threshold | (digit << shift), state.threshold),
        remaining=jnp.where(refine, rank - above, rank),
        refined=jnp.where(refine, pass_index + 1, state.refined),
        done=state.done | (rank == at_least),
    )


def k_effective(length, budget: int):
    return jnp.minimum(length, budget)


# ----------------------------------------------------------------------------------------------
# The fallback: one program selects a whole row.


def row_select(scores_ref, table_ref, counts_ref, length, *, seq: int, tiling: Tiling, budget: int, sink: int,
               recent: int) -> RowState:
    """The exact radix select of one row by one program (the fallback of a row the fast path
    cannot take): NUM_PASSES histogram passes over the row's keys that share the prefix resolved
    so far (a done row skips the rest), then one scan writing each chunk's keys above and equal
    to the final prefix to counts_ref ([chunks, 2]), which the compaction reads as it reads a
    fast row's. scores_ref: float32[S] (read at positions < length only).
    Returns the row's final state."""
    row = ChunkGeometry(jnp.int32(0), jnp.int32(0), length, pl.next_power_of_2(seq))
    zero = traced(0, length)  # a constant would not lower where the state is updated under a condition
    state = RowState(zero, k_effective(length, budget), zero, zero != 0)

    def one_pass(pass_index, state):  # a loop, not unrolled: one pass's registers, not four passes'
        prefix_bits = jnp.maximum(DIGIT_BITS * pass_index, DIGIT_BITS)  # pass 0 takes every key
        prefix = state.signed_prefix(prefix_bits)

        def load_block(i):
            first, _, valid = block_positions(row, i, FALLBACK_BLOCK)
            return pltriton.load(scores_ref.at[pl.ds(first, FALLBACK_BLOCK)], mask=valid, other=0.0)

        def digits_of_block(i, scores):
            _, pos, valid = block_positions(row, i, FALLBACK_BLOCK)
            keys = order_keys(scores, pos, length, sink=sink, recent=recent)
            shares = (pass_index == 0) | ((keys >> (32 - prefix_bits)) == prefix)
            return key_digit(keys, pass_index), valid & shares

        blocks = jnp.where(state.done, 0, row.blocks(length, FALLBACK_BLOCK))
        # No load ahead here: inside the band launch it took that launch from 96 to 128 registers.
        return advance(state, histogram_loop(blocks, load_block, digits_of_block, table_ref, ahead=False), pass_index)

    state = lax.fori_loop(0, NUM_PASSES, one_pass, state)

    shift, prefix = state.shift, state.prefix
    block = min(FALLBACK_BLOCK, tiling.chunk)  # a step must not reach into the next chunk

    def chunk_counts_of(c, carry):
        chunk = ChunkGeometry(c, c * tiling.chunk, length, tiling.chunk)

        def scan(i, counts):
            _, valid, keys = block_keys(scores_ref, chunk, i, block, sink=sink, recent=recent)
            key_prefix = keys >> shift
            return counts[0] + count(valid & (key_prefix > prefix)), counts[1] + count(valid & (key_prefix == prefix))

        blocks = chunk.blocks(length, block)
        greater, equal = lax.fori_loop(0, blocks, scan, (jnp.int32(0), jnp.int32(0)))
        counts_ref[c, 0] = greater
        counts_ref[c, 1] = equal
        return carry

    lax.fori_loop(0, counts_ref.shape[0], chunk_counts_of, 0)
    return state


# ----------------------------------------------------------------------------------------------
# Compaction.


class ChunkPlan(NamedTuple):
    """What the compaction program of one chunk takes: keys whose top `32 - shift` bits
    (`keys >> shift`) are above `prefix`, and of the keys equal to it those whose rank among
    the row's equal keys in position order is <= `need`."""

    greater_before: jax.Array  # keys above the threshold in the row's earlier chunks
    equal_before: jax.Array  # keys equal to it in the row's earlier chunks
    own_greater: jax.Array  # keys above it in this chunk
    own_equal: jax.Array  # keys equal to it in this chunk
    need: jax.Array
    shift: jax.Array
    prefix: jax.Array


def chunk_plan(greater, equal, need, shift, prefix, chunk_index) -> ChunkPlan:
    """The ChunkPlan of chunk `chunk_index` from the row's per-chunk counts (greater, equal: [chunks])."""
    before = iota(greater.shape) < chunk_index
    return ChunkPlan(
        jnp.sum(jnp.where(before, greater, 0)),
        jnp.sum(jnp.where(before, equal, 0)),
        pick(greater, chunk_index),
        pick(equal, chunk_index),
        need,
        shift,
        prefix,
    )


def _compact_kernel(len_ref, scores_ref, decision_ref, *refs, chunk_plan_of, plan_inputs, tiling, seq, budget, sink,
                    recent):
    plan_refs, (idx_ref, count_ref) = refs[:plan_inputs], refs[plan_inputs:]
    geo = chunk_geometry(len_ref, tiling, seq)
    plan = chunk_plan_of(decision_ref, *plan_refs, chunk_index=geo.chunk_index)
    equal_before = plan.equal_before
    need = plan.need  # equal keys to take, in position order
    own_taken = plan.own_greater + jnp.clip(need - equal_before, 0, plan.own_equal)
    first_slot = plan.greater_before + jnp.minimum(equal_before, need)
    block = tiling.scan

    def body(i, carry):
        equal_seen, taken_seen = carry
        pos, valid, keys = block_keys(scores_ref, geo, i, block, sink=sink, recent=recent)
        key_prefix = keys >> plan.shift
        is_greater = (valid & (key_prefix > plan.prefix)).astype(jnp.int32)
        is_equal = (valid & (key_prefix == plan.prefix)).astype(jnp.int32)
        # One scan counts both (block <= MAX_BLOCK): greater keys so far in the low 16 bits, equal ones above.
        running = jnp.cumsum(is_greater + (is_equal << 16))
        greater_so_far, equal_so_far = running & 0xFFFF, running >> 16
        free = jnp.maximum(need - equal_before - equal_seen, 0)  # equal keys still to take
        take = (is_greater == 1) | ((is_equal == 1) & (equal_so_far <= free))
        slots = first_slot + taken_seen + greater_so_far + jnp.minimum(equal_so_far, free) - 1
        pltriton.store(idx_ref.at[jnp.where(take, slots, budget)], pos, mask=take)
        return equal_seen + jnp.sum(is_equal), taken_seen + count(take)

    lax.fori_loop(0, jnp.where(own_taken > 0, geo.blocks(geo.length, block), 0), body, (jnp.int32(0), jnp.int32(0)))

    @pl.when(geo.chunk_index == 0)
    def _():
        k_eff = k_effective(geo.length, budget)
        count_ref[()] = k_eff
        fill = min(FILL_BLOCK, pl.next_power_of_2(budget))

        def fill_unused(j, carry):
            slots = j * fill + iota((fill,))
            pltriton.store(
                idx_ref.at[pl.ds(j * fill, fill)],
                jnp.full((fill,), UNUSED, jnp.int32),
                mask=(slots >= k_eff) & (slots < budget),
            )
            return carry

        lax.fori_loop(0, pl.cdiv(budget, fill), fill_unused, 0)


# ----------------------------------------------------------------------------------------------
# Block specs and the launches after the band select's decision.


def length_spec():
    return pl.BlockSpec((None,), lambda b, h, c: (b,))


def table_spec():
    return pl.BlockSpec((2 * NIBBLE, NIBBLE), lambda b, h, c: (0, 0))


def row_spec(*tail: int):
    """The whole row (b, h) of an array [B, Hkv, *tail]."""
    return pl.BlockSpec((None, None, *tail), lambda b, h, c: (b, h) + (0,) * len(tail))


def compact_launch(scores, lengths, decision, plan_inputs, chunk_plan_of, *, budget, sink, recent, tiling, interpret):
    """The compaction, grid (B, Hkv, chunks): writes every row's selected positions.

    scores: float32[B, Hkv, S] (read at positions < lengths[b] only); decision: int32[B, Hkv,
    DECISION_WIDTH]; plan_inputs: [(array, row BlockSpec)] that `chunk_plan_of(decision_ref,
    *their refs, chunk_index=...) -> ChunkPlan` reads.
    Returns (idx int32[B, Hkv, budget], count int32[B, Hkv]).
    """
    batch, kv_heads, seq = scores.shape
    chunks = tiling.chunks(seq)
    return triton_call(
        functools.partial(
            _compact_kernel,
            chunk_plan_of=chunk_plan_of,
            plan_inputs=len(plan_inputs),
            budget=budget,
            tiling=tiling,
            seq=seq,
            sink=sink,
            recent=recent,
        ),
        out_shape=(
            jax.ShapeDtypeStruct((batch, kv_heads, budget), jnp.int32),
            jax.ShapeDtypeStruct((batch, kv_heads), jnp.int32),
        ),
        grid=(batch, kv_heads, chunks),
        in_specs=[length_spec(), row_spec(seq), row_spec(DECISION_WIDTH), *[spec for _, spec in plan_inputs]],
        out_specs=[row_spec(budget), row_spec()],
        num_warps=tiling.num_warps,
        num_stages=tiling.num_stages,
        interpret=interpret,
        name="hata_select_compact",
    )(lengths, scores, decision, *[array for array, _ in plan_inputs])
