"""Hash encoding kernels (Pallas Triton): `sign(x @ W) > 0`, packed LSB-first into uint32 words.

Two kernels share one packing routine (:func:`_pack_codes`):

- :func:`encode`, the prefill form: codes for many tokens of every head, e.g. a whole
  `[B, Hkv, S, D]` key cache or `[N, Hq, D]` queries.
- :func:`encode_step`, the decode form: the step's query heads, the new key's code and the new
  key's norm, all in one launch.

Design
------
Any `x: [..., H, ..., D]` with the heads at `head_axis` is viewed (a free reshape) as
`[A, H, C, D]`: A = the dims before the heads, C = the dims between the heads and D. Each
program encodes a tile of `M` rows `[M, D]` of one head `h` against `w[h // G]` (G = H / Hkv):
- head-major (`C > 1`, the `[B, Hkv, S, D]` cache): grid `(A, H, cdiv(C, M))`, rows along C;
- token-major (`C == 1`, `[N, H, D]`): grid `(cdiv(A, M), H)`, rows along A (strided by H*D).
An x with a small C > 1 and a large A, e.g. `[N, H, 2, D]`, is encoded correctly but fills only
C of the >= 16 rows of each tile; no caller has one.
Partial tiles are masked (loads fill 0, stores skip rows past the end). Per 32-bit word c the
program computes the `[M, 32]` projection with one dot (float32 accumulation), turns positive
entries into `1 << j`, sums the 32 lanes (distinct bits, so the sum is the OR) and puts the
word in column c of a `[M, Wp]` code tile (Wp = W rounded up to a power of two). One masked
store writes the tile: each row's W words are contiguous (16 B at rbit 128). Looping over words
keeps every tensor a power of two even when the word count W = rbit / 32 is not (rbit 96, 160).
Masked loads/stores may slice past a block's end: masked lanes touch no memory on the GPU, and
the interpreter pads blocks.

Precision: the reference projects in float32 with `Precision.HIGHEST`. When x is 16-bit (bf16
or fp16) the dots run on tensor cores in x's dtype with float32 accumulation: a w of the same
dtype is used as is (products of two 16-bit floats are exact in float32, so only the summation
order differs from the reference); any other w (the usual float32 projection) is read as it is
stored and split inside the kernel, tile by tile (:func:`_projection_parts`), into `w_hi = w`
rounded to x.dtype and `w_lo = (w - w_hi).astype(x.dtype)`, and the projection is `x @ w_hi + x @
w_lo`, within ~2^-17 (bf16) of the float32 one: far below the sign tolerance, at two tensor-core
dots instead of an FMA-bound IEEE fp32 dot, and with no XLA op before the kernel (in the model's
step w is a runtime argument, so a split in XLA is a fusion launched every layer and step; the
in-kernel split costs `encode_step` 0.5 us on the H100, 5.0 -> 5.5 us at the Llama shape,
BENCHMARKS.md). A float32 x uses an IEEE fp32
dot (`Precision.HIGHEST`; Triton's default for an fp32 dot is tf32, which would flip signs of
projections near zero): correct, compute-bound, not the production path.

:func:`encode_step` has G <= 8 query rows and one key row per KV head: fewer than the 16 rows a
Triton dot needs. Each program (grid `(B, Hkv)`) builds one 16-row tile: rows 0..G-1 are the
group's query heads (a masked 16-row load), row G is the new key, the rest are zeros and are
never stored. One dot per part of w encodes queries and key together over every word (`span`
words per dot, :func:`step_span`: all of them at rbit 128 and 256; a dot per word made a chain
of dependent loads of w, 8.5 us at the Llama shape on the H100); the first G rows of the code
tile are stored as the query codes, row G (extracted with a masked sum over rows) as the key
code. The key norm `sqrt(sum(k * k))` is computed in float32 from the same loaded row. With
`query_planes = P` (the "asymmetric" score) the same dots give the query rows' projections; their
sum over the group (a masked sum over rows, one float32[32] per word, kept in registers) is
quantized after the last word to P sign planes with the reference's float32 formula
(`hata_jax.hashing.planes_from_projection`: scale = max |sum| / (2**P - 1), level =
floor(sum / scale / 2 + 2**(P-1))), and the `[P, W]` plane words and the scale are stored instead
of the G query codes.

Byte floor, Llama-3.1-8B shapes (32 q heads, 8 KV heads, D=128, bf16, batch 1, rbit 128)
-----------------------------------------------------------------------------------------
- encode_step (every decode step of every hashed layer): reads q 8 KiB + k_new 2 KiB +
  W `[8, 128, 128]` 256 KiB (bf16; 512 KiB if stored float32), writes 512 B + 128 B of codes and
  32 B of norms: about 267 KiB, ~0.1 us at 2.4-3 TB/s. The step is launch-latency bound (a few
  us), so what matters is that it is one launch of 8 programs. W dominates the bytes; with
  batch > 1 the repeated reads of w[h] hit L2.
- encode, prefill of a 128K-token key cache: reads 131072 * 8 * 256 B = 256 MiB of keys, writes
  16 MiB of codes (16 B per token-head): 272 MiB, ~0.1 ms at ~2.4 TB/s. Each program
  also reads its w[h] (32 KiB) from L2, once per tile of M rows.

Tunables (picked without GPU measurements; re-tune on the H100)
-------------------------------------------------------------
- `PREFILL_BLOCK_ROWS = 128`: rows per program. A 128 x 128 bf16 tile is 32 KiB read per
  program against a 32 KiB w[h] re-read from L2, and 128 flop per byte of x at bf16, well
  under the H100's ~300 flop/B, so the kernel stays memory-bound; a 128K cache still gives
  8192 programs. Smaller inputs get the next power of two >= the row count (at least 16, the
  dot minimum). Float32 inputs are computed with fp32 FMAs (IEEE dot) and are compute-bound,
  about 3x above their byte floor; they are not the production path.
- `PREFILL_NUM_WARPS = 4`: a [128, 128] bf16 tile is 64 registers per thread at 128 threads,
  the [128, 32] float32 projection 32 more; 8 warps would only halve work per warp. ptxas counts
  156 registers with a float32 w split in the kernel (140 with the split in XLA): 3 programs an SM
  either way.
- `STEP_ROWS = 16` (the dot minimum; G + 1 <= 16 rows), `STEP_NUM_WARPS = 4`: the per-program
  work is a [16, D] x [D, rbit] product, a few thousand cycles at most; its float32 result is
  16 x rbit / 128 registers a thread (16 at rbit 128). ptxas (pip's Triton 3.5 for sm_90a, on the
  CPU: `bench/results/issue13_encode_split/encode_registers.py`) counts 166 registers at the Llama
  shape with a float32 w split in the kernel, no spills, and 64 at 8 warps. Which warp count is
  faster is unmeasured; with 8 programs at batch 1 the registers cost no occupancy.
- `num_stages = 1` for both: no kernel has a loop over memory tiles to pipeline.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.backend import MAX_QUERY_PLANES, SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, triton_call

MAX_RBIT = 256
WORD_BITS = 32

MIN_DOT_ROWS = 16
PREFILL_BLOCK_ROWS = 128
PREFILL_NUM_WARPS = 4
STEP_ROWS = MIN_DOT_ROWS
STEP_NUM_WARPS = 4
NUM_STAGES = 1


def _check_dtype(x, name: str) -> None:
    if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
        raise ValueError(f"hash_encode: {name} must be bfloat16, float16 or float32, got {x.dtype}")


def _check_projection(w, head_dim: int) -> tuple[int, int]:
    """Validate w: [kv_heads, head_dim, rbit]; returns (kv_heads, words)."""
    _check_dtype(w, "w")
    if w.ndim != 3:
        raise ValueError(f"hash_encode: w must have shape [kv_heads, head_dim, rbit], got {w.shape}")
    kv_heads, d, rbit = w.shape
    if d not in SUPPORTED_HEAD_DIMS or d != head_dim:
        raise ValueError(
            f"hash_encode: head_dim must be one of {SUPPORTED_HEAD_DIMS} and match w "
            f"(inputs {head_dim}, w {d})"
        )
    if rbit % WORD_BITS or not WORD_BITS <= rbit <= MAX_RBIT:
        raise ValueError(f"hash_encode: rbit must be a multiple of 32 in [32, {MAX_RBIT}], got {rbit}")
    return kv_heads, rbit // WORD_BITS


def _group(heads: int, kv_heads: int) -> int:
    if kv_heads <= 0 or heads % kv_heads:
        raise ValueError(f"hash_encode: heads ({heads}) must be a positive multiple of kv_heads ({kv_heads})")
    return heads // kv_heads


def _compute_dtype(*dtypes) -> jnp.dtype:
    """The dot's input dtype: the inputs' shared 16-bit dtype, otherwise float32."""
    first = jnp.dtype(dtypes[0])
    if first != jnp.float32 and all(jnp.dtype(d) == first for d in dtypes):
        return first
    return jnp.dtype(jnp.float32)


def _projection_parts(w: jax.Array, compute_dtype) -> tuple[jax.Array, ...]:
    """A tile of w (any float dtype) as one or two tiles of the compute dtype whose sum is w to
    ~2^-17 (see Precision), inside the kernel.

    The high part is w rounded to the compute dtype's mantissa with integer operations on the
    float32 bits (round to nearest even), not by a round trip `w.astype(bf16).astype(f32)`: a
    compiler may delete such a convert pair (XLA:GPU's excess-precision pass does, under jit; on
    the H100 that made the low part 0 and flipped 521 of 2.4M code bits). Below the 16-bit
    dtype's normal range (|w| < 6.1e-5 for float16) the high part rounds a second time on its
    cast, which costs at most that dtype's smallest subnormal.
    """
    if compute_dtype == jnp.float32 or w.dtype == compute_dtype:
        return (w.astype(compute_dtype),)
    w32 = w.astype(jnp.float32)
    dropped = 23 - jnp.finfo(compute_dtype).nmant  # float32 mantissa bits the compute dtype lacks
    bits = lax.bitcast_convert_type(w32, jnp.uint32)
    half = jnp.uint32(2 ** (dropped - 1) - 1) + ((bits >> dropped) & jnp.uint32(1))
    hi32 = lax.bitcast_convert_type((bits + half) & jnp.uint32(~(2**dropped - 1) & 0xFFFFFFFF), jnp.float32)
    return hi32.astype(compute_dtype), (w32 - hi32).astype(compute_dtype)


def _pack_codes(rows: jax.Array, w_ref, words: int, sum_rows: jax.Array | None = None, span: int = 1):
    """rows: [M, D] (compute dtype), w_ref: [D, 32 * words] (any float dtype: each tile is split by
    :func:`_projection_parts`) -> uint32[M, next_pow2(words)].

    Column c < words holds bits 32c .. 32c+31 (bit j set iff row . w[:, 32c + j] > 0); the
    padding columns are 0. Each dot projects `span` words (a power of two dividing `words`): one
    `[M, D] x [D, 32 span]` product per part. With `sum_rows` (bool[M]) also returns the float32
    projection summed over those rows, one `[32 span]` vector per dot: (codes, [words / span
    vectors]).
    """
    width = span * WORD_BITS
    lane = lax.broadcasted_iota(jnp.int32, (1, width), 1)
    bit_values = jnp.left_shift(jnp.uint32(1), (lane % WORD_BITS).astype(jnp.uint32))
    column = lax.broadcasted_iota(jnp.int32, (1, pl.next_power_of_2(words)), 1)
    codes = jnp.zeros((rows.shape[0], column.shape[1]), jnp.uint32)
    sums = []
    for first in range(0, words, span):
        cols = pl.ds(first * WORD_BITS, width)
        proj = sum(
            jnp.dot(rows, part, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
            for part in _projection_parts(w_ref[:, cols], rows.dtype)
        )
        bits = jnp.where(proj > 0, bit_values, jnp.uint32(0))
        for word in range(span):
            packed = jnp.sum(jnp.where(lane // WORD_BITS == word, bits, jnp.uint32(0)), axis=1, dtype=jnp.uint32)
            codes = jnp.where(column == first + word, packed[:, None], codes)
        if sum_rows is not None:
            sums.append(jnp.sum(jnp.where(sum_rows[:, None], proj, 0.0), axis=0))
    return codes if sum_rows is None else (codes, sums)


def step_span(words: int) -> int:
    """Words per dot of :func:`encode_step`: the largest power of two dividing `words`, so rbit
    128 and 256 project in one dot per part (independent loads: one memory round trip, where a
    dot per word made a chain of them)."""
    return words & -words


def _store_codes(o_ref, codes: jax.Array, row_mask: jax.Array) -> None:
    """Store codes: uint32[M, Wp] into o_ref: [M', words], rows where row_mask and columns < words."""
    column = lax.broadcasted_iota(jnp.int32, codes.shape, 1)
    mask = row_mask[:, None] & (column < o_ref.shape[-1])
    pltriton.store(o_ref.at[pl.ds(0, codes.shape[0]), pl.ds(0, codes.shape[1])], codes, mask=mask)


def _encode_kernel(x_ref, w_ref, o_ref, *, rows_grid_axis: int, num_rows: int, words: int, compute_dtype):
    """x_ref: [M, D], w_ref: [D, rbit], o_ref: [M, words]; rows past `num_rows` are masked."""
    block_rows = x_ref.shape[0]
    first_row = pl.program_id(rows_grid_axis) * block_rows
    valid = first_row + lax.broadcasted_iota(jnp.int32, (block_rows,), 0) < num_rows
    rows = pltriton.load(x_ref, mask=valid[:, None], other=0).astype(compute_dtype)
    _store_codes(o_ref, _pack_codes(rows, w_ref, words), valid)


def _block_rows(num_rows: int) -> int:
    return min(PREFILL_BLOCK_ROWS, max(MIN_DOT_ROWS, pl.next_power_of_2(num_rows)))


@functools.partial(jax.jit, static_argnames=("head_axis", "interpret"))
def encode(x: jax.Array, w: jax.Array, *, head_axis: int, interpret: bool = False) -> jax.Array:
    """Hash codes of many tokens of every head (see `hata_jax.encode`). Jitted: an eager call
    compiles once per shape (a `pallas_call` run eagerly would compile its kernel at every call).

    Args:
      x: float[..., H, ..., D], H at `head_axis` (non-negative, not the last axis), a multiple
        of kv_heads; head h uses w[h // (H // kv_heads)].
      w: float[kv_heads, D, rbit].
      head_axis: the axis of x holding the heads.
      interpret: run with the Pallas interpreter (CPU).

    Returns:
      uint32, the shape of x with D replaced by rbit // 32.
    """
    _check_dtype(x, "x")
    if not 0 <= head_axis <= x.ndim - 2:
        raise ValueError(
            f"hash_encode: head_axis must be in [0, {x.ndim - 2}] for x of shape {x.shape}, got {head_axis}"
        )
    *lead, d = x.shape
    kv_heads, words = _check_projection(w, d)
    heads = x.shape[head_axis]
    group = _group(heads, kv_heads)
    out_shape = (*lead, words)
    if x.size == 0:
        return jnp.zeros(out_shape, jnp.uint32)
    a = math.prod(x.shape[:head_axis])
    c = x.size // (a * heads * d)
    compute_dtype = _compute_dtype(x.dtype)
    kernel = functools.partial(_encode_kernel, words=words, compute_dtype=compute_dtype)
    w_spec = pl.BlockSpec((None, d, words * WORD_BITS), lambda *ids: (ids[1] // group, 0, 0))
    if c > 1:  # head-major: rows run along C
        m = _block_rows(c)
        grid = (a, heads, pl.cdiv(c, m))
        x_view, out = x.reshape(a, heads, c, d), jax.ShapeDtypeStruct((a, heads, c, words), jnp.uint32)
        x_spec = pl.BlockSpec((None, None, m, d), lambda i, h, j: (i, h, j, 0))
        o_spec = pl.BlockSpec((None, None, m, words), lambda i, h, j: (i, h, j, 0))
        kernel = functools.partial(kernel, rows_grid_axis=2, num_rows=c)
    else:  # token-major: rows run along A
        m = _block_rows(a)
        grid = (pl.cdiv(a, m), heads)
        x_view, out = x.reshape(a, heads, d), jax.ShapeDtypeStruct((a, heads, words), jnp.uint32)
        x_spec = pl.BlockSpec((m, None, d), lambda i, h: (i, h, 0))
        o_spec = pl.BlockSpec((m, None, words), lambda i, h: (i, h, 0))
        kernel = functools.partial(kernel, rows_grid_axis=0, num_rows=a)
    codes = triton_call(
        kernel,
        out_shape=out,
        grid=grid,
        in_specs=[x_spec, w_spec],
        out_specs=o_spec,
        num_warps=PREFILL_NUM_WARPS,
        num_stages=NUM_STAGES,
        interpret=interpret,
        name="hash_encode",
    )(x_view, w)
    return codes.reshape(out_shape)


def _query_planes(projections: list, planes: int) -> tuple[jax.Array, jax.Array]:
    """The group's summed projections, one float32[32 span] vector per `span` words (as
    :func:`_pack_codes` returns them), as sign planes (the formula of
    `hata_jax.hashing.planes_from_projection`): (uint32[next_pow2(planes), next_pow2(words)]
    plane words, padding 0; float32 scale)."""
    top = 2**planes - 1
    span = projections[0].shape[0] // WORD_BITS
    peak = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(p)) for p in projections])
    scale = jnp.maximum(peak, jnp.finfo(jnp.float32).tiny) / jnp.float32(top)
    lane = lax.broadcasted_iota(jnp.int32, (span * WORD_BITS,), 0)
    lane_bit = (lane % WORD_BITS).astype(jnp.uint32)
    shape = (pl.next_power_of_2(planes), pl.next_power_of_2(span * len(projections)))
    plane_row = lax.broadcasted_iota(jnp.int32, shape, 0)
    column = lax.broadcasted_iota(jnp.int32, shape, 1)
    out = jnp.zeros(shape, jnp.uint32)
    for index, proj in enumerate(projections):
        level = jnp.floor(proj / scale * 0.5 + jnp.float32((top + 1) * 0.5))
        level = jnp.minimum(jnp.maximum(level, 0.0), jnp.float32(top)).astype(jnp.uint32)
        for p in range(planes):
            plane_bits = jnp.left_shift((level >> p) & jnp.uint32(1), lane_bit)
            for word in range(span):
                bits = jnp.sum(jnp.where(lane // WORD_BITS == word, plane_bits, jnp.uint32(0)), dtype=jnp.uint32)
                out = jnp.where((plane_row == p) & (column == index * span + word), bits, out)
    return out, scale


def _encode_step_kernel(q_ref, k_ref, w_ref, *refs, words: int, compute_dtype, planes: int):
    """q_ref: [G, D], k_ref: [D], w_ref: [D, rbit], then refs: q_codes_ref [G, words] (planes > 0:
    q_planes_ref [P, words] and q_scale_ref [], a scalar), k_codes_ref [words], k_norm_ref [] (a
    scalar)."""
    query_refs, (k_codes_ref, k_norm_ref) = refs[:-2], refs[-2:]
    group = q_ref.shape[0]
    row = lax.broadcasted_iota(jnp.int32, (STEP_ROWS,), 0)
    q = pltriton.load(q_ref.at[pl.ds(0, STEP_ROWS), :], mask=(row < group)[:, None], other=0)
    k = k_ref[...]
    is_key = row == group
    rows = jnp.where(is_key[:, None], k[None, :].astype(compute_dtype), q.astype(compute_dtype))
    if planes:
        q_planes_ref, q_scale_ref = query_refs
        codes, projections = _pack_codes(rows, w_ref, words, sum_rows=row < group, span=step_span(words))
        plane_words, scale = _query_planes(projections, planes)
        _store_codes(q_planes_ref, plane_words, lax.broadcasted_iota(jnp.int32, (plane_words.shape[0],), 0) < planes)
        q_scale_ref[...] = scale
    else:
        codes = _pack_codes(rows, w_ref, words, span=step_span(words))
        _store_codes(query_refs[0], codes, row < group)
    k_codes = jnp.sum(jnp.where(is_key[:, None], codes, jnp.uint32(0)), axis=0, dtype=jnp.uint32)
    column = lax.broadcasted_iota(jnp.int32, k_codes.shape, 0)
    pltriton.store(k_codes_ref.at[pl.ds(0, k_codes.shape[0])], k_codes, mask=column < words)
    kf = k.astype(jnp.float32)
    k_norm_ref[...] = jnp.sqrt(jnp.sum(kf * kf))


@functools.partial(jax.jit, static_argnames=("query_planes", "interpret"))
def encode_step(q: jax.Array, k_new: jax.Array, w: jax.Array, *, query_planes: int = 0, interpret: bool = False):
    """One decode step's hashing in one launch (see `hata_jax.encode_step`).

    Args:
      q: float[B, Hq, D] post-RoPE queries.
      k_new: float[B, Hkv, D] post-RoPE new keys.
      w: float[Hkv, D, rbit].
      query_planes: 0, or P in [1, 8]: the query as P sign planes of its group-summed projection
        (`hata_jax.query_planes`) instead of one code per query head.
      interpret: run with the Pallas interpreter (CPU).

    Returns:
      (q_codes uint32[B, Hq, rbit//32], k_codes uint32[B, Hkv, rbit//32], k_norms float32[B, Hkv]);
      with query_planes = P: (q_planes uint32[B, Hkv * P, rbit//32], q_scales float32[B, Hkv],
      k_codes, k_norms).
    """
    _check_dtype(q, "q")
    _check_dtype(k_new, "k_new")
    if q.ndim != 3 or k_new.ndim != 3:
        raise ValueError(
            f"hash_encode: q and k_new must be [batch, heads, head_dim], got {q.shape} and {k_new.shape}"
        )
    b, heads, d = q.shape
    kv_heads, words = _check_projection(w, d)
    if k_new.shape != (b, kv_heads, d):
        raise ValueError(f"hash_encode: k_new must have shape {(b, kv_heads, d)}, got {k_new.shape}")
    group = _group(heads, kv_heads)
    if group + 1 > STEP_ROWS:
        raise ValueError(f"hash_encode: encode_step supports GQA groups up to {STEP_ROWS - 1}, got {group}")
    if not 0 <= query_planes <= MAX_QUERY_PLANES:
        raise ValueError(f"hash_encode: query_planes must be in [0, {MAX_QUERY_PLANES}], got {query_planes}")
    query_rows = query_planes or group
    query_shapes = [jax.ShapeDtypeStruct((b, kv_heads, query_rows, words), jnp.uint32)]
    query_specs = [pl.BlockSpec((None, None, query_rows, words), lambda i, h: (i, h, 0, 0))]
    if query_planes:
        query_shapes.append(jax.ShapeDtypeStruct((b, kv_heads), jnp.float32))
        query_specs.append(pl.BlockSpec((None, None), lambda i, h: (i, h)))
    if b == 0:
        outs = [jnp.zeros(x.shape, x.dtype) for x in query_shapes]
        outs += [jnp.zeros((0, kv_heads, words), jnp.uint32), jnp.zeros((0, kv_heads), jnp.float32)]
    else:
        compute_dtype = _compute_dtype(q.dtype, k_new.dtype)
        kernel = functools.partial(_encode_step_kernel, words=words, compute_dtype=compute_dtype,
                                   planes=query_planes)
        outs = triton_call(
            kernel,
            out_shape=(
                *query_shapes,
                jax.ShapeDtypeStruct((b, kv_heads, words), jnp.uint32),
                jax.ShapeDtypeStruct((b, kv_heads), jnp.float32),
            ),
            grid=(b, kv_heads),
            in_specs=[
                pl.BlockSpec((None, None, group, d), lambda i, h: (i, h, 0, 0)),
                pl.BlockSpec((None, None, d), lambda i, h: (i, h, 0)),
                pl.BlockSpec((None, d, words * WORD_BITS), lambda i, h: (h, 0, 0)),
            ],
            out_specs=(
                *query_specs,
                pl.BlockSpec((None, None, words), lambda i, h: (i, h, 0)),
                pl.BlockSpec((None, None), lambda i, h: (i, h)),
            ),
            num_warps=STEP_NUM_WARPS,
            num_stages=NUM_STAGES,
            interpret=interpret,
            name="hash_encode_step",
        )(q.reshape(b, kv_heads, group, d), k_new, w)
    query_codes, *rest = outs
    return query_codes.reshape(b, kv_heads * query_rows, words), *rest


def query_planes(q: jax.Array, w: jax.Array, *, planes: int, interpret: bool = False):
    """`hata_jax.query_planes` through :func:`encode_step`'s kernel (its key outputs unused):
    (q_planes uint32[B, Hkv * planes, rbit//32], q_scales float32[B, Hkv])."""
    k_new = jnp.zeros((q.shape[0], w.shape[0], q.shape[-1]), q.dtype)
    q_planes, q_scales, _, _ = encode_step(q, k_new, w, query_planes=planes, interpret=interpret)
    return q_planes, q_scales
