"""Pallas flash-decode kernels (interpret mode on the CPU) against the hata_jax references."""

from __future__ import annotations

import collections
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from hata_jax import attention
from pallas_kernels import flash_decode
from pallas_kernels.backend import lower_for_cuda, lowered_ops
from pallas_kernels.flash_decode import Tuning

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 2e-2}


def assert_matches(got, want, dtype):
    """got/want: (out, lse); relative L2 error of out and of the finite lse within tolerance."""
    (out, lse), (ref_out, ref_lse) = got, want
    assert out.dtype == ref_out.dtype and lse.dtype == jnp.float32
    out, ref_out = np.asarray(out, np.float32), np.asarray(ref_out, np.float32)
    assert np.linalg.norm(out - ref_out) <= TOLERANCE[dtype] * np.linalg.norm(ref_out)
    lse, ref_lse = np.asarray(lse), np.asarray(ref_lse)
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(ref_lse))
    finite = np.isfinite(ref_lse)
    assert np.linalg.norm(lse[finite] - ref_lse[finite]) <= TOLERANCE[dtype] * np.linalg.norm(ref_lse[finite])


def assert_empty_rows(out, lse, empty):
    """Heads of `empty` (bool[B, Hq]) have out 0 and lse -inf."""
    empty = np.asarray(empty)
    assert np.all(np.asarray(out, np.float32)[empty] == 0)
    assert np.all(np.asarray(lse)[empty] == -np.inf)


def poison_rows(x, keep):
    """x: [B, Hkv, S, D]; rows where keep[B, Hkv, S] is False become NaN (a kernel must not use them)."""
    return jnp.where(keep[..., None], x, jnp.nan).astype(x.dtype)


def random_selection(rng, batch, kv_heads, seq, budget, count):
    """idx int32[B, Hkv, budget]: distinct positions in slots < count, -1 after."""
    idx = np.full((batch, kv_heads, budget), -1, np.int32)
    for b in range(batch):
        for h in range(kv_heads):
            n = int(count[b, h])
            idx[b, h, :n] = rng.choice(seq, size=n, replace=False)
    return idx


DENSE_CASES = [
    # dtype, head_dim, group, seq, batch, kv_heads, tuning
    (jnp.float32, 64, 3, 257, 3, 2, Tuning(block_k=32, splits=4)),
    (jnp.float32, 128, 8, 130, 2, 1, Tuning(block_k=16, splits=3)),
    (jnp.bfloat16, 128, 4, 1000, 2, 2, Tuning(block_k=64, splits=3)),
    (jnp.float16, 64, 1, 257, 2, 3, Tuning(block_k=16, splits=5)),
    (jnp.float32, 128, 6, 1000, 2, 1, Tuning(block_k=16, splits=24)),  # combine in 2 steps, empty splits
    (jnp.bfloat16, 64, 2, 200, 3, 2, Tuning(block_k=32, splits=1)),  # one launch, no combine
]


@pytest.mark.parametrize("dtype, head_dim, group, seq, batch, kv_heads, tuning", DENSE_CASES)
def test_dense_matches_reference(randn, ragged_lengths, dtype, head_dim, group, seq, batch, kv_heads, tuning):
    q = randn(batch, kv_heads * group, head_dim, dtype=dtype)
    k = randn(batch, kv_heads, seq, head_dim, dtype=dtype)
    v = randn(batch, kv_heads, seq, head_dim, dtype=dtype)
    lengths = ragged_lengths(batch, 1, seq).at[0].set(0)  # one empty sequence, the rest ragged
    beyond = jnp.arange(seq)[None, None, :] >= lengths[:, None, None]
    keep = ~jnp.broadcast_to(beyond, k.shape[:3])
    scale = 0.7 / np.sqrt(head_dim)
    got = flash_decode.dense_decode_attention(
        q,
        poison_rows(k, keep),
        poison_rows(v, keep),
        lengths,
        scale=scale,
        return_lse=True,
        interpret=True,
        tuning=tuning,
    )
    want = attention.dense_decode_attention(q, k, v, lengths, scale=scale, return_lse=True, impl="reference")
    assert_matches(got, want, dtype)
    assert_empty_rows(*got, jnp.broadcast_to((lengths == 0)[:, None], q.shape[:2]))


SPARSE_CASES = [
    # dtype, head_dim, group, seq, budget, tuning
    (jnp.float32, 64, 3, 257, 100, Tuning(block_k=16, splits=4)),
    (jnp.float32, 128, 1, 1000, 64, Tuning(block_k=16, splits=3)),
    (jnp.bfloat16, 128, 4, 1000, 64, Tuning(block_k=32, splits=2)),
    (jnp.float16, 64, 8, 257, 100, Tuning(block_k=32, splits=3)),
    (jnp.float32, 128, 5, 300, 40, Tuning(block_k=16, splits=1)),  # one launch, no combine
    (jnp.bfloat16, 64, 1, 257, 100, Tuning(block_k=16, splits=1)),
]


@pytest.mark.parametrize("dtype, head_dim, group, seq, budget, tuning", SPARSE_CASES)
def test_sparse_matches_reference(rng, randn, dtype, head_dim, group, seq, budget, tuning):
    batch, kv_heads = 2, 2
    q = randn(batch, kv_heads * group, head_dim, dtype=dtype)
    k = randn(batch, kv_heads, seq, head_dim, dtype=dtype)
    v = randn(batch, kv_heads, seq, head_dim, dtype=dtype)
    count = rng.integers(1, budget + 1, size=(batch, kv_heads)).astype(np.int32)
    count[0, 1], count[1, 0] = 0, budget  # one empty head, one full budget
    idx = random_selection(rng, batch, kv_heads, seq, budget, count)
    keep = np.zeros(k.shape[:3], bool)
    for b, h in np.ndindex(batch, kv_heads):
        keep[b, h, idx[b, h, : count[b, h]]] = True
    idx, count = jnp.asarray(idx), jnp.asarray(count)
    got = flash_decode.sparse_decode_attention(
        q,
        poison_rows(k, keep),
        poison_rows(v, keep),
        idx,
        count,
        scale=0.1,
        return_lse=True,
        interpret=True,
        tuning=tuning,
    )
    want = attention.sparse_decode_attention(q, k, v, idx, count, scale=0.1, return_lse=True, impl="reference")
    assert_matches(got, want, dtype)
    assert_empty_rows(*got, jnp.repeat(count == 0, group, axis=1))


def test_sparse_ignores_slots_past_count(rng, randn):
    """Out-of-range garbage beyond `count` gives exactly the result of -1 padding."""
    batch, kv_heads, group, seq, head_dim, budget = 2, 2, 3, 257, 64, 100
    q = randn(batch, kv_heads * group, head_dim)
    k = randn(batch, kv_heads, seq, head_dim)
    v = randn(batch, kv_heads, seq, head_dim)
    count = np.array([[37, 100], [1, 64]], np.int32)
    idx = random_selection(rng, batch, kv_heads, seq, budget, count)
    garbage = rng.choice([-(2**31), -7, seq, seq + 12345, 2**31 - 1], size=idx.shape).astype(np.int32)
    garbage_idx = np.where(np.arange(budget) < count[..., None], idx, garbage)
    run = functools.partial(
        flash_decode.sparse_decode_attention,
        q,
        k,
        v,
        count=jnp.asarray(count),
        scale=0.125,
        return_lse=True,
        interpret=True,
        tuning=Tuning(block_k=32, splits=2),
    )
    clean, dirty = run(idx=jnp.asarray(idx)), run(idx=jnp.asarray(garbage_idx))
    np.testing.assert_array_equal(np.asarray(clean[0]), np.asarray(dirty[0]))
    np.testing.assert_array_equal(np.asarray(clean[1]), np.asarray(dirty[1]))
    want = attention.sparse_decode_attention(
        q, k, v, jnp.asarray(idx), jnp.asarray(count), scale=0.125, return_lse=True, impl="reference"
    )
    assert_matches(dirty, want, jnp.float32)


@pytest.mark.parametrize("splits", [1, 2])
def test_all_empty(randn, splits):
    """lengths 0 / count 0 everywhere: out 0, lse -inf, nothing read (the caches are NaN)."""
    batch, kv_heads, group, seq, head_dim = 2, 2, 4, 64, 64
    q = randn(batch, kv_heads * group, head_dim, dtype=jnp.bfloat16)
    cache = jnp.full((batch, kv_heads, seq, head_dim), jnp.nan, jnp.bfloat16)
    tuning = Tuning(block_k=16, splits=splits)
    dense = flash_decode.dense_decode_attention(
        q, cache, cache, jnp.zeros(batch, jnp.int32), scale=0.1, return_lse=True, interpret=True, tuning=tuning
    )
    idx = jnp.full((batch, kv_heads, 32), -1, jnp.int32)
    sparse = flash_decode.sparse_decode_attention(
        q,
        cache,
        cache,
        idx,
        jnp.zeros((batch, kv_heads), jnp.int32),
        scale=0.1,
        return_lse=True,
        interpret=True,
        tuning=tuning,
    )
    for out, lse in (dense, sparse):
        assert out.dtype == jnp.bfloat16 and out.shape == q.shape and lse.shape == q.shape[:2]
        assert_empty_rows(out, lse, np.ones(q.shape[:2], bool))


@pytest.mark.parametrize("splits", [1, 3])
def test_out_of_range_lengths_and_counts_are_clipped(rng, randn, splits):
    """The kernels clip the raw lengths to [0, S] and counts to [0, budget] themselves."""
    batch, kv_heads, group, seq, head_dim, budget = 3, 2, 2, 100, 64, 48
    q = randn(batch, kv_heads * group, head_dim)
    k = randn(batch, kv_heads, seq, head_dim)
    v = randn(batch, kv_heads, seq, head_dim)
    tuning = Tuning(block_k=16, splits=splits)
    dense = functools.partial(
        flash_decode.dense_decode_attention, q, k, v, scale=0.1, return_lse=True, interpret=True, tuning=tuning
    )
    raw, clipped = jnp.array([seq + 9, -4, 37], jnp.int32), jnp.array([seq, 0, 37], jnp.int32)
    for got, want in zip(dense(raw), dense(clipped)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    full = np.full((batch, kv_heads), budget, np.int32)
    idx = jnp.asarray(random_selection(rng, batch, kv_heads, seq, budget, full))
    sparse = functools.partial(
        flash_decode.sparse_decode_attention, q, k, v, idx, scale=0.1, return_lse=True, interpret=True, tuning=tuning
    )
    raw = jnp.array([[budget + 1, -1], [2**31 - 1, 5], [-(2**31), budget]], jnp.int32)
    for got, want in zip(sparse(raw), sparse(jnp.clip(raw, 0, budget))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_public_wrappers_dispatch_to_pallas(rng, randn, ragged_lengths):
    """impl="pallas" (default tuning, default scale, no lse) equals impl="reference"."""
    batch, kv_heads, group, seq, head_dim, budget = 3, 2, 4, 300, 128, 64
    q = randn(batch, kv_heads * group, head_dim, dtype=jnp.bfloat16)
    k = randn(batch, kv_heads, seq, head_dim, dtype=jnp.bfloat16)
    v = randn(batch, kv_heads, seq, head_dim, dtype=jnp.bfloat16)
    lengths = ragged_lengths(batch, 0, seq)
    dense = {impl: attention.dense_decode_attention(q, k, v, lengths, impl=impl) for impl in ("pallas", "reference")}
    count = rng.integers(0, budget + 1, size=(batch, kv_heads)).astype(np.int32)
    idx = jnp.asarray(random_selection(rng, batch, kv_heads, seq, budget, count))
    sparse = {
        impl: attention.sparse_decode_attention(q, k, v, idx, jnp.asarray(count), impl=impl)
        for impl in ("pallas", "reference")
    }
    for result in (dense, sparse):
        got, want = np.asarray(result["pallas"], np.float32), np.asarray(result["reference"], np.float32)
        assert result["pallas"].dtype == jnp.bfloat16 and got.shape == q.shape
        assert np.linalg.norm(got - want) <= 2e-2 * np.linalg.norm(want)


def shapes(dtype, batch, kv_heads, group, seq, head_dim, budget):
    """Abstract inputs of both kernels: q, k, lengths, idx, count."""
    return (
        jax.ShapeDtypeStruct((batch, kv_heads * group, head_dim), dtype),
        jax.ShapeDtypeStruct((batch, kv_heads, seq, head_dim), dtype),
        jax.ShapeDtypeStruct((batch,), jnp.int32),
        jax.ShapeDtypeStruct((batch, kv_heads, budget), jnp.int32),
        jax.ShapeDtypeStruct((batch, kv_heads), jnp.int32),
    )


@pytest.mark.parametrize("dtype, head_dim, group", [(jnp.bfloat16, 128, 4), (jnp.float32, 64, 3)])
def test_lowers_for_cuda(dtype, head_dim, group):
    q, k, lengths, idx, count = shapes(dtype, 2, 8, group, 4096, head_dim, 2048)
    dense = lower_for_cuda(flash_decode.dense_decode_attention, q, k, k, lengths, scale=0.1, return_lse=True)
    sparse = lower_for_cuda(flash_decode.sparse_decode_attention, q, k, k, idx, count, scale=0.1, return_lse=True)
    assert "hata_dense_decode" in dense and "hata_sparse_decode" in sparse


@pytest.mark.parametrize("splits, group", [(1, 4), (8, 3), (64, 8)])  # 64 x 8 rows: a 4-step combine
@pytest.mark.parametrize("return_lse", [True, False])
def test_a_call_is_its_kernels_and_nothing_else(splits, group, return_lse):
    """splits > 1: the split kernel and the combine kernel; splits == 1: one kernel. Around them
    only reshapes (bitcasts): no clip, broadcast, cast, exp or reduce left to XLA."""
    q, k, lengths, idx, count = shapes(jnp.bfloat16, 2, 8, group, 4096, 128, 2048)
    tuning = Tuning(block_k=64, splits=splits)
    kw = dict(scale=0.1, return_lse=return_lse, tuning=tuning)
    for name, text in (
        ("hata_dense_decode", lower_for_cuda(flash_decode.dense_decode_attention, q, k, k, lengths, **kw)),
        ("hata_sparse_decode", lower_for_cuda(flash_decode.sparse_decode_attention, q, k, k, idx, count, **kw)),
    ):
        ops = collections.Counter(lowered_ops(text))
        assert ops.pop("module") == ops.pop("call") == 1  # @main calls the jitted wrapper
        assert ops.pop("func.func") == ops.pop("return") == 2
        assert ops.pop("stablehlo.custom_call") == text.count("__gpu$xla.gpu.triton") == (1 if splits == 1 else 2)
        assert set(ops) == {"stablehlo.reshape"}, ops
        assert name in text and (f"{name}_combine" in text) == (splits > 1)


# `%name = shape opcode(`, the shape maybe a tuple; opcodes that launch no kernel.
HLO_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?\S+ = (?:\([^()]*\)|\S+) ([\w-]+)\(")
NO_LAUNCH = {"parameter", "constant", "bitcast", "get-tuple-element", "tuple"}


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiles for the GPU")
@pytest.mark.parametrize("splits", [1, 8])
def test_compiled_call_launches_only_its_kernels(splits):
    """In XLA's optimized HLO every launching instruction is one of our Triton kernels."""
    q, k, lengths, idx, count = shapes(jnp.bfloat16, 1, 8, 4, 4096, 128, 2048)
    kw = dict(scale=0.1, return_lse=True, tuning=Tuning(block_k=64, splits=splits))
    calls = (
        (flash_decode.dense_decode_attention, (q, k, k, lengths)),
        (flash_decode.sparse_decode_attention, (q, k, k, idx, count)),
    )
    for fn, args in calls:
        hlo = jax.jit(functools.partial(fn, **kw)).lower(*args).compile().as_text()
        entry = hlo[hlo.index("\nENTRY") :]
        entry = entry[: entry.index("\n}")]
        launches = [
            line for line in entry.splitlines() if (op := HLO_INSTRUCTION.match(line)) and op.group(1) not in NO_LAUNCH
        ]
        assert len(launches) == (1 if splits == 1 else 2) and all("triton" in line for line in launches), launches


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(head_dim=96), "head_dim"),
        (dict(group=16), "group size"),
        (dict(seq=262145), "sequence capacity"),
        (dict(budget=8193), "budget"),
    ],
)
def test_unsupported_shapes_raise(change, message):
    config = dict(dtype=jnp.bfloat16, batch=1, kv_heads=1, group=4, seq=512, head_dim=128, budget=64) | change
    q, k, lengths, idx, count = shapes(**config)
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(
            functools.partial(flash_decode.sparse_decode_attention, scale=0.1, return_lse=False), q, k, k, idx, count
        )
    if "budget" not in change:
        with pytest.raises(ValueError, match=message):
            jax.eval_shape(
                functools.partial(flash_decode.dense_decode_attention, scale=0.1, return_lse=False), q, k, k, lengths
            )


def test_mixed_dtypes_raise():
    q, k, lengths, _, _ = shapes(jnp.float32, 1, 1, 2, 64, 64, 16)
    k16 = jax.ShapeDtypeStruct(k.shape, jnp.bfloat16)
    with pytest.raises(ValueError, match="share a dtype"):
        jax.eval_shape(
            functools.partial(flash_decode.dense_decode_attention, scale=0.1, return_lse=False), q, k16, k16, lengths
        )


def test_default_tuning_fills_the_gpu():
    """Llama-3.1-8B shapes: enough programs for every SM, power-of-two blocks, pipelined loads."""
    sms = flash_decode._sm_count()
    for batch in (1, 8):
        for seq in (32768, 131072):
            t = flash_decode.dense_tuning(batch, 8, seq, 128, jnp.bfloat16)
            assert batch * 8 * t.splits >= 2 * sms and 64 <= t.block_k <= 128 and t.num_stages >= 2
            assert seq // (t.block_k * t.splits) >= 4  # several blocks per split for the pipeline
        t = flash_decode.sparse_tuning(batch, 8, 2048, 128, jnp.bfloat16)
        assert t.splits * t.block_k <= 2048 and batch * 8 * t.splits >= sms


def test_default_tuning_skips_the_combine_only_when_splitting_buys_nothing():
    """One split (one launch) when batch x kv_heads already fills the SMs `_WAVES` times or the
    rows make too few blocks to share; otherwise several."""
    full = pl.cdiv(flash_decode._WAVES * flash_decode._sm_count(), 8)  # batches of 8 KV heads
    for batch in (full, 2 * full):
        assert flash_decode.dense_tuning(batch, 8, 131072, 128, jnp.bfloat16).splits == 1
        assert flash_decode.sparse_tuning(batch, 8, 2048, 128, jnp.bfloat16).splits == 1
    assert flash_decode.sparse_tuning(1, 8, 64, 128, jnp.bfloat16).splits == 1
    assert flash_decode.dense_tuning(1, 8, 300, 128, jnp.bfloat16).splits == 1
    for batch in (1, full // 2):
        assert flash_decode.dense_tuning(batch, 8, 131072, 128, jnp.bfloat16).splits > 1
        assert flash_decode.sparse_tuning(batch, 8, 2048, 128, jnp.bfloat16).splits > 1


def test_dots_ask_for_full_precision():
    """The interpreter cannot show tf32 rounding, so check what the block update asks the GPU for:
    HIGHEST lowers to IEEE fp32 dots in Triton (DEFAULT would be tf32)."""
    rows, block, head_dim = flash_decode.GROUP_ROWS, 32, 64
    f32 = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.float32)
    carry = (f32((rows, head_dim)), f32((rows,)), f32((rows,)))

    def step(q, k, v, read, carry):
        return flash_decode._softmax_step(q, flash_decode.Rows(k, v, None, None, read), carry, scale=0.1)

    jaxpr = jax.make_jaxpr(step)(
        f32((rows, head_dim)),
        f32((block, head_dim)),
        f32((block, head_dim)),
        jax.ShapeDtypeStruct((block,), jnp.bool_),
        carry,
    )
    dots = [eqn for eqn in jaxpr.eqns if eqn.primitive is jax.lax.dot_general_p]
    assert len(dots) == 2
    assert all(eqn.params["precision"] == (jax.lax.Precision.HIGHEST,) * 2 for eqn in dots)


@pytest.mark.parametrize("splits", [1, 4])
def test_positions_outside_the_cache_poison_only_their_rows(rng, randn, splits):
    """A used slot outside [0, S) makes its (b, h)'s query heads NaN, as the reference does (never
    a clipped read); a bad slot past the count is unused; the other rows are untouched."""
    q, k, v = randn(2, 6, 64), randn(2, 2, 100, 64), randn(2, 2, 100, 64)
    idx = jnp.asarray(rng.integers(0, 100, (2, 2, 16)), jnp.int32).at[0, 1, 5].set(100).at[1, 0, 15].set(-1)
    count = jnp.array([[16, 16], [15, 16]], jnp.int32)
    tuning = Tuning(block_k=16, splits=splits)
    out = flash_decode.sparse_decode_attention(
        q, k, v, idx, count, scale=0.125, return_lse=False, interpret=True, tuning=tuning
    )
    want = attention.sparse_decode_attention(q, k, v, idx, count, scale=0.125, impl="reference")
    nan_heads = np.isnan(np.asarray(out)).all(-1)
    np.testing.assert_array_equal(nan_heads, [[False] * 3 + [True] * 3, [False] * 6])
    np.testing.assert_array_equal(np.isnan(np.asarray(want)).all(-1), nan_heads)
    np.testing.assert_allclose(np.asarray(out)[~nan_heads], np.asarray(want)[~nan_heads], rtol=1e-5, atol=1e-5)
