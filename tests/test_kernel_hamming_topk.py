"""Pallas Hamming scoring and the band/radix top-k selection (interpret mode on the CPU) against the references.

Scores must match `scores_reference` bit for bit. Selections are checked two ways: as sets
against the reference semantics (count, distinct valid positions, forced positions in, every
other selected score >= every unselected valid score in the reference's nan_to_num order,
UNUSED after count), and exactly against `expected_selection`, the kernels' documented
deterministic answer (float order with NaN lowest, ties to the lowest positions, slots in
ascending position), which both the sample-band fast path and the radix fallback must give.
Every selection also reports how each row was selected (`band_select.PATH_*`), so the tests
show which path ran: the fast path on random scores; after a band miss (the k-th key above or
below the band), an overflowing chunk or a threshold bucket over `list_cap`, the listed
fallback (the row's candidates listed by one scan) or, with more candidates than `list_cap`,
the whole-row radix select; each of the fast path's threshold cases (small and large ranked
buckets); and rows of one call taking different paths. Small tilings (`chunk` 64-512) give several programs per row,
with S not a multiple of the chunk.
"""
from __future__ import annotations

import dataclasses
import functools
import re

import brute_force as bf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hata_jax
from hata_jax import dispatch
from hata_jax.scoring import scores_reference
from hata_jax.selection import exact_slots as expected_selection  # the kernels' exact answer
from pallas_kernels import band_select, hamming_topk, radix_select
from pallas_kernels.backend import lower_for_cuda, lowered_ops
from pallas_kernels.band_select import BandConfig
from pallas_kernels.radix_select import Tiling

SMALL = Tiling(chunk=128, block=32, scan_block=64)
BIG = float(np.finfo(np.float32).max)
# The paths that select without the radix passes.
FAST = {band_select.PATH_NO_BAND_KEY, band_select.PATH_ONE_KEY_BAND, band_select.PATH_ONE_KEY_BUCKET,
        band_select.PATH_RANKED}

# Jitted once per static configuration: interpret-mode compiles dominate this file's time.
kernel_scores = jax.jit(hamming_topk.hamming_scores, static_argnames=("score", "interpret", "tiling"))
kernel_select = jax.jit(band_select.select_topk_with_path, static_argnums=1,
                        static_argnames=("sink", "recent", "interpret", "tiling", "config"))
kernel_topk = jax.jit(hamming_topk.hamming_topk_with_path,
                      static_argnames=("budget", "score", "sink", "recent", "interpret", "tiling", "config"))


def random_codes(rng, batch, kv_heads, group, seq, rbit):
    words = rbit // 32
    q = rng.integers(0, 2**32, size=(batch, kv_heads * group, words), dtype=np.uint32)
    k = rng.integers(0, 2**32, size=(batch, kv_heads, seq, words), dtype=np.uint32)
    # Keys close to the first query of their group, so scores spread over the whole range.
    near = rng.random((batch, kv_heads, seq)) < 0.3
    flips = np.bitwise_and(*rng.integers(0, 2**32, size=(2, *k.shape), dtype=np.uint32))  # ~1/4 of bits
    q_first = np.repeat(q[:, ::group][:, :, None], seq, axis=2)
    k = np.where(near[..., None], q_first ^ flips, k)
    norms = rng.uniform(0.1, 8.0, size=(batch, kv_heads, seq)).astype(np.float32)
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(norms)


def query_scales(rng, score, batch, kv_heads):
    """The "asymmetric" score's q_scales (random, positive), None for the other scores; with it
    random_codes' query codes [B, Hkv * P, W] are P query planes per KV head."""
    if score != "asymmetric":
        return None
    return jnp.asarray(rng.uniform(0.01, 3.0, size=(batch, kv_heads)).astype(np.float32))


def ordered(scores):
    """float64 scores in the reference's selection order (nan_to_num), so set checks hold."""
    return np.nan_to_num(np.asarray(scores, np.float64), nan=-BIG, posinf=BIG, neginf=-BIG)


def check_selection(idx, count, scores, lengths, budget, sink=0, recent=0):
    bf.check_selection(idx, count, ordered(scores), lengths, budget, sink, recent)
    np.testing.assert_array_equal(idx, expected_selection(scores, lengths, budget, sink, recent))


def bits(x):
    return np.asarray(x, np.float32).view(np.uint32)


SCORE_CASES = [
    # score, group, rbit, batch, seq, tiling
    ("key_norm", 1, 32, 2, 300, SMALL),
    ("key_norm", 3, 96, 2, 1000, Tiling(chunk=256, block=64)),
    ("hamming", 4, 128, 3, 300, SMALL),
    ("key_norm", 8, 256, 2, 200, Tiling(chunk=64, block=32)),
    ("key_norm", 4, 128, 2, 700, None),
    # group = P query planes
    ("asymmetric", 4, 128, 2, 700, None),
    ("asymmetric", 8, 64, 3, 300, SMALL),
    ("asymmetric", 1, 256, 1, 200, Tiling(chunk=64, block=32)),
]


@pytest.mark.parametrize("score, group, rbit, batch, seq, tiling", SCORE_CASES)
def test_hamming_scores_bit_exact(rng, ragged_lengths, score, group, rbit, batch, seq, tiling):
    kv_heads = 2
    q, k, norms = random_codes(rng, batch, kv_heads, group, seq, rbit)
    scales = query_scales(rng, score, batch, kv_heads)
    lengths = ragged_lengths(batch, 0, seq).at[0].set(seq)
    got = kernel_scores(q, k, norms, lengths, score=score, q_scales=scales, interpret=True, tiling=tiling)
    want = scores_reference(q, k, norms, lengths, score, scales)
    assert got.shape == want.shape and got.dtype == jnp.float32
    np.testing.assert_array_equal(bits(got), bits(want))
    np.testing.assert_allclose(want, bf.hamming_scores(q, k, norms, lengths, score, scales), rtol=1e-6, atol=1e-5)


def select(scores, budget, lengths, sink=0, recent=0, tiling=SMALL, config=BandConfig()):
    """(idx, count, path) of the kernel selection, checked against the references."""
    scores = np.asarray(scores, np.float32)
    lengths = np.asarray(lengths, np.int32)
    idx, count, path = kernel_select(jnp.asarray(scores), budget, jnp.asarray(lengths), sink=sink, recent=recent,
                                     interpret=True, tiling=tiling, config=config)
    check_selection(idx, count, scores, lengths, budget, sink, recent)
    return idx, count, np.asarray(path)


def special_values(rng, shape):
    """Normal scores sprinkled with -inf, +inf, NaN, +-max, +-0, denormals and huge outliers."""
    scores = rng.standard_normal(shape).astype(np.float32)
    specials = np.array([-np.inf, np.inf, np.nan, -np.nan, BIG, -BIG, 0.0, -0.0, 1e-40, -1e-40, 1e30, -1e30],
                        np.float32)
    where = rng.random(shape) < 0.25
    scores[where] = rng.choice(specials, size=where.sum())
    return scores


def ulps_above_one(rng, shape, spread):
    """1 + a few ulps: scores sharing most key bits (all four radix passes matter)."""
    base = np.float32(1.0).view(np.uint32)
    return (base + rng.integers(0, spread, size=shape).astype(np.uint32)).view(np.float32)


SCORE_KINDS = {
    "normal": lambda rng, shape: rng.standard_normal(shape).astype(np.float32),
    "tied": lambda rng, shape: rng.integers(0, 5, size=shape).astype(np.float32),
    "equal": lambda rng, shape: np.full(shape, 1.5, np.float32),
    "special": special_values,
    "near_threshold": lambda rng, shape: ulps_above_one(rng, shape, 200),
    "outliers": lambda rng, shape: rng.standard_normal(shape).astype(np.float32)
    * np.where(rng.random(shape) < 0.01, 1e6, 1e-3).astype(np.float32),
}
# The shared configuration of the selection tests below (one compile): batch 3, S = 1000 (not
# a multiple of the 128-position chunk), budget 100, 3 sink and 5 recent positions.
SHAPE, BUDGET, SINK, RECENT = (3, 2, 1000), 100, 3, 5


@pytest.mark.parametrize("kind", sorted(SCORE_KINDS))
def test_select_topk_is_the_expected_top_set(rng, kind):
    """Ragged lengths (one row shorter than the budget)."""
    batch, _, seq = SHAPE
    scores = SCORE_KINDS[kind](rng, SHAPE)
    lengths = [seq, int(rng.integers(BUDGET + 1, seq)), int(rng.integers(1, BUDGET))]
    _, _, path = select(scores, BUDGET, lengths, sink=SINK, recent=RECENT)
    assert set(path[2]) <= {band_select.PATH_NO_BAND_KEY, band_select.PATH_ONE_KEY_BAND}, path  # length <= budget


def clustered(rng, seq, size, keys):
    """Distinct normal scores, except `size` unforced positions around the threshold (the
    (BUDGET - SINK - RECENT)-th best unforced score) taking `keys` distinct values a few ulps
    apart: the threshold's band bucket then holds those `size` keys (and about one more)."""
    scores = rng.standard_normal(seq).astype(np.float32)
    free = np.arange(SINK, seq - RECENT)
    order = free[np.argsort(-scores[free])]
    start = BUDGET - SINK - RECENT - size // 2
    level = scores[order[start - 1]]
    values = np.nextafter(level, np.float32(-np.inf)) - np.arange(keys, dtype=np.float32) * np.spacing(level)
    scores[order[start: start + size]] = np.resize(values, size)
    return scores


def test_each_fast_path_case(rng):
    """Rows built to reach every case of the fast path's threshold, in one call; buckets of
    tied keys (integer scores, a few values a few ulps apart) ranked by the compaction."""
    batch, kv_heads, seq = SHAPE
    rows = [
        rng.standard_normal(seq).astype(np.float32),  # any case; asserted fast below
        np.full(seq, -2.25, np.float32),  # t_lo == t_hi
        ulps_above_one(rng, seq, 200),  # a band narrower than 256 keys: one key per bucket
        rng.integers(0, 200, size=seq).astype(np.float32),  # integer scores: buckets of equal keys
        clustered(rng, seq, 12, 3),  # a bucket of 12 keys of 3 values
        clustered(rng, seq, 40, 5),  # a bucket of 40 keys of 5 values
    ]
    scores = np.stack(rows).reshape(batch, kv_heads, seq)
    idx, _, path = select(scores, BUDGET, [seq] * batch, sink=SINK, recent=RECENT)
    assert path[0, 0] in FAST
    np.testing.assert_array_equal(path.reshape(-1)[1:], [
        band_select.PATH_ONE_KEY_BAND, band_select.PATH_ONE_KEY_BUCKET, band_select.PATH_RANKED,
        band_select.PATH_RANKED, band_select.PATH_RANKED,
    ])
    # All-equal scores: forced positions, then the first positions, the same on every call.
    want = np.union1d(np.arange(BUDGET - RECENT), np.arange(seq - RECENT, seq))
    np.testing.assert_array_equal(idx[0, 1], want)


def cluster_with_outliers(rng, seq, outliers):
    """`outliers` huge scores over distinct scores within 2**16 ulps above 1: the sample's
    largest unforced key, which caps the band digits, is an outlier, so a digit spans more than
    2**16 keys and the band keys of the cluster (all >= t_lo) share the threshold's digit."""
    scores = ulps_above_one(rng, seq, 2**16)
    scores[rng.choice(np.arange(SINK, seq - RECENT), outliers, replace=False)] = 1e6 * (1 + rng.random(outliers))
    return scores


def test_each_path_in_one_call(rng):
    """One call, one row per path: thresholds from the band counts alone, a one-value bucket,
    small and large ranked buckets, and a bucket over `list_cap` (whole-row fallback)."""
    batch, kv_heads, seq = SHAPE
    rows = [
        np.full(seq, -2.25, np.float32),  # t_lo == t_hi
        ulps_above_one(rng, seq, 200),  # a band narrower than 256 keys: one key per bucket
        rng.standard_normal(seq).astype(np.float32),  # a small bucket: one ranking program
        # 40 outliers: the band (sample ranks 11..91 of 512) holds ~138 +- 13 cluster keys, the
        # bucket: several histogram steps of the compaction's radix select per pass.
        cluster_with_outliers(rng, seq, 40),
        *rng.standard_normal((2, seq)).astype(np.float32),  # length <= budget: no band key to take
    ]
    scores = np.stack(rows).reshape(SHAPE)
    lengths = [seq, seq, 77]
    config = BandConfig(slots_divisor=1)  # no chunk overflows its slots
    _, _, path = select(scores, BUDGET, lengths, sink=SINK, recent=RECENT, config=config)
    np.testing.assert_array_equal(path.reshape(-1)[:4], [band_select.PATH_ONE_KEY_BAND,
                                                         band_select.PATH_ONE_KEY_BUCKET, band_select.PATH_RANKED,
                                                         band_select.PATH_RANKED])
    np.testing.assert_array_equal(path[2], band_select.PATH_NO_BAND_KEY)
    # sigmas 10: sample ranks down to 127, ~208 +- 16 cluster keys in the bucket (and more in the
    # band: the listed fallback's candidates), over a cap of 128.
    small_cap = dataclasses.replace(config, sigmas=10.0, list_cap=128)
    _, _, path = select(scores, BUDGET, lengths, sink=SINK, recent=RECENT, config=small_cap)
    assert path[1, 1] == band_select.PATH_FALLBACK, path


def test_overflowing_chunk_falls_back_and_rows_switch_paths(rng):
    """One call, one path per row: a chunk with more band keys than its 64 slots sends its row to
    the listed fallback (its band listed by a scan of the row); random, empty and short rows
    stay on the fast path."""
    batch, kv_heads, seq = SHAPE
    scores = rng.standard_normal(SHAPE).astype(np.float32)
    # Row (0, 0) is the control: a random row takes the band's fast path, but not always (3 of 200
    # fresh rows fell back, measured), so the control is a fixed draw that does.
    scores[0, 0] = np.random.default_rng(0).standard_normal(seq).astype(np.float32)
    # Row (0, 1): 128 scores of one chunk just below its 60th best score, so the band (sample
    # ranks ~11..91 of 512) holds about 100 of them.
    level = np.sort(scores[0, 1])[::-1][60]
    scores[0, 1, 256:384] = level - rng.uniform(0, 1e-3, 128).astype(np.float32)
    lengths = [seq, 0, 57]
    _, count, path = select(scores, BUDGET, lengths, sink=SINK, recent=RECENT)
    assert path[0, 0] in FAST and path[0, 1] == band_select.PATH_LISTED, path
    np.testing.assert_array_equal(path[1:], band_select.PATH_NO_BAND_KEY)
    np.testing.assert_array_equal(count, [[BUDGET] * kv_heads, [0] * kv_heads, [57] * kv_heads])


@pytest.mark.parametrize("tiling", [SMALL, Tiling(chunk=64, block=32)], ids=["small", "chunk_below_fallback_block"])
@pytest.mark.parametrize("kind", ["normal", "special", "near_threshold", "tied"])
@pytest.mark.parametrize("list_cap, fallback", [(16384, band_select.PATH_LISTED), (128, band_select.PATH_FALLBACK)],
                         ids=["listed", "whole_row"])
def test_fallback_is_the_expected_top_set(rng, kind, tiling, list_cap, fallback):
    """A band that always misses (margins of -30 sample ranks: ~158 keys above t_hi, more than
    k) sends every row of distinct scores to the fallback, which must give the exact answer for
    any scores: specials, keys sharing their top 24 bits (all four radix passes), heavy ties;
    listed (the candidates fit `list_cap`) or whole (they do not); also with chunks shorter
    than the whole-row select's loop step (its per-chunk counts must not overlap)."""
    batch, _, seq = SHAPE
    scores = SCORE_KINDS[kind](rng, SHAPE)
    lengths = [seq, int(rng.integers(BUDGET + 1, seq)), seq - 1]
    _, _, path = select(scores, BUDGET, lengths, sink=SINK, recent=RECENT, tiling=tiling,
                        config=BandConfig(sigmas=0.0, slack=-30.0, list_cap=list_cap))
    if kind == "tied":
        return
    if fallback == band_select.PATH_LISTED:
        assert (path == fallback).all(), path
    else:  # specials can leave a row 128 candidates or fewer: listed
        assert np.isin(path, [band_select.PATH_LISTED, fallback]).all() and (path == fallback).any(), path


def test_band_above_the_threshold_lists_the_keys_below_it(rng):
    """The sampled positions score in (0, 1), the others in (-1, 0), so fewer than k keys reach
    t_lo (the sample's r_lo-th key; a band of 2 sigmas): the k-th key is below the band, the
    candidates are the keys below t_lo (listed, or with a cap of 128 the whole-row select), and
    the answer stays exact."""
    batch, kv_heads, seq = SHAPE
    config = BandConfig(sigmas=2.0)
    scores = rng.uniform(-1.0, 0.0, SHAPE).astype(np.float32)
    lengths = np.array([seq, 900, seq - 1])
    for b, length in enumerate(lengths.tolist()):
        n_s = min(length, config.sample)
        forced = np.r_[np.arange(SINK), np.arange(length - RECENT, length)]
        _, _, r_lo = band_select.sample_ranks(jnp.int32(n_s), jnp.int32(length), BUDGET, config, jnp.int32(0))
        for h in range(kv_heads):
            row = jnp.int32(b * kv_heads + h)
            sampled = np.asarray(band_select.strided_positions(jnp.arange(n_s), n_s, jnp.int32(length), row))
            scores[b, h, sampled] = rng.uniform(0.0, 1.0, n_s)
            keys = scores[b, h, :length].copy()
            keys[forced] = np.inf
            t_lo = np.sort(keys[sampled])[::-1][int(r_lo) - 1]
            assert (keys >= t_lo).sum() < BUDGET, (b, h)  # the premise: the k-th key is below t_lo
    for list_cap, fallback in [(16384, band_select.PATH_LISTED), (128, band_select.PATH_FALLBACK)]:
        _, _, path = select(scores, BUDGET, lengths, sink=SINK, recent=RECENT,
                            config=dataclasses.replace(config, list_cap=list_cap))
        assert (path == fallback).all(), (list_cap, path)


def test_band_miss_falls_back(rng):
    """Margins of -30 sample ranks put the k-th key outside the band (t_hi is the sample's ~81st
    key, ~158 +- 12 keys of the row are above it, more than k): every row of distinct scores
    takes the listed fallback (still exact); a row of equal scores keeps its one-key band."""
    batch, kv_heads, seq = SHAPE
    scores = rng.standard_normal(SHAPE).astype(np.float32)
    scores[2] = 0.5
    _, _, path = select(scores, BUDGET, [seq, 777, seq], sink=SINK, recent=RECENT,
                        config=BandConfig(sigmas=0.0, slack=-30.0))
    np.testing.assert_array_equal(path[:2], band_select.PATH_LISTED)
    np.testing.assert_array_equal(path[2], band_select.PATH_ONE_KEY_BAND)


@pytest.mark.parametrize(
    "seq, short, tiling",
    [
        (4096, 3001, Tiling(chunk=512, block=64, scan_block=128)),
        (6000, 4321, None),  # the default tiling: one chunk of 2048 per program
    ],
)
def test_fast_path_on_random_scores_matches_reference(rng, seq, short, tiling):
    """Distinct random scores, rows longer than the 512-position sample (hashed strata): the
    fast path takes every row, and its answer is the reference's set (in ascending order)."""
    batch, kv_heads, budget = 2, 2, 256
    scores = (rng.permutation(batch * kv_heads * seq).reshape(batch, kv_heads, seq) - 7000.0).astype(np.float32)
    lengths = np.array([seq, short])
    idx, count, path = select(scores, budget, lengths, sink=2, recent=3, tiling=tiling)
    assert np.isin(path, list(FAST)).all(), path
    ref_idx, ref_count = hata_jax.select_topk(jnp.asarray(scores), budget, jnp.asarray(lengths), sink=2, recent=3,
                                              impl="reference")
    np.testing.assert_array_equal(count, ref_count)
    np.testing.assert_array_equal(idx, np.sort(np.asarray(ref_idx), axis=-1))


@pytest.mark.parametrize(
    "seq, budget, lengths, sink, recent",
    [
        # length == budget, length < budget, one more than the budget, sink + recent > length, an
        # empty row; 3 chunks (one padded) per row
        (300, 64, [64, 63, 65, 5, 0], 8, 8),
        (2500, 100, [2500, 1777], 40, 60),  # sink + recent == budget
        (40, 40, [40, 39], 1, 2),  # budget == S, one block
    ],
)
def test_select_topk_edge_cases(rng, seq, budget, lengths, sink, recent):
    scores = rng.standard_normal((len(lengths), 2, seq)).astype(np.float32)
    select(scores, budget, lengths, sink=sink, recent=recent)


@pytest.mark.parametrize(
    "score, group, rbit, batch, seq, budget, tiling, fast",
    [
        ("key_norm", 4, 128, 2, 1000, 64, SMALL, True),
        # integer scores, 16 band slots per chunk: either path
        ("hamming", 3, 96, 3, 300, 16, Tiling(chunk=64, block=32), False),
        # integer scores, threshold buckets of many equal keys: either path
        ("hamming", 3, 96, 2, 1000, 64, SMALL, False),
        ("key_norm", 1, 256, 1, 2500, 100, None, True),
        ("asymmetric", 4, 128, 2, 2500, 100, None, True),
    ],
)
def test_hamming_topk_selects_the_expected_set(rng, ragged_lengths, score, group, rbit, batch, seq, budget, tiling,
                                               fast):
    """The fused pipeline computes the reference's scores bit for bit, so it selects exactly
    the expected set of those scores; full-length rows of distinct scores take the fast path but
    for band misses: at these sizes a row misses the band with probability ~7.5e-4 (6 of 8000
    rows of random_codes, seeds 1000-2999), so one of row 0's two heads may fall back (both:
    ~6e-7); requiring both failed about one run in 700."""
    q, k, norms = random_codes(rng, batch, 2, group, seq, rbit)
    scales = query_scales(rng, score, batch, 2)
    lengths = ragged_lengths(batch, 1, seq).at[0].set(seq)
    idx, count, path = kernel_topk(q, k, norms, lengths, budget=budget, score=score, q_scales=scales, sink=1,
                                   recent=2, interpret=True, tiling=tiling)
    scores = scores_reference(q, k, norms, lengths, score, scales)
    check_selection(idx, count, scores, lengths, budget, sink=1, recent=2)
    assert not fast or np.sum(~np.isin(np.asarray(path)[0], list(FAST))) <= 1, path


@pytest.mark.parametrize("score", ["key_norm", pytest.param("hamming", marks=pytest.mark.slow)])
def test_llama_shape_takes_the_fast_path(rng, score):
    """The Llama-3.1-8B decode shape (8 KV heads, G = 4, rbit 128, 128K tokens, budget 2048) with
    the default tiling and BandConfig: the rows on the fast path but for band misses, exactly the
    expected set ("hamming": integer scores, a threshold bucket of ~1000 equal keys). A row
    misses the band with probability ~exp(-8) = 3.4e-4 here (see band_select's tunables), so
    one fallback row in 8 is allowed (two: ~3e-6); a top_rank of 3 (an earlier design's) sent
    ~0.6% of rows to the fallback and failed this test in a few percent of runs."""
    seq, budget = 131072, 2048
    q, k, norms = random_codes(rng, 1, 8, 4, seq, 128)
    lengths = jnp.array([seq], jnp.int32)
    idx, count, path = kernel_topk(q, k, norms, lengths, budget=budget, score=score, interpret=True)
    assert np.sum(~np.isin(np.asarray(path), list(FAST))) <= 1, path
    check_selection(idx, count, scores_reference(q, k, norms, lengths, score), lengths, budget)


def test_public_api_dispatches_to_the_kernels(rng):
    """impl="pallas" runs these kernels (interpreted here): scores bit-exact, the expected set,
    and the fused path equal to scoring then selecting."""
    q, k, norms = random_codes(rng, 2, 2, 2, 300, 64)
    lengths = jnp.array([300, 123], jnp.int32)
    before = dict(hata_jax.TRACE_LOG)
    scores = jax.jit(lambda *a: hata_jax.hamming_scores(*a, impl="pallas"))(q, k, norms, lengths)
    np.testing.assert_array_equal(bits(scores), bits(scores_reference(q, k, norms, lengths, "key_norm")))
    idx, count = jax.jit(lambda s, n: hata_jax.select_topk(s, 32, n, sink=1, impl="pallas"))(scores, lengths)
    check_selection(idx, count, scores, lengths, 32, sink=1)
    fused = jax.jit(lambda *a: hata_jax.hamming_topk(*a, budget=32, sink=1, impl="pallas"))(q, k, norms, lengths)
    np.testing.assert_array_equal(fused[0], idx)
    np.testing.assert_array_equal(fused[1], count)
    for op in ("hamming_scores", "select_topk", "hamming_topk"):
        assert hata_jax.TRACE_LOG[(op, "pallas-interpret")] == before.get((op, "pallas-interpret"), 0) + 1


@pytest.mark.parametrize(
    "batch, kv_heads, group, rbit, seq, budget",
    [
        (1, 8, 4, 128, 131072, 2048),
        (2, 2, 3, 96, 5000, 100),
        (2, 2, 3, 96, radix_select.MAX_SEQ, radix_select.MAX_BUDGET),
        (1, 2, 8, 256, radix_select.MAX_SEQ, radix_select.MAX_BUDGET),
    ],
)
def test_lowers_for_cuda(batch, kv_heads, group, rbit, seq, budget):
    words = rbit // 32
    q = jax.ShapeDtypeStruct((batch, kv_heads * group, words), jnp.uint32)
    k = jax.ShapeDtypeStruct((batch, kv_heads, seq, words), jnp.uint32)
    norms = jax.ShapeDtypeStruct((batch, kv_heads, seq), jnp.float32)
    lengths = jax.ShapeDtypeStruct((batch,), jnp.int32)
    text = lower_for_cuda(hamming_topk.hamming_scores, q, k, norms, lengths, score="key_norm")
    assert "hata_hamming_scores" in text
    text = lower_for_cuda(lambda s, n: hamming_topk.select_topk(s, budget, n, sink=4, recent=4), norms, lengths)
    assert launch_names(text) == ["hata_select_sample", "hata_select_band", "hata_select_compact"]
    text = lower_for_cuda(hamming_topk.hamming_topk, q, k, norms, lengths, budget=budget, score="hamming")
    assert launch_names(text) == ["hata_hamming_sample", "hata_hamming_band", "hata_select_compact"]
    scales = jax.ShapeDtypeStruct((batch, kv_heads), jnp.float32)
    text = lower_for_cuda(lambda *a: hamming_topk.hamming_topk(*a[:4], budget=budget, score="asymmetric",
                                                               q_scales=a[4]), q, k, norms, lengths, scales)
    assert launch_names(text) == ["hata_hamming_sample", "hata_hamming_band", "hata_select_compact"]


@pytest.mark.parametrize("score", ["key_norm", "asymmetric"])
def test_hata_layer_launches(monkeypatch, score):
    """One HATA layer's step (impl resolving as on a GPU) is six Triton launches: the step's
    encoding, the selection's three (no fallback launch), the sparse attention and the merge of
    its splits (merged in the kernel, it cost more device time than the merge launch on the
    H100: BENCHMARKS, issue 13, session 19)."""
    monkeypatch.setattr(dispatch, "on_gpu", lambda: True)
    config = hata_jax.HataConfig(budget=256, rbit=128, score=score)
    cache = jax.eval_shape(lambda: hata_jax.HataCache.init(1, 2, 4096, 128, rbit=128))
    q = jax.ShapeDtypeStruct((1, 8, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 2, 128), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((2, 128, 128), jnp.float32)
    text = lower_for_cuda(lambda *a: hata_jax.hata_decode_attention(*a, config), q, k, k, cache, w)
    assert launch_names(text) == ["hash_encode_step", "hata_hamming_sample", "hata_hamming_band",
                                  "hata_select_compact", "hata_sparse_decode", "hata_sparse_decode_combine"]


def launch_names(text: str) -> list[str]:
    """The names of the Triton launches of a lowered module, in program order."""
    return re.findall(r'__gpu\$xla\.gpu\.triton.*?name = "(\w+)"', text)


def test_selection_runs_no_xla_op_between_launches():
    """Scoring and selection lower to their launches and literals only: the histograms' one-hot
    table is a constant of the program, not an XLA fusion run before every selection."""
    q = jax.ShapeDtypeStruct((2, 6, 4), jnp.uint32)
    k = jax.ShapeDtypeStruct((2, 3, 4096, 4), jnp.uint32)
    norms = jax.ShapeDtypeStruct((2, 3, 4096), jnp.float32)
    lengths = jax.ShapeDtypeStruct((2,), jnp.int32)
    for text in (lower_for_cuda(hamming_topk.hamming_topk, q, k, norms, lengths, budget=256, score="key_norm"),
                 lower_for_cuda(lambda s, n: hamming_topk.select_topk(s, 256, n), norms, lengths)):
        ops = set(lowered_ops(text)) - {"module", "func.func", "call", "return"}
        assert ops == {"stablehlo.custom_call", "stablehlo.constant"}, ops


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(rbit=288), "rbit"),
        (dict(group=16), "group size"),
        (dict(seq=radix_select.MAX_SEQ + 1), "sequence capacity"),
        (dict(budget=radix_select.MAX_BUDGET + 1), "budget"),
        (dict(codes_dtype=jnp.int32), "k_codes"),
    ],
)
def test_unsupported_shapes_raise(change, message):
    shape = dict(rbit=128, group=4, seq=radix_select.MAX_SEQ, budget=2048, codes_dtype=jnp.uint32) | change
    words = shape["rbit"] // 32
    q = jax.ShapeDtypeStruct((1, 2 * shape["group"], words), jnp.uint32)
    k = jax.ShapeDtypeStruct((1, 2, shape["seq"], words), shape["codes_dtype"])
    norms = jax.ShapeDtypeStruct((1, 2, shape["seq"]), jnp.float32)
    with pytest.raises(ValueError, match=message):
        hamming_topk.hamming_topk(q, k, norms, jnp.zeros(1, jnp.int32), budget=shape["budget"])


def test_select_topk_rejects_bad_scores():
    with pytest.raises(ValueError, match="float32"):
        hamming_topk.select_topk(jnp.zeros((1, 2, 64), jnp.bfloat16), 8, jnp.array([64]))
    with pytest.raises(ValueError, match="budget"):
        hamming_topk.select_topk(jnp.zeros((1, 2, 64), jnp.float32), 65, jnp.array([64]))


@pytest.mark.parametrize("chunk, block, scan_block", [(96, 32, 64), (128, 256, 64), (64, 16, 64), (128, 32, 48)])
def test_tiling_is_checked(chunk, block, scan_block):
    with pytest.raises(ValueError, match="Tiling"):
        Tiling(chunk=chunk, block=block, scan_block=scan_block)


@pytest.mark.parametrize(
    "change",
    [dict(sample=8192), dict(top_rank=0), dict(slots_divisor=3), dict(list_cap=1000), dict(list_block=8),
     dict(list_cap=64)],
)
def test_band_config_is_checked(change):
    with pytest.raises(ValueError, match="BandConfig"):
        BandConfig(**change)


@pytest.mark.parametrize(
    "score, scales, message",
    [
        ("asymmetric", None, "q_scales is needed by score='asymmetric'"),
        ("key_norm", (1, 2), "q_scales is needed by score='asymmetric' and by no other"),
        ("asymmetric", (2, 2), r"q_scales must be float32\[1, 2\]"),
        ("asymmetric", (1, 3), r"q_scales must be float32\[1, 2\]"),
    ],
)
def test_query_scales_are_checked(score, scales, message):
    q = jax.ShapeDtypeStruct((1, 8, 4), jnp.uint32)
    k = jax.ShapeDtypeStruct((1, 2, 300, 4), jnp.uint32)
    norms = jax.ShapeDtypeStruct((1, 2, 300), jnp.float32)
    q_scales = None if scales is None else jnp.ones(scales, jnp.float32)
    for op in (hamming_topk.hamming_scores, functools.partial(hamming_topk.hamming_topk, budget=16)):
        with pytest.raises(ValueError, match=message):
            op(q, k, norms, jnp.zeros(1, jnp.int32), score=score, q_scales=q_scales)
