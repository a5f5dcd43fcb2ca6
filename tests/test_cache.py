"""HataCache: placement of prefilled and appended tokens, pytree behaviour, capacity overflow."""
from __future__ import annotations

import dataclasses
import functools

import brute_force as bf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hata_jax as hj

REF = "reference"
FIELDS = ("k", "v", "codes", "norms", "lengths", "starts", "overflow", "uncoded")


def assert_caches_equal(a: hj.HataCache, b: hj.HataCache) -> None:
    for name in FIELDS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_init_is_empty():
    cache = hj.HataCache.init(3, 2, 17, 64, rbit=96, dtype=jnp.float16)
    assert (cache.batch, cache.kv_heads, cache.capacity, cache.head_dim, cache.rbit) == (3, 2, 17, 64, 96)
    assert cache.k.shape == cache.v.shape == (3, 2, 17, 64) and cache.k.dtype == cache.v.dtype == jnp.float16
    assert cache.codes.shape == (3, 2, 17, 3) and cache.codes.dtype == jnp.uint32
    assert cache.norms.shape == (3, 2, 17) and cache.norms.dtype == jnp.float32
    assert cache.lengths.dtype == jnp.int32 and not np.asarray(cache.lengths).any()
    assert cache.overflow.dtype == jnp.bool_ and not np.asarray(cache.overflow).any()
    assert hj.HataCache.init(1, 1, 4, 64).k.dtype == jnp.bfloat16


@pytest.mark.parametrize("head_dim, rbit", [(64, 32), (128, 128), (64, 256)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_prefill_then_appends_write_each_sequence_at_its_length(rng, randn, head_dim, rbit, dtype):
    batch, kv_heads, capacity, prompt, steps = 4, 2, 23, 15, 4
    w = randn(kv_heads, head_dim, rbit)
    lengths = rng.permutation(np.concatenate([[0, prompt], rng.integers(1, prompt, size=batch - 2)]))
    k, v = randn(batch, kv_heads, prompt, head_dim), randn(batch, kv_heads, prompt, head_dim)
    cache = hj.HataCache.init(batch, kv_heads, capacity, head_dim, rbit=rbit, dtype=dtype)
    cache = cache.prefill(k, v, w, jnp.asarray(lengths, jnp.int32), impl=REF)

    np.testing.assert_array_equal(cache.lengths, lengths)
    assert not np.asarray(cache.overflow).any()
    bf.check_codes(cache.codes[:, :, :prompt], k, w, 1)
    np.testing.assert_array_equal(cache.codes[:, :, :prompt], hj.encode(k, w, head_axis=1, impl=REF))
    np.testing.assert_allclose(cache.norms[:, :, :prompt], bf.key_norms(k), rtol=2e-6)
    # The expected contents, built position by position in numpy.
    want = {name: np.zeros(getattr(cache, name).shape, getattr(cache, name).dtype) for name in FIELDS[:4]}
    want["k"][:, :, :prompt] = np.asarray(k.astype(dtype))
    want["v"][:, :, :prompt] = np.asarray(v.astype(dtype))
    want["codes"][:, :, :prompt] = np.asarray(cache.codes[:, :, :prompt])
    want["norms"][:, :, :prompt] = np.asarray(cache.norms[:, :, :prompt])

    for step in range(steps):
        k_new, v_new = randn(batch, kv_heads, head_dim), randn(batch, kv_heads, head_dim)
        cache = cache.append(k_new, v_new, w, impl=REF)
        bf.check_codes(cache.codes[np.arange(batch), :, lengths + step], k_new, w, 1)
        for b in range(batch):
            pos = lengths[b] + step
            want["k"][b, :, pos] = np.asarray(k_new[b].astype(dtype))
            want["v"][b, :, pos] = np.asarray(v_new[b].astype(dtype))
            want["codes"][b, :, pos] = np.asarray(hj.encode(k_new[b], w, impl=REF))
            want["norms"][b, :, pos] = np.asarray(hj.key_norms(k_new[b]))
        np.testing.assert_allclose(cache.norms[np.arange(batch), :, lengths + step], bf.key_norms(k_new), rtol=2e-6)
    for name in FIELDS[:4]:
        np.testing.assert_array_equal(getattr(cache, name), want[name], err_msg=name)
    np.testing.assert_array_equal(cache.lengths, lengths + steps)
    assert not np.asarray(cache.overflow).any()


def test_append_encoded_equals_append(randn):
    w = randn(3, 64, 128)
    cache = hj.HataCache.init(2, 3, 9, 64, dtype=jnp.float32)
    cache = cache.prefill(randn(2, 3, 5, 64), randn(2, 3, 5, 64), w, jnp.array([5, 2], jnp.int32), impl=REF)
    k_new, v_new = randn(2, 3, 64), randn(2, 3, 64)
    codes = hj.encode(k_new, w, impl=REF)
    assert_caches_equal(cache.append_encoded(k_new, v_new, codes, hj.key_norms(k_new)),
                        cache.append(k_new, v_new, w, impl=REF))


def test_pytree_round_trip(randn):
    w = randn(2, 64, 64)
    cache = hj.HataCache.init(2, 2, 8, 64, rbit=64).prefill(
        randn(2, 2, 6, 64), randn(2, 2, 6, 64), w, jnp.array([6, 3], jnp.int32), impl=REF)
    leaves, treedef = jax.tree_util.tree_flatten(cache)
    assert len(leaves) == len(FIELDS)
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert isinstance(rebuilt, hj.HataCache)
    assert_caches_equal(rebuilt, cache)
    doubled = jax.tree_util.tree_map(lambda x: x, cache)
    assert_caches_equal(doubled, cache)


@functools.partial(jax.jit, static_argnames="config", donate_argnames="cache")
def decode_step(q, k_new, v_new, cache, w, config):
    return hj.hata_decode_attention(q, k_new, v_new, cache, w, config, impl=REF)


@functools.partial(jax.jit, donate_argnames="cache")
def append_step(cache, k_new, v_new, w):
    return cache.append(k_new, v_new, w, impl=REF)


@pytest.mark.parametrize("group", [1, 3])
def test_fresh_cache_can_be_donated(randn, group):
    """k and v of a new cache are separate buffers; the first token attends to itself only."""
    cache = hj.HataCache.init(2, 2, 6, 64, dtype=jnp.float32)
    q, k_new, v_new, w = randn(2, 2 * group, 64), randn(2, 2, 64), randn(2, 2, 64), randn(2, 64, 128)
    out, cache = decode_step(q, k_new, v_new, cache, w, hj.HataConfig(budget=6))
    np.testing.assert_allclose(out, np.repeat(np.asarray(v_new), group, axis=1), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(cache.lengths, [1, 1])


def test_jit_with_donated_cache_matches_eager(randn):
    batch, kv_heads, group, capacity, head_dim = 3, 2, 3, 12, 64
    w = randn(kv_heads, head_dim, 128)
    prompt_k, prompt_v = randn(batch, kv_heads, 7, head_dim), randn(batch, kv_heads, 7, head_dim)
    lengths = jnp.array([7, 2, 5], jnp.int32)
    config = hj.HataConfig(budget=capacity)

    def fresh():
        return hj.HataCache.init(batch, kv_heads, capacity, head_dim, dtype=jnp.float32).prefill(
            prompt_k, prompt_v, w, lengths, impl=REF)

    eager, jitted = fresh(), fresh()
    for _ in range(3):
        q = randn(batch, kv_heads * group, head_dim)
        k_new, v_new = randn(batch, kv_heads, head_dim), randn(batch, kv_heads, head_dim)
        out_eager, eager = hj.hata_decode_attention(q, k_new, v_new, eager, w, config, impl=REF)
        out_jit, jitted = decode_step(q, k_new, v_new, jitted, w, config)
        np.testing.assert_allclose(out_jit, out_eager, rtol=1e-6, atol=1e-6)
        assert_caches_equal(jitted, eager)
        dense = hj.dense_decode_attention(q, eager.k, eager.v, eager.lengths, impl=REF)
        np.testing.assert_allclose(out_jit, dense, rtol=1e-5, atol=1e-5)
    k_new, v_new = randn(batch, kv_heads, head_dim), randn(batch, kv_heads, head_dim)
    assert_caches_equal(append_step(jitted, k_new, v_new, w), eager.append(k_new, v_new, w, impl=REF))


def full_cache(randn, capacity: int, lengths, head_dim: int = 64, rbit: int = 64):
    """A float32 cache with `lengths` (some at capacity) and its projection."""
    batch = len(lengths)
    w = randn(2, head_dim, rbit)
    k, v = randn(batch, 2, capacity, head_dim), randn(batch, 2, capacity, head_dim)
    cache = hj.HataCache.init(batch, 2, capacity, head_dim, rbit=rbit, dtype=jnp.float32)
    return cache.prefill(k, v, w, jnp.asarray(lengths, jnp.int32), impl=REF), w


def test_eager_append_on_a_full_cache_raises(randn):
    cache, w = full_cache(randn, 6, [3, 6, 1])
    with pytest.raises(ValueError, match=r"overflow.*sequences \[1\].*capacity=6"):
        cache.append(randn(3, 2, 64), randn(3, 2, 64), w, impl=REF)
    with pytest.raises(ValueError, match=r"overflow.*sequences \[1\]"):
        hj.hata_decode_attention(randn(3, 4, 64), randn(3, 2, 64), randn(3, 2, 64), cache, w,
                                 hj.HataConfig(rbit=64, budget=4), impl=REF)
    cache.raise_if_overflowed()  # nothing was written, nothing overflowed


def test_jit_append_past_capacity_is_dropped_and_flagged(randn):
    capacity = 7
    cache, w = full_cache(randn, capacity, [capacity, 4, capacity - 1])
    before = jax.tree_util.tree_map(np.asarray, cache)
    k_new, v_new = randn(3, 2, 64), randn(3, 2, 64)
    after = append_step(cache, k_new, v_new, w)

    np.testing.assert_array_equal(after.lengths, [capacity, 5, capacity])
    np.testing.assert_array_equal(after.overflow, [True, False, False])
    for name in ("k", "v", "codes", "norms"):
        new, old = np.asarray(getattr(after, name)), getattr(before, name)
        np.testing.assert_array_equal(new[0], old[0], err_msg=f"{name}: the full sequence changed")
        for b, pos in ((1, 4), (2, capacity - 1)):
            np.testing.assert_array_equal(np.delete(new[b], pos, axis=1), np.delete(old[b], pos, axis=1))
    np.testing.assert_array_equal(after.k[1, :, 4], k_new[1])
    np.testing.assert_array_equal(after.v[2, :, capacity - 1], v_new[2])
    with pytest.raises(ValueError, match=r"sequences \[0\] went past capacity=7"):
        after.raise_if_overflowed()

    # The flag is sticky and a second overflowing write adds sequence 2.
    full_row = np.asarray(after.k[2])
    again = append_step(after, randn(3, 2, 64), randn(3, 2, 64), w)  # donates `after`
    np.testing.assert_array_equal(again.overflow, [True, False, True])
    np.testing.assert_array_equal(again.k[2], full_row)
    with pytest.raises(ValueError, match=r"sequences \[0, 2\]"):
        again.raise_if_overflowed()


@pytest.mark.parametrize("group", [1, 4])
def test_decode_on_overflowed_sequence_is_nan_for_that_sequence_only(randn, group):
    capacity = 9
    cache, w = full_cache(randn, capacity, [5, capacity, 2])
    config = hj.HataConfig(rbit=64, budget=capacity)
    q = randn(3, 2 * group, 64)
    k_new, v_new = randn(3, 2, 64), randn(3, 2, 64)
    out, new_cache = decode_step(q, k_new, v_new, cache, w, config)
    out = np.asarray(out)
    assert np.isnan(out[1]).all()
    assert np.isfinite(out[[0, 2]]).all()
    np.testing.assert_array_equal(new_cache.lengths, [6, capacity, 3])
    dense = hj.dense_decode_attention(q, new_cache.k, new_cache.v, new_cache.lengths, impl=REF)
    np.testing.assert_allclose(out[[0, 2]], np.asarray(dense)[[0, 2]], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"sequences \[1\]"):
        new_cache.raise_if_overflowed()


def test_prefill_longer_than_capacity_raises(randn):
    cache = hj.HataCache.init(2, 2, 5, 64, dtype=jnp.float32)
    with pytest.raises(ValueError, match=r"prefill.*6 tokens.*capacity is 5"):
        cache.prefill(randn(2, 2, 6, 64), randn(2, 2, 6, 64), randn(2, 64, 128), jnp.array([6, 1]), impl=REF)


def test_prefill_lengths_past_the_prompt(randn):
    """Concrete lengths beyond the prompt raise; traced ones are clipped and flagged as overflow."""
    cache = hj.HataCache.init(2, 2, 8, 64, dtype=jnp.float32)
    k, v, w = randn(2, 2, 5, 64), randn(2, 2, 5, 64), randn(2, 64, 128)
    with pytest.raises(ValueError, match=r"lengths \(prefill\) must lie in \[0, 5\]"):
        cache.prefill(k, v, w, jnp.array([6, 1]), impl=REF)
    traced = jax.jit(lambda c, lengths: c.prefill(k, v, w, lengths, impl=REF))(cache, jnp.array([6, 1]))
    np.testing.assert_array_equal(traced.lengths, [5, 1])
    np.testing.assert_array_equal(traced.overflow, [True, False])


@pytest.mark.parametrize("impl", ["reference", "pallas"])
def test_negative_lengths_inside_jit_never_wrap(randn, impl):
    """A negative length inside jit: no write anywhere (a negative index would wrap to the
    cache's end), the sequence is flagged and gets NaN, lengths stay in [0, capacity]; the
    other sequences are untouched. Concrete negative lengths raise at once."""
    cache, w = full_cache(randn, 8, [3, 5])
    bad = cache.__class__(**{**vars(cache), "lengths": jnp.array([-3, 5], jnp.int32)})
    with pytest.raises(ValueError, match=r"overflow.*sequences \[0\]"):
        bad.append(randn(2, 2, 64), randn(2, 2, 64), w, impl=REF)
    step = jax.jit(lambda q, k, v, c: hj.hata_decode_attention(q, k, v, c, w, hj.HataConfig(rbit=64, budget=4),
                                                                impl=impl))
    out, after = step(randn(2, 4, 64), randn(2, 2, 64), randn(2, 2, 64), bad)
    np.testing.assert_array_equal(after.lengths, [0, 6])
    np.testing.assert_array_equal(after.overflow, [True, False])
    assert np.isnan(np.asarray(out)[0]).all() and np.isfinite(np.asarray(out)[1]).all()
    np.testing.assert_array_equal(np.asarray(after.k)[0], np.asarray(bad.k)[0])
    with pytest.raises(ValueError, match="overflow"):
        after.raise_if_overflowed()
    k, v = randn(2, 2, 6, 64), randn(2, 2, 6, 64)
    prefilled = jax.jit(lambda n: hj.HataCache.init(2, 2, 8, 64, rbit=64).prefill(k, v, w, n, impl=REF))(
        jnp.array([-1, 4], jnp.int32))
    np.testing.assert_array_equal(prefilled.overflow, [True, False])
    np.testing.assert_array_equal(prefilled.lengths, [0, 4])


@pytest.mark.parametrize("impl", ["reference", "pallas"])
def test_a_non_finite_key_poisons_its_sequence_as_in_dense_attention(randn, impl):
    """A NaN key in a prompt (or a new key) makes HATA's output NaN for that sequence, as dense
    attention's is, instead of the key silently never being selected; a NaN key past a
    sequence's length (padding) is ignored; other sequences are untouched."""
    w = randn(2, 64, 64)
    k, v = randn(3, 2, 40, 64), randn(3, 2, 40, 64)
    k = k.at[0, 1, 7].set(jnp.nan).at[2, 0, 35].set(jnp.nan)  # sequence 2: at a padded position
    lengths = jnp.array([40, 30, 30], jnp.int32)
    cache = jax.jit(lambda k: hj.HataCache.init(3, 2, 48, 64, rbit=64, dtype=jnp.float32).prefill(
        k, v, w, lengths, impl=REF))(k)
    np.testing.assert_array_equal(cache.overflow, [True, False, False])
    q = randn(3, 4, 64)
    step = jax.jit(lambda q, kn, vn, c: hj.hata_decode_attention(q, kn, vn, c, w, hj.HataConfig(rbit=64, budget=8),
                                                                  impl=impl))
    k_new = randn(3, 2, 64).at[1, 0, 3].set(jnp.inf)
    out, after = step(q, k_new, randn(3, 2, 64), cache)
    np.testing.assert_array_equal(after.overflow, [True, True, False])
    nan_rows = np.isnan(np.asarray(out)).all(axis=(1, 2))
    np.testing.assert_array_equal(nan_rows, [True, True, False])
    dense = hj.dense_decode_attention(q, cache.k, cache.v, cache.lengths, impl=REF)
    assert np.isnan(np.asarray(dense)[0]).any()  # dense attention over the NaN key is NaN too


@pytest.mark.parametrize("impl", [REF, "pallas"])
def test_a_dense_layer_writes_without_a_projection_and_hata_refuses_its_cache(randn, impl):
    """w=None in prefill and append: k, v, norms and lengths as with w, codes left zero, the
    sequences marked uncoded; HATA over that cache raises eagerly and gives NaN under jit (only
    for the uncoded sequences); a prefill with w makes the cache usable again."""
    b, hkv, s, d, rbit = 2, 2, 24, 64, 64
    k, v, w = randn(b, hkv, 16, d), randn(b, hkv, 16, d), randn(hkv, d, rbit)
    k_new, v_new = randn(b, hkv, d), randn(b, hkv, d)
    empty = hj.HataCache.init(b, hkv, s, d, rbit=rbit, dtype=jnp.float32)
    coded = empty.prefill(k, v, w, [16, 9], impl=REF).append(k_new, v_new, w, impl=REF)
    dense = empty.prefill(k, v, None, [16, 9]).append(k_new, v_new, None)
    for name in ("k", "v", "lengths", "overflow"):
        np.testing.assert_array_equal(getattr(dense, name), getattr(coded, name), err_msg=name)
    np.testing.assert_allclose(dense.norms, coded.norms, rtol=1e-6)
    assert not np.asarray(dense.codes).any() and np.asarray(coded.codes).any()
    assert dense.uncoded.tolist() == [True, True] and coded.uncoded.tolist() == [False, False]
    assert empty.prefill(k, v, None, [0, 9]).uncoded.tolist() == [False, True]  # an empty sequence has no token

    config = hj.HataConfig(rbit=rbit, budget=8)
    q = randn(b, 2 * hkv, d)
    with pytest.raises(ValueError, match=r"sequences \[0, 1\] .* written without hash codes \(w=None"):
        hj.hata_decode_attention(q, k_new, v_new, dense, w, config, impl=impl)
    step = jax.jit(functools.partial(hj.hata_decode_attention, config=config, impl=impl))
    mixed = dataclasses.replace(coded, uncoded=jnp.array([False, True]))
    out, _ = step(q, k_new, v_new, mixed, w)
    want, _ = step(q, k_new, v_new, coded, w)
    assert np.isnan(np.asarray(out[1])).all()
    np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(want[0]))
    recoded = dense.prefill(k, v, w, [16, 9], impl=REF)
    assert recoded.uncoded.tolist() == [False, False]
    hj.hata_decode_attention(q, k_new, v_new, recoded, w, config, impl=REF)
