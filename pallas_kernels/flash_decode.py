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
A call is one launch and nothing else: no XLA op runs around it (the q, out and lse reshapes
are bitcasts; `lengths` / `count` are read raw and clipped inside the kernel; the caller gives
the `flags` and `tickets` arrays, or fresh zero arrays are made).

Grid `(batch, kv_heads, splits)`. The `G = Hq / Hkv` query heads of a KV head are the rows of
one `[16, D]` query tile (G padded up to 16 rows for the dot; padded rows are masked on load
and store), so each K/V row is read from HBM once per group. The `n = clip(lengths[b], 0, S)`
(dense) or `clip(count[b, h], 0, budget)` (sparse) valid rows form `cdiv(n, block_k)` blocks;
split `s` takes the `s`-th run of `cdiv(blocks, splits)` of them. Splits are sized from the
*traced* `n`, not from the capacity, so a short sequence in a long cache still spreads over all
its programs, and blocks past `n` are never visited (no loads). Each program keeps a float32
online softmax (running max `m`, sum `l`, unnormalised output `acc`). With `splits == 1` it
normalises and writes out (and lse). Otherwise it writes float32 partials `[B, Hkv, splits, G,
(D)]`, then (after a block barrier) takes a ticket, an acquire-release atomic increment of the
row's counter in `tickets`; the program that draws the row's last ticket combines
(:func:`_combine_splits`): it loads the `[splits, G]` maxima and sums, takes `m* = max m` and
`L = sum exp(m - m*) l`, sums `exp(m - m*) acc` over the `[splits, G, D]` partials
(`_COMBINE_TILE` elements per loop step), writes `out = acc / L` in q's dtype and, if asked,
`lse = m* + log L`, and resets the counter to zero. Which program combines does not change the
result (the sum runs over the splits in order).

A (b, h) with no valid row gets out 0 and lse -inf; a used sparse slot outside `[0, S)` is
never read and makes its (b, h) NaN; a non-zero `flags[b]` (an overflowed cache) makes
sequence b NaN. Dots run at full input precision (`Precision.HIGHEST`: IEEE fp32 for fp32
inputs, not tf32; bf16/fp16 tensor-core dots accumulate in fp32). The probabilities are cast
to V's dtype for the second dot, as in every flash kernel.

Byte floor, Llama-3.1-8B attention (32 q heads, 8 KV heads, D=128, bf16), batch 1, 128K context
------------------------------------------------------------------------------------------------
- dense: K + V of 131072 tokens x 8 KV heads x 128 x 2 B x 2 = 512 MiB (536.9 MB): 0.18 ms at
  3.0 TB/s. The split partials (f32 acc, m, l: 8 heads x 64 splits x 4 rows x 130 x 4 B) add
  1.0 MiB written and read back (0.4%).
- sparse, budget 2048: 2048 rows x 8 KV heads x 128 x 2 B x 2 (K and V) = 8 MiB plus the
  indices 2048 x 8 x 4 B = 64 KiB: 8.06 MiB (8.45 MB), 2.8 us at 3.0 TB/s, so this kernel is
  launch- and latency-bound. Partials at 32 splits: 0.5 MiB written and read back (6% of the
  floor each way; fewer splits trade it for parallelism). Choosing the rows is the scoring kernels' job (codes 16 B + norm
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
  batch 8. The rule gives 1 split (no partials) only where it costs no parallelism: when
  `batch x kv_heads` alone fills the SMs 4 times (batch >= 66 at 8 KV heads), or when the rows
  make too few blocks to share (sparse budget <= block_k, dense S < 8 blocks).
- `num_warps = 4` (one `[16, D]` query tile needs no more); `num_stages = 3` for dense (two
  blocks in flight while one computes), 2 for fp32 at D=128 (tile bytes) and for sparse (the
  gather addresses come from a load in the same iteration; its loop is 1-4 blocks long).
- combine: `_COMBINE_TILE = 8192` float32 partial elements per loop step (64 registers a
  thread at 4 warps): Llama's sparse batch 1 (32 splits x 4 rows x 128) merges in 2 steps.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels._backend import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, dot

MAX_GROUP = 8
MAX_SEQ = 262144
MAX_BUDGET = 8192
# Query heads of a group, padded up to the smallest Triton dot operand dimension.
GROUP_ROWS = 16

_DEFAULT_SMS = 132  # H100 SXM, used when the device does not report its core count.
_WAVES = 4
# Running max before any valid row: finite, so `exp(m_old - m_new)` never sees inf - inf.
_NO_MAX = float(jnp.finfo(jnp.float32).min)
_COMBINE_TILE = 8192


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


def _softmax_step(q, k, v, valid, carry, scale: float):
    """One online-softmax update of a group's query rows with one block of K/V rows.

    q: [GROUP_ROWS, D]; k, v: [block_k, D] (masked rows loaded as 0); valid: bool[block_k];
    carry: (acc float32[GROUP_ROWS, D], m float32[GROUP_ROWS], l float32[GROUP_ROWS]).
    """
    acc, m, l = carry
    logits = dot(q, k, trans_b=True, precision=lax.Precision.HIGHEST) * scale
    logits = jnp.where(valid[None, :], logits, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(logits, axis=1))
    rescale = jnp.exp(m - m_new)
    p = jnp.exp(logits - m_new[:, None])
    pv = dot(p.astype(v.dtype), v, precision=lax.Precision.HIGHEST)
    return rescale[:, None] * acc + pv, m_new, rescale * l + jnp.sum(p, axis=1)


def _store_normalized(acc, m, l, rows, poisoned, out_ref, lse_ref=None):
    """Write `out = acc / l` (0 where l = 0; NaN when `poisoned`) in out_ref's dtype and
    `lse = m + log l` (-inf).

    acc: float32[R, D]; m, l: float32[R]; rows: bool[R], the rows to write; poisoned: bool scalar;
    out_ref: [>= R, D]; lse_ref: float32[>= R], or None when the caller wants no lse.
    """
    nonempty = l > 0
    out = acc / jnp.where(nonempty, l, 1.0)[:, None]
    out = jnp.where(poisoned, jnp.nan, out)
    pltriton.store(out_ref.at[pl.ds(0, acc.shape[0]), :], out.astype(out_ref.dtype), mask=rows[:, None])
    if lse_ref is not None:
        lse = jnp.where(nonempty, m + jnp.log(l), -jnp.inf)
        pltriton.store(lse_ref.at[pl.ds(0, acc.shape[0])], lse, mask=rows)


def _attend_blocks(q_ref, n, load_block, out_refs, *, scale, block_k, splits, group, head_dim, interpret):
    """This program's split of the first `n` (traced scalar) rows, then, in the row's last
    program, the combine of all splits.

    out_refs: (flag_ref, out_ref[, lse_ref], acc_ref, m_ref, l_ref, tickets_ref) with one split
    fewer refs (no partials, no tickets). load_block(start, valid) -> (k, v): the K/V rows of
    slots `start + arange(block_k)`, masked by `valid` (masked rows are not read, come back 0).
    """
    flag_ref, *refs = out_refs
    if splits > 1:
        refs = refs[1:]  # the tickets input, aliased to the last output
    out_ref, *rest = refs
    lse_ref = rest.pop(0) if len(rest) in (1, 5) else None
    split = pl.program_id(2)  # read outside the conditionals (the interpreter needs that)
    blocks_per_split = pl.cdiv(pl.cdiv(n, block_k), splits)
    first = split * blocks_per_split
    last = jnp.minimum(first + blocks_per_split, pl.cdiv(n, block_k))
    rows = jnp.arange(GROUP_ROWS) < group
    q = pltriton.load(q_ref.at[pl.ds(0, GROUP_ROWS), :], mask=rows[:, None], other=0)
    poisoned = flag_ref[...].astype(jnp.int32) != 0

    def body(block, carry):
        start = block * block_k
        valid = start + jnp.arange(block_k) < n
        k, v, inside = load_block(start, valid)
        *state, bad = carry
        state = _softmax_step(q, k, v, inside, tuple(state), scale)
        return (*state, bad + jnp.sum((valid & ~inside).astype(jnp.int32)))

    init = (
        jnp.zeros((GROUP_ROWS, head_dim), jnp.float32),
        jnp.full((GROUP_ROWS,), _NO_MAX, jnp.float32),
        jnp.zeros((GROUP_ROWS,), jnp.float32),
        jnp.int32(0),
    )
    acc, m, l, bad = lax.fori_loop(first, last, body, init)
    acc = jnp.where(bad > 0, jnp.nan, acc)  # a slot outside the cache poisons the row
    if splits == 1:
        _store_normalized(acc, m, l, rows, poisoned, out_ref, lse_ref)
        return
    acc_ref, m_ref, l_ref, tickets_ref = rest
    pltriton.store(acc_ref.at[split, pl.ds(0, GROUP_ROWS), :], acc, mask=rows[:, None])
    pltriton.store(m_ref.at[split, pl.ds(0, GROUP_ROWS)], m, mask=rows)
    pltriton.store(l_ref.at[split, pl.ds(0, GROUP_ROWS)], l, mask=rows)
    if not interpret:
        pltriton.debug_barrier()  # every store of this program happens before its ticket
    ticket = pltriton.atomic_add(tickets_ref, (jnp.int32(0),), jnp.ones((), jnp.int32))  # scalar: one thread, once

    @pl.when(ticket == splits - 1)
    def _():
        _combine_splits(acc_ref, m_ref, l_ref, poisoned, out_ref, lse_ref, splits=splits, group=group,
                        head_dim=head_dim)
        pltriton.store(tickets_ref.at[pl.ds(0, 1)], jnp.zeros((1,), jnp.int32))


def _combine_splits(acc_ref, m_ref, l_ref, poisoned, out_ref, lse_ref, *, splits: int, group: int, head_dim: int):
    """Merge the row's split partials by log-sum-exp and write out (and lse).

    acc_ref: float32[splits, G, D]; m_ref, l_ref: float32[splits, G] (loaded as power-of-two
    tiles of next_pow2(G) rows: split rows >= `splits` and query rows >= `group` are masked,
    never read).
    """
    splits_p, rows_p = pl.next_power_of_2(splits), pl.next_power_of_2(group)
    rows = jnp.arange(rows_p) < group
    chunk = min(splits_p, max(1, _COMBINE_TILE // (rows_p * head_dim)))

    def used(first, size):  # bool[size, rows_p]: real (split, query row) pairs
        return ((first + jnp.arange(size)) < splits)[:, None] & rows[None, :]

    m = pltriton.load(m_ref.at[pl.ds(0, splits_p), pl.ds(0, rows_p)], mask=used(0, splits_p), other=_NO_MAX)
    l = pltriton.load(l_ref.at[pl.ds(0, splits_p), pl.ds(0, rows_p)], mask=used(0, splits_p), other=0)
    m_max = jnp.max(m, axis=0)
    total = jnp.sum(jnp.exp(m - m_max[None, :]) * l, axis=0)

    def add_chunk(c, acc):
        first = c * chunk
        mask = used(first, chunk)
        m_c = pltriton.load(m_ref.at[pl.ds(first, chunk), pl.ds(0, rows_p)], mask=mask, other=_NO_MAX)
        part = pltriton.load(acc_ref.at[pl.ds(first, chunk), pl.ds(0, rows_p), :], mask=mask[:, :, None], other=0)
        return acc + jnp.sum(jnp.exp(m_c - m_max[None, :])[:, :, None] * part, axis=0)

    acc = lax.fori_loop(0, pl.cdiv(splits, chunk), add_chunk, jnp.zeros((rows_p, head_dim), jnp.float32))
    _store_normalized(acc, m_max, total, rows, poisoned, out_ref, lse_ref)


def _load_contiguous(k_ref, v_ref, start, valid, *, block_k):
    """Rows `start .. start + block_k` of the cache."""
    rows = pl.ds(start, block_k)
    k = pltriton.load(k_ref.at[rows, :], mask=valid[:, None], other=0)
    v = pltriton.load(v_ref.at[rows, :], mask=valid[:, None], other=0)
    return k, v, valid


def _load_gathered(idx_ref, k_ref, v_ref, start, valid, *, block_k):
    """Rows `idx[start .. start + block_k]` of the cache (slots past the count are not read;
    a position outside [0, S) is not read either and poisons the row: see `_sparse_kernel`)."""
    positions = pltriton.load(idx_ref.at[pl.ds(start, block_k)], mask=valid, other=0)
    inside = valid & (positions >= 0) & (positions < k_ref.shape[0])
    positions = jnp.where(inside, positions, 0)
    # Both dims as index arrays: the interpreter cannot discharge a masked gather mixed with a
    # slice; on the GPU this is the same pointer tensor as `k_ref.at[positions, :]`.
    rows, cols = positions[:, None], jnp.arange(k_ref.shape[-1])[None, :]
    k = pltriton.load(k_ref.at[rows, cols], mask=inside[:, None], other=0)
    v = pltriton.load(v_ref.at[rows, cols], mask=inside[:, None], other=0)
    return k, v, inside


def _dense_kernel(q_ref, lengths_ref, flag_ref, k_ref, v_ref, *out_refs, **kw):
    n = jnp.clip(lengths_ref[...], 0, k_ref.shape[0])
    load = functools.partial(_load_contiguous, k_ref, v_ref, block_k=kw["block_k"])
    _attend_blocks(q_ref, n, load, (flag_ref, *out_refs), **kw)


def _sparse_kernel(q_ref, count_ref, flag_ref, idx_ref, k_ref, v_ref, *out_refs, **kw):
    """Attention over idx[:count]; a slot outside [0, S) among them makes the row's output NaN."""
    n = jnp.clip(count_ref[...], 0, idx_ref.shape[0])
    load = functools.partial(_load_gathered, idx_ref, k_ref, v_ref, block_k=kw["block_k"])
    _attend_blocks(q_ref, n, load, (flag_ref, *out_refs), **kw)


def _check_supported(q, k, v) -> int:
    """Raise ValueError for q/k/v these kernels do not take; returns the group size."""
    if q.ndim != 3 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"need q [B, Hq, D] and k, v [B, Hkv, S, D]; got {q.shape}, {k.shape}, {v.shape}")
    batch, kv_heads, seq, head_dim = k.shape
    if q.shape[0] != batch or q.shape[2] != head_dim or kv_heads < 1 or q.shape[1] % kv_heads:
        raise ValueError(f"q {q.shape} does not match k {k.shape}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} dtype {x.dtype} not supported (bf16, fp16, fp32)")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {head_dim} not supported {SUPPORTED_HEAD_DIMS}")
    group = q.shape[1] // kv_heads
    if not 1 <= group <= MAX_GROUP:
        raise ValueError(f"group size {group} not supported (1 to {MAX_GROUP})")
    if not 1 <= seq <= MAX_SEQ:
        raise ValueError(f"sequence capacity {seq} not supported (1 to {MAX_SEQ})")
    return group


def _head_block(x):
    """The whole of x[b, h] (x[b] for a per-sequence array) for program (b, h, s)."""
    lead = min(x.ndim, 2)
    return pl.BlockSpec((None,) * lead + x.shape[lead:], lambda b, h, s: (b, h)[:lead] + (0,) * (x.ndim - lead))


def _decode(kernel, q, row_inputs, flags, tickets, *, group, tuning, scale, return_lse, interpret, name):
    """One launch on grid (B, Hkv, splits); with splits > 1 the row's last program combines.

    row_inputs: the raw `lengths [B]` or `count [B, Hkv]`, then per-(b, h) arrays [B, Hkv, ...].
    flags: int32 or bool[B], non-zero for a sequence whose output must be NaN; tickets: int32[B, Hkv, 1],
    zero (and zero again after the call), or None for a fresh zero array.
    Returns (out, lse or None, tickets).
    """
    batch, kv_heads = row_inputs[-1].shape[:2]
    head_dim = q.shape[-1]
    splits = tuning.splits
    row = lambda *tail: pl.BlockSpec((None, None, *tail), lambda b, h, s: (b, h) + (0,) * len(tail))  # noqa: E731
    out_shape = [jax.ShapeDtypeStruct((batch, kv_heads, group, head_dim), q.dtype)]
    out_specs = [row(GROUP_ROWS, head_dim)]
    if return_lse:
        out_shape.append(jax.ShapeDtypeStruct((batch, kv_heads, group), jnp.float32))
        out_specs.append(row(GROUP_ROWS))
    inputs = [q.reshape(batch, kv_heads, group, head_dim), row_inputs[0], flags, *row_inputs[1:]]
    in_specs = [
        row(GROUP_ROWS, head_dim),
        _head_block(row_inputs[0]),
        pl.BlockSpec((None,), lambda b, h, s: (b,)),
        *[_head_block(x) for x in row_inputs[1:]],
    ]
    aliases = {}
    if splits > 1:
        lead = (batch, kv_heads, splits)
        out_shape += [
            jax.ShapeDtypeStruct((*lead, group, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((*lead, group), jnp.float32),
            jax.ShapeDtypeStruct((*lead, group), jnp.float32),
            jax.ShapeDtypeStruct((batch, kv_heads, 1), jnp.int32),
        ]
        out_specs += [row(splits, GROUP_ROWS, head_dim), row(splits, GROUP_ROWS), row(splits, GROUP_ROWS), row(1)]
        tickets = tickets if tickets is not None else jnp.zeros((batch, kv_heads, 1), jnp.int32)
        inputs.append(tickets)
        in_specs.append(row(1))
        aliases = {len(inputs) - 1: len(out_shape) - 1}
    results = pl.pallas_call(
        functools.partial(kernel, scale=scale, block_k=tuning.block_k, splits=splits, group=group,
                          head_dim=head_dim, interpret=interpret),
        out_shape=out_shape,
        grid=(batch, kv_heads, splits),
        in_specs=in_specs,
        out_specs=out_specs,
        input_output_aliases=aliases,
        interpret=interpret,
        name=name,
        compiler_params=pltriton.CompilerParams(num_warps=tuning.num_warps, num_stages=tuning.num_stages),
    )(*inputs)
    out = results[0].reshape(q.shape)
    lse = results[1].reshape(q.shape[:2]) if return_lse else None
    return out, lse, (results[-1] if splits > 1 else tickets)


def dense_decode_attention(q, k, v, lengths, *, scale: float, return_lse: bool, interpret: bool = False,
                           tuning: Tuning | None = None, flags=None, tickets=None, return_tickets: bool = False):
    """Attention of each query head over the first `lengths[b]` cached rows of its KV head.

    q: [B, Hq, D]; k, v: [B, Hkv, S, D]; lengths: int32[B] (clipped to [0, S]); flags: int32 or
    bool[B] or None, non-zero where the output must be NaN (an overflowed cache); tickets: int32[B, Hkv, 1]
    zeros the call may use and leaves zero (None: a fresh array).
    Returns out [B, Hq, D] in q's dtype, then lse float32[B, Hq] if `return_lse`, then the
    tickets if `return_tickets` (a sequence of length 0 gets out 0, lse -inf).
    """
    group = _check_supported(q, k, v)
    batch, kv_heads, seq, head_dim = k.shape
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must have shape ({batch},), got {lengths.shape}")
    tuning = tuning or dense_tuning(batch, kv_heads, seq, head_dim, k.dtype)
    flags = jnp.zeros((batch,), jnp.int32) if flags is None else flags
    out, lse, tickets = _decode(_dense_kernel, q, (lengths.astype(jnp.int32), k, v), flags, tickets, group=group,
                                tuning=tuning, scale=scale, return_lse=return_lse, interpret=interpret,
                                name="hata_dense_decode")
    return _result(out, lse, tickets, return_lse, return_tickets)


def sparse_decode_attention(q, k, v, idx, count, *, scale: float, return_lse: bool, interpret: bool = False,
                            tuning: Tuning | None = None, flags=None, tickets=None, return_tickets: bool = False):
    """Attention of each query head over the cached rows its KV head selected.

    q: [B, Hq, D]; k, v: [B, Hkv, S, D]; idx: int32[B, Hkv, K] (slots `< count` hold positions
    in [0, S), the rest are never read; a position outside [0, S) makes that (b, h) NaN);
    count: int32[B, Hkv] (clipped to [0, K]); flags, tickets: as :func:`dense_decode_attention`.
    Returns out [B, Hq, D] in q's dtype, then lse float32[B, Hq] if `return_lse`, then the
    tickets if `return_tickets` (a (b, h) with count 0 gets out 0, lse -inf).
    """
    group = _check_supported(q, k, v)
    batch, kv_heads, _, head_dim = k.shape
    if idx.ndim != 3 or idx.shape[:2] != (batch, kv_heads) or idx.dtype != jnp.int32:
        raise ValueError(f"idx must be int32[{batch}, {kv_heads}, budget], got {idx.dtype}{list(idx.shape)}")
    if count.shape != (batch, kv_heads):
        raise ValueError(f"count must have shape ({batch}, {kv_heads}), got {count.shape}")
    budget = idx.shape[2]
    if not 1 <= budget <= MAX_BUDGET:
        raise ValueError(f"budget {budget} not supported (1 to {MAX_BUDGET})")
    tuning = tuning or sparse_tuning(batch, kv_heads, budget, head_dim, k.dtype)
    flags = jnp.zeros((batch,), jnp.int32) if flags is None else flags
    out, lse, tickets = _decode(_sparse_kernel, q, (count.astype(jnp.int32), idx, k, v), flags, tickets, group=group,
                                tuning=tuning, scale=scale, return_lse=return_lse, interpret=interpret,
                                name="hata_sparse_decode")
    return _result(out, lse, tickets, return_lse, return_tickets)


def _result(out, lse, tickets, return_lse: bool, return_tickets: bool):
    result = (out, lse) if return_lse else (out,)
    result = result + (tickets,) if return_tickets else result
    return result if len(result) > 1 else result[0]
