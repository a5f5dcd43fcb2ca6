"""Caches in the caller's layout: sequence-major [B, S, Hkv, D] caches (`seq_axis=1`) and
left-padded rows (`starts`) in dense and sparse decode attention, and HATA over the model's own
buffers (`HataCache.from_kv`). Pages and quantized K/V: tests/test_kv_storage.py."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import hata_jax as hj

REF = "reference"


def _assert_close(got, want):
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group", [1, 3])
def test_sequence_major_cache_equals_head_major(randn, rng, group):
    b, hkv, s, d, budget = 3, 2, 40, 64, 12
    q, k, v = randn(b, hkv * group, d), randn(b, hkv, s, d), randn(b, hkv, s, d)
    lengths = jnp.asarray(rng.integers(0, s + 1, b), jnp.int32)
    seq_major = (jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2))
    _assert_close(hj.dense_decode_attention(q, *seq_major, lengths, seq_axis=1, return_lse=True, impl=REF),
                  hj.dense_decode_attention(q, k, v, lengths, return_lse=True, impl=REF))
    idx = jnp.asarray(np.stack([rng.permutation(s)[:budget] for _ in range(b * hkv)]).reshape(b, hkv, budget),
                      jnp.int32)
    count = jnp.asarray(rng.integers(0, budget + 1, (b, hkv)), jnp.int32)
    _assert_close(hj.sparse_decode_attention(q, *seq_major, idx, count, seq_axis=1, return_lse=True, impl=REF),
                  hj.sparse_decode_attention(q, k, v, idx, count, return_lse=True, impl=REF))


@pytest.mark.parametrize("seq_axis", [2, 1])
def test_left_padded_rows_equal_right_padded_ones(randn, rng, seq_axis):
    """Row b holds its n_b tokens at [S - n_b, S) (left padding, garbage before): the same output
    as the tokens at [0, n_b) of a right-padded cache."""
    b, hkv, g, s, d = 3, 2, 2, 24, 64
    q, k, v = randn(b, hkv * g, d), randn(b, hkv, s, d), randn(b, hkv, s, d)
    n = rng.integers(1, s + 1, b)
    starts = jnp.asarray(s - n, jnp.int32)
    left_k = jnp.stack([jnp.roll(k[i], s - n[i], axis=1) for i in range(b)])  # token j of row i at s - n_i + j
    left_v = jnp.stack([jnp.roll(v[i], s - n[i], axis=1) for i in range(b)])
    if seq_axis == 1:
        left_k, left_v = jnp.swapaxes(left_k, 1, 2), jnp.swapaxes(left_v, 1, 2)
    got = hj.dense_decode_attention(q, left_k, left_v, [s] * b, starts=starts, seq_axis=seq_axis, return_lse=True,
                                    impl=REF)
    _assert_close(got, hj.dense_decode_attention(q, k, v, jnp.asarray(n, jnp.int32), return_lse=True, impl=REF))


def test_bad_layout_arguments_are_named(randn):
    q, k = randn(2, 4, 64), randn(2, 2, 8, 64)
    with pytest.raises(ValueError, match=r"starts must lie in \[0, 8\]"):
        hj.dense_decode_attention(q, k, k, [8, 8], starts=[9, 0], impl=REF)
    with pytest.raises(ValueError, match=r"starts must not exceed lengths, got starts \[5, 0\] and lengths \[4, 8\]"):
        hj.dense_decode_attention(q, k, k, [4, 8], starts=[5, 0], impl=REF)


def test_sequence_major_left_padded_under_an_explicit_mesh(randn, rng):
    """A [B, S, Hkv, D] cache under `jax.set_mesh` (Explicit axes; one device here): the layout
    of the op follows the sequence-major cache."""
    b, hkv, s, d = 2, 2, 16, 64
    q, k, v = randn(b, 2 * hkv, d), randn(b, s, hkv, d), randn(b, s, hkv, d)
    lengths, starts = jnp.array([s, 9]), jnp.array([3, 0])
    want = hj.dense_decode_attention(q, k, v, lengths, starts=starts, seq_axis=1, impl=REF)
    mesh = jax.make_mesh((1, 1), ("data", "model"), (AxisType.Explicit,) * 2, devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        k, v = (jax.sharding.reshard(x, P("data", None, "model")) for x in (k, v))
        got = jax.jit(lambda *a: hj.dense_decode_attention(*a, starts=starts, seq_axis=1, impl=REF))(q, k, v, lengths)
    _assert_close(got, want)


def _left_padded(rng, b, hkv, s, d, end, seq_axis):
    """A model's K/V buffers [B, Hkv, S, D] or [B, S, Hkv, D]: row b holds n_b tokens (odd
    counts included) at [end - n_b, end), large finite garbage elsewhere; and the same tokens
    right-padded head-major at [0, n_b), zeros elsewhere. Returns (k, v, starts, right_k,
    right_v, n)."""
    n = rng.integers(1, end + 1, b)
    n[0] = end  # one full row
    tokens = rng.standard_normal((2, b, hkv, end, d)).astype(np.float32)
    left = 30 * rng.standard_normal((2, b, hkv, s, d)).astype(np.float32)
    right = np.zeros((2, b, hkv, s, d), np.float32)
    for i in range(b):
        left[:, i, :, end - n[i]:end] = right[:, i, :, :n[i]] = tokens[:, i, :, :n[i]]
    if seq_axis == 1:
        left = np.swapaxes(left, 2, 3)
    return (*jnp.asarray(left), jnp.asarray(end - n, jnp.int32), *jnp.asarray(right), n)


@pytest.mark.parametrize("seq_axis", [1, 2])
@pytest.mark.parametrize("group", [1, 3])
def test_hata_over_a_left_padded_model_cache_equals_dense_at_full_budget(randn, rng, seq_axis, group):
    """HATA over the model's own left-padded buffers (`from_kv`, no copy of K/V), three jitted
    steps at budget >= context: each output equals dense attention over the buffers the steps
    wrote into, and dense attention over the right-padded tokens; the new tokens land at
    `lengths[b]` of the model's layout."""
    b, hkv, s, d, rbit, end = 3, 2, 37, 64, 64, 29
    k, v, starts, right_k, right_v, n = _left_padded(rng, b, hkv, s, d, end, seq_axis)
    w = randn(hkv, d, rbit)
    cache = hj.HataCache.from_kv(k, v, w, [end] * b, starts=starts, seq_axis=seq_axis, impl=REF)
    assert (cache.capacity, cache.kv_heads, cache.seq_axis) == (s, hkv, seq_axis)
    assert cache.k is k and cache.v is v  # the model's buffers, as they are
    step = jax.jit(lambda *a: hj.hata_decode_attention(*a, config=hj.HataConfig(rbit=rbit, budget=s), impl=REF))
    for t in range(3):
        q, k_new, v_new = randn(b, hkv * group, d), randn(b, hkv, d), randn(b, hkv, d)
        out, cache = step(q, k_new, v_new, cache, w)
        token = (slice(None), end + t) if seq_axis == 1 else (slice(None), slice(None), end + t)
        np.testing.assert_array_equal(np.asarray(cache.k[token]), np.asarray(k_new))
        np.testing.assert_array_equal(np.asarray(cache.lengths), end + t + 1)
        right_k = right_k.at[np.arange(b), :, n + t].set(k_new)
        right_v = right_v.at[np.arange(b), :, n + t].set(v_new)
        _assert_close(out, hj.dense_decode_attention(q, right_k, right_v, jnp.asarray(n + t + 1), impl=REF))
        _assert_close(out, hj.dense_decode_attention(q, cache.k, cache.v, cache.lengths, starts=cache.starts,
                                                     seq_axis=seq_axis, impl=REF))
    assert not np.asarray(cache.overflow).any()


@pytest.mark.parametrize("seq_axis, impl, score", [(1, REF, "key_norm"), (2, REF, "key_norm"),
                                                   (2, "pallas", "key_norm"), (1, "pallas", "key_norm"),
                                                   (2, "pallas", "asymmetric")])
def test_hata_over_a_left_padded_model_cache_equals_hata_over_a_prefilled_cache(randn, rng, seq_axis, impl, score):
    """At a small budget the selection over a left-padded cache is the selection over the same
    tokens prefilled into a HataCache at [0, n_b) (the codes count from each sequence's start),
    so the steps' outputs are equal; sink and recent count from the start too. The Pallas path
    (interpreted here) reads a left-padded cache of either layout, and its one-launch encode of
    the asymmetric score's query planes selects as the reference does."""
    b, hkv, g, s, d, rbit, end = 3, 2, 2, 41, 64, 64, 33
    k, v, starts, right_k, right_v, n = _left_padded(rng, b, hkv, s, d, end, seq_axis)
    w = randn(hkv, d, rbit)
    left = hj.HataCache.from_kv(k, v, w, [end] * b, starts=starts, seq_axis=seq_axis, impl=REF)
    right = hj.HataCache.init(b, hkv, s, d, rbit=rbit, dtype=jnp.float32).prefill(right_k, right_v, w, n, impl=REF)
    held = np.arange(s)[None, None, :] < n[:, None, None]
    np.testing.assert_array_equal(np.where(held[..., None], left.codes, 0), np.where(held[..., None], right.codes, 0))
    np.testing.assert_allclose(np.where(held, left.norms, 0), np.where(held, right.norms, 0), rtol=1e-6)
    config = hj.HataConfig(rbit=rbit, budget=7, sink=1, recent=2, score=score)
    for _ in range(2):
        q, k_new, v_new = randn(b, hkv * g, d), randn(b, hkv, d), randn(b, hkv, d)
        out, left = hj.hata_decode_attention(q, k_new, v_new, left, w, config, impl=impl)
        want, right = hj.hata_decode_attention(q, k_new, v_new, right, w, config, impl=REF)
        _assert_close(out, want)


def test_from_kv_arguments_are_named(randn):
    k, w = randn(2, 8, 2, 64), randn(2, 64, 32)
    with pytest.raises(ValueError, match=r"k must be \[batch, kv_heads, seq, head_dim\] with 2 KV heads .* "
                                         r"\(pass seq_axis=1\)"):
        hj.HataCache.from_kv(k, k, w, [8, 8])
    with pytest.raises(ValueError, match=r"starts must not exceed lengths, got starts \[5, 0\] and lengths \[4, 8\]"):
        hj.HataCache.from_kv(k, k, w, [4, 8], starts=[5, 0], seq_axis=1)
    with pytest.raises(ValueError, match=r"seq_axis must be 2 .* or 1"):
        hj.HataCache.from_kv(k, k, w, [4, 8], seq_axis=3)
    cache = hj.HataCache.from_kv(k, k, w, [8, 8], seq_axis=1, impl=REF)
    with pytest.raises(ValueError, match=r"cache overflow: sequences \[0, 1\]"):
        cache.append(randn(2, 2, 64), randn(2, 2, 64), w, impl=REF)


def test_from_kv_sequence_major_under_an_explicit_mesh(randn, rng):
    """`from_kv` and a HATA step on a sequence-major left-padded cache under `jax.set_mesh`
    (Explicit axes; one device here): the results of the unplaced run, laid out as the cache."""
    b, hkv, s, d, rbit, end = 2, 2, 24, 64, 32, 20
    k, v, starts, _, _, _ = _left_padded(rng, b, hkv, s, d, end, 1)
    w, q, k_new, v_new = randn(hkv, d, rbit), randn(b, 2 * hkv, d), randn(b, hkv, d), randn(b, hkv, d)
    config = hj.HataConfig(rbit=rbit, budget=6)

    def run(k, v):
        cache = hj.HataCache.from_kv(k, v, w, [end] * b, starts=starts, seq_axis=1, impl=REF)
        return hj.hata_decode_attention(q, k_new, v_new, cache, w, config, impl=REF)

    want = run(k, v)
    mesh = jax.make_mesh((1, 1), ("data", "model"), (AxisType.Explicit,) * 2, devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        k, v = (jax.sharding.reshard(x, P("data", None, "model")) for x in (k, v))
        got = jax.jit(run)(k, v)
        assert tuple(jax.typeof(got[1].k).sharding.spec)[:3] == ("data", None, "model")
        assert tuple(jax.typeof(got[1].codes).sharding.spec)[:2] == ("data", "model")
    _assert_close(got, want)


def test_a_sequence_major_hata_cache_equals_a_head_major_one(randn, rng):
    """`HataCache.init(seq_axis=1)` (also made in its layout on an explicit mesh): prefill,
    append and HATA steps give the head-major cache's codes, norms, lengths and outputs, with k
    and v sequence-major."""
    b, hkv, g, s, t, d, rbit = 3, 2, 2, 30, 21, 64, 64
    k, v, w = randn(b, hkv, t, d), randn(b, hkv, t, d), randn(hkv, d, rbit)
    lengths = jnp.asarray(rng.integers(1, t + 1, b), jnp.int32)
    mesh = jax.make_mesh((1, 1), ("data", "model"), (AxisType.Explicit,) * 2, devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        placed = hj.HataCache.init(b, hkv, s, d, rbit=rbit, dtype=jnp.float32, seq_axis=1,
                                   out_sharding=P("data", None, "model"))
    assert placed.k.shape == (b, s, hkv, d) and tuple(placed.k.sharding.spec)[:3] == ("data", None, "model")
    head = hj.HataCache.init(b, hkv, s, d, rbit=rbit, dtype=jnp.float32).prefill(k, v, w, lengths, impl=REF)
    seq = hj.HataCache.init(b, hkv, s, d, rbit=rbit, dtype=jnp.float32, seq_axis=1).prefill(
        jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), w, lengths, impl=REF)
    config = hj.HataConfig(rbit=rbit, budget=8)
    for _ in range(2):
        q, k_new, v_new = randn(b, hkv * g, d), randn(b, hkv, d), randn(b, hkv, d)
        out_head, head = hj.hata_decode_attention(q, k_new, v_new, head, w, config, impl=REF)
        out_seq, seq = hj.hata_decode_attention(q, k_new, v_new, seq, w, config, impl=REF)
        _assert_close(out_seq, out_head)
    for name in ("codes", "norms", "lengths", "starts", "overflow"):
        np.testing.assert_array_equal(getattr(seq, name), getattr(head, name), err_msg=name)
    np.testing.assert_array_equal(jnp.swapaxes(seq.k, 1, 2), head.k)
    with pytest.raises(ValueError, match=r"k must have shape \[batch, tokens, kv_heads, head_dim\] with B=3, Hkv=2"):
        seq.prefill(k, v, w, lengths, impl=REF)
