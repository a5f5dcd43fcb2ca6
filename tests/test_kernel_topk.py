"""Pallas Hamming scoring and the one-launch top-k selection (interpret mode on the CPU) against
the references.

Scores must match `scores_reference` bit for bit. Selections are checked two ways: as sets
against an independent brute force (count, distinct valid positions, forced positions in, every
other selected score >= every unselected one) and slot for slot against the kernels' documented
answer, `exact_slots`: the reference selection (`select_reference`, `lax.top_k` on order keys:
NaN lowest, ties to the lowest positions) with the positions in ascending order. Every case
runs with a fresh state (no hint: every valid key is a candidate) and then carrying the state
from call to call (the hint path), on new scores each call; a hint far above every key takes
the re-score path. Small tilings give several programs per row, with S not a multiple of the
chunk.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hata_jax
from hata_jax.scoring import scores_reference
from hata_jax.selection import select_reference
from pallas_kernels import hamming_topk, topk_select
from pallas_kernels._backend import lower_for_cuda
from pallas_kernels.topk_select import Tiling

import brute_force as bf

SMALL = Tiling(chunk=128, block=32)
BIG = float(np.finfo(np.float32).max)

# Jitted once per static configuration: interpret-mode compiles dominate this file's time.
kernel_scores = jax.jit(hamming_topk.hamming_scores, static_argnames=("score", "interpret", "tiling"))
kernel_select = jax.jit(topk_select.select_topk, static_argnums=1, static_argnames=("sink", "recent", "interpret",
                                                                                   "tiling"))
kernel_topk = jax.jit(hamming_topk.hamming_topk, static_argnames=("budget", "score", "sink", "recent", "interpret",
                                                                  "tiling"))


def exact_slots(scores, lengths, budget, sink=0, recent=0):
    """The kernels' answer: the reference's positions per row in ascending order, then -1."""
    idx, count = select_reference(jnp.asarray(scores, jnp.float32), budget, jnp.asarray(lengths), sink, recent)
    idx, count = np.asarray(idx), np.asarray(count)
    out = np.full(idx.shape, -1, np.int32)
    for b, h in np.ndindex(*count.shape):
        out[b, h, : count[b, h]] = np.sort(idx[b, h, : count[b, h]])
    return out


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


def check_selection(idx, count, scores, lengths, budget, sink=0, recent=0):
    ordered = np.nan_to_num(np.asarray(scores, np.float64), nan=-BIG, posinf=BIG, neginf=-BIG)
    no_nan = not np.isnan(np.asarray(scores)).any()  # the brute force ranks NaN as -max, the kernels lowest
    if no_nan:
        bf.check_selection(idx, count, ordered, lengths, budget, sink, recent)
    np.testing.assert_array_equal(idx, exact_slots(scores, lengths, budget, sink, recent))


def check_state_reset(state):
    assert not np.asarray(state.tickets).any(), "tickets not reset to zero"
    assert not np.asarray(state.hist).any(), "histogram not reset to zero"


def bits(x):
    return np.asarray(x, np.float32).view(np.uint32)


SCORE_CASES = [
    # score, group, rbit, batch, seq, tiling
    ("key_norm", 1, 32, 2, 300, SMALL),
    ("key_norm", 3, 96, 2, 1000, Tiling(chunk=256, block=64)),
    ("hamming", 4, 128, 3, 300, SMALL),
    ("key_norm", 8, 256, 2, 200, Tiling(chunk=64, block=32)),
]


@pytest.mark.parametrize("score, group, rbit, batch, seq, tiling", SCORE_CASES)
def test_hamming_scores_bit_exact(rng, ragged_lengths, score, group, rbit, batch, seq, tiling):
    kv_heads = 2
    q, k, norms = random_codes(rng, batch, kv_heads, group, seq, rbit)
    lengths = ragged_lengths(batch, 0, seq).at[0].set(seq)
    got = kernel_scores(q, k, norms, lengths, score=score, interpret=True, tiling=tiling)
    want = scores_reference(q, k, norms, lengths, score)
    assert got.shape == want.shape and got.dtype == jnp.float32
    np.testing.assert_array_equal(bits(got), bits(want))
    np.testing.assert_allclose(want, bf.hamming_scores(q, k, norms, lengths, score), rtol=1e-6, atol=1e-5)


def special_values(rng, shape):
    """Normal scores sprinkled with -inf, +inf, NaN, +-max, +-0, denormals and huge outliers."""
    scores = rng.standard_normal(shape).astype(np.float32)
    specials = np.array([-np.inf, np.inf, np.nan, BIG, -BIG, 0.0, -0.0, 1e-40, -1e-40, 1e30, -1e30], np.float32)
    where = rng.random(shape) < 0.25
    scores[where] = rng.choice(specials, size=where.sum())
    return scores


SCORE_KINDS = {
    "normal": lambda rng, shape: rng.standard_normal(shape).astype(np.float32),
    "tied": lambda rng, shape: rng.integers(0, 5, size=shape).astype(np.float32),
    "equal": lambda rng, shape: np.full(shape, 1.5, np.float32),
    "special": special_values,
    "near_threshold": lambda rng, shape: (np.float32(1.0).view(np.uint32)
                                          + rng.integers(0, 200, size=shape).astype(np.uint32)).view(np.float32),
    "outliers": lambda rng, shape: rng.standard_normal(shape).astype(np.float32)
    * np.where(rng.random(shape) < 0.01, 1e6, 1e-3).astype(np.float32),
    "clustered": lambda rng, shape: (rng.standard_normal(shape)
                                     + 4.0 * (np.arange(shape[-1]) > shape[-1] - 150)).astype(np.float32),
}
# The shared configuration of the selection tests below (one compile): batch 3, S = 1000 (not
# a multiple of the 128-position chunk), budget 100, 3 sink and 5 recent positions.
SHAPE, BUDGET, SINK, RECENT = (3, 2, 1000), 100, 3, 5


def run_select(scores, lengths, state, budget=BUDGET, sink=SINK, recent=RECENT, tiling=SMALL):
    idx, count, state = kernel_select(jnp.asarray(scores), budget, jnp.asarray(lengths), sink=sink, recent=recent,
                                      state=state, interpret=True, tiling=tiling)
    check_selection(idx, count, scores, lengths, budget, sink, recent)
    check_state_reset(state)
    return state


@pytest.mark.parametrize("kind", sorted(SCORE_KINDS))
def test_select_topk_exact_with_fresh_and_carried_state(rng, kind):
    """A fresh state, then three calls on new scores carrying the state (the hint path), then a
    hint far above every key (the re-score path): the exact answer every time."""
    lengths = np.array([1000, 997, 450], np.int32)
    state = topk_select.init_state(3, 2)
    for _ in range(4):
        state = run_select(SCORE_KINDS[kind](rng, SHAPE), lengths, state)
    assert (np.asarray(state.hint)[..., 0] > topk_select.INT32_MIN).any() or kind == "equal"
    too_high = state._replace(hint=state.hint.at[..., 0].set(topk_select.INT32_MAX - 1).at[..., 1].set(0))
    run_select(SCORE_KINDS[kind](rng, SHAPE), lengths, too_high)


def test_hint_converges_to_about_twice_the_budget(rng):
    """On scores of one distribution the carried hint keeps ~2 x budget candidates: between k
    and 8 k keys lie at or above it after a few calls."""
    lengths = np.array([1000, 1000, 1000], np.int32)
    state = topk_select.init_state(3, 2)
    for _ in range(4):
        scores = rng.standard_normal(SHAPE).astype(np.float32)
        state = run_select(scores, lengths, state)
    scores = rng.standard_normal(SHAPE).astype(np.float32)
    keys = np.asarray(topk_select.order_keys(jnp.asarray(scores), jnp.arange(1000), 1000, sink=SINK, recent=RECENT))
    at_least = (keys >= np.asarray(state.hint)[..., :1]).sum(-1)
    assert ((at_least >= BUDGET) & (at_least <= 8 * BUDGET)).all(), at_least


@pytest.mark.parametrize(
    "lengths, budget",
    [
        ([1000, 100, 0], BUDGET),  # a row of exactly budget tokens, an empty row
        ([57, 99, 1], BUDGET),  # every row fits the budget: all selected
        ([1000, 1000, 1000], 1000),  # budget = capacity
        ([1000, 640, 129], 1),  # one token
    ],
)
def test_select_topk_edge_cases(rng, lengths, budget):
    scores = rng.standard_normal(SHAPE).astype(np.float32)
    state = topk_select.init_state(3, 2)
    for _ in range(2):
        state = run_select(scores, np.asarray(lengths, np.int32), state, budget=budget, sink=0, recent=0)


@pytest.mark.parametrize(
    "score, group, rbit, batch, seq, budget, tiling",
    [
        ("key_norm", 4, 128, 2, 1000, 64, SMALL),
        ("hamming", 3, 96, 3, 300, 16, Tiling(chunk=64, block=32)),  # integer scores: many ties
        ("key_norm", 1, 256, 1, 2500, 100, None),
    ],
)
def test_hamming_topk_selects_the_exact_set(rng, ragged_lengths, score, group, rbit, batch, seq, budget, tiling):
    """The fused scoring + selection computes the reference's scores bit for bit, so it selects
    exactly the expected set of those scores, with a fresh and with a carried state."""
    lengths = ragged_lengths(batch, 1, seq).at[0].set(seq)
    state = topk_select.init_state(batch, 2)
    for _ in range(2):
        q, k, norms = random_codes(rng, batch, 2, group, seq, rbit)
        idx, count, state = kernel_topk(q, k, norms, lengths, budget=budget, score=score, sink=1, recent=2,
                                        state=state, interpret=True, tiling=tiling)
        check_selection(idx, count, scores_reference(q, k, norms, lengths, score), lengths, budget, sink=1, recent=2)
        check_state_reset(state)


@pytest.mark.slow
def test_llama_shape(rng):
    """The Llama-3.1-8B decode shape (8 KV heads, G = 4, rbit 128, 128K tokens, budget 2048) with
    the default tiling: the exact set, fresh and carried."""
    seq, budget = 131072, 2048
    lengths = jnp.array([seq], jnp.int32)
    state = topk_select.init_state(1, 8)
    for _ in range(2):
        q, k, norms = random_codes(rng, 1, 8, 4, seq, 128)
        idx, count, state = kernel_topk(q, k, norms, lengths, budget=budget, state=state, interpret=True)
        check_selection(idx, count, scores_reference(q, k, norms, lengths, "key_norm"), lengths, budget)


def test_public_api_dispatches_to_the_kernels(rng):
    """impl="pallas" runs these kernels (interpreted here): scores bit-exact, the exact set, the
    fused path equal to scoring then selecting, and a state in -> a state out."""
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
    idx2, _, state = hata_jax.select_topk(scores, 32, lengths, sink=1, state=topk_select.init_state(2, 2),
                                          impl="pallas")
    np.testing.assert_array_equal(idx2, idx)
    assert isinstance(state, topk_select.SelectState)
    for op in ("hamming_scores", "select_topk", "hamming_topk"):
        assert hata_jax.TRACE_LOG[(op, "pallas-interpret")] >= before.get((op, "pallas-interpret"), 0) + 1


def step_inputs(rng, batch, group, kv_heads=2, seq=300, head_dim=64, rbit=64, dtype=jnp.bfloat16):
    w = jnp.asarray(rng.standard_normal((kv_heads, head_dim, rbit)), jnp.float32)
    shape = (batch, kv_heads, seq, head_dim)
    cache = hata_jax.HataCache.init(batch, kv_heads, seq, head_dim, rbit=rbit, dtype=dtype)
    lengths = jnp.asarray(rng.integers(1, seq - 10, batch), jnp.int32)
    cache = cache.prefill(jnp.asarray(rng.standard_normal(shape), dtype), jnp.asarray(rng.standard_normal(shape), dtype),
                          w, lengths, impl="reference")

    def new(*trail):
        return jnp.asarray(rng.standard_normal((batch, *trail, head_dim)), dtype)

    return w, cache, lambda: (new(kv_heads * group), new(kv_heads), new(kv_heads))


@pytest.mark.parametrize("group, batch", [(1, 1), (4, 3)])
def test_fused_step_appends_and_selects_like_the_reference(rng, group, batch):
    """hata_step_select (encode + append + score + select in one launch): the appended cache
    equals the reference append, and the selection is the exact set of the appended cache."""
    budget = 40
    w, cache, draw = step_inputs(rng, batch, group)
    state = cache.select_state
    step = jax.jit(functools.partial(hamming_topk.hata_step_select, budget=budget, sink=2, recent=3, interpret=True,
                                     tiling=Tiling(chunk=64, block=32)))
    for _ in range(3):
        q, k_new, v_new = draw()
        q_codes, k_codes, k_norms = hata_jax.encode_step(q, k_new, w, impl="reference")
        want = cache.append_encoded(k_new, v_new, k_codes, k_norms)
        idx, count, arrays, state = step(q, k_new, v_new, w, cache.k, cache.v, cache.codes, cache.norms,
                                         cache.lengths, cache.overflow, state)
        for name, got in zip(("k", "v", "codes", "norms", "lengths", "overflow"), arrays):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(getattr(want, name)), err_msg=name)
        scores = scores_reference(q_codes, want.codes, want.norms, want.lengths, "key_norm")
        check_selection(idx, count, scores, want.lengths, budget, sink=2, recent=3)
        check_state_reset(state)
        cache = want


def test_fused_step_never_writes_outside_the_cache(rng):
    """A full cache or a negative length: the write is dropped, the overflow flag set, lengths
    stay in [0, capacity], nothing else of the cache changes."""
    w, cache, draw = step_inputs(rng, 3, 2, seq=64)
    cache = cache.__class__(**{**vars(cache), "lengths": jnp.array([64, -3, 10], jnp.int32)})
    q, k_new, v_new = draw()
    _, _, (k, v, codes, norms, lengths, overflow), _ = hamming_topk.hata_step_select(
        q, k_new, v_new, w, cache.k, cache.v, cache.codes, cache.norms, cache.lengths, cache.overflow,
        cache.select_state, budget=8, interpret=True)
    np.testing.assert_array_equal(lengths, [64, 0, 11])
    np.testing.assert_array_equal(overflow, [True, True, False])
    for got, before in ((k, cache.k), (v, cache.v), (codes, cache.codes), (norms, cache.norms)):
        np.testing.assert_array_equal(np.asarray(got)[:2], np.asarray(before)[:2])


@pytest.mark.parametrize(
    "batch, kv_heads, group, rbit, seq, budget",
    [(1, 8, 4, 128, 131072, 2048), (2, 2, 3, 96, 5000, 100), (1, 2, 8, 256, topk_select.MAX_SEQ, topk_select.MAX_BUDGET)],
)
def test_lowers_for_cuda(batch, kv_heads, group, rbit, seq, budget):
    """Every kernel passes the Triton lowering and MLIR verifier for CUDA, each one launch."""
    words = rbit // 32
    q = jax.ShapeDtypeStruct((batch, kv_heads * group, words), jnp.uint32)
    k = jax.ShapeDtypeStruct((batch, kv_heads, seq, words), jnp.uint32)
    norms = jax.ShapeDtypeStruct((batch, kv_heads, seq), jnp.float32)
    lengths = jax.ShapeDtypeStruct((batch,), jnp.int32)
    text = lower_for_cuda(hamming_topk.hamming_scores, q, k, norms, lengths, score="key_norm")
    assert text.count("hata_hamming_scores") >= 1
    text = lower_for_cuda(lambda s, n: topk_select.select_topk(s, budget, n, sink=4, recent=4), norms, lengths)
    assert "hata_select" in text
    text = lower_for_cuda(lambda *a: hamming_topk.hamming_topk(*a, budget=budget, score="hamming"), q, k, norms, lengths)
    assert "hata_hamming_topk" in text


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(rbit=288), "rbit"),
        (dict(group=16), "group size"),
        (dict(seq=topk_select.MAX_SEQ + 1), "sequence capacity"),
        (dict(budget=topk_select.MAX_BUDGET + 1), "budget"),
        (dict(codes_dtype=jnp.int32), "k_codes"),
    ],
)
def test_unsupported_shapes_raise(change, message):
    shape = dict(rbit=128, group=4, seq=topk_select.MAX_SEQ, budget=2048, codes_dtype=jnp.uint32) | change
    words = shape["rbit"] // 32
    q = jax.ShapeDtypeStruct((1, 2 * shape["group"], words), jnp.uint32)
    k = jax.ShapeDtypeStruct((1, 2, shape["seq"], words), shape["codes_dtype"])
    norms = jax.ShapeDtypeStruct((1, 2, shape["seq"]), jnp.float32)
    with pytest.raises(ValueError, match=message):
        hamming_topk.hamming_topk(q, k, norms, jnp.zeros(1, jnp.int32), budget=shape["budget"])


def test_select_topk_rejects_bad_arguments():
    with pytest.raises(ValueError, match="budget"):
        topk_select.select_topk(jnp.zeros((1, 2, 64), jnp.float32), 65, jnp.array([64]))
    with pytest.raises(ValueError, match="scores"):
        topk_select.select_topk(jnp.zeros((2, 64), jnp.float32), 8, jnp.array([64]))


@pytest.mark.parametrize("chunk, block", [(96, 32), (128, 256), (64, 8), (128, 48)])
def test_tiling_is_checked(chunk, block):
    with pytest.raises(ValueError, match="Tiling"):
        Tiling(chunk=chunk, block=block)
