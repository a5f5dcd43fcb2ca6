"""Hamming scoring and exact top-`budget` selection (Pallas Triton), without any sort.

Kernel forms of :func:`hata_jax.hamming_scores`, :func:`hata_jax.select_topk` and
:func:`hata_jax.hamming_topk` (same arguments plus `interpret` and an optional `tiling`).

Design
------
Every kernel runs on the grid `(B, Hkv, chunks)`: each row `(b, h)` of the cache is cut into
`chunks` (a power of two) programs of `chunk` positions, walked in loop steps of `block`
positions, so batch 1 with 8 KV heads still launches hundreds of programs.

Scoring (:func:`hamming_scores`): a program loads the G query codes of its group once (a
`[Wp]` row each, Wp = W rounded up to a power of two, masked), then per loop step one
`[block, Wp]` tile of key codes (masked columns and positions read nothing; each token's W words
are contiguous, 16 B at rbit 128), XORs it with each query row, popcounts (`popcount32`: PTX
`popc`), sums over words and the group, and writes `k_norm * ((G*rbit - 2*ham) * (1/rbit))`
(float32, exactly the reference's two products, so the scores match bit for bit) or `-ham`;
positions >= lengths[b] get -inf.

Selection (:func:`select_topk`, details in :mod:`pallas_kernels.radix_select`): an exact radix
select on the 32-bit order-preserving key of each score, one 8-bit digit per pass: 4 histogram
passes then a compaction pass, 5 launches, no atomics, no sort, deterministic.
- A pass program histograms its chunk's digit with a `[16, 16]` bf16 MMA of one-hot rows
  gathered from a 1 KiB table and stores suffix counts; the next pass re-derives the row's
  boundary digit from 128 B per chunk. Chunks with no key left in the boundary bucket skip their
  keys, and loop steps without one skip the MMA, so later passes get cheap as the candidates
  thin out; a row whose boundary bucket is taken whole (e.g. lengths[b] <= budget) is done early.
- NaN scores rank lowest (a refinement of the reference's nan_to_num order), sink/recent
  positions get the highest key and always make it (they count against the budget).
- Ties at the threshold are taken in position order, so the result is deterministic; the
  selected positions fill slots [0, count) in ascending order, `UNUSED` (-1) after.

Fused pipeline (:func:`hamming_topk`): pass 0 is fused into the scoring kernel (it histograms
the keys of the scores it just computed and writes the scores once, only at valid positions),
then passes 1..3 and the compaction read those scores back (4 B per token-head, L2-resident at
batch 1). 5 launches in all; the scores never leave the pipeline.

Byte floor, Llama-3.1-8B (32 q heads, 8 KV heads, batch 1, 128K context, rbit 128, budget 2048)
-----------------------------------------------------------------------------------------------
- Scoring reads codes 16 B + norm 4 B per token-head: 8 x 131072 x 20 B = 20 MiB (+8 KiB of
  query codes), ~7-8 us at the measured ~2.4-3 TB/s. `hamming_scores` also writes 4 MiB of
  scores; the fused pass 0 writes the same 4 MiB for the later passes.
- Selection: the float32 scores are 8 x 131072 x 4 B = 4 MiB; floor = read them once, ~1.5 us.
  The pipeline reads them up to 4 more times (passes 1-3 read only chunks that still hold
  candidates, the compaction reads chunks that hold selected keys), mostly from the 50 MB L2.
  Per-chunk suffix counts are 1 KiB + 64 B per chunk and pass (64 chunks per row: 0.5 MiB per
  pass), each program of the next pass reads 128 B per chunk of its row (8 KiB); the output is
  8 x 2048 x 4 B = 64 KiB of indices.
- Expected times (from the sm_90 SASS of each loop step, ptxas 12.x via triton 3.6; not yet
  measured): a histogram loop step of 256 keys is ~240 instructions per warp, i.e. ~3.8 warp
  instructions per key, ~4-5 us for a pass over all 1M keys on 132 SMs; the compaction ~2.7 per
  key, ~3 us; each launch adds ~1-2 us. `select_topk` at [8, 131072], k = 2048: passes 0 and 1
  full (the top byte of similar positive scores is nearly constant, so pass 1 still sees most
  keys), passes 2-3 touch few chunks, compaction full: ~15-20 us against ~300 us for
  `lax.top_k`. Worst case (all-equal or few distinct scores: every key stays a candidate): four
  full passes, ~25 us. Fused `hamming_topk`: scoring + pass 0 ~8 us (bandwidth-bound on the 20
  MiB; ~4.8 warp instructions per token), then ~12-15 us of selection.

Tunables (picked from ptxas register counts and SASS, without GPU timing; re-tune with the bench)
-------------------------------------------------------------------------------------------------
- `radix_select.TARGET_PROGRAMS = 512` (~4 CTAs per SM on 132 SMs): `chunk` = rows * S / 512
  rounded up to a power of two, clamped to [`MIN_CHUNK` = 2048, `MAX_CHUNK` = 16384] and to S:
  64 chunks of 2048 per row at the Llama shape. Fewer, bigger chunks mean fewer programs and
  longer serial loops; more chunks mean more per-chunk counts for every program to read.
- `radix_select.BLOCK = 256` positions per loop step: the histogram passes then use 117-128
  registers per thread (4 CTAs of 4 warps per SM), the fused scoring pass 143, the compaction
  and plain scoring 40; 512 would need ~200 registers, 128 costs ~20% more instructions per key.
- `num_warps = 4`: the `[16, 16]` histogram MMA has two 16x8 tiles; more warps only replicate it.
  `num_stages = 1`: the loops are short (8 steps per program at the Llama shape) and occupancy
  hides the load latency.
- `radix_select.HIST_DTYPE = bfloat16`: 0/1 operands, float32 accumulation exact up to 2**24
  keys per chunk; the table gather compiles to 16 B loads and `ldmatrix`, where one-hots built
  by compares (int8 or bf16) cost ~2.5x more instructions in byte shuffles and shared stores.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import radix_select
from pallas_kernels._backend import popcount32, triton_call
from pallas_kernels.radix_select import Tiling, default_tiling, select_topk  # noqa: F401 (select_topk: public)

SCORES = ("key_norm", "hamming")
MAX_WORDS = 8  # rbit <= 256
MAX_GROUP = 8


def _check_codes(q_codes, k_codes, k_norms, score: str) -> None:
    """Raise a ValueError for inputs these kernels do not support."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if k_codes.ndim != 4 or k_codes.dtype != jnp.uint32:
        raise ValueError(
            f"k_codes must be uint32[batch, kv_heads, seq, words], got {k_codes.dtype}{list(k_codes.shape)}"
        )
    batch, kv_heads, seq, words = k_codes.shape
    if not 1 <= words <= MAX_WORDS:
        raise ValueError(f"rbit {32 * words} not supported (32 to {32 * MAX_WORDS})")
    if not 0 < seq <= radix_select.MAX_SEQ:
        raise ValueError(f"sequence capacity {seq} not supported (1 to {radix_select.MAX_SEQ})")
    if q_codes.ndim != 3 or q_codes.dtype != jnp.uint32 or q_codes.shape[0] != batch or q_codes.shape[2] != words:
        raise ValueError(f"q_codes must be uint32[{batch}, q_heads, {words}], got {q_codes.dtype}{list(q_codes.shape)}")
    group = q_codes.shape[1] // kv_heads
    if q_codes.shape[1] % kv_heads or not 1 <= group <= MAX_GROUP:
        raise ValueError(f"group size {q_codes.shape[1]} / {kv_heads} not supported (1 to {MAX_GROUP})")
    if k_norms.shape != (batch, kv_heads, seq) or k_norms.dtype != jnp.float32:
        raise ValueError(
            f"k_norms must be float32[{batch}, {kv_heads}, {seq}], got {k_norms.dtype}{list(k_norms.shape)}"
        )


def _score_block(q_rows, codes_ref, norms_ref, first, valid, *, block, score, rbit, interpret):
    """float32[block] scores of the positions [first, first + block) (-inf where not valid).

    q_rows: G uint32[Wp] query code rows (columns >= W are 0); codes_ref: [S, W]; norms_ref: [S].
    """
    words = codes_ref.shape[1]
    width = q_rows[0].shape[0]
    columns = jax.lax.broadcasted_iota(jnp.int32, (1, width), 1)
    codes = pltriton.load(
        codes_ref.at[pl.ds(first, block), pl.ds(0, width)],
        mask=valid[:, None] & (columns < words),
        other=jnp.uint32(0),
    )
    dist = [popcount32(codes ^ row[None, :], interpret=interpret).astype(jnp.int32) for row in q_rows]
    ham = jnp.sum(functools.reduce(jnp.add, dist), axis=1)
    if score == "key_norm":
        norms = pltriton.load(norms_ref.at[pl.ds(first, block)], mask=valid, other=0.0)
        group = len(q_rows)
        values = norms * ((group * rbit - 2 * ham).astype(jnp.float32) * jnp.float32(1.0 / rbit))
    else:
        values = -ham.astype(jnp.float32)
    return jnp.where(valid, values, -jnp.inf)


def _load_query_rows(q_ref, words: int):
    """The group's G query codes as uint32[Wp] rows (q_ref: [G, W])."""
    width = pl.next_power_of_2(words)
    mask = jax.lax.broadcasted_iota(jnp.int32, (width,), 0) < words
    return [
        pltriton.load(q_ref.at[jnp.int32(g), pl.ds(0, width)], mask=mask, other=jnp.uint32(0))
        for g in range(q_ref.shape[0])
    ]


def _scoring_kernel(len_ref, q_ref, codes_ref, norms_ref, *refs, tiling, seq, score, selection, interpret):
    """Scores of this program's chunk (refs: scores). With `selection` (budget, sink, recent),
    also pass 0 of the radix select over them (refs: one-hot table, scores, state, coarse,
    fine), the scores being written at valid positions only."""
    table_ref, scores_ref, *pass_refs = (None, *refs) if selection is None else refs
    geo = radix_select.chunk_geometry(len_ref, tiling, seq)
    rbit = 32 * codes_ref.shape[1]
    q_rows = _load_query_rows(q_ref, codes_ref.shape[1])
    block = tiling.block

    def scores_of_block(i):
        first, pos, valid = radix_select.block_positions(geo, i, block)
        values = _score_block(q_rows, codes_ref, norms_ref, first, valid, block=block, score=score, rbit=rbit,
                              interpret=interpret)
        pltriton.store(scores_ref.at[pl.ds(first, block)], values, mask=pos < seq)
        return pos, valid, values

    if selection is None:
        def write_block(i, carry):
            scores_of_block(i)
            return carry

        jax.lax.fori_loop(0, geo.in_bounds_blocks, write_block, 0)
        return
    budget, sink, recent = selection

    def digits_of_block(i):
        pos, valid, values = scores_of_block(i)
        keys = radix_select.order_keys(values, pos, geo.length, sink=sink, recent=recent)
        return radix_select.key_digit(keys, 0), valid

    hist = radix_select.histogram_loop(geo.valid_blocks, digits_of_block, table_ref)
    radix_select.finish_first_pass(geo, hist, *pass_refs, budget)


def _scoring_call(q_codes, k_codes, k_norms, lengths, *, score, tiling, selection, interpret):
    batch, kv_heads, seq, words = k_codes.shape
    group = q_codes.shape[1] // kv_heads
    chunks = tiling.chunks(seq)
    in_specs = [
        radix_select.length_spec(),
        pl.BlockSpec((None, group, words), lambda b, h, c: (b, h, 0)),
        radix_select.row_spec(seq, words),
        radix_select.row_spec(seq),
    ]
    inputs = [lengths.astype(jnp.int32), q_codes, k_codes, k_norms]
    out_shape = [jax.ShapeDtypeStruct((batch, kv_heads, seq), jnp.float32)]
    out_specs = [radix_select.row_spec(seq)]
    if selection is not None:
        in_specs.append(radix_select.table_spec())
        inputs.append(radix_select.one_hot_table())
        out_shape += radix_select.pass_out_shapes(batch, kv_heads, chunks)
        out_specs += radix_select.pass_out_specs()
    kernel = functools.partial(
        _scoring_kernel, tiling=tiling, seq=seq, score=score, selection=selection, interpret=interpret
    )
    return triton_call(
        kernel,
        out_shape=out_shape,
        grid=(batch, kv_heads, chunks),
        in_specs=in_specs,
        out_specs=out_specs,
        num_warps=tiling.num_warps,
        num_stages=tiling.num_stages,
        interpret=interpret,
        name="hata_hamming_scores" if selection is None else "hata_hamming_select_pass0",
    )(*inputs)


def hamming_scores(q_codes, k_codes, k_norms, lengths, *, score: str = "key_norm", interpret: bool = False,
                   tiling: Tiling | None = None):
    """Kernel form of :func:`hata_jax.hamming_scores`.

    q_codes: uint32[B, Hq, W]; k_codes: uint32[B, Hkv, S, W]; k_norms: float32[B, Hkv, S];
    lengths: int[B]. Returns float32[B, Hkv, S] (-inf at positions >= lengths[b]).
    """
    _check_codes(q_codes, k_codes, k_norms, score)
    batch, kv_heads, seq, _ = k_codes.shape
    tiling = tiling or default_tiling(batch * kv_heads, seq)
    [scores] = _scoring_call(q_codes, k_codes, k_norms, jnp.asarray(lengths), score=score, tiling=tiling,
                             selection=None, interpret=interpret)
    return scores


def hamming_topk(q_codes, k_codes, k_norms, lengths, *, budget: int, score: str = "key_norm", sink: int = 0,
                 recent: int = 0, interpret: bool = False, tiling: Tiling | None = None):
    """Kernel form of :func:`hata_jax.hamming_topk`: scoring fused with the first selection pass.

    Shapes as in :func:`hamming_scores`; returns (idx int32[B, Hkv, budget] with the selected
    positions in ascending order then `UNUSED`, count int32[B, Hkv] = min(lengths[b], budget)).
    """
    _check_codes(q_codes, k_codes, k_norms, score)
    batch, kv_heads, seq, _ = k_codes.shape
    radix_select.check_selection(seq, budget, sink, recent)
    lengths = jnp.asarray(lengths).astype(jnp.int32)
    tiling = tiling or default_tiling(batch * kv_heads, seq)
    scores, *first = _scoring_call(q_codes, k_codes, k_norms, lengths, score=score, tiling=tiling,
                                   selection=(budget, sink, recent), interpret=interpret)
    return radix_select.finish_selection(scores, lengths, first, budget=budget, sink=sink, recent=recent,
                                         tiling=tiling, interpret=interpret)
