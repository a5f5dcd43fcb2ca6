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
Grid `(batch, kv_heads, splits)`. The `G = Hq / Hkv` query heads of a KV head are the rows of
one `[16, D]` query tile (G padded up to 16 rows for the dot; padded rows are masked on load
and store), so each K/V row is read from HBM once per group. The `n = lengths[b]` (dense) or
`count[b, h]` (sparse) valid rows form `cdiv(n, block_k)` blocks; split `s` takes the `s`-th
run of `cdiv(blocks, splits)` of them. Splits are sized from the *traced* `n`, not from the
capacity, so a short sequence in a long cache still spreads over all its programs, and blocks
past `n` are never visited (no loads). Each program keeps a float32 online softmax (running
max `m`, sum `l`, unnormalised output `acc`) and writes them; :func:`_combine_splits` (plain
jnp, fused by XLA) merges the splits. Dots run at full input precision (`Precision.HIGHEST`:
IEEE fp32 for fp32 inputs, not tf32; bf16/fp16 tensor-core dots accumulate in fp32). The
probabilities are cast to V's dtype for the second dot, as in every flash kernel.

Byte floor, Llama-3.1-8B attention (32 q heads, 8 KV heads, D=128, bf16), batch 1, 128K context
------------------------------------------------------------------------------------------------
- dense: K + V of 131072 tokens x 8 KV heads x 128 x 2 B x 2 = 512 MiB (536.9 MB): 0.18 ms at
  3.0 TB/s. The split partials (f32 acc, m, l: 8 heads x 64 splits x 4 rows x 130 x 4 B) add
  1.0 MiB written and read back (0.4%).
- sparse, budget 2048: 2048 rows x 8 KV heads x 128 x 2 B x 2 (K and V) = 8 MiB plus the
  indices 2048 x 8 x 4 B = 64 KiB: 8.06 MiB (8.45 MB), 2.8 us at 3.0 TB/s, so this kernel is
  launch- and latency-bound. Partials at 32 splits: 0.5 MiB written and read back (12% of the
  floor; fewer splits trade it for parallelism). Choosing the rows is the scoring kernels' job
  (codes 16 B + norm 4 B per token per KV head at rbit 128: 131072 x 8 x 20 B = 20 MiB).

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
  batch 8.
- `num_warps = 4` (one `[16, D]` query tile needs no more); `num_stages = 3` for dense (two
  blocks in flight while one computes), 2 for fp32 at D=128 (tile bytes) and for sparse (the
  gather addresses come from a load in the same iteration; its loop is 1-4 blocks long).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels._backend import dot, triton_call

SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
SUPPORTED_HEAD_DIMS = (64, 128)
MAX_GROUP = 8
MAX_SEQ = 262144
MAX_BUDGET = 8192
# Query heads of a group, padded up to the smallest Triton dot operand dimension.
GROUP_ROWS = 16

_DEFAULT_SMS = 132  # H100 SXM, used when the device does not report its core count.
_WAVES = 4
# Running max before any valid row: finite, so `exp(m_old - m_new)` never sees inf - inf.
_NO_MAX = float(jnp.finfo(jnp.float32).min)


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
    divide evenly), with at least `min_blocks` blocks each."""
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


def _attend_blocks(q_ref, n_ref, load_block, acc_ref, m_ref, l_ref, *, scale, block_k, splits, group):
    """This program's split of the `n_ref[...]` valid rows; writes its (acc, m, l) partials.

    load_block(start, valid) -> (k, v): the K/V rows of slots `start + arange(block_k)`, masked
    by `valid` (masked rows are not read and come back as 0).
    """
    n = n_ref[...]
    blocks_per_split = pl.cdiv(pl.cdiv(n, block_k), splits)
    first = pl.program_id(2) * blocks_per_split
    last = jnp.minimum(first + blocks_per_split, pl.cdiv(n, block_k))
    head_dim = q_ref.shape[-1]
    rows = jnp.arange(GROUP_ROWS) < group
    q = pltriton.load(q_ref.at[pl.ds(0, GROUP_ROWS), :], mask=rows[:, None], other=0)

    def body(block, carry):
        start = block * block_k
        valid = start + jnp.arange(block_k) < n
        k, v = load_block(start, valid)
        return _softmax_step(q, k, v, valid, carry, scale)

    init = (
        jnp.zeros((GROUP_ROWS, head_dim), jnp.float32),
        jnp.full((GROUP_ROWS,), _NO_MAX, jnp.float32),
        jnp.zeros((GROUP_ROWS,), jnp.float32),
    )
    acc, m, l = lax.fori_loop(first, last, body, init)
    pltriton.store(acc_ref.at[pl.ds(0, GROUP_ROWS), :], acc, mask=rows[:, None])
    pltriton.store(m_ref.at[pl.ds(0, GROUP_ROWS)], m, mask=rows)
    pltriton.store(l_ref.at[pl.ds(0, GROUP_ROWS)], l, mask=rows)


def _load_contiguous(k_ref, v_ref, start, valid, *, block_k):
    """Rows `start .. start + block_k` of the cache."""
    rows = pl.ds(start, block_k)
    k = pltriton.load(k_ref.at[rows, :], mask=valid[:, None], other=0)
    v = pltriton.load(v_ref.at[rows, :], mask=valid[:, None], other=0)
    return k, v


def _load_gathered(idx_ref, k_ref, v_ref, start, valid, *, block_k):
    """Rows `idx[start .. start + block_k]` of the cache (slots past the count are not read)."""
    positions = pltriton.load(idx_ref.at[pl.ds(start, block_k)], mask=valid, other=0)
    positions = jnp.clip(positions, 0, k_ref.shape[0] - 1)  # as the reference: never out of bounds
    # Both dims as index arrays: the interpreter cannot discharge a masked gather mixed with a
    # slice; on the GPU this is the same pointer tensor as `k_ref.at[positions, :]`.
    rows, cols = positions[:, None], jnp.arange(k_ref.shape[-1])[None, :]
    k = pltriton.load(k_ref.at[rows, cols], mask=valid[:, None], other=0)
    v = pltriton.load(v_ref.at[rows, cols], mask=valid[:, None], other=0)
    return k, v


def _dense_kernel(q_ref, n_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, **kw):
    load = functools.partial(_load_contiguous, k_ref, v_ref, block_k=kw["block_k"])
    _attend_blocks(q_ref, n_ref, load, acc_ref, m_ref, l_ref, **kw)


def _sparse_kernel(q_ref, n_ref, idx_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, **kw):
    load = functools.partial(_load_gathered, idx_ref, k_ref, v_ref, block_k=kw["block_k"])
    _attend_blocks(q_ref, n_ref, load, acc_ref, m_ref, l_ref, **kw)


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


def _combine_splits(acc, m, l):
    """Merge per-split (acc, m, l) partials along axis 2.

    acc: float32[B, Hkv, splits, G, D]; m, l: float32[B, Hkv, splits, G].
    Returns (out float32[B, Hkv, G, D], lse float32[B, Hkv, G]); no valid row gives 0, -inf.
    """
    m_max = jnp.max(m, axis=2, keepdims=True)
    weight = jnp.exp(m - m_max)
    total = jnp.sum(weight * l, axis=2)
    out = jnp.sum(weight[..., None] * acc, axis=2) / jnp.where(total > 0, total, 1.0)[..., None]
    lse = jnp.where(total > 0, m_max[:, :, 0] + jnp.log(total), -jnp.inf)
    return out, lse


def _decode(kernel, q, n, row_inputs, *, group, tuning, scale, return_lse, interpret, name):
    """Launch `kernel` on grid (B, Hkv, splits) and combine; row_inputs are per-(b, h) arrays."""
    batch, kv_heads = n.shape
    head_dim = q.shape[-1]
    splits = tuning.splits
    qg = q.reshape(batch, kv_heads, group, head_dim)

    def per_head(x):
        return pl.BlockSpec((None, None, *x.shape[2:]), lambda b, h, s: (b, h) + (0,) * (x.ndim - 2))

    partial_shapes = [
        jax.ShapeDtypeStruct((batch, kv_heads, splits, group, head_dim), jnp.float32),
        jax.ShapeDtypeStruct((batch, kv_heads, splits, group), jnp.float32),
        jax.ShapeDtypeStruct((batch, kv_heads, splits, group), jnp.float32),
    ]
    acc, m, l = triton_call(
        functools.partial(kernel, scale=scale, block_k=tuning.block_k, splits=splits, group=group),
        out_shape=partial_shapes,
        grid=(batch, kv_heads, splits),
        in_specs=[
            pl.BlockSpec((None, None, GROUP_ROWS, head_dim), lambda b, h, s: (b, h, 0, 0)),
            pl.BlockSpec((None, None), lambda b, h, s: (b, h)),
            *[per_head(x) for x in row_inputs],
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, GROUP_ROWS, head_dim), lambda b, h, s: (b, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, GROUP_ROWS), lambda b, h, s: (b, h, s, 0)),
            pl.BlockSpec((None, None, None, GROUP_ROWS), lambda b, h, s: (b, h, s, 0)),
        ],
        num_warps=tuning.num_warps,
        num_stages=tuning.num_stages,
        interpret=interpret,
        name=name,
    )(qg, n, *row_inputs)
    out, lse = _combine_splits(acc, m, l)
    out = out.reshape(q.shape).astype(q.dtype)
    return (out, lse.reshape(q.shape[:2])) if return_lse else out


def dense_decode_attention(q, k, v, lengths, *, scale: float, return_lse: bool, interpret: bool = False,
                           tuning: Tuning | None = None):
    """Attention of each query head over the first `lengths[b]` cached rows of its KV head.

    q: [B, Hq, D]; k, v: [B, Hkv, S, D]; lengths: int32[B] in [0, S].
    Returns out [B, Hq, D] in q's dtype, and lse float32[B, Hq] if `return_lse`
    (a sequence of length 0 gets out 0, lse -inf).
    """
    group = _check_supported(q, k, v)
    batch, kv_heads, seq, head_dim = k.shape
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must have shape ({batch},), got {lengths.shape}")
    tuning = tuning or dense_tuning(batch, kv_heads, seq, head_dim, k.dtype)
    n = jnp.broadcast_to(jnp.clip(lengths.astype(jnp.int32), 0, seq)[:, None], (batch, kv_heads))
    return _decode(_dense_kernel, q, n, (k, v), group=group, tuning=tuning, scale=scale,
                   return_lse=return_lse, interpret=interpret, name="hata_dense_decode")


def sparse_decode_attention(q, k, v, idx, count, *, scale: float, return_lse: bool, interpret: bool = False,
                            tuning: Tuning | None = None):
    """Attention of each query head over the cached rows its KV head selected.

    q: [B, Hq, D]; k, v: [B, Hkv, S, D]; idx: int32[B, Hkv, K] (slots `< count` hold positions
    in [0, S), the rest are never read); count: int32[B, Hkv].
    Returns out [B, Hq, D] in q's dtype, and lse float32[B, Hq] if `return_lse`
    (a (b, h) with count 0 gets out 0, lse -inf).
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
    n = jnp.clip(count.astype(jnp.int32), 0, budget)
    return _decode(_sparse_kernel, q, n, (idx, k, v), group=group, tuning=tuning, scale=scale,
                   return_lse=return_lse, interpret=interpret, name="hata_sparse_decode")
