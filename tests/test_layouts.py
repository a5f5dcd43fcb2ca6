"""Caches in the caller's layout: sequence-major [B, S, Hkv, D] caches (`seq_axis=1`) and
left-padded rows (`starts`) in dense and sparse decode attention (reference path)."""
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
    with pytest.raises(ValueError, match=r"the Pallas kernel reads \[batch, kv_heads, seq, head_dim\] caches from "
                                         r"position 0; seq_axis=1 run with impl='reference'"):
        hj.dense_decode_attention(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(k, 1, 2), [8, 8], seq_axis=1,
                                  impl="pallas")
    with pytest.raises(ValueError, match=r"seq_axis=2 and starts run with impl='reference'"):
        hj.dense_decode_attention(q, k, k, [8, 8], starts=[1, 0], impl="pallas")


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
