"""K/V storage as the caller keeps it (hata_jax.kv_storage): page pools with a page table and
int8 / fp8 K/V with scales, in either layout, read in place by dense and sparse decode attention
(reference and Pallas, interpreted here) and by HATA over `HataCache.from_kv`.

The oracle of every test is the plain head-major float cache holding the same (dequantized)
tokens at the same positions."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import hata_jax as hj
from bench.kv_layouts import make_storage
from hata_jax import kv_storage

REF = "reference"
PAGE = 8
VARIANTS = [  # (seq_axis, paged, quantization)
    (2, True, None), (1, True, None), (1, False, "int8"), (2, False, "fp8-head"), (1, True, "int8"),
    (2, True, "fp8-head"),
]


def _assert_close(got, want, tol=2e-5):
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(e, np.float32), rtol=tol, atol=tol)


def _inputs(randn, rng, b, hkv, g, s, d):
    q = randn(b, hkv * g, d)
    k, v = randn(b, hkv, s, d), randn(b, hkv, s, d)
    return q, k, v


@pytest.mark.parametrize("seq_axis, paged, quant", VARIANTS)
@pytest.mark.parametrize("impl", [REF, "pallas"])
def test_dense_attention_reads_the_storage_in_place(randn, rng, seq_axis, paged, quant, impl):
    b, hkv, g, s, d = 3, 2, 3 if paged else 1, 37, 64
    q, k, v = _inputs(randn, rng, b, hkv, g, s, d)
    st, lk, lv = make_storage(rng, k, v, seq_axis, paged, quant, page_size=PAGE)
    lengths = jnp.asarray(rng.integers(1, s + 1, b), jnp.int32)
    starts = jnp.asarray([int(rng.integers(0, n)) for n in np.asarray(lengths)], jnp.int32)
    kv = {name: st.pop(name) for name in ("k", "v")}
    got = hj.dense_decode_attention(q, kv["k"], kv["v"], lengths, starts=starts, return_lse=True, impl=impl, **st)
    want = hj.dense_decode_attention(q, lk, lv, lengths, starts=starts, return_lse=True, impl=REF)
    _assert_close(got, want)


@pytest.mark.parametrize("seq_axis, paged, quant", VARIANTS)
@pytest.mark.parametrize("impl", [REF, "pallas"])
def test_sparse_attention_reads_the_storage_in_place(randn, rng, seq_axis, paged, quant, impl):
    b, hkv, g, s, d, budget = 2, 2, 1 if paged else 4, 45, 64, 13
    q, k, v = _inputs(randn, rng, b, hkv, g, s, d)
    st, lk, lv = make_storage(rng, k, v, seq_axis, paged, quant, page_size=PAGE)
    idx = jnp.asarray(np.stack([rng.permutation(s)[:budget] for _ in range(b * hkv)]).reshape(b, hkv, budget),
                      jnp.int32)
    count = jnp.asarray(rng.integers(0, budget + 1, (b, hkv)), jnp.int32)
    kv = {name: st.pop(name) for name in ("k", "v")}
    got = hj.sparse_decode_attention(q, kv["k"], kv["v"], idx, count, return_lse=True, impl=impl, **st)
    want = hj.sparse_decode_attention(q, lk, lv, idx, count, return_lse=True, impl=REF)
    _assert_close(got, want)


@pytest.mark.parametrize("impl", [REF, "pallas"])
def test_a_page_outside_the_pool_poisons_only_its_rows(randn, rng, impl):
    """A table entry outside [0, pages) is a page not held: dense attention over it and a sparse
    read of a position on it give NaN for that sequence (sparse: that KV head), never a clipped
    read; the other rows are exact."""
    b, hkv, s, d = 2, 2, 32, 64
    q, k, v = _inputs(randn, rng, b, hkv, 2, s, d)
    st, lk, lv = make_storage(rng, k, v, 1, True, None, page_size=PAGE)
    st["page_table"] = st["page_table"].at[1, 2].set(-1)  # sequence 1, positions [16, 24)
    kv = {name: st.pop(name) for name in ("k", "v")}
    lengths = jnp.array([s, s], jnp.int32)
    out = np.asarray(hj.dense_decode_attention(q, kv["k"], kv["v"], lengths, impl=impl, **st))
    assert np.isnan(out[1]).all() and np.isfinite(out[0]).all()
    _assert_close(out[0], hj.dense_decode_attention(q, lk, lv, lengths, impl=REF)[0])
    idx = jnp.tile(jnp.array([1, 5, 20], jnp.int32), (b, hkv, 1)).at[1, 1].set(jnp.array([1, 5, 9]))
    count = jnp.full((b, hkv), 3, jnp.int32)
    out = np.asarray(hj.sparse_decode_attention(q, kv["k"], kv["v"], idx, count, impl=impl, **st))
    assert np.isnan(out[1, :2]).all() and np.isfinite(out[1, 2:]).all() and np.isfinite(out[0]).all()


def test_quantize_is_symmetric_absmax():
    x = jnp.array([[[3.0, -6.0, 0.5], [0.0, 0.0, 0.0]]])
    stored, scale = kv_storage.quantize(x, jnp.int8)
    np.testing.assert_allclose(np.asarray(scale), [[6 / 127, 1.0]], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(stored), [[[64, -127, 11], [0, 0, 0]]])
    stored, scale = kv_storage.quantize(x, jnp.float8_e4m3fn, 0.01)
    np.testing.assert_allclose(np.asarray(stored, np.float32)[0, 0], [300.0, -448.0, 50.0], rtol=0.07)
    assert np.asarray(scale).shape == (1, 2)
    with pytest.raises(ValueError, match=r"quantize: dtype must be one of \['int8', 'float8_e4m3fn', 'float8_e5m2'\], "
                                         r"got bfloat16"):
        kv_storage.quantize(x, jnp.bfloat16)


@pytest.mark.parametrize("seq_axis, paged, quant", VARIANTS)
def test_hata_over_the_models_storage_equals_hata_over_a_plain_cache(randn, rng, seq_axis, paged, quant):
    """`from_kv` over each storage gives the codes and norms of the plain cache of the same
    dequantized tokens; HATA steps over it (appends written into the pages, quantized by the
    cache's scheme) give the plain cache's outputs, with the appended rows where the table
    says."""
    b, hkv, g, s, d, rbit, end = 2, 2, 2, 40, 64, 64, 29
    _, k, v = _inputs(randn, rng, b, hkv, g, s, d)
    st, lk, lv = make_storage(rng, k, v, seq_axis, paged, quant, page_size=PAGE)
    w = randn(hkv, d, rbit)
    lengths = jnp.asarray([end, 17], jnp.int32)
    starts = jnp.asarray([3, 0], jnp.int32)
    cache = hj.HataCache.from_kv(st.pop("k"), st.pop("v"), w, lengths, starts=starts, impl=REF, **st)
    plain = hj.HataCache.from_kv(lk, lv, w, lengths, starts=starts, impl=REF)
    np.testing.assert_array_equal(np.asarray(cache.codes), np.asarray(plain.codes))
    np.testing.assert_allclose(np.asarray(cache.norms), np.asarray(plain.norms), rtol=1e-6)
    cache, plain = _steps_agree(randn, cache, plain, w, hj.HataConfig(rbit=rbit, budget=9, sink=1, recent=2),
                                [REF, "pallas", "pallas"], tol=1e-4)
    assert not np.asarray(cache.overflow).any()
    np.testing.assert_array_equal(np.asarray(cache.lengths), np.asarray(plain.lengths))
    positions = jnp.broadcast_to(jnp.arange(s)[None, None, :], (b, hkv, s))
    got_k, _ = kv_storage.gather_rows(cache.k, cache.k_scale, positions, seq_axis=seq_axis,
                                      page_table=cache.page_table)
    held = np.arange(s)[None, None, :] < np.asarray(cache.lengths)[:, None, None]
    np.testing.assert_allclose(np.where(held[..., None], got_k, 0), np.where(held[..., None], plain.k, 0),
                               rtol=1e-6, atol=1e-6)


def _steps_agree(randn, cache, plain, w, config, impls, tol=2e-5):
    """HATA steps (one per impl) over `cache` and over the plain cache of the same tokens (the
    reference path; each new token as `cache` stores it): equal outputs. Returns both caches."""
    b, hkv, d = plain.batch, plain.kv_heads, plain.head_dim
    for impl in impls:
        q, k_new, v_new = randn(b, 2 * hkv, d), randn(b, hkv, d), randn(b, hkv, d)
        out, cache = hj.hata_decode_attention(q, k_new, v_new, cache, w, config, impl=impl)
        if cache.k_scale is not None:  # the plain cache gets the token as the quantized cache stores it
            k_new, v_new = (_roundtrip(x, cache.k.dtype, None if scale.ndim != 1 else scale[None, :])
                            for x, scale in ((k_new, cache.k_scale), (v_new, cache.v_scale)))
        want, plain = hj.hata_decode_attention(q, k_new, v_new, plain, w, config, impl="reference")
        _assert_close(out, want, tol)
    return cache, plain


def _roundtrip(x, dtype, fixed):
    stored, scale = kv_storage.quantize(x, dtype, fixed)
    return stored.astype(jnp.float32) * scale[..., None]


def test_paged_prefill_and_append_write_only_the_sequences_pages(randn, rng):
    """`prefill` into a paged cache writes each prompt's tokens (not its padding: a page past a
    sequence's end may be another's) and `append` the next token, on the pages of the table; a
    write to a page the table does not hold raises on the host and, inside jit, is dropped with
    the sequence's overflow flag set."""
    b, hkv, d, rbit, per_seq = 2, 2, 64, 32, 3
    pages = b * per_seq + 1
    table = jnp.asarray(rng.permutation(pages)[: b * per_seq].reshape(b, per_seq), jnp.int32)
    pool = jnp.full((pages, PAGE, hkv, d), 7.0)
    w = randn(hkv, d, rbit)
    cache = hj.HataCache.from_kv(pool, pool, w, [0, 0], seq_axis=1, page_table=table, impl=REF)
    assert cache.capacity == per_seq * PAGE and cache.batch == b
    k = randn(b, 12, hkv, d)
    cache = cache.prefill(k, k, w, [12, 5], impl=REF)
    pool_k = np.asarray(cache.k)
    np.testing.assert_array_equal(pool_k[int(table[0, 1]), :4], np.asarray(k[0, 8:12]))
    np.testing.assert_array_equal(pool_k[int(table[1, 0]), :5], np.asarray(k[1, :5]))
    assert (pool_k[int(table[1, 0]), 5:] == 7.0).all()  # sequence 1's padding is not written
    k_new = randn(b, hkv, d)
    cache = cache.append(k_new, k_new, w, impl=REF)
    np.testing.assert_array_equal(np.asarray(cache.k)[int(table[1, 0]), 5], np.asarray(k_new[1]))
    np.testing.assert_array_equal(np.asarray(cache.k)[int(table[0, 1]), 4], np.asarray(k_new[0]))
    unheld = cache.page_table.at[1, 0].set(pages)
    with pytest.raises(ValueError, match=r"page_table: sequences \[1\] hold or write positions on pages outside"):
        hj.HataCache.from_kv(cache.k, cache.v, w, cache.lengths, seq_axis=1, page_table=unheld, impl=REF)
    held_cache = hj.HataCache.from_kv(cache.k, cache.v, w, [8, 8], seq_axis=1, page_table=cache.page_table.at[1, 1]
                                      .set(-1), impl=REF)
    with pytest.raises(ValueError, match=r"page_table: sequences \[1\]"):
        held_cache.append(k_new, k_new, w, impl=REF)
    appended = jax.jit(lambda c: c.append(k_new, k_new, w, impl=REF))(held_cache)
    np.testing.assert_array_equal(np.asarray(appended.overflow), [False, True])
    np.testing.assert_array_equal(np.asarray(appended.lengths), [9, 8])


def test_bad_storage_arguments_are_named(randn):
    q, w = randn(2, 4, 64), randn(2, 64, 32)
    pool = randn(5, PAGE, 2, 64)
    table = jnp.zeros((2, 2), jnp.int32)
    lengths = jnp.array([3, 3])
    cases = [
        (dict(page_table=table.astype(jnp.float32)), r"page_table must be an integer array, got dtype float32"),
        (dict(page_table=jnp.zeros((3, 2), jnp.int32)), r"page_table has batch size 3"),
        (dict(page_table=jnp.zeros((2,), jnp.int32)), r"page_table must have shape \[batch, pages_per_sequence\]"),
        (dict(page_table=table, k_scale=jnp.ones((5, PAGE, 2))), r"k_scale and v_scale must be given together"),
        (dict(page_table=table, k_scale=jnp.ones(2), v_scale=jnp.ones(2)),
         r"k and v with scales must be quantized: int8, float8_e4m3fn or float8_e5m2, got float32"),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message):
            hj.dense_decode_attention(q, pool, pool, lengths, seq_axis=1, impl=REF, **kw)
    q8 = pool.astype(jnp.int8)
    with pytest.raises(ValueError, match=r"k_scale must have shape \[5, 8, 2\] \(one scale per row: k's layout "
                                         r"\[pages, page_size, kv_heads, head_dim\] without head_dim\) or \[2\]"):
        hj.dense_decode_attention(q, q8, q8, lengths, seq_axis=1, page_table=table, k_scale=jnp.ones((5, 2)),
                                  v_scale=jnp.ones((5, 2)), impl=REF)
    with pytest.raises(ValueError, match=r"k must be \[pages, page_size, kv_heads, head_dim\] with 3 KV heads"):
        hj.HataCache.from_kv(pool, pool, randn(3, 64, 32), lengths, seq_axis=1, page_table=table)
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 16\]"):
        hj.HataCache.from_kv(pool, pool, w, [17, 3], seq_axis=1, page_table=table)


def test_a_paged_cache_under_an_explicit_mesh(randn, rng):
    """A page pool under `jax.set_mesh` (Explicit axes; one device here) split by KV heads only:
    the results of the unplaced run."""
    b, hkv, g, s, d, rbit = 2, 2, 2, 24, 64, 32
    _, k, v = _inputs(randn, rng, b, hkv, g, s, d)
    st, _, _ = make_storage(rng, k, v, 1, True, "int8", page_size=PAGE)
    w, q, k_new = randn(hkv, d, rbit), randn(b, hkv * g, d), randn(b, hkv, d)
    config = hj.HataConfig(rbit=rbit, budget=6)

    seq_axis = st.pop("seq_axis")

    def run(st):
        st = dict(st)
        cache = hj.HataCache.from_kv(st.pop("k"), st.pop("v"), w, [20, 11], seq_axis=seq_axis, impl=REF, **st)
        return hj.hata_decode_attention(q, k_new, k_new, cache, w, config, impl=REF)

    want = run(st)
    mesh = jax.make_mesh((1, 1), ("data", "model"), (AxisType.Explicit,) * 2, devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        placed = dict(st, k=jax.sharding.reshard(st["k"], P(None, None, "model")),
                      v=jax.sharding.reshard(st["v"], P(None, None, "model")))
        got = jax.jit(run)(placed)
        assert tuple(jax.typeof(got[1].k).sharding.spec)[:3] == (None, None, "model")
    _assert_close(got, want)


def _ring(rng, k, v, starts, seq_axis):
    """Tokens j of sequence b of the plain k, v [B, Hkv, S, D] moved to slot (starts[b] + j) % S."""
    s = k.shape[2]
    ring_k = jnp.stack([jnp.roll(k[i], int(starts[i]), axis=1) for i in range(k.shape[0])])
    ring_v = jnp.stack([jnp.roll(v[i], int(starts[i]), axis=1) for i in range(k.shape[0])])
    assert ring_k.shape[2] == s
    return (ring_k, ring_v) if seq_axis == 2 else (jnp.swapaxes(ring_k, 1, 2), jnp.swapaxes(ring_v, 1, 2))


@pytest.mark.parametrize("seq_axis", [2, 1])
@pytest.mark.parametrize("impl", [REF, "pallas"])
def test_a_ring_buffer_equals_the_plain_cache(randn, rng, seq_axis, impl):
    """A ring buffer (`ring=True`: the rows `[starts, lengths)` modulo S run past the end) holds
    the same tokens as the plain cache at `[0, n)`: dense attention over it and HATA steps that
    write past the end (wrapping into the slots before `starts`) give the plain cache's results;
    a write that would hold more than S tokens overflows."""
    b, hkv, g, s, d, rbit = 3, 2, 2, 40, 64, 64
    q, k, v = _inputs(randn, rng, b, hkv, g, s, d)
    n = np.array([30, 38, 12])
    starts = np.array([25, 39, 3])  # rows 0 and 1 wrap around
    ring_k, ring_v = _ring(rng, k, v, starts, seq_axis)
    lengths = jnp.asarray(starts + n, jnp.int32)
    got = hj.dense_decode_attention(q, ring_k, ring_v, lengths, starts=jnp.asarray(starts, jnp.int32),
                                    seq_axis=seq_axis, ring=True, return_lse=True, impl=impl)
    _assert_close(got, hj.dense_decode_attention(q, k, v, jnp.asarray(n, jnp.int32), return_lse=True, impl=REF))
    w = randn(hkv, d, rbit)
    cache = hj.HataCache.from_kv(ring_k, ring_v, w, lengths, starts=starts, seq_axis=seq_axis, ring=True, impl=REF)
    plain = hj.HataCache.from_kv(k, v, w, n, impl=REF)
    np.testing.assert_array_equal(np.asarray(cache.codes), np.asarray(plain.codes))
    cache, plain = _steps_agree(randn, cache, plain, w, hj.HataConfig(rbit=rbit, budget=9, sink=1, recent=2),
                                [impl, impl])
    np.testing.assert_array_equal(np.asarray(cache.lengths), starts + n + 2)
    k_new, v_new = randn(b, hkv, d), randn(b, hkv, d)
    with pytest.raises(ValueError, match=r"cache overflow: sequences \[1\]"):
        cache.append(k_new, v_new, w, impl=REF)  # row 1 holds 40 = S tokens
    full = jax.jit(lambda c: c.append(k_new, v_new, w, impl=REF))(cache)
    np.testing.assert_array_equal(np.asarray(full.overflow), [False, True, False])
    with pytest.raises(ValueError, match=r"a ring buffer needs starts in \[0, 40\) and lengths in \[starts, starts \+ "
                                         r"40\]"):
        hj.HataCache.from_kv(ring_k, ring_v, w, [30, 80, 12], starts=starts, seq_axis=seq_axis, ring=True)
