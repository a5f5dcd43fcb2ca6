"""Pallas Hamming scoring and radix top-k selection (interpret mode on the CPU) against the references.

Scores must match `_scores_reference` bit for bit. Selections are checked as sets (ties are
arbitrary): count, distinct valid positions, forced positions in, every other selected score >=
every unselected valid score (in the reference's nan_to_num order), UNUSED after count; the
kernel also promises ascending positions, which is checked too. Small tilings (`chunk` 64-256)
give several programs per row, with S not a multiple of the chunk.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hata_jax
from hata_jax.scoring import _scores_reference
from pallas_kernels import hamming_topk, radix_select
from pallas_kernels._backend import lower_for_cuda
from pallas_kernels.radix_select import Tiling

import brute_force as bf

SMALL = Tiling(chunk=128, block=32)
BIG = float(np.finfo(np.float32).max)

# Jitted once per static configuration: interpret-mode compiles dominate this file's time.
kernel_scores = jax.jit(hamming_topk.hamming_scores, static_argnames=("score", "interpret", "tiling"))
kernel_select = jax.jit(hamming_topk.select_topk, static_argnums=1,
                        static_argnames=("sink", "recent", "interpret", "tiling"))
kernel_topk = jax.jit(hamming_topk.hamming_topk,
                      static_argnames=("budget", "score", "sink", "recent", "interpret", "tiling"))


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


def ordered(scores):
    """float64 scores in the reference's selection order (nan_to_num), so set checks hold."""
    return np.nan_to_num(np.asarray(scores, np.float64), nan=-BIG, posinf=BIG, neginf=-BIG)


def check_selection(idx, count, scores, lengths, budget, sink=0, recent=0):
    bf.check_selection(idx, count, ordered(scores), lengths, budget, sink, recent)
    idx, count = np.asarray(idx), np.asarray(count)
    for b, h in np.ndindex(*count.shape):
        assert np.all(np.diff(idx[b, h, : count[b, h]]) > 0), f"row {(b, h)} not in ascending order"


def bits(x):
    return np.asarray(x, np.float32).view(np.uint32)


SCORE_CASES = [
    # score, group, rbit, batch, seq, tiling
    ("key_norm", 1, 32, 2, 300, SMALL),
    ("key_norm", 3, 96, 2, 1000, Tiling(chunk=256, block=64)),
    ("hamming", 4, 128, 3, 300, SMALL),
    ("key_norm", 8, 256, 2, 200, Tiling(chunk=64, block=32)),
    ("key_norm", 4, 128, 2, 700, None),
]


@pytest.mark.parametrize("score, group, rbit, batch, seq, tiling", SCORE_CASES)
def test_hamming_scores_bit_exact(rng, ragged_lengths, score, group, rbit, batch, seq, tiling):
    kv_heads = 2
    q, k, norms = random_codes(rng, batch, kv_heads, group, seq, rbit)
    lengths = ragged_lengths(batch, 0, seq).at[0].set(seq)
    got = kernel_scores(q, k, norms, lengths, score=score, interpret=True, tiling=tiling)
    want = _scores_reference(q, k, norms, lengths, score)
    assert got.shape == want.shape and got.dtype == jnp.float32
    np.testing.assert_array_equal(bits(got), bits(want))
    np.testing.assert_allclose(want, bf.hamming_scores(q, k, norms, lengths, score), rtol=1e-6, atol=1e-5)


def select(scores, budget, lengths, sink=0, recent=0, tiling=SMALL):
    return kernel_select(
        jnp.asarray(scores, jnp.float32), budget, jnp.asarray(lengths, jnp.int32),
        sink=sink, recent=recent, interpret=True, tiling=tiling,
    )


def special_values(rng, shape):
    """Normal scores sprinkled with -inf, +inf, NaN, +-max, +-0, denormals and huge outliers."""
    scores = rng.standard_normal(shape).astype(np.float32)
    specials = np.array([-np.inf, np.inf, np.nan, -np.nan, BIG, -BIG, 0.0, -0.0, 1e-40, -1e-40, 1e30, -1e30],
                        np.float32)
    where = rng.random(shape) < 0.25
    scores[where] = rng.choice(specials, size=where.sum())
    return scores


def near_threshold(rng, shape):
    """Scores sharing their top 24 key bits (1 + a few ulps), so all four digit passes matter."""
    base = np.float32(1.0).view(np.uint32)
    return (base + rng.integers(0, 200, size=shape).astype(np.uint32)).view(np.float32)


SCORE_KINDS = {
    "normal": lambda rng, shape: rng.standard_normal(shape).astype(np.float32),
    "tied": lambda rng, shape: rng.integers(0, 5, size=shape).astype(np.float32),
    "equal": lambda rng, shape: np.full(shape, 1.5, np.float32),
    "special": special_values,
    "near_threshold": near_threshold,
    "outliers": lambda rng, shape: rng.standard_normal(shape).astype(np.float32)
    * np.where(rng.random(shape) < 0.01, 1e6, 1e-3).astype(np.float32),
}


@pytest.mark.parametrize("kind", sorted(SCORE_KINDS))
def test_select_topk_is_a_top_set(rng, kind):
    """batch 3 with ragged lengths (one row shorter than the budget), S not a multiple of the chunk."""
    batch, kv_heads, seq, budget = 3, 2, 1000, 100
    scores = SCORE_KINDS[kind](rng, (batch, kv_heads, seq))
    lengths = np.array([seq, int(rng.integers(budget + 1, seq)), int(rng.integers(1, budget))])
    idx, count = select(scores, budget, lengths, sink=3, recent=5)
    check_selection(idx, count, scores, lengths, budget, sink=3, recent=5)


@pytest.mark.parametrize(
    "seq, budget, lengths, sink, recent",
    [
        (300, 16, [0, 300], 0, 0),  # an empty row; 3 chunks (one padded) per row
        (300, 64, [64, 63], 0, 0),  # length == budget, length < budget
        (300, 64, [65, 5], 8, 8),  # one more than the budget; sink + recent > length
        (2500, 100, [2500, 1777], 40, 60),  # sink + recent == budget
        (40, 40, [40, 39], 1, 2),  # budget == S, one block
    ],
)
def test_select_topk_edge_cases(rng, seq, budget, lengths, sink, recent):
    scores = rng.standard_normal((len(lengths), 2, seq)).astype(np.float32)
    idx, count = select(scores, budget, lengths, sink=sink, recent=recent)
    check_selection(idx, count, scores, lengths, budget, sink, recent)


def test_select_topk_matches_reference_without_ties(rng):
    """Distinct scores have one right answer: the reference's set, in ascending order."""
    batch, kv_heads, seq, budget = 2, 3, 1000, 64
    scores = rng.permutation(batch * kv_heads * seq).reshape(batch, kv_heads, seq).astype(np.float32) - 3000.0
    lengths = jnp.array([seq, 611], jnp.int32)
    idx, count = select(scores, budget, lengths, sink=2, recent=3, tiling=Tiling(chunk=256, block=64))
    ref_idx, ref_count = hata_jax.select_topk(jnp.asarray(scores), budget, lengths, sink=2, recent=3, impl="reference")
    np.testing.assert_array_equal(count, ref_count)
    np.testing.assert_array_equal(idx, np.sort(np.asarray(ref_idx), axis=-1))


def test_select_topk_ties_take_the_first_positions(rng):
    """All-equal scores: the first `budget` positions, the same on every call."""
    scores = np.full((1, 2, 700), -2.25, np.float32)
    idx, count = select(scores, 50, [700])
    np.testing.assert_array_equal(idx, np.broadcast_to(np.arange(50, dtype=np.int32), (1, 2, 50)))
    np.testing.assert_array_equal(count, [[50, 50]])


@pytest.mark.parametrize(
    "score, group, rbit, batch, seq, budget, tiling",
    [
        ("key_norm", 4, 128, 2, 1000, 64, SMALL),
        ("hamming", 3, 96, 3, 300, 16, Tiling(chunk=64, block=32)),
        ("key_norm", 1, 256, 1, 2500, 100, None),
    ],
)
def test_hamming_topk_equals_select_of_reference_scores(rng, ragged_lengths, score, group, rbit, batch, seq,
                                                         budget, tiling):
    """The fused pipeline sees the same scores (bit for bit), so it picks exactly what
    select_topk picks on the reference scores; and that is a top set of those scores."""
    q, k, norms = random_codes(rng, batch, 2, group, seq, rbit)
    lengths = ragged_lengths(batch, 1, seq).at[0].set(seq)
    idx, count = kernel_topk(q, k, norms, lengths, budget=budget, score=score, sink=1, recent=2, interpret=True,
                             tiling=tiling)
    scores = _scores_reference(q, k, norms, lengths, score)
    want_idx, want_count = kernel_select(scores, budget, lengths, sink=1, recent=2, interpret=True, tiling=tiling)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_array_equal(count, want_count)
    check_selection(idx, count, scores, lengths, budget, sink=1, recent=2)


def test_public_api_dispatches_to_the_kernels(rng):
    """impl="pallas" runs these kernels (interpreted here): scores bit-exact, a top set, and the
    fused path equal to scoring then selecting."""
    q, k, norms = random_codes(rng, 2, 2, 2, 300, 64)
    lengths = jnp.array([300, 123], jnp.int32)
    before = dict(hata_jax.TRACE_LOG)
    scores = hata_jax.hamming_scores(q, k, norms, lengths, impl="pallas")
    np.testing.assert_array_equal(bits(scores), bits(_scores_reference(q, k, norms, lengths, "key_norm")))
    idx, count = hata_jax.select_topk(scores, 32, lengths, sink=1, impl="pallas")
    check_selection(idx, count, scores, lengths, 32, sink=1)
    fused = hata_jax.hamming_topk(q, k, norms, lengths, budget=32, sink=1, impl="pallas")
    np.testing.assert_array_equal(fused[0], idx)
    np.testing.assert_array_equal(fused[1], count)
    for op in ("hamming_scores", "select_topk", "hamming_topk"):
        assert hata_jax.TRACE_LOG[(op, "pallas-interpret")] == before.get((op, "pallas-interpret"), 0) + 1


@pytest.mark.parametrize(
    "batch, kv_heads, group, rbit, seq, budget",
    [
        (1, 8, 4, 128, 131072, 2048),
        (2, 2, 3, 96, 5000, 100),
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
    assert "hata_select_pass0" in text and "hata_select_compact" in text
    text = lower_for_cuda(hamming_topk.hamming_topk, q, k, norms, lengths, budget=budget, score="hamming")
    assert "hata_hamming_select_pass0" in text and "hata_select_pass3" in text


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


@pytest.mark.parametrize("chunk, block", [(96, 32), (128, 256), (64, 16)])
def test_tiling_is_checked(chunk, block):
    with pytest.raises(ValueError, match="Tiling"):
        Tiling(chunk=chunk, block=block)
