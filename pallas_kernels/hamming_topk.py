"""Hamming scoring of cached key codes, alone or feeding the one-launch top-k selection.

Kernel forms of :func:`hata_jax.hamming_scores` and :func:`hata_jax.hamming_topk`, and
:func:`hata_step_select`, the first of the two launches of a HATA decode layer: the step's
query and key encoding, the cache append and the selection in one `pallas_call`.

Scoring: the G query codes of a KV head's group are held as `[Wp]` rows (Wp = W rounded up to a
power of two, masked); per loop step a `[block, Wp]` tile of key codes (each token's W words are
contiguous, 16 B at rbit 128) is XORed with each query row, popcounted (`popcount32`: PTX
`popc`), summed over words and the group, and `k_norm * ((G*rbit - 2*ham) * (1/rbit))` is
computed in float32 with exactly the reference's two products (bit-identical scores), or
`-ham`; positions >= lengths[b] get -inf.

The fused step (:class:`StepScores`): every program of row (b, h) encodes the group's query
heads and the new key (one `[16, D] x [D, rbit]` tile product per 32-bit word, as
:func:`pallas_kernels.hash_encode.encode_step`), the program whose chunk holds position
`lengths[b]` writes the new key, value, code and norm there (in place: the cache arrays are
aliased to the outputs), and program (b, 0, 0) writes the new lengths and overflow flags. A
write at a position outside `[0, S)` (a full cache, or a negative length) is dropped and sets
the sequence's overflow flag, as :meth:`hata_jax.HataCache.append_encoded` does.

Byte floor, Llama-3.1-8B (8 KV heads, 128K, rbit 128, batch 1): codes 16 B + norm 4 B per
token-head, 20 MiB, ~7 us at 2.9 TB/s; each program also reads the projection (2 x 32 KiB bf16
parts of its head) from L2.
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

from pallas_kernels import hash_encode
from pallas_kernels import topk_select as ts
from pallas_kernels._backend import popcount32, triton_call

SCORES = ("key_norm", "hamming")
MAX_WORDS = 8  # rbit <= 256
MAX_GROUP = 8


def check_codes(q_codes, k_codes, k_norms, score: str) -> None:
    """Raise a ValueError for code inputs these kernels do not support."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if k_codes.ndim != 4 or k_codes.dtype != jnp.uint32:
        raise ValueError(f"k_codes must be uint32[batch, kv_heads, seq, words], got {k_codes.dtype}{list(k_codes.shape)}")
    batch, kv_heads, seq, words = k_codes.shape
    if not 1 <= words <= MAX_WORDS:
        raise ValueError(f"rbit {32 * words} not supported (32 to {32 * MAX_WORDS})")
    if not 0 < seq <= ts.MAX_SEQ:
        raise ValueError(f"sequence capacity {seq} not supported (1 to {ts.MAX_SEQ})")
    if q_codes.ndim != 3 or q_codes.dtype != jnp.uint32 or q_codes.shape[0] != batch or q_codes.shape[2] != words:
        raise ValueError(f"q_codes must be uint32[{batch}, q_heads, {words}], got {q_codes.dtype}{list(q_codes.shape)}")
    group = q_codes.shape[1] // kv_heads
    if q_codes.shape[1] % kv_heads or not 1 <= group <= MAX_GROUP:
        raise ValueError(f"group size {q_codes.shape[1]} / {kv_heads} not supported (1 to {MAX_GROUP})")
    if k_norms.shape != (batch, kv_heads, seq) or k_norms.dtype != jnp.float32:
        raise ValueError(f"k_norms must be float32[{batch}, {kv_heads}, {seq}], got {k_norms.dtype}{list(k_norms.shape)}")


def _columns(rows: int, width: int):
    return lax.broadcasted_iota(jnp.int32, (rows, width), 1)


class _CodeRows(NamedTuple):
    """Scores of a row's positions from its key codes and norms against the group's query codes."""

    q_rows: list  # G uint32[Wp] query code rows (columns >= W are 0)
    codes_ref: Any  # [S, W]
    norms_ref: Any  # [S]
    score: str
    row_length: jax.Array
    interpret: bool

    def length(self):
        return self.row_length

    def block(self, first, pos, valid):
        """float32[block] scores of positions [first, first + block) (-inf where not valid)."""
        del pos
        block, words = valid.shape[0], self.codes_ref.shape[1]
        columns = _columns(1, self.q_rows[0].shape[0])
        codes = pltriton.load(self.codes_ref.at[pl.ds(first, block), pl.ds(0, columns.shape[1])],
                              mask=valid[:, None] & (columns < words), other=jnp.uint32(0))
        norms = pltriton.load(self.norms_ref.at[pl.ds(first, block)], mask=valid, other=0.0)
        return self._scores(codes, norms, valid)

    def at(self, pos, valid):
        """float32[n] scores of the positions `pos` (gathered; -inf where not valid)."""
        words = self.codes_ref.shape[1]
        columns = _columns(pos.shape[0], self.q_rows[0].shape[0])
        rows = jnp.broadcast_to(jnp.where(valid, pos, 0)[:, None], columns.shape)
        codes = pltriton.load(self.codes_ref.at[rows, jnp.minimum(columns, words - 1)],
                              mask=valid[:, None] & (columns < words), other=jnp.uint32(0))
        norms = pltriton.load(self.norms_ref.at[jnp.where(valid, pos, 0)], mask=valid, other=0.0)
        return self._scores(codes, norms, valid)

    def _scores(self, codes, norms, valid):
        words = self.codes_ref.shape[1]
        dist = [popcount32(codes ^ row[None, :], interpret=self.interpret).astype(jnp.int32) for row in self.q_rows]
        ham = jnp.sum(functools.reduce(jnp.add, dist), axis=1)
        if self.score == "hamming":
            scores = -ham.astype(jnp.float32)
        else:
            rbit = 32 * words
            scores = norms * ((len(self.q_rows) * rbit - 2 * ham).astype(jnp.float32) * jnp.float32(1.0 / rbit))
        return jnp.where(valid, scores, -jnp.inf)


@dataclasses.dataclass(frozen=True)
class CodeScores:
    """Scores from (q_codes [B, Hq, W], k_codes [B, Hkv, S, W], k_norms [B, Hkv, S])."""

    group: int
    words: int
    seq: int
    score: str

    def in_specs(self):
        return [
            pl.BlockSpec((None, None, self.group, self.words), lambda b, h, c: (b, h, 0, 0)),
            ts.row_spec(self.seq, self.words),
            ts.row_spec(self.seq),
        ]

    def aliases(self):
        return {}

    def out_shapes(self):
        return []

    def out_specs(self):
        return []

    def bind(self, len_ref, refs, *, interpret: bool):
        q_ref, codes_ref, norms_ref = refs
        width = pl.next_power_of_2(self.words)
        mask = lax.broadcasted_iota(jnp.int32, (width,), 0) < self.words
        q_rows = [pltriton.load(q_ref.at[jnp.int32(g), pl.ds(0, width)], mask=mask, other=jnp.uint32(0))
                  for g in range(self.group)]
        length = jnp.clip(len_ref[...], 0, self.seq)
        return _CodeRows(q_rows, codes_ref, norms_ref, self.score, length, interpret)


def _scoring_kernel(len_ref, *refs, source, tiling, seq, interpret):
    """Scores of this program's chunk (-inf at positions >= lengths[b])."""
    *source_refs, scores_ref = refs
    scores = source.bind(len_ref, source_refs, interpret=interpret)
    start = pl.program_id(2) * tiling.chunk

    def write_block(i, carry):
        first = start + i * tiling.block
        pos = first + ts.iota((tiling.block,))
        pltriton.store(scores_ref.at[pl.ds(first, tiling.block)], scores.block(first, pos, pos < scores.length()),
                       mask=pos < seq)
        return carry

    lax.fori_loop(0, pl.cdiv(jnp.clip(seq - start, 0, tiling.chunk), tiling.block), write_block, 0)


def hamming_scores(q_codes, k_codes, k_norms, lengths, *, score: str = "key_norm", interpret: bool = False,
                   tiling: ts.Tiling | None = None):
    """Kernel form of :func:`hata_jax.hamming_scores`.

    q_codes: uint32[B, Hq, W]; k_codes: uint32[B, Hkv, S, W]; k_norms: float32[B, Hkv, S];
    lengths: int[B]. Returns float32[B, Hkv, S] (-inf at positions >= lengths[b]).
    """
    check_codes(q_codes, k_codes, k_norms, score)
    batch, kv_heads, seq, words = k_codes.shape
    tiling = tiling or ts.default_tiling(batch * kv_heads, seq)
    source = CodeScores(q_codes.shape[1] // kv_heads, words, seq, score)
    return triton_call(
        functools.partial(_scoring_kernel, source=source, tiling=tiling, seq=seq, interpret=interpret),
        out_shape=jax.ShapeDtypeStruct((batch, kv_heads, seq), jnp.float32),
        grid=(batch, kv_heads, tiling.chunks(seq)),
        in_specs=[ts.batch_spec(), *source.in_specs()],
        out_specs=ts.row_spec(seq),
        num_warps=tiling.num_warps,
        num_stages=1,
        interpret=interpret,
        name="hata_hamming_scores",
    )(jnp.asarray(lengths).astype(jnp.int32), q_codes.reshape(batch, kv_heads, -1, words), k_codes, k_norms)


def hamming_topk(q_codes, k_codes, k_norms, lengths, *, budget: int, score: str = "key_norm", sink: int = 0,
                 recent: int = 0, state: ts.SelectState | None = None, interpret: bool = False,
                 tiling: ts.Tiling | None = None):
    """Kernel form of :func:`hata_jax.hamming_topk`: scoring fused with the one-launch selection.

    Shapes as in :func:`hamming_scores`; state: the rows' :class:`topk_select.SelectState` (None:
    a fresh one). Returns (idx int32[B, Hkv, budget] with the selected positions in ascending
    order then `UNUSED`, count int32[B, Hkv] = min(lengths[b], budget), new state).
    """
    check_codes(q_codes, k_codes, k_norms, score)
    batch, kv_heads, seq, words = k_codes.shape
    ts.check_selection(seq, budget, sink, recent)
    source = CodeScores(q_codes.shape[1] // kv_heads, words, seq, score)
    idx, count, state, _ = ts.run_select(
        source, jnp.asarray(lengths).astype(jnp.int32), [q_codes.reshape(batch, kv_heads, -1, words), k_codes, k_norms],
        state, batch=batch, kv_heads=kv_heads, seq=seq, budget=budget, sink=sink, recent=recent,
        tiling=tiling or ts.default_tiling(batch * kv_heads, seq), interpret=interpret, name="hata_hamming_topk",
    )
    return idx, count, state


# ----------------------------------------------------------------------------------------------
# The fused decode step: encode + append + score + select.


@dataclasses.dataclass(frozen=True)
class StepScores:
    """Scores of a decode step computed from the step's q and new key (encoded in-kernel).

    Inputs (in order): q [B, Hkv, G, D], k_new, v_new [B, Hkv, D], overflow bool[B],
    the projection parts [Hkv, D, rbit], then the cache k, v [B, Hkv, S, D], codes
    [B, Hkv, S, W], norms [B, Hkv, S] (aliased to the first four outputs); outputs also
    lengths int32[B] and overflow bool[B].
    """

    batch: int
    kv_heads: int
    group: int
    head_dim: int
    words: int
    seq: int
    parts: int
    score: str
    chunk: int
    dtype: Any  # the cache's K/V dtype
    compute_dtype: Any  # the encoding dot's input dtype

    def in_specs(self):
        d, w = self.head_dim, self.words
        return [
            pl.BlockSpec((None, None, self.group, d), lambda b, h, c: (b, h, 0, 0)),
            pl.BlockSpec((None, None, d), lambda b, h, c: (b, h, 0)),
            pl.BlockSpec((None, None, d), lambda b, h, c: (b, h, 0)),
            ts.batch_spec(),
            *[pl.BlockSpec((None, d, 32 * w), lambda b, h, c: (h, 0, 0))] * self.parts,
            ts.row_spec(self.seq, d),
            ts.row_spec(self.seq, d),
            ts.row_spec(self.seq, w),
            ts.row_spec(self.seq),
        ]

    def aliases(self):
        first_cache = 4 + self.parts
        return {first_cache + i: i for i in range(4)}

    def out_shapes(self):
        rows = (self.batch, self.kv_heads, self.seq)
        return [
            jax.ShapeDtypeStruct((*rows, self.head_dim), self.dtype),
            jax.ShapeDtypeStruct((*rows, self.head_dim), self.dtype),
            jax.ShapeDtypeStruct((*rows, self.words), jnp.uint32),
            jax.ShapeDtypeStruct(rows, jnp.float32),
            jax.ShapeDtypeStruct((self.batch,), jnp.int32),
            jax.ShapeDtypeStruct((self.batch,), jnp.bool_),
        ]

    def out_specs(self):
        d, w = self.head_dim, self.words
        return [ts.row_spec(self.seq, d), ts.row_spec(self.seq, d), ts.row_spec(self.seq, w), ts.row_spec(self.seq),
                ts.batch_spec(), ts.batch_spec()]

    def bind(self, len_ref, refs, *, interpret: bool):
        q_ref, k_new_ref, v_new_ref, overflow_ref, *rest = refs
        w_refs = rest[: self.parts]
        _, _, _, _, k_ref, v_ref, codes_ref, norms_ref, len_out_ref, overflow_out_ref = rest[self.parts:]
        old = len_ref[...]
        ok = (old >= 0) & (old < self.seq)
        length = jnp.where(ok, old + 1, jnp.clip(old, 0, self.seq))
        # Encode the group's queries (rows 0..G-1) and the new key (row G) in one tile.
        row = lax.broadcasted_iota(jnp.int32, (hash_encode.STEP_ROWS,), 0)
        q = pltriton.load(q_ref.at[pl.ds(0, hash_encode.STEP_ROWS), :], mask=(row < self.group)[:, None], other=0)
        k_new = k_new_ref[...]
        is_key = row == self.group
        rows = jnp.where(is_key[:, None], k_new[None, :].astype(self.compute_dtype), q.astype(self.compute_dtype))
        codes = hash_encode.pack_codes(rows, w_refs, self.words)
        q_rows = [jnp.sum(jnp.where((row == g)[:, None], codes, jnp.uint32(0)), axis=0, dtype=jnp.uint32)
                  for g in range(self.group)]
        k_code = jnp.sum(jnp.where(is_key[:, None], codes, jnp.uint32(0)), axis=0, dtype=jnp.uint32)
        kf = k_new.astype(jnp.float32)
        k_norm = jnp.sqrt(jnp.sum(kf * kf))
        chunk_index, head = pl.program_id(2), pl.program_id(1)
        owner = ok & (chunk_index == jnp.clip(old, 0, self.seq - 1) // self.chunk)

        @pl.when(owner)
        def _():
            pos = jnp.clip(old, 0, self.seq - 1)
            k_ref[pos, :] = k_new.astype(k_ref.dtype)
            v_ref[pos, :] = v_new_ref[...].astype(v_ref.dtype)
            width = k_code.shape[0]
            columns = lax.broadcasted_iota(jnp.int32, (width,), 0)
            pltriton.store(codes_ref.at[pos, pl.ds(0, width)], k_code, mask=columns < self.words)
            norms_ref[pos] = k_norm

        @pl.when((head == 0) & (chunk_index == 0))
        def _():
            len_out_ref[...] = length
            overflow_out_ref[...] = overflow_ref[...] | ~ok

        ts.barrier(interpret)  # the new row is stored before this program scores it
        return _CodeRows(q_rows, codes_ref, norms_ref, self.score, length, interpret)


def hata_step_select(q, k_new, v_new, w, k, v, codes, norms, lengths, overflow, state: ts.SelectState, *, budget: int,
                     score: str = "key_norm", sink: int = 0, recent: int = 0, interpret: bool = False,
                     tiling: ts.Tiling | None = None):
    """One launch: encode the step, append the new token to the cache, score and select.

    Args:
      q: float[B, Hq, D] post-RoPE queries; k_new, v_new: float[B, Hkv, D].
      w: float[Hkv, D, rbit] the layer's projection.
      k, v: [B, Hkv, S, D]; codes: uint32[B, Hkv, S, W]; norms: float32[B, Hkv, S]: the cache,
        updated in place when donated.
      lengths: int32[B] before the append; overflow: bool[B].
      state: the rows' :class:`topk_select.SelectState`.

    Returns:
      (idx, count, (k, v, codes, norms, lengths, overflow), state): the selection of the
      appended cache (as :func:`hamming_topk`) and the updated cache arrays and state.
    """
    batch, kv_heads, seq, head_dim = k.shape
    words = codes.shape[-1]
    heads = q.shape[1]
    group = heads // kv_heads
    check_codes(jax.ShapeDtypeStruct((batch, heads, words), jnp.uint32), codes, norms, score)
    if group + 1 > hash_encode.STEP_ROWS:
        raise ValueError(f"group size {group} not supported (1 to {hash_encode.STEP_ROWS - 1})")
    ts.check_selection(seq, budget, sink, recent)
    tiling = tiling or ts.default_tiling(batch * kv_heads, seq)
    compute_dtype = hash_encode.dot_dtype(q.dtype, k_new.dtype)
    w_parts = hash_encode.projection_parts(w, compute_dtype)
    source = StepScores(batch, kv_heads, group, head_dim, words, seq, len(w_parts), score, tiling.chunk, k.dtype,
                        compute_dtype)
    inputs = [q.reshape(batch, kv_heads, group, head_dim), k_new, v_new, overflow.astype(jnp.bool_), *w_parts,
              k, v, codes, norms]
    idx, count, state, outs = ts.run_select(
        source, lengths.astype(jnp.int32), inputs, state, batch=batch, kv_heads=kv_heads,
        seq=seq, budget=budget, sink=sink, recent=recent, tiling=tiling, interpret=interpret, name="hata_step_select",
    )
    k, v, codes, norms, new_lengths, new_overflow = outs
    return idx, count, (k, v, codes, norms, new_lengths, new_overflow), state
