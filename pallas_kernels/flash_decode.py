"""Split-K flash-decode attention (one query token per sequence) over a head-major KV cache.

Two kernels share one body, :func:`_attend_blocks`:

- :func:`dense_decode_attention` reads the first `lengths[b]` rows of each KV head's cache;
- :func:`sparse_decode_attention` reads the rows listed in `idx[b, h, :count[b, h]]`, gathered
  inside the kernel (`k_ref.at[positions[:, None], columns]`: one masked row gather per block).

They differ only in how a block's K/V rows are addressed (a contiguous range or an index
vector) and so in what masks a row; the online-softmax update (:func:`_softmax_step`) is the
same function.

Design
------
A call is at most two launches and nothing else: no XLA op runs around them (the q, out and
lse reshapes are bitcasts; `lengths` / `count` are read raw and clipped inside the kernel).

1. The split kernel, grid `(batch, kv_heads, splits)`. The `G = Hq / Hkv` query heads of a KV
   head are the rows of one `[16, D]` query tile (G padded up to 16 rows for the dot; padded
   rows are masked on load and store), so each K/V row is read from HBM once per group. The
   `n = clip(lengths[b], 0, S)` (dense) or `clip(count[b, h], 0, budget)` (sparse) valid rows
   form `cdiv(n, block_k)` blocks; split `s` takes the `s`-th run of `cdiv(blocks, splits)` of
   them. Splits are sized from the *traced* `n`, not from the capacity, so a short sequence in
   a long cache still spreads over all its programs, and blocks past `n` are never visited (no
   loads). Each program keeps a float32 online softmax (running max `m`, sum `l`, unnormalised
   output `acc`) and writes it as float32 partials `[B, Hkv, splits, G, (D)]`.
2. The combine kernel (:func:`_combine_splits`), grid `(batch, kv_heads)`: each program loads
   its `[splits, G]` maxima and sums, takes `m* = max m` and `L = sum exp(m - m*) l`, sums
   `exp(m - m*) acc` over its `[splits, G, D]` partials (`_COMBINE_TILE` elements per loop
   step), and writes `out = acc / L` in q's dtype and, if asked, `lse = m* + log L`.

With `splits == 1` the split kernel normalises and writes out (and lse) itself: one launch,
no partials (:func:`_store_normalized` is the same code in both kernels). A (b, h) with no
valid row gets out 0 and lse -inf. Dots run at full input precision (`Precision.HIGHEST`:
IEEE fp32 for fp32 inputs, not tf32; bf16/fp16 tensor-core dots accumulate in fp32). The
probabilities are cast to V's dtype for the second dot, as in every flash kernel.

Byte floor, Llama-3.1-8B attention (32 q heads, 8 KV heads, D=128, bf16), batch 1, 128K context
------------------------------------------------------------------------------------------------
- dense: K + V of 131072 tokens x 8 KV heads x 128 x 2 B x 2 = 512 MiB (536.9 MB): 0.18 ms at
  3.0 TB/s. The split partials (f32 acc, m, l: 8 heads x 64 splits x 4 rows x 130 x 4 B) add
  1.0 MiB written and read back (0.4%).
- sparse, budget 2048: 2048 rows x 8 KV heads x 128 x 2 B x 2 (K and V) = 8 MiB plus the
  indices 2048 x 8 x 4 B = 64 KiB: 8.06 MiB (8.45 MB), 2.8 us at 3.0 TB/s, so this kernel is
  launch- and latency-bound. Partials at 32 splits: 0.5 MiB written and read back (6% of the
  floor each way; fewer splits trade it for parallelism), and the combine is a second launch
  (splits == 1 skips both). Choosing the rows is the scoring kernels' job (codes 16 B + norm
  4 B per token per KV head at rbit 128: 131072 x 8 x 20 B = 20 MiB).

Tunables (:class:`Tuning`; pass `tuning=` to override, e.g. from a benchmark sweep)
---------------------------------------------------------------------------------
- `block_k = 64` rows per block: K and V tiles of 64 x 128 x 2 B = 16 KiB each, so 3 pipeline
  stages take 96 KiB of shared memory and two programs fit on an H100 SM (228 KiB); 64 keeps
  the `[16, 64]` logits tile and the `[16, 128]` accumulator in registers at 4 warps. 32 when a
  row is wider than 256 B (fp32 at D=128), to keep the same tile bytes.
- `splits`: about `_WAVES` (= 4) x SMs programs, `splits = cdiv(4 x SMs, batch x kv_heads)`
  rounded down to a power of two, capped so each split gets at least 4 blocks (dense: the
  pipeline needs iterations to overlap) or 1 block (sparse) at full length. Llama-3.1-8B on an
  H100 (132 SMs): dense batch 1 -> 64 splits (512 programs; 2048 tokens each at 128K, 512 at
  32K), batch 8 -> 8 splits; sparse budget 2048 -> 32 splits (one block each) at batch 1, 8 at
  batch 8. The rule gives 1 split (one launch, no combine) only where it costs no parallelism:
  when `batch x kv_heads` alone fills the SMs 4 times (batch >= 66 at 8 KV heads), or when
  the rows make too few blocks to share (sparse budget <= block_k, dense S < 8 blocks).
- `num_warps = 4` (one `[16, D]` query tile needs no more); `num_stages = 3` for dense (two
  blocks in flight while one computes), 2 for fp32 at D=128 (tile bytes) and for sparse (the
  gather addresses come from a load in the same iteration; its loop is 1-4 blocks long).
- combine (module constants): `_COMBINE_WARPS = 8`, `_COMBINE_TILE = 16384` float32 partial
  elements per loop step (64 KiB, 64 registers a thread): the combine has only `batch x
  kv_heads` programs (8 at batch 1), so each issues as many loads at once as its registers
  hold; sparse batch 1 (32 splits x 4 rows x 128) merges in one step, dense (64 splits) in 2.
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

from pallas_kernels.backend import (
    MAX_BUDGET,
    MAX_GROUP,
    MAX_SEQ,
    QUANTIZED_DTYPES,
    SUPPORTED_DTYPES,
    SUPPORTED_HEAD_DIMS,
    dot,
    triton_call,
)

# Query heads of a group, padded up to the smallest Triton dot operand dimension.
GROUP_ROWS = 16

_DEFAULT_SMS = 132  # H100 SXM, used when the device does not report its core count.
_WAVES = 4
# Running max before any valid row: finite, so `exp(m_old - m_new)` never sees inf - inf.
_NO_MAX = float(jnp.finfo(jnp.float32).min)
_COMBINE_TILE = 16384
_COMBINE_WARPS = 8


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Launch parameters of one kernel call (see the module docstring for the defaults)."""

    block_k: int
    splits: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        if self.block_k < 16 or self.block_k & (self.block_k - 1):
            raise ValueError(f"block_k must be a power of two >= 16, got {self.block_k}")
        if self.splits < 1:
            raise ValueError(f"splits must be >= 1, got {self.splits}")


_LAYOUTS = {
    False: {2: "[batch, kv_heads, seq, head_dim]", 1: "[batch, seq, kv_heads, head_dim]"},
    True: {2: "[pages, kv_heads, page_size, head_dim]", 1: "[pages, page_size, kv_heads, head_dim]"},
}


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """How the kernels address a (b, h)'s K/V rows (static).

    Attributes:
      seq_axis: 2 for k, v laid out [.., kv_heads, seq, head_dim], 1 for [.., seq, kv_heads,
        head_dim] (the row stride is then kv_heads x head_dim; no copy either way).
      paged: k, v are page pools [pages, kv_heads, page_size, head_dim] (seq_axis 2) or
        [pages, page_size, kv_heads, head_dim] (seq_axis 1) shared by the batch, and
        `page_table` int32[B, pages_per_sequence] maps sequence b's position p to row
        `p % page_size` of page `page_table[b, p // page_size]`; otherwise k, v are [B, ...].
      scales: None (k, v in q's dtype), "token" (quantized K/V with float scales laid out as k
        without head_dim: one per row and KV head) or "head" (float[kv_heads]); a row's value is
        `scale x stored`.
      starts: (dense) each sequence's rows begin at `starts[b]` (a left-padded cache).
      ring: (dense) positions wrap around the capacity S: row p is slot `p % S` (a ring
        buffer whose rows `[starts[b], lengths[b])`, at most S of them, may run past its end).
    """

    seq_axis: int = 2
    paged: bool = False
    scales: str | None = None
    starts: bool = False
    ring: bool = False

    @classmethod
    def of(cls, seq_axis: int, page_table, k_scale, starts, ring: bool = False) -> CacheSpec:
        if seq_axis not in (1, 2):
            raise ValueError(f"seq_axis must be 2 or 1, got {seq_axis!r}")
        if ring and page_table is not None:
            raise ValueError("a ring buffer is one buffer per sequence: ring and page_table do not go together")
        scales = None if k_scale is None else "head" if k_scale.ndim == 1 else "token"
        return cls(seq_axis, page_table is not None, scales, starts is not None, ring)


def _sm_count() -> int:
    return getattr(jax.devices()[0], "core_count", None) or _DEFAULT_SMS


def _pick_splits(programs_per_split: int, rows: int, block_k: int, min_blocks: int) -> int:
    """Splits filling the SMs about `_WAVES` times (a power of two, so power-of-two row counts
    divide evenly), with at least `min_blocks` blocks each; 1 (no combine) when the other grid
    axes already fill them or the rows are too few to share."""
    wanted = pl.cdiv(_WAVES * _sm_count(), programs_per_split)
    wanted = 1 << (wanted.bit_length() - 1)
    most = max(1, pl.cdiv(rows, block_k) // min_blocks)
    return min(wanted, most)


def _block_k(dtype, head_dim: int) -> int:
    """64 rows, or 32 when a row is wider than 256 B (fp32 at D=128), to keep the tile bytes."""
    return 32 if jnp.dtype(dtype).itemsize * head_dim > 256 else 64


def dense_tuning(batch: int, kv_heads: int, seq: int, head_dim: int, dtype) -> Tuning:
    """Default launch parameters of the dense kernel for a `[batch, kv_heads, seq, head_dim]` cache."""
    block_k = _block_k(dtype, head_dim)
    return Tuning(
        block_k=block_k,
        splits=_pick_splits(batch * kv_heads, seq, block_k, min_blocks=4),
        num_stages=3 if block_k == 64 else 2,
    )


def sparse_tuning(batch: int, kv_heads: int, budget: int, head_dim: int, dtype) -> Tuning:
    """Default launch parameters of the sparse kernel for `budget` selected rows per KV head."""
    block_k = _block_k(dtype, head_dim)
    return Tuning(block_k=block_k, splits=_pick_splits(batch * kv_heads, budget, block_k, min_blocks=1))


def _softmax_step(q, rows: Rows, carry, scale: float):
    """One online-softmax update of a group's query rows with one block of K/V rows.

    q: [GROUP_ROWS, D]; rows: the block's K/V rows (masked rows loaded as 0); carry: (acc
    float32[GROUP_ROWS, D], m float32[GROUP_ROWS], l float32[GROUP_ROWS]). Quantized K/V are
    converted to q's dtype (exact for int8 and fp8 into bf16, fp16 or fp32) and their scales
    applied to the logits' columns and the probabilities' columns: `q . (s_k k) = s_k (q . k)`
    and `p (s_v v) = (p s_v) v`, two multiplies on [GROUP_ROWS, block_k] tiles.
    """
    acc, m, l = carry
    k, v = rows.k.astype(q.dtype), rows.v.astype(q.dtype)
    logits = dot(q, k, trans_b=True, precision=lax.Precision.HIGHEST) * scale
    if rows.k_scale is not None:
        logits = logits * rows.k_scale[None, :]
    logits = jnp.where(rows.read[None, :], logits, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(logits, axis=1))
    rescale = jnp.exp(m - m_new)
    p = jnp.exp(logits - m_new[:, None])
    weights = p if rows.v_scale is None else p * rows.v_scale[None, :]
    pv = dot(weights.astype(v.dtype), v, precision=lax.Precision.HIGHEST)
    return rescale[:, None] * acc + pv, m_new, rescale * l + jnp.sum(p, axis=1)


def _store_normalized(acc, m, l, rows, out_ref, lse_ref=None):
    """Write `out = acc / l` (0 where l = 0) in out_ref's dtype and `lse = m + log l` (-inf).

    acc: float32[R, D]; m, l: float32[R]; rows: bool[R], the rows to write;
    out_ref: [>= R, D]; lse_ref: float32[>= R], or None when the caller wants no lse.
    """
    nonempty = l > 0
    out = acc / jnp.where(nonempty, l, 1.0)[:, None]
    pltriton.store(out_ref.at[pl.ds(0, acc.shape[0]), :], out.astype(out_ref.dtype), mask=rows[:, None])
    if lse_ref is not None:
        lse = jnp.where(nonempty, m + jnp.log(l), -jnp.inf)
        pltriton.store(lse_ref.at[pl.ds(0, acc.shape[0])], lse, mask=rows)


def _attend_blocks(q_ref, n, load_block, out_refs, *, scale, block_k, splits, group):
    """This program's split of the first `n` (traced scalar) rows.

    Writes its (acc, m, l) partials to out_refs, or with one split the final (out[, lse]).
    load_block(start, valid) -> Rows: the K/V rows of slots `start + arange(block_k)`, masked by
    `valid` (masked rows are not read and come back as 0); a valid slot that was not read (a
    sparse position outside the cache, or on a page the table does not hold) makes the partials
    NaN, so that (b, h)'s output is NaN.
    """
    blocks_per_split = pl.cdiv(pl.cdiv(n, block_k), splits)
    first = pl.program_id(2) * blocks_per_split
    last = jnp.minimum(first + blocks_per_split, pl.cdiv(n, block_k))
    head_dim = q_ref.shape[-1]
    rows = jnp.arange(GROUP_ROWS) < group
    q = pltriton.load(q_ref.at[pl.ds(0, GROUP_ROWS), :], mask=rows[:, None], other=0)

    def body(block, carry):
        start = block * block_k
        valid = start + jnp.arange(block_k) < n
        block_rows = load_block(start, valid)
        *state, bad = carry
        state = _softmax_step(q, block_rows, tuple(state), scale)
        return (*state, bad + jnp.sum((valid & ~block_rows.read).astype(jnp.int32)))

    init = (
        jnp.zeros((GROUP_ROWS, head_dim), jnp.float32),
        jnp.full((GROUP_ROWS,), _NO_MAX, jnp.float32),
        jnp.zeros((GROUP_ROWS,), jnp.float32),
        jnp.int32(0),
    )
    acc, m, l, bad = lax.fori_loop(first, last, body, init)
    acc = jnp.where(bad > 0, jnp.nan, acc)  # a used slot outside the cache poisons its (b, h)
    if splits == 1:
        _store_normalized(acc, m, l, rows, *out_refs)
        return
    acc_ref, m_ref, l_ref = out_refs
    pltriton.store(acc_ref.at[pl.ds(0, GROUP_ROWS), :], acc, mask=rows[:, None])
    pltriton.store(m_ref.at[pl.ds(0, GROUP_ROWS)], m, mask=rows)
    pltriton.store(l_ref.at[pl.ds(0, GROUP_ROWS)], l, mask=rows)


class Rows(NamedTuple):
    """One block of K/V rows in a kernel: k, v [block_k, D] in the cache's dtype (rows not read
    are 0); k_scale, v_scale float32[block_k] (a quantized cache) or None; read bool[block_k]."""

    k: jax.Array
    v: jax.Array
    k_scale: jax.Array | None
    v_scale: jax.Array | None
    read: jax.Array


class CacheRefs(NamedTuple):
    """A program's view of the cache (see :class:`CacheSpec`): k, v [S, D] (this (b, h)'s rows) or
    [pages, page_size, D] (this KV head's page pool); page_table [pages_per_sequence] (paged) or
    None; k_scale, v_scale [S] / [pages, page_size] ("token"), [] ("head") or None."""

    page_table: Any
    k: Any
    v: Any
    k_scale: Any
    v_scale: Any

    @classmethod
    def take(cls, refs, spec: CacheSpec):
        """(CacheRefs, the remaining refs) from a kernel's refs in :func:`_cache_operands`' order."""
        refs = list(refs)
        page_table = refs.pop(0) if spec.paged else None
        k, v = refs.pop(0), refs.pop(0)
        k_scale, v_scale = (refs.pop(0), refs.pop(0)) if spec.scales else (None, None)
        return cls(page_table, k, v, k_scale, v_scale), refs

    def capacity(self) -> int:
        """Positions a sequence can hold: S, or pages_per_sequence x page_size."""
        return self.page_table.shape[0] * self.k.shape[1] if self.page_table is not None else self.k.shape[0]

    def scales(self, spec: CacheSpec, index, read, block_k: int):
        """(k_scale, v_scale) float32[block_k] of the rows at `index` (None for a float cache)."""
        if spec.scales is None:
            return None, None
        if spec.scales == "head":
            return tuple(jnp.full((block_k,), ref[...].astype(jnp.float32)) for ref in (self.k_scale, self.v_scale))
        return tuple(pltriton.load(ref.at[index], mask=read, other=0).astype(jnp.float32)
                     for ref in (self.k_scale, self.v_scale))


def _zero(ref):
    """A masked load's fill value of ref's dtype (an int 0 does not cast to fp8 in Triton)."""
    return 0 if jnp.issubdtype(ref.dtype, jnp.integer) else 0.0


def _load_contiguous(cache: CacheRefs, spec: CacheSpec, first, valid, *, block_k):
    """Rows `first .. first + block_k` of an unpaged cache."""
    rows = pl.ds(first, block_k)
    k = pltriton.load(cache.k.at[rows, :], mask=valid[:, None], other=_zero(cache.k))
    v = pltriton.load(cache.v.at[rows, :], mask=valid[:, None], other=_zero(cache.v))
    return Rows(k, v, *cache.scales(spec, rows, valid, block_k), valid)


def _load_positions(cache: CacheRefs, spec: CacheSpec, positions, valid, *, block_k):
    """The rows at `positions` int32[block_k], and which were read: slots not `valid`, positions
    outside [0, capacity) and (paged) positions whose page-table entry is outside the pool are
    not read (the caller poisons the latter two)."""
    inside = valid & (positions >= 0) & (positions < cache.capacity())
    positions = jnp.where(inside, positions, 0)
    columns = jnp.arange(cache.k.shape[-1])[None, :]
    if spec.paged:
        page_size = cache.k.shape[1]
        page = pltriton.load(cache.page_table.at[positions // page_size], mask=inside, other=-1)
        inside = inside & (page >= 0) & (page < cache.k.shape[0])
        page, offset = jnp.where(inside, page, 0), jnp.where(inside, positions % page_size, 0)
        index, scale_index = (page[:, None], offset[:, None], columns), (page, offset)
    else:
        # Both dims as index arrays: the interpreter cannot discharge a masked gather mixed with
        # a slice; on the GPU this is the same pointer tensor as `k.at[positions, :]`.
        index, scale_index = (positions[:, None], columns), positions
    k = pltriton.load(cache.k.at[index], mask=inside[:, None], other=_zero(cache.k))
    v = pltriton.load(cache.v.at[index], mask=inside[:, None], other=_zero(cache.v))
    return Rows(k, v, *cache.scales(spec, scale_index, inside, block_k), inside)


def _dense_kernel(q_ref, lengths_ref, *refs, spec: CacheSpec, **kw):
    if spec.starts:
        starts_ref, *refs = refs
    cache, out_refs = CacheRefs.take(refs, spec)
    capacity = cache.capacity()
    if spec.ring:  # rows [first, first + n) modulo the capacity, n <= capacity
        first = jnp.clip(starts_ref[...], 0, capacity - 1) if spec.starts else 0
        end = jnp.clip(lengths_ref[...], first, first + capacity)
    else:
        end = jnp.clip(lengths_ref[...], 0, capacity)
        first = jnp.clip(starts_ref[...], 0, end) if spec.starts else 0
    if spec.paged or spec.ring:
        def load(start, valid):
            return _load_positions(cache, spec, (first + start + jnp.arange(kw["block_k"])) % capacity, valid,
                                   block_k=kw["block_k"])
    else:
        def load(start, valid):
            return _load_contiguous(cache, spec, first + start, valid, block_k=kw["block_k"])
    _attend_blocks(q_ref, end - first, load, out_refs, **kw)


def _sparse_kernel(q_ref, count_ref, idx_ref, *refs, spec: CacheSpec, **kw):
    cache, out_refs = CacheRefs.take(refs, spec)
    n = jnp.clip(count_ref[...], 0, idx_ref.shape[0])
    block_k = kw["block_k"]

    def load(start, valid):
        positions = pltriton.load(idx_ref.at[pl.ds(start, block_k)], mask=valid, other=0)
        return _load_positions(cache, spec, positions, valid, block_k=block_k)

    _attend_blocks(q_ref, n, load, out_refs, **kw)


def _combine_kernel(acc_ref, m_ref, l_ref, out_ref, lse_ref=None, *, splits, group, chunk):
    """Merge one (b, h)'s split partials by log-sum-exp and write out (and lse).

    acc_ref: float32[splits_p, R, D]; m_ref, l_ref: float32[splits_p, R] (blocks padded to
    powers of two: split rows >= `splits` and query rows >= `group` are masked, never read).
    """
    splits_p, rows_p, head_dim = acc_ref.shape
    rows = jnp.arange(rows_p) < group

    def used(first, size):  # bool[size, R]: real (split, query row) pairs
        return ((first + jnp.arange(size)) < splits)[:, None] & rows[None, :]

    m = pltriton.load(m_ref.at[:, :], mask=used(0, splits_p), other=_NO_MAX)
    l = pltriton.load(l_ref.at[:, :], mask=used(0, splits_p), other=0)
    m_max = jnp.max(m, axis=0)
    total = jnp.sum(jnp.exp(m - m_max[None, :]) * l, axis=0)

    def add_chunk(c, acc):
        first = c * chunk
        mask = used(first, chunk)
        m_c = pltriton.load(m_ref.at[pl.ds(first, chunk), :], mask=mask, other=_NO_MAX)
        part = pltriton.load(acc_ref.at[pl.ds(first, chunk), :, :], mask=mask[:, :, None], other=0)
        return acc + jnp.sum(jnp.exp(m_c - m_max[None, :])[:, :, None] * part, axis=0)

    acc = lax.fori_loop(0, pl.cdiv(splits, chunk), add_chunk, jnp.zeros((rows_p, head_dim), jnp.float32))
    _store_normalized(acc, m_max, total, rows, out_ref, lse_ref)


def _result_shapes(lead, group, head_dim, dtype, return_lse):
    """out [*lead, G, D] in `dtype`, and lse float32[*lead, G] if `return_lse`."""
    out = jax.ShapeDtypeStruct((*lead, group, head_dim), dtype)
    lse = jax.ShapeDtypeStruct((*lead, group), jnp.float32)
    return [out, lse] if return_lse else [out]


def _combine_splits(acc, m, l, *, dtype, return_lse, interpret, name):
    """One launch merging per-split partials along axis 2.

    acc: float32[B, Hkv, splits, G, D]; m, l: float32[B, Hkv, splits, G].
    Returns [out [B, Hkv, G, D] in `dtype`] (+ [lse float32[B, Hkv, G]] if `return_lse`);
    a (b, h) with no valid row gets 0 and -inf.
    """
    batch, kv_heads, splits, group, head_dim = acc.shape
    splits_p, rows_p = pl.next_power_of_2(splits), pl.next_power_of_2(group)
    chunk = min(splits_p, max(1, _COMBINE_TILE // (rows_p * head_dim)))
    out_specs = [
        pl.BlockSpec((None, None, rows_p, head_dim), lambda b, h: (b, h, 0, 0)),
        pl.BlockSpec((None, None, rows_p), lambda b, h: (b, h, 0)),
    ]
    return triton_call(
        functools.partial(_combine_kernel, splits=splits, group=group, chunk=chunk),
        out_shape=_result_shapes((batch, kv_heads), group, head_dim, dtype, return_lse),
        grid=(batch, kv_heads),
        in_specs=[
            pl.BlockSpec((None, None, splits_p, rows_p, head_dim), lambda b, h: (b, h, 0, 0, 0)),
            pl.BlockSpec((None, None, splits_p, rows_p), lambda b, h: (b, h, 0, 0)),
            pl.BlockSpec((None, None, splits_p, rows_p), lambda b, h: (b, h, 0, 0)),
        ],
        out_specs=out_specs[: 1 + return_lse],
        num_warps=_COMBINE_WARPS,
        num_stages=2,
        interpret=interpret,
        name=f"{name}_combine",
    )(acc, m, l)


def _check_supported(q, k, v, spec: CacheSpec, page_table, k_scale, v_scale) -> tuple[int, int]:
    """Raise ValueError for arguments these kernels do not take; returns (group size, capacity)."""
    layout = _LAYOUTS[spec.paged][spec.seq_axis]
    if q.ndim != 3 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"need q [B, Hq, D] and k, v {layout}; got {q.shape}, {k.shape}, {v.shape}")
    batch, kv_heads, seq, head_dim = q.shape[0], k.shape[3 - spec.seq_axis], k.shape[spec.seq_axis], k.shape[3]
    if q.shape[2] != head_dim or kv_heads < 1 or q.shape[1] % kv_heads or (not spec.paged and k.shape[0] != batch):
        raise ValueError(f"q {q.shape} does not match k {k.shape} ({layout})")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q dtype {q.dtype} not supported (bf16, fp16, fp32)")
    if v.dtype != k.dtype:
        raise ValueError(f"k and v must share a dtype, got {k.dtype}, {v.dtype}")
    if spec.scales is None and k.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype (or k, v be quantized with scales), got {q.dtype}, {k.dtype}")
    if spec.scales is not None:
        if v_scale is None:
            raise ValueError("k_scale and v_scale must be given together")
        if k.dtype not in SUPPORTED_DTYPES + QUANTIZED_DTYPES:
            raise ValueError(f"k dtype {k.dtype} not supported (int8, fp8 e4m3 / e5m2, bf16, fp16, fp32)")
        shape = k.shape[:3] if spec.scales == "token" else (kv_heads,)
        for name, x in (("k_scale", k_scale), ("v_scale", v_scale)):
            if x.shape != shape or not jnp.issubdtype(x.dtype, jnp.floating):
                raise ValueError(f"{name} must be float{list(shape)}, got {x.dtype}{list(x.shape)}")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {head_dim} not supported {SUPPORTED_HEAD_DIMS}")
    group = q.shape[1] // kv_heads
    if not 1 <= group <= MAX_GROUP:
        raise ValueError(f"group size {group} not supported (1 to {MAX_GROUP})")
    capacity = seq
    if spec.paged:
        if page_table.ndim != 2 or page_table.shape[0] != batch or page_table.dtype != jnp.int32:
            raise ValueError(f"page_table must be int32[{batch}, pages_per_sequence], got "
                             f"{page_table.dtype}{list(page_table.shape)}")
        capacity = page_table.shape[1] * seq
        if k.size >= 2**31:  # a KV head's pool is addressed with int32 offsets inside the kernel
            raise ValueError(f"a page pool of {k.size} elements is not supported (at most 2**31 - 1)")
    if not 1 <= capacity <= MAX_SEQ:
        raise ValueError(f"sequence capacity {capacity} not supported (1 to {MAX_SEQ})")
    return group, capacity


def _head_block(x):
    """The whole of x[b, h] (x[b] for a per-sequence array) for program (b, h, s)."""
    lead = min(x.ndim, 2)
    return pl.BlockSpec((None,) * lead + x.shape[lead:], lambda b, h, s: (b, h)[:lead] + (0,) * (x.ndim - lead))


def _cache_block(shape, spec: CacheSpec):
    """Program (b, h, s)'s part of k, v or a token scale laid out as `spec`: the whole KV head h,
    of sequence b ([S, (D)]) or of the page pool ([pages, page_size, (D)])."""
    head = 3 - spec.seq_axis

    def role(axis):
        return "h" if axis == head else "b" if axis == 0 and not spec.paged else "."

    block = tuple(None if role(a) != "." else size for a, size in enumerate(shape))
    return pl.BlockSpec(block, lambda b, h, s: tuple({"h": h, "b": b, ".": 0}[role(a)] for a in range(len(shape))))


def _cache_operands(spec: CacheSpec, k, v, page_table, k_scale, v_scale):
    """The kernel's cache operands and their BlockSpecs, in :meth:`CacheRefs.take`'s order."""
    operands = [(page_table, pl.BlockSpec((None, page_table.shape[1]), lambda b, h, s: (b, 0)))] if spec.paged else []
    operands += [(x, _cache_block(x.shape, spec)) for x in (k, v)]
    if spec.scales == "token":
        operands += [(x.astype(jnp.float32), _cache_block(x.shape, spec)) for x in (k_scale, v_scale)]
    elif spec.scales == "head":
        operands += [(x.astype(jnp.float32), pl.BlockSpec((None,), lambda b, h, s: (h,))) for x in (k_scale, v_scale)]
    return operands


def _split_block(shape):
    """Program (b, h, s)'s GROUP_ROWS query rows of a `[B, Hkv, splits, G, (D)]` result."""
    trailing = (0,) * (len(shape) - 4)
    return pl.BlockSpec((None, None, None, GROUP_ROWS, *shape[4:]), lambda b, h, s: (b, h, s, 0, *trailing))


def _decode(kernel, q, row_inputs, cache_operands, *, kv_heads, group, tuning, scale, return_lse, interpret, name):
    """Launch `kernel` on grid (B, Hkv, splits), then the combine if splits > 1.

    row_inputs: per-sequence or per-(b, h) arrays [B, ...] / [B, Hkv, ...] (the raw `lengths`
    and `starts`, or `count` and `idx`); cache_operands: (array, BlockSpec) pairs.
    """
    batch, head_dim = q.shape[0], q.shape[-1]
    splits = tuning.splits
    lead = (batch, kv_heads, splits)
    if splits == 1:
        out_shape = _result_shapes(lead, group, head_dim, q.dtype, return_lse)
    else:
        out_shape = [
            jax.ShapeDtypeStruct((*lead, group, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((*lead, group), jnp.float32),
            jax.ShapeDtypeStruct((*lead, group), jnp.float32),
        ]
    results = triton_call(
        functools.partial(kernel, scale=scale, block_k=tuning.block_k, splits=splits, group=group),
        out_shape=out_shape,
        grid=(batch, kv_heads, splits),
        in_specs=[
            pl.BlockSpec((None, None, GROUP_ROWS, head_dim), lambda b, h, s: (b, h, 0, 0)),
            *[_head_block(x) for x in row_inputs],
            *[spec for _, spec in cache_operands],
        ],
        out_specs=[_split_block(x.shape) for x in out_shape],
        num_warps=tuning.num_warps,
        num_stages=tuning.num_stages,
        interpret=interpret,
        name=name,
    )(q.reshape(batch, kv_heads, group, head_dim), *row_inputs, *[x for x, _ in cache_operands])
    if splits > 1:
        results = _combine_splits(*results, dtype=q.dtype, return_lse=return_lse, interpret=interpret, name=name)
    out = results[0].reshape(q.shape)
    return (out, results[1].reshape(q.shape[:2])) if return_lse else out


@functools.partial(jax.jit, static_argnames=("scale", "return_lse", "seq_axis", "ring", "interpret", "tuning"))
def dense_decode_attention(q, k, v, lengths, *, scale: float, return_lse: bool, starts=None, seq_axis: int = 2,
                           page_table=None, k_scale=None, v_scale=None, ring: bool = False, interpret: bool = False,
                           tuning: Tuning | None = None):
    """Attention of each query head over the cached rows `[starts[b], lengths[b])` of its KV head.

    q: [B, Hq, D]; k, v: the cache as `CacheSpec.of` describes it (seq_axis, page_table,
    k_scale, v_scale, ring); lengths: int32[B] (clipped to [0, capacity], or with `ring` to
    [starts[b], starts[b] + capacity]); starts: int32[B] (clipped to [0, lengths[b]], or with
    `ring` to [0, capacity)) or None (0).
    Returns out [B, Hq, D] in q's dtype, and lse float32[B, Hq] if `return_lse`
    (a sequence with no rows gets out 0, lse -inf; a row on a page outside the pool, NaN).
    """
    spec = CacheSpec.of(seq_axis, page_table, k_scale, starts, ring)
    group, capacity = _check_supported(q, k, v, spec, page_table, k_scale, v_scale)
    batch, kv_heads = q.shape[0], k.shape[3 - seq_axis]
    rows = [lengths] + ([] if starts is None else [starts])
    for name, x in zip(("lengths", "starts"), rows):
        if x.shape != (batch,):
            raise ValueError(f"{name} must have shape ({batch},), got {x.shape}")
    tuning = tuning or dense_tuning(batch, kv_heads, capacity, q.shape[2], q.dtype)
    return _decode(functools.partial(_dense_kernel, spec=spec), q, [x.astype(jnp.int32) for x in rows],
                   _cache_operands(spec, k, v, page_table, k_scale, v_scale), kv_heads=kv_heads, group=group,
                   tuning=tuning, scale=scale, return_lse=return_lse, interpret=interpret, name="hata_dense_decode")


@functools.partial(jax.jit, static_argnames=("scale", "return_lse", "seq_axis", "interpret", "tuning"))
def sparse_decode_attention(q, k, v, idx, count, *, scale: float, return_lse: bool, seq_axis: int = 2,
                            page_table=None, k_scale=None, v_scale=None, interpret: bool = False,
                            tuning: Tuning | None = None):
    """Attention of each query head over the cached rows its KV head selected.

    q: [B, Hq, D]; k, v: the cache as `CacheSpec.of` describes it (seq_axis, page_table,
    k_scale, v_scale); idx: int32[B, Hkv, K] (slots `< count` hold positions in [0, capacity),
    the rest are never read); count: int32[B, Hkv] (clipped to [0, K]).
    Returns out [B, Hq, D] in q's dtype, and lse float32[B, Hq] if `return_lse`
    (a (b, h) with count 0 gets out 0, lse -inf; one with a used position outside the cache or
    on a page outside the pool, NaN).
    """
    spec = CacheSpec.of(seq_axis, page_table, k_scale, None)
    group, _ = _check_supported(q, k, v, spec, page_table, k_scale, v_scale)
    batch, kv_heads = q.shape[0], k.shape[3 - seq_axis]
    if idx.ndim != 3 or idx.shape[:2] != (batch, kv_heads) or idx.dtype != jnp.int32:
        raise ValueError(f"idx must be int32[{batch}, {kv_heads}, budget], got {idx.dtype}{list(idx.shape)}")
    if count.shape != (batch, kv_heads):
        raise ValueError(f"count must have shape ({batch}, {kv_heads}), got {count.shape}")
    budget = idx.shape[2]
    if not 1 <= budget <= MAX_BUDGET:
        raise ValueError(f"budget {budget} not supported (1 to {MAX_BUDGET})")
    tuning = tuning or sparse_tuning(batch, kv_heads, budget, q.shape[2], q.dtype)
    return _decode(functools.partial(_sparse_kernel, spec=spec), q, [count.astype(jnp.int32), idx],
                   _cache_operands(spec, k, v, page_table, k_scale, v_scale), kv_heads=kv_heads, group=group,
                   tuning=tuning, scale=scale, return_lse=return_lse, interpret=interpret, name="hata_sparse_decode")
