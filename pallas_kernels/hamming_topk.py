"""Hamming scoring and exact top-`budget` selection (Pallas Triton), without any sort.

Kernel forms of :func:`hata_jax.hamming_scores`, :func:`hata_jax.select_topk` and
:func:`hata_jax.hamming_topk` (same arguments plus `interpret` and an optional `tiling`);
`hamming_topk_with_path` / `band_select.select_topk_with_path` also return how each row was
selected and take a `BandConfig`.

Design
------
Every kernel runs on a grid `(B, Hkv, programs)`: each row `(b, h)` of the cache is cut into
`chunks` (a power of two) programs of `chunk` positions, so batch 1 with 8 KV heads still
launches hundreds of programs.

Scoring (:func:`hamming_scores`, and inside the selection's first two launches): the G query
codes of the group are loaded once per program (a `[Wp]` row each, Wp = W rounded up to a power
of two, masked); per loop step a `[block, Wp]` tile of key codes (each token's W words are
contiguous, 16 B at rbit 128) is XORed with each query row, popcounted (`popcount32`: PTX
`popc`), summed over words and the group, and `k_norm * ((G*rbit - 2*ham) * (1/rbit))` is
computed in float32 with exactly the reference's two products (bit-identical scores), or `-ham`;
positions >= lengths[b] get -inf. The "asymmetric" score has the same loop with the KV head's P
query planes as the rows (P = 4 by default: the popcounts of G = 4 query codes at the Llama
shape), plane p's distance shifted left by p, and `k_norm * ((top*rbit - 2*ham) * (scale *
(1/rbit)))` with the row's plane scale loaded once per program (top = 2**P - 1). The
selection's sample launch gathers code rows by position instead of loading a contiguous tile.

Selection (:mod:`pallas_kernels.band_select`, whose docstring has its launches and its
:class:`~pallas_kernels.band_select.BandConfig` tunables, with the radix machinery of
:mod:`pallas_kernels.radix_select` as exact fallback): launch A ranks a stratified sample of
`min(L, 512)` positions to get band bounds `t_lo <= k-th largest key <= t_hi` (with
overwhelming probability); launch B (fused with scoring) counts the keys above the band,
compacts the band keys into per-chunk slots and histograms them (one 8-bit band digit), and the
last of a row's programs to finish decides from the counts alone whether the band holds the
k-th key and, if so, which band digit holds the threshold; a row it cannot take it selects whole
(the radix fallback), ranking the threshold bucket's keys when the bucket is not one key
value; launch C writes the selected positions of both paths. No sort, no host sync,
static shapes, one atomic counter per row; deterministic: the k keys are the largest in float
order (NaN lowest, forced sink/recent positions first), ties at the threshold taken lowest
position first, slots in ascending position, then `UNUSED` (-1).

Byte floor, Llama-3.1-8B (32 q heads, 8 KV heads, batch 1, 128K context, rbit 128, budget 2048)
-----------------------------------------------------------------------------------------------
- Scoring reads codes 16 B + norm 4 B per token-head: 8 x 131072 x 20 B = 20 MiB (+8 KiB of
  query codes); `hamming_scores` also writes 4 MiB of scores.
- Fused score + select: the floor is that same 20 MiB read once plus the 64 KiB index output,
  ~7 us. The pipeline adds the 4 MiB scores write (launch B, for the compaction and the
  fallback), their re-read by the compaction (L2-resident), 0.21 MiB of band keys (~6.9K per
  row), 0.5 MiB of per-chunk band histograms, and 1.25 MiB of L2 reads by the sample launch
  (each of its 16 programs per row scores the row's 512 sample positions; 80 KiB of them from
  HBM).
- `select_topk` on given scores: floor = read the 4 MiB of scores once, ~1.5 us; the pipeline
  reads them twice (band pass, compaction).

Tunables (re-tune with the bench)
--------------------------------------------------------------------------------------------------
Tiling (:class:`radix_select.Tiling`):
- `radix_select.TARGET_PROGRAMS = 512` (~4 CTAs per SM on 132 SMs): `chunk` = rows * S / 512
  rounded up to a power of two, clamped to [`MIN_CHUNK` = 2048, `MAX_CHUNK` = 16384] and to S:
  64 chunks of 2048 per row at the Llama shape. Fewer, bigger chunks mean fewer programs and
  longer serial loops; more chunks mean more per-chunk counts for the decision to read.
- `radix_select.SCAN_BLOCK = 2048` positions per loop step of the loops without a histogram
  (band pass with its scoring, compaction): one step per chunk, so a program waits for one load.
- `radix_select.BLOCK = 256` positions per loop step of `hamming_scores`;
  `radix_select.FALLBACK_BLOCK = 128` per loop step of the fallback (see there).
- `num_warps = 4`: the `[16, 16]` histogram MMA has two 16x8 tiles; more warps only replicate
  it. `num_stages = 1`: one loop step per program on the fast path.
- `radix_select.HIST_DTYPE = bfloat16`: 0/1 operands, float32 accumulation exact up to 2**24
  keys per chunk; the table gather compiles to 16 B loads and `ldmatrix`.
BandConfig (the sample, the band, the decision and the bucket's ranking): in
:mod:`pallas_kernels.band_select`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import band_select
from pallas_kernels import radix_select as rs
from pallas_kernels.backend import MAX_GROUP, SCORES, popcount32, triton_call
from pallas_kernels.band_select import BandConfig, select_topk  # noqa: F401 (select_topk: public)
from pallas_kernels.radix_select import Tiling, default_tiling

MAX_WORDS = 8  # rbit <= 256


def _check_codes(q_codes, k_codes, k_norms, score: str, q_scales) -> None:
    """Raise a ValueError for inputs these kernels do not support."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if (score == "asymmetric") != (q_scales is not None):
        raise ValueError(f"q_scales is needed by score='asymmetric' and by no other score (score={score!r}, "
                         f"q_scales {'given' if q_scales is not None else 'None'})")
    if k_codes.ndim != 4 or k_codes.dtype != jnp.uint32:
        raise ValueError(
            f"k_codes must be uint32[batch, kv_heads, seq, words], got {k_codes.dtype}{list(k_codes.shape)}"
        )
    batch, kv_heads, seq, words = k_codes.shape
    if not 1 <= words <= MAX_WORDS:
        raise ValueError(f"rbit {32 * words} not supported (32 to {32 * MAX_WORDS})")
    if not 0 < seq <= rs.MAX_SEQ:
        raise ValueError(f"sequence capacity {seq} not supported (1 to {rs.MAX_SEQ})")
    if q_codes.ndim != 3 or q_codes.dtype != jnp.uint32 or q_codes.shape[0] != batch or q_codes.shape[2] != words:
        raise ValueError(f"q_codes must be uint32[{batch}, q_heads, {words}], got {q_codes.dtype}{list(q_codes.shape)}")
    group = q_codes.shape[1] // kv_heads
    if q_codes.shape[1] % kv_heads or not 1 <= group <= MAX_GROUP:
        raise ValueError(f"group size {q_codes.shape[1]} / {kv_heads} not supported (1 to {MAX_GROUP})")
    if k_norms.shape != (batch, kv_heads, seq) or k_norms.dtype != jnp.float32:
        raise ValueError(
            f"k_norms must be float32[{batch}, {kv_heads}, {seq}], got {k_norms.dtype}{list(k_norms.shape)}"
        )
    if q_scales is not None and (q_scales.shape != (batch, kv_heads) or q_scales.dtype != jnp.float32):
        raise ValueError(f"q_scales must be float32[{batch}, {kv_heads}], got {q_scales.dtype}{list(q_scales.shape)}")


class _CodeScoresRefs(NamedTuple):
    """Scores of a row computed from its key codes and norms against the group's query codes
    (or, for the "asymmetric" score, the KV head's query planes and their scale)."""

    q_rows: list  # G (or P) uint32[Wp] query code rows (columns >= W are 0)
    codes_ref: Any  # [S, W]
    norms_ref: Any  # [S]
    score: str
    q_scale: Any  # float32 scalar ("asymmetric") or None
    interpret: bool

    def _scores(self, codes, norms):
        """The reference's float32 formula, so the scores match it bit for bit (codes: [n, Wp],
        columns >= W are 0)."""
        dist = [popcount32(codes ^ row[None, :], interpret=self.interpret).astype(jnp.int32) for row in self.q_rows]
        if self.score == "asymmetric":  # plane p counts 2**p times
            dist = [d << p for p, d in enumerate(dist)]
        ham = jnp.sum(functools.reduce(jnp.add, dist), axis=1)
        if self.score == "hamming":
            return -ham.astype(jnp.float32)
        rbit = 32 * self.codes_ref.shape[1]
        if self.score == "asymmetric":
            top = 2 ** len(self.q_rows) - 1
            return norms * ((top * rbit - 2 * ham).astype(jnp.float32) * (self.q_scale * jnp.float32(1.0 / rbit)))
        return norms * ((len(self.q_rows) * rbit - 2 * ham).astype(jnp.float32) * jnp.float32(1.0 / rbit))

    def _columns(self, rows: int):
        return jax.lax.broadcasted_iota(jnp.int32, (rows, self.q_rows[0].shape[0]), 1)

    def at(self, pos, valid):
        columns = self._columns(pos.shape[0])
        words = self.codes_ref.shape[1]
        codes = self.codes_ref[jnp.broadcast_to(pos[:, None], columns.shape), jnp.minimum(columns, words - 1)]
        return self._scores(jnp.where(columns < words, codes, jnp.uint32(0)), self.norms_ref[pos])

    def block(self, first, valid):
        """float32[block] scores of the positions [first, first + block) (-inf where not valid)."""
        block = valid.shape[0]
        columns = self._columns(1)
        mask = valid[:, None]
        if columns.shape[1] > self.codes_ref.shape[1]:  # W not a power of two: mask the padding words
            mask = mask & (columns < self.codes_ref.shape[1])
        # A mask uniform along a token's words lets each thread load them as one vector (16 B at rbit 128).
        codes = pltriton.load(
            self.codes_ref.at[pl.ds(first, block), pl.ds(0, columns.shape[1])],
            mask=jnp.broadcast_to(mask, (block, columns.shape[1])),
            other=jnp.uint32(0),
        )
        norms = pltriton.load(self.norms_ref.at[pl.ds(first, block)], mask=valid, other=0.0)
        return jnp.where(valid, self._scores(codes, norms), -jnp.inf)


@dataclasses.dataclass(frozen=True)
class CodeScores:
    """Scores computed from (q_codes [B, Hq, W], k_codes [B, Hkv, S, W], k_norms [B, Hkv, S]),
    then q_scales [B, Hkv] for the "asymmetric" score (q_codes: [B, Hkv * P, W] query planes)."""

    group: int  # query rows per KV head: G query codes, or P query planes
    words: int
    seq: int
    score: str
    writes_scores = True

    def in_specs(self):
        specs = [
            pl.BlockSpec((None, self.group, self.words), lambda b, h, c: (b, h, 0)),
            rs.row_spec(self.seq, self.words),
            rs.row_spec(self.seq),
        ]
        return specs + [rs.row_spec()] if self.score == "asymmetric" else specs

    def bind(self, refs, *, interpret):
        q_ref, codes_ref, norms_ref, *scale_ref = refs
        width = pl.next_power_of_2(self.words)
        mask = jax.lax.broadcasted_iota(jnp.int32, (width,), 0) < self.words
        q_rows = [
            pltriton.load(q_ref.at[jnp.int32(g), pl.ds(0, width)], mask=mask, other=jnp.uint32(0))
            for g in range(self.group)
        ]
        q_scale = scale_ref[0][...] if scale_ref else None
        return _CodeScoresRefs(q_rows, codes_ref, norms_ref, self.score, q_scale, interpret)


def _code_scores(q_codes, k_codes, score: str) -> CodeScores:
    _, kv_heads, seq, words = k_codes.shape
    return CodeScores(q_codes.shape[1] // kv_heads, words, seq, score)


def _score_inputs(q_codes, k_codes, k_norms, q_scales) -> tuple:
    """The arrays of CodeScores.in_specs, in order."""
    return (q_codes, k_codes, k_norms) + (() if q_scales is None else (q_scales,))


def _scoring_kernel(len_ref, *refs, source, tiling, seq, interpret):
    """Scores of this program's chunk (-inf at positions >= lengths[b])."""
    *source_refs, scores_ref = refs
    scores = source.bind(source_refs, interpret=interpret)
    geo = rs.chunk_geometry(len_ref, tiling, seq)

    def write_block(i, carry):
        first, pos, valid = rs.block_positions(geo, i, tiling.block)
        pltriton.store(scores_ref.at[pl.ds(first, tiling.block)], scores.block(first, valid), mask=pos < seq)
        return carry

    jax.lax.fori_loop(0, geo.blocks(seq, tiling.block), write_block, 0)


@functools.partial(jax.jit, static_argnames=("score", "interpret", "tiling"))
def hamming_scores(
    q_codes,
    k_codes,
    k_norms,
    lengths,
    *,
    score: str = "key_norm",
    q_scales=None,
    interpret: bool = False,
    tiling: Tiling | None = None,
):
    """Kernel form of :func:`hata_jax.hamming_scores`.

    q_codes: uint32[B, Hq, W] (score "asymmetric": uint32[B, Hkv * P, W] query planes);
    k_codes: uint32[B, Hkv, S, W]; k_norms: float32[B, Hkv, S]; lengths: int[B]; q_scales:
    float32[B, Hkv] ("asymmetric" only). Returns float32[B, Hkv, S] (-inf at positions >= lengths[b]).
    """
    _check_codes(q_codes, k_codes, k_norms, score, q_scales)
    batch, kv_heads, seq, _ = k_codes.shape
    tiling = tiling or default_tiling(batch * kv_heads, seq)
    source = _code_scores(q_codes, k_codes, score)
    return triton_call(
        functools.partial(_scoring_kernel, source=source, tiling=tiling, seq=seq, interpret=interpret),
        out_shape=jax.ShapeDtypeStruct((batch, kv_heads, seq), jnp.float32),
        grid=(batch, kv_heads, tiling.chunks(seq)),
        in_specs=[rs.length_spec(), *source.in_specs()],
        out_specs=rs.row_spec(seq),
        num_warps=tiling.num_warps,
        num_stages=tiling.num_stages,
        interpret=interpret,
        name="hata_hamming_scores",
    )(jnp.asarray(lengths).astype(jnp.int32), *_score_inputs(q_codes, k_codes, k_norms, q_scales))


@functools.partial(jax.jit, static_argnames=("budget", "score", "sink", "recent", "interpret", "tiling", "config"))
def hamming_topk_with_path(
    q_codes,
    k_codes,
    k_norms,
    lengths,
    *,
    budget: int,
    score: str = "key_norm",
    q_scales=None,
    sink: int = 0,
    recent: int = 0,
    interpret: bool = False,
    tiling: Tiling | None = None,
    config: BandConfig = BandConfig(),
):
    """:func:`hamming_topk`, also returning how each row was selected (int32[B, Hkv] of band_select.PATH_*)."""
    _check_codes(q_codes, k_codes, k_norms, score, q_scales)
    batch, kv_heads, seq, _ = k_codes.shape
    rs.check_selection(seq, budget, sink, recent)
    return band_select.select_with_path(
        _code_scores(q_codes, k_codes, score),
        _score_inputs(q_codes, k_codes, k_norms, q_scales),
        jnp.asarray(lengths),
        shape=(batch, kv_heads, seq),
        budget=budget,
        sink=sink,
        recent=recent,
        tiling=tiling or default_tiling(batch * kv_heads, seq),
        config=config,
        interpret=interpret,
    )


def hamming_topk(
    q_codes,
    k_codes,
    k_norms,
    lengths,
    *,
    budget: int,
    score: str = "key_norm",
    q_scales=None,
    sink: int = 0,
    recent: int = 0,
    interpret: bool = False,
    tiling: Tiling | None = None,
):
    """Kernel form of :func:`hata_jax.hamming_topk`: scoring fused with the band select.

    Shapes as in :func:`hamming_scores`; returns (idx int32[B, Hkv, budget] with the selected
    positions in ascending order then `UNUSED`, count int32[B, Hkv] = min(lengths[b], budget)).
    """
    idx, count, _ = hamming_topk_with_path(
        q_codes,
        k_codes,
        k_norms,
        lengths,
        budget=budget,
        score=score,
        q_scales=q_scales,
        sink=sink,
        recent=recent,
        interpret=interpret,
        tiling=tiling,
    )
    return idx, count
