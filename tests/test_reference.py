"""The pure-JAX reference API (impl="reference") against plain-numpy brute force."""
from __future__ import annotations

import functools

import brute_force as bf
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hata_jax as hj

REF = "reference"
KV_HEADS = 2
# (G, rbit, D): every G with every rbit, and each of G and rbit with both head dims.
CASES = [
    (1, 32, 64), (1, 128, 128), (1, 256, 64),
    (3, 32, 128), (3, 128, 64), (3, 256, 128),
    (4, 32, 64), (4, 128, 128), (4, 256, 64),
]
# The decode tests compose encode, scoring and selection (checked on every case above them): each
# G, each rbit and both head dims once.
DECODE_CASES = [(1, 32, 64), (3, 256, 128), (4, 128, 128)]
# Attention tolerances (rtol = atol) against float64 numpy on the same input values.
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def random_codes(rng, *shape):
    return jnp.asarray(rng.integers(0, 2**32, size=shape, dtype=np.uint32))


def random_norms(rng, *shape):
    return jnp.asarray(rng.uniform(0.5, 4.0, size=shape).astype(np.float32))


def lengths_with_edges(rng, batch: int, capacity: int):
    """int32[batch] lengths including 0, 1 and `capacity`, the rest random, shuffled."""
    values = np.concatenate([[0, 1, capacity], rng.integers(2, capacity, size=batch - 3)])
    return jnp.asarray(rng.permutation(values), jnp.int32)


@pytest.mark.parametrize("group, rbit, head_dim", CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_encode_matches_brute_force(randn, group, rbit, head_dim, dtype):
    w = randn(KV_HEADS, head_dim, rbit)
    q = randn(3, KV_HEADS * group, head_dim, dtype=dtype)
    k = randn(3, KV_HEADS, 7, head_dim, dtype=dtype)
    bf.check_codes(hj.encode(q, w, impl=REF), q, w, -2)
    bf.check_codes(hj.encode(k, w, head_axis=1, impl=REF), k, w, 1)
    tokens_first = randn(5, KV_HEADS * group, head_dim, dtype=dtype)
    bf.check_codes(hj.encode(tokens_first, w, head_axis=1, impl=REF), tokens_first, w, 1)


def test_encode_is_strict_sign(rng):
    """Bit j is set iff x . w_j > 0 strictly: an exactly-zero projection gives 0."""
    w = jnp.asarray(rng.integers(-2, 3, size=(2, 64, 96)).astype(np.float32))
    x = jnp.asarray(rng.integers(-1, 2, size=(4, 6, 64)).astype(np.float32))
    codes = hj.encode(x, w, impl=REF)
    expected, proj = bf.encode(x, w, -2)
    assert (proj == 0).any(), "the test needs exact zeros"
    np.testing.assert_array_equal(codes, expected)


@pytest.mark.parametrize("group, rbit, head_dim", CASES[::4])
def test_encode_step_matches_encode_and_norms(randn, group, rbit, head_dim):
    w = randn(KV_HEADS, head_dim, rbit)
    q = randn(3, KV_HEADS * group, head_dim)
    k_new = randn(3, KV_HEADS, head_dim)
    q_codes, k_codes, norms = hj.encode_step(q, k_new, w, impl=REF)
    bf.check_codes(q_codes, q, w, 1)
    bf.check_codes(k_codes, k_new, w, 1)
    np.testing.assert_array_equal(q_codes, hj.encode(q, w, impl=REF))
    np.testing.assert_array_equal(k_codes, hj.encode(k_new, w, impl=REF))
    assert norms.dtype == jnp.float32
    np.testing.assert_allclose(norms, bf.key_norms(k_new), rtol=1e-6)


@pytest.mark.parametrize("group, rbit, head_dim", CASES[::4])
@pytest.mark.parametrize("planes", [1, 4, 8])
def test_query_planes_quantize_the_summed_projection(randn, group, rbit, head_dim, planes):
    w = randn(KV_HEADS, head_dim, rbit)
    q = randn(3, KV_HEADS * group, head_dim)
    q_planes, q_scales = hj.query_planes(q, w, planes=planes, impl=REF)
    bf.check_query_planes(q_planes, q_scales, q, w, planes)
    *query, k_codes, norms = hj.encode_step(q, randn(3, KV_HEADS, head_dim), w, query_planes=planes, impl=REF)
    np.testing.assert_array_equal(query[0], q_planes)
    np.testing.assert_array_equal(query[1], q_scales)


@pytest.mark.parametrize("group, rbit, head_dim", CASES[1::3])
def test_asymmetric_scores_match_brute_force(rng, randn, group, rbit, head_dim):
    batch, seq = 4, 23
    w = randn(KV_HEADS, head_dim, rbit)
    q_planes, q_scales = hj.query_planes(randn(batch, KV_HEADS * group, head_dim), w, impl=REF)
    k_codes = random_codes(rng, batch, KV_HEADS, seq, rbit // 32)
    norms = random_norms(rng, batch, KV_HEADS, seq)
    lengths = lengths_with_edges(rng, batch, seq)
    scores = hj.hamming_scores(q_planes, k_codes, norms, lengths, score="asymmetric", q_scales=q_scales, impl=REF)
    expected = bf.hamming_scores(q_planes, k_codes, norms, lengths, "asymmetric", q_scales)
    np.testing.assert_allclose(scores, expected, rtol=1e-6, atol=0)
    idx, count = hj.hamming_topk(q_planes, k_codes, norms, lengths, budget=6, score="asymmetric", q_scales=q_scales,
                                 sink=1, recent=2, impl=REF)
    bf.check_selection(idx, count, scores, lengths, 6, sink=1, recent=2)


def test_asymmetric_score_ranks_like_the_query_projection(randn):
    """With 8 planes the asymmetric score is, to within the quantization, `||k|| (sum_i q_i W) . b(k) / rbit`."""
    w = randn(KV_HEADS, 64, 128)
    q, k = randn(2, KV_HEADS * 3, 64), randn(2, KV_HEADS, 50, 64)
    q_planes, q_scales = hj.query_planes(q, w, planes=8, impl=REF)
    codes, norms = hj.encode(k, w, head_axis=1, impl=REF), hj.key_norms(k)
    scores = bf.as_f64(hj.hamming_scores(q_planes, codes, norms, jnp.array([50, 50]), score="asymmetric",
                                         q_scales=q_scales, impl=REF))
    qsum = bf.projections(q, w, -2).reshape(2, KV_HEADS, 3, 128).sum(2)
    signs = np.where(bf.unpack_bits(codes), 1.0, -1.0)
    expected = bf.as_f64(norms) * np.einsum("bhr,bhsr->bhs", qsum, signs) / 128
    bound = bf.as_f64(norms) * bf.as_f64(q_scales)[..., None]  # one scale per coordinate, averaged
    assert np.all(np.abs(scores - expected) <= bound * (1 + 1e-4))
    assert np.corrcoef(scores.ravel(), expected.ravel())[0, 1] > 0.999


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_key_norms_in_float32(randn, dtype):
    k = randn(3, 2, 9, 128, dtype=dtype)
    norms = hj.key_norms(k)
    assert norms.dtype == jnp.float32 and norms.shape == (3, 2, 9)
    np.testing.assert_allclose(norms, bf.key_norms(k), rtol=2e-6)


def test_key_norms_do_not_overflow_in_float16(randn):
    """Squares of fp16 keys above 256 overflow fp16; the norm is computed in float32."""
    k = randn(2, 3, 64, dtype=jnp.float16, scale=400.0)
    norms = hj.key_norms(k)
    assert np.isfinite(norms).all()
    np.testing.assert_allclose(norms, bf.key_norms(k), rtol=2e-6)


@pytest.mark.parametrize("rbit", [32, 128, 256])
def test_pack_bits_matches_brute_force(rng, rbit):
    bits = rng.random((3, 5, rbit)) < 0.5
    packed = hj.pack_bits(jnp.asarray(bits))
    assert packed.dtype == jnp.uint32 and packed.shape == (3, 5, rbit // 32)
    np.testing.assert_array_equal(packed, bf.pack_bits(bits))
    np.testing.assert_array_equal(hj.unpack_bits(packed), bits)
    codes = rng.integers(0, 2**32, size=(4, rbit // 32), dtype=np.uint32)
    np.testing.assert_array_equal(hj.unpack_bits(jnp.asarray(codes)), bf.unpack_bits(codes))
    np.testing.assert_array_equal(hj.pack_bits(hj.unpack_bits(jnp.asarray(codes))), codes)


@pytest.mark.parametrize("group, rbit, head_dim", CASES)
@pytest.mark.parametrize("score", ["key_norm", "hamming"])
def test_hamming_scores_match_brute_force(rng, group, rbit, head_dim, score):
    batch, seq = 4, 23
    q_codes = random_codes(rng, batch, KV_HEADS * group, rbit // 32)
    k_codes = random_codes(rng, batch, KV_HEADS, seq, rbit // 32)
    norms = random_norms(rng, batch, KV_HEADS, seq)
    lengths = lengths_with_edges(rng, batch, seq)
    scores = hj.hamming_scores(q_codes, k_codes, norms, lengths, score=score, impl=REF)
    assert scores.dtype == jnp.float32 and scores.shape == (batch, KV_HEADS, seq)
    expected = bf.hamming_scores(q_codes, k_codes, norms, lengths, score)
    np.testing.assert_allclose(scores, expected, rtol=1e-6, atol=0)  # -inf == -inf past lengths


def test_hamming_scores_of_identical_codes(rng):
    """A key whose code equals every query code of its group scores G * ||k||; the complement -G * ||k||."""
    q_one = np.asarray(random_codes(rng, 4))
    q_codes = jnp.asarray(np.tile(q_one, (1, 6, 1)))  # G = 3 over 2 KV heads
    k_codes = jnp.asarray(np.tile(np.stack([q_one, ~q_one]), (1, 2, 1, 1)))  # [1, 2, 2, 4]
    norms = random_norms(rng, 1, 2, 2)
    scores = hj.hamming_scores(q_codes, k_codes, norms, jnp.array([2]), impl=REF)
    np.testing.assert_allclose(scores[0, :, 0], 3 * norms[0, :, 0], rtol=1e-7)
    np.testing.assert_allclose(scores[0, :, 1], -3 * norms[0, :, 1], rtol=1e-7)
    ham = hj.hamming_scores(q_codes, k_codes, norms, jnp.array([2]), score="hamming", impl=REF)
    np.testing.assert_array_equal(ham[0], [[0, -3 * 128]] * 2)


def random_scores(rng, kind: str, shape):
    """Scores of one kind: continuous, heavily tied small integers, some -inf, or bf16."""
    if kind == "tied":
        return jnp.asarray(rng.integers(0, 3, size=shape).astype(np.float32))
    scores = rng.standard_normal(shape).astype(np.float32)
    if kind == "neg_inf":
        scores[rng.random(shape) < 0.3] = -np.inf
    return jnp.asarray(scores, jnp.bfloat16 if kind == "bf16" else jnp.float32)


@pytest.mark.parametrize("budget, sink, recent", [(1, 0, 0), (5, 0, 0), (8, 2, 3), (8, 0, 8), (13, 4, 0), (29, 1, 1)])
@pytest.mark.parametrize("kind", ["normal", "tied", "neg_inf", "bf16"])
def test_select_topk_is_a_top_set(rng, budget, sink, recent, kind):
    batch, seq = 6, 29
    scores = random_scores(rng, kind, (batch, 3, seq))
    lengths = np.concatenate([[0, 1, budget, seq], rng.integers(0, seq + 1, size=batch - 4)])
    lengths = jnp.asarray(rng.permutation(lengths), jnp.int32)
    idx, count = hj.select_topk(scores, budget, lengths, sink=sink, recent=recent, impl=REF)
    bf.check_selection(idx, count, bf.as_f64(scores), lengths, budget, sink, recent)


def test_select_topk_picks_the_unique_best(rng):
    """With distinct scores the selected set is exactly the numpy top-budget set."""
    scores = jnp.asarray(rng.permutation(np.arange(2 * 3 * 40, dtype=np.float32)).reshape(2, 3, 40))
    lengths = jnp.array([40, 17], jnp.int32)
    idx, count = hj.select_topk(scores, 9, lengths, impl=REF)
    expected = bf.top_positions(scores, lengths, 9)
    for b in range(2):
        for h in range(3):
            assert sorted(np.asarray(idx[b, h, : count[b, h]]).tolist()) == sorted(expected[b][h].tolist())


@pytest.mark.parametrize("group, rbit, head_dim", CASES[1::3])
@pytest.mark.parametrize("score", ["key_norm", "hamming"])
def test_hamming_topk_selects_top_scores(rng, group, rbit, head_dim, score):
    batch, seq, budget = 4, 31, 6
    q_codes = random_codes(rng, batch, KV_HEADS * group, rbit // 32)
    k_codes = random_codes(rng, batch, KV_HEADS, seq, rbit // 32)
    norms = random_norms(rng, batch, KV_HEADS, seq)
    lengths = lengths_with_edges(rng, batch, seq)
    idx, count = hj.hamming_topk(q_codes, k_codes, norms, lengths, budget=budget, score=score,
                                 sink=1, recent=2, impl=REF)
    scores = hj.hamming_scores(q_codes, k_codes, norms, lengths, score=score, impl=REF)
    np.testing.assert_allclose(scores, bf.hamming_scores(q_codes, k_codes, norms, lengths, score), rtol=1e-6)
    bf.check_selection(idx, count, scores, lengths, budget, sink=1, recent=2)


def random_selection(rng, batch: int, kv_heads: int, seq: int, slots: int):
    """(idx, count, positions): distinct positions per row, counts from 0 to `slots`, unused slots
    holding -1 or (ignored) stale valid positions."""
    idx = np.full((batch, kv_heads, slots), -1, np.int32)
    count = rng.integers(0, slots + 1, size=(batch, kv_heads)).astype(np.int32)
    count[0, 0], count[-1, -1] = 0, slots
    positions = [[None] * kv_heads for _ in range(batch)]
    for b in range(batch):
        for h in range(kv_heads):
            perm = rng.permutation(seq)[:slots].astype(np.int32)
            positions[b][h] = perm[: count[b, h]]
            idx[b, h] = perm if (b + h) % 2 else np.where(np.arange(slots) < count[b, h], perm, -1)
    return jnp.asarray(idx), jnp.asarray(count), positions


def assert_attention_close(out, lse, expected_out, expected_lse, dtype, rtol=None):
    tol = rtol or TOLERANCE[dtype]
    assert out.dtype == dtype and lse.dtype == jnp.float32
    np.testing.assert_allclose(bf.as_f64(out), expected_out, rtol=tol, atol=tol)
    np.testing.assert_allclose(lse, expected_lse, rtol=tol, atol=tol)


@pytest.mark.parametrize("group, rbit, head_dim", CASES[::2])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_sparse_decode_attention_matches_numpy(rng, randn, group, rbit, head_dim, dtype):
    batch, seq, slots = 3, 37, 11
    q = randn(batch, KV_HEADS * group, head_dim, dtype=dtype)
    k = randn(batch, KV_HEADS, seq, head_dim, dtype=dtype)
    v = randn(batch, KV_HEADS, seq, head_dim, dtype=dtype)
    idx, count, positions = random_selection(rng, batch, KV_HEADS, seq, slots)
    out, lse = hj.sparse_decode_attention(q, k, v, idx, count, return_lse=True, impl=REF)
    expected_out, expected_lse = bf.attention(q, k, v, positions)
    assert_attention_close(out, lse, expected_out, expected_lse, dtype)
    empty = np.asarray(count) == 0
    heads_empty = np.repeat(empty, group, axis=1)
    assert np.all(np.asarray(out, np.float32)[heads_empty] == 0) and np.all(np.asarray(lse)[heads_empty] == -np.inf)
    np.testing.assert_array_equal(hj.sparse_decode_attention(q, k, v, idx, count, impl=REF), out)


def test_sparse_decode_attention_scale(rng, randn):
    q, k, v = randn(2, 4, 64), randn(2, 2, 19, 64), randn(2, 2, 19, 64)
    idx, count, positions = random_selection(rng, 2, 2, 19, 7)
    out, lse = hj.sparse_decode_attention(q, k, v, idx, count, scale=0.3, return_lse=True, impl=REF)
    expected_out, expected_lse = bf.attention(q, k, v, positions, scale=0.3)
    assert_attention_close(out, lse, expected_out, expected_lse, jnp.float32)


@pytest.mark.parametrize("group, rbit, head_dim", CASES[1::2])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_decode_attention_matches_numpy(rng, randn, group, rbit, head_dim, dtype):
    batch, seq = 4, 33
    q = randn(batch, KV_HEADS * group, head_dim, dtype=dtype)
    k = randn(batch, KV_HEADS, seq, head_dim, dtype=dtype)
    v = randn(batch, KV_HEADS, seq, head_dim, dtype=dtype)
    lengths = lengths_with_edges(rng, batch, seq)
    out, lse = hj.dense_decode_attention(q, k, v, lengths, return_lse=True, impl=REF)
    expected_out, expected_lse = bf.attention(q, k, v, bf.prefix_positions(lengths, KV_HEADS))
    assert_attention_close(out, lse, expected_out, expected_lse, dtype)
    zero = np.asarray(lengths) == 0
    assert np.all(np.asarray(out, np.float32)[zero] == 0) and np.all(np.asarray(lse)[zero] == -np.inf)


def split_into_parts(rng, lengths, kv_heads: int, parts: int):
    """Partition each row's positions [0, length) at random into `parts` (some empty) index sets."""
    batch, slots = len(lengths), int(max(lengths))
    idx = np.full((parts, batch, kv_heads, slots), -1, np.int32)
    count = np.zeros((parts, batch, kv_heads), np.int32)
    for b, n in enumerate(np.asarray(lengths)):
        for h in range(kv_heads):
            owner = rng.integers(0, parts - 1, size=n)  # the last part stays empty
            for p in range(parts):
                mine = np.flatnonzero(owner == p)
                idx[p, b, h, : mine.size] = mine
                count[p, b, h] = mine.size
    return jnp.asarray(idx), jnp.asarray(count)


@pytest.mark.parametrize("group", [1, 3, 4])
def test_combine_of_parts_equals_whole(rng, randn, group):
    batch, seq, parts = 4, 26, 4
    q = randn(batch, KV_HEADS * group, 64)
    k, v = randn(batch, KV_HEADS, seq, 64), randn(batch, KV_HEADS, seq, 64)
    lengths = lengths_with_edges(rng, batch, seq)
    idx, count = split_into_parts(rng, lengths, KV_HEADS, parts)
    pieces = [hj.sparse_decode_attention(q, k, v, idx[p], count[p], return_lse=True, impl=REF) for p in range(parts)]
    outs, lses = jnp.stack([o for o, _ in pieces]), jnp.stack([s for _, s in pieces])
    out, lse = hj.combine(outs, lses)
    whole_out, whole_lse = hj.dense_decode_attention(q, k, v, lengths, return_lse=True, impl=REF)
    np.testing.assert_allclose(out, whole_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, whole_lse, rtol=1e-5, atol=1e-5)
    out_axis1, lse_axis1 = hj.combine(jnp.moveaxis(outs, 0, 1), jnp.moveaxis(lses, 0, 1), axis=-2)
    np.testing.assert_allclose(out_axis1, out, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(lse_axis1, lse, rtol=1e-6, atol=1e-6)


def test_combine_with_empty_parts(randn):
    """Empty parts (lse -inf) get no weight whatever their output; all-empty gives out 0, lse -inf."""
    outs = randn(3, 2, 4, 64)
    lses = jnp.full((3, 2, 4), -jnp.inf).at[1, 0, 2].set(1.5)
    out, lse = hj.combine(outs, lses)
    assert out.dtype == jnp.float32 and lse.dtype == jnp.float32
    expected_lse = np.full((2, 4), -np.inf)
    expected_lse[0, 2] = 1.5
    expected_out = np.zeros((2, 4, 64), np.float32)
    expected_out[0, 2] = outs[1, 0, 2]
    np.testing.assert_allclose(lse, expected_lse, rtol=1e-7)
    np.testing.assert_allclose(out, expected_out, rtol=1e-6, atol=0)


def prefilled_cache(randn, lengths, capacity: int, shape, rbit: int, dtype=jnp.float32):
    """A cache of `capacity` filled to ragged `lengths` (prompt padded to max(lengths)) and its w."""
    batch, kv_heads, head_dim = shape
    w = randn(kv_heads, head_dim, rbit)
    prompt = int(max(lengths))
    cache = hj.HataCache.init(batch, kv_heads, capacity, head_dim, rbit=rbit, dtype=dtype)
    k, v = randn(batch, kv_heads, prompt, head_dim), randn(batch, kv_heads, prompt, head_dim)
    return cache.prefill(k, v, w, jnp.asarray(lengths, jnp.int32), impl=REF), w


@pytest.mark.parametrize("group, rbit, head_dim", DECODE_CASES)
def test_hata_decode_with_full_budget_equals_dense(rng, randn, group, rbit, head_dim):
    batch, capacity = 3, 21
    lengths = rng.permutation([0, 9, capacity - 3])
    cache, w = prefilled_cache(randn, lengths, capacity, (batch, KV_HEADS, head_dim), rbit)
    q = randn(batch, KV_HEADS * group, head_dim)
    k_new, v_new = randn(batch, KV_HEADS, head_dim), randn(batch, KV_HEADS, head_dim)
    config = hj.HataConfig(rbit=rbit, budget=capacity if group == 1 else int(max(lengths)) + 1)
    out, new_cache = hj.hata_decode_attention(q, k_new, v_new, cache, w, config, impl=REF)
    np.testing.assert_array_equal(new_cache.lengths, lengths + 1)
    expected_cache = cache.append(k_new, v_new, w, impl=REF)
    for name in ("k", "v", "codes", "norms", "overflow"):
        np.testing.assert_array_equal(getattr(new_cache, name), getattr(expected_cache, name))
    dense = hj.dense_decode_attention(q, new_cache.k, new_cache.v, new_cache.lengths, impl=REF)
    np.testing.assert_allclose(out, dense, rtol=1e-5, atol=1e-5)
    expected, _ = bf.attention(q, new_cache.k, new_cache.v, bf.prefix_positions(lengths + 1, KV_HEADS))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_hata_decode_bf16_cache_equals_dense(rng, randn):
    lengths = np.array([5, 16, 11])
    cache, w = prefilled_cache(randn, lengths, 17, (3, 2, 64), 128, dtype=jnp.bfloat16)
    q = randn(3, 6, 64, dtype=jnp.bfloat16)
    k_new, v_new = randn(3, 2, 64, dtype=jnp.bfloat16), randn(3, 2, 64, dtype=jnp.bfloat16)
    out, new_cache = hj.hata_decode_attention(q, k_new, v_new, cache, w, hj.HataConfig(budget=17), impl=REF)
    assert out.dtype == jnp.bfloat16
    expected, _ = bf.attention(q, new_cache.k, new_cache.v, bf.prefix_positions(lengths + 1, 2))
    np.testing.assert_allclose(bf.as_f64(out), expected, rtol=2e-2, atol=2e-2)


def forced_positions(length: int, sink: int, recent: int) -> np.ndarray:
    return np.union1d(np.arange(min(sink, length)), np.arange(max(length - recent, 0), length)).astype(np.int64)


def expected_selection(scores, lengths, budget: int, sink: int, recent: int):
    """positions[b][h] = forced ∪ the best other valid positions, or None when a tie at the
    cut makes the set ambiguous."""
    out = []
    for b, n in enumerate(lengths):
        rows = []
        for h in range(scores.shape[1]):
            forced = forced_positions(int(n), sink, recent)
            others = np.setdiff1d(np.arange(n), forced)
            ranked = others[np.argsort(-scores[b, h, others], kind="stable")]
            take = min(int(n), budget) - forced.size
            cut = scores[b, h, ranked]
            if 0 < take < ranked.size and cut[take - 1] - cut[take] <= 1e-5 * np.abs(cut).max():
                return None
            rows.append(np.concatenate([forced, ranked[:take]]))
        out.append(rows)
    return out


@pytest.mark.parametrize("group, rbit, head_dim", DECODE_CASES)
@pytest.mark.parametrize("sink, recent, score", [(0, 0, "key_norm"), (1, 2, "key_norm"), (1, 2, "asymmetric")])
def test_hata_decode_with_small_budget_attends_to_top_scores(rng, randn, group, rbit, head_dim, sink, recent, score):
    """budget < length: the output is attention over exactly the numpy top-budget set."""
    batch, capacity = 3, 40
    lengths = rng.permutation([6, 30, capacity - 1])
    cache, w = prefilled_cache(randn, lengths, capacity, (batch, KV_HEADS, head_dim), rbit)
    q = randn(batch, KV_HEADS * group, head_dim)
    k_new, v_new = randn(batch, KV_HEADS, head_dim), randn(batch, KV_HEADS, head_dim)
    appended = cache.append(k_new, v_new, w, impl=REF)
    if score == "asymmetric":
        q_planes, q_scales = hj.query_planes(q, w, impl=REF)
        bf.check_query_planes(q_planes, q_scales, q, w, hj.QUERY_PLANES)
        scores = bf.hamming_scores(q_planes, appended.codes, appended.norms, lengths + 1, score, q_scales)
    else:
        scores = bf.hamming_scores(hj.encode(q, w, impl=REF), appended.codes, appended.norms, lengths + 1)
    # Scores are norm x (small integer); pick the largest budget whose cut is untied in every row.
    for budget in range(12, sink + recent, -1):
        selection = expected_selection(scores, lengths + 1, budget, sink, recent)
        if selection is not None:
            break
    assert selection is not None and budget < max(lengths)
    config = hj.HataConfig(rbit=rbit, budget=budget, sink=sink, recent=recent, score=score)
    out, new_cache = hj.hata_decode_attention(q, k_new, v_new, cache, w, config, impl=REF)
    np.testing.assert_array_equal(new_cache.codes, appended.codes)
    expected, _ = bf.attention(q, new_cache.k, new_cache.v, selection)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_dispatch_reference_and_trace_log(randn):
    assert hj.default_impl() == "reference"  # this suite runs on the CPU
    w, x = randn(2, 64, 32), randn(3, 2, 64)
    before_ref = hj.TRACE_LOG[("encode", "reference")]
    np.testing.assert_array_equal(hj.encode(x, w, impl="auto"), hj.encode(x, w, impl=REF))
    assert hj.TRACE_LOG[("encode", "reference")] == before_ref + 2


# ---- property tests ---------------------------------------------------------------------------
# Each example has new shapes; one jit compile per shape is much cheaper than op-by-op dispatch.
select_topk_jit = jax.jit(functools.partial(hj.select_topk, impl=REF), static_argnames=("budget", "sink", "recent"))
pack_bits_jit, unpack_bits_jit = jax.jit(hj.pack_bits), jax.jit(hj.unpack_bits)
encode_jit = jax.jit(functools.partial(hj.encode, impl=REF))

@st.composite
def selection_problems(draw):
    batch, heads = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    seq = draw(st.integers(1, 24))
    budget = draw(st.integers(1, seq))
    sink = draw(st.integers(0, budget))
    recent = draw(st.integers(0, budget - sink))
    lengths = draw(hnp.arrays(np.int32, (batch,), elements=st.integers(0, seq)))
    levels = draw(st.sampled_from([2, 5, 1000]))
    scores = draw(hnp.arrays(np.float32, (batch, heads, seq), elements=st.integers(0, levels - 1).map(float)))
    return scores, lengths, budget, sink, recent


@settings(max_examples=25, deadline=None)
@given(selection_problems())
def test_select_topk_properties(problem):
    scores, lengths, budget, sink, recent = problem
    idx, count = select_topk_jit(jnp.asarray(scores), budget, jnp.asarray(lengths), sink=sink, recent=recent)
    bf.check_selection(idx, count, scores, lengths, budget, sink, recent)


@settings(max_examples=25, deadline=None)
@given(
    lead=hnp.array_shapes(min_dims=0, max_dims=2, max_side=4),
    words=st.integers(1, 8),
    seed=st.integers(0, 2**32 - 1),
)
def test_pack_unpack_round_trip(lead, words, seed):
    codes = np.random.default_rng(seed).integers(0, 2**32, size=lead + (words,), dtype=np.uint32)
    bits = unpack_bits_jit(jnp.asarray(codes))
    assert bits.dtype == jnp.bool_ and bits.shape == lead + (32 * words,)
    np.testing.assert_array_equal(bits, bf.unpack_bits(codes))
    np.testing.assert_array_equal(pack_bits_jit(bits), codes)


@settings(max_examples=25, deadline=None)
@given(
    kv_heads=st.integers(1, 3), group=st.sampled_from([1, 3, 4]), tokens=st.integers(1, 5),
    head_dim=st.sampled_from([16, 64]), words=st.integers(1, 8), seed=st.integers(0, 2**32 - 1),
)
def test_encode_bits_are_signs(kv_heads, group, tokens, head_dim, words, seed):
    """Small-integer inputs make every projection exact (zeros included): encode is bit-exact,
    and unpacking its codes gives back the signs."""
    rng = np.random.default_rng(seed)
    w = rng.integers(-2, 3, size=(kv_heads, head_dim, 32 * words)).astype(np.float32)
    x = rng.integers(-2, 3, size=(tokens, kv_heads * group, head_dim)).astype(np.float32)
    codes = encode_jit(jnp.asarray(x), jnp.asarray(w))
    expected, proj = bf.encode(x, w, -2)
    np.testing.assert_array_equal(codes, expected)
    np.testing.assert_array_equal(unpack_bits_jit(codes), proj > 0)
