"""HATA with the K/V cache in host memory (hata_jax.offload, hata_jax.host_memory, models.offload):
the offloaded layer step against hata_decode_attention, the row cache against an LRU oracle, the
staged transfers, dense streaming against dense attention, generation (chunked prefill, dense
baseline) against on-device decoding, overflow, bytes moved."""
from __future__ import annotations

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_models_llama import HF_CONFIGS, ragged_prompts, random_model

import hata_jax as hj
from hata_jax import dispatch, host_memory, offload
from hata_jax.models import AttentionPlan, generate
from hata_jax.models.offload import OffloadDecoder, generate_offloaded
from hata_jax.offload import (
    DeviceCodes,
    OffloadedCache,
    RowCache,
    offload_decode_attention,
    offload_dense_attention,
    plan_fetch,
    step_transfer_bytes,
)
from pallas_kernels.backend import lower_for_cuda

REF = "reference"
ON_GPU = jax.default_backend() == "gpu"


def twin_caches(randn, batch, kv_heads, capacity, head_dim, rbit, dtype, lengths, prompt, rows=0):
    """A HataCache and an OffloadedCache (`rows` row-cache slots) holding the same random prompt
    (from device arrays), and w."""
    w = randn(kv_heads, head_dim, rbit)
    k, v = randn(batch, kv_heads, prompt, head_dim), randn(batch, kv_heads, prompt, head_dim)
    lengths = jnp.asarray(lengths, jnp.int32)
    on_device = hj.HataCache.init(batch, kv_heads, capacity, head_dim, rbit=rbit, dtype=dtype).prefill(
        k, v, w, lengths, impl=REF)
    offloaded = OffloadedCache.init(batch, kv_heads, capacity, head_dim, rbit=rbit, dtype=dtype, rows=rows)
    offloaded.prefill(k, v, w, lengths, impl=REF)
    return on_device, offloaded, w


def assert_same_contents(on_device: hj.HataCache, offloaded: OffloadedCache) -> None:
    np.testing.assert_array_equal(offloaded.kv[..., 0, :], np.asarray(on_device.k))
    np.testing.assert_array_equal(offloaded.kv[..., 1, :], np.asarray(on_device.v))
    np.testing.assert_array_equal(offloaded.codes.codes, on_device.codes)
    np.testing.assert_array_equal(offloaded.codes.norms, on_device.norms)
    np.testing.assert_array_equal(offloaded.codes.lengths, on_device.lengths)
    np.testing.assert_array_equal(offloaded.lengths, on_device.lengths)


def assert_rows_match_host(cache: OffloadedCache) -> None:
    """Every occupied row-cache slot holds the host's row of its position; no position twice."""
    positions = np.asarray(cache.rows.positions)
    for b, h in np.ndindex(cache.batch, cache.kv_heads):
        held = np.flatnonzero(positions[b, h] >= 0)
        assert len(set(positions[b, h, held])) == len(held)
        np.testing.assert_array_equal(np.asarray(cache.rows.k)[b, h, held], cache.kv[b, h, positions[b, h, held], 0])
        np.testing.assert_array_equal(np.asarray(cache.rows.v)[b, h, held], cache.kv[b, h, positions[b, h, held], 1])


@pytest.mark.parametrize("group, kv_heads, rbit, dtype, config, extra_rows", [
    (1, 2, 32, jnp.float32, hj.HataConfig(rbit=32, budget=8), 0),
    (3, 2, 128, jnp.bfloat16, hj.HataConfig(rbit=128, budget=8), 5),
    (4, 1, 64, jnp.float32, hj.HataConfig(rbit=64, budget=10, sink=2, recent=3), 30),
    (2, 3, 32, jnp.float16, hj.HataConfig(rbit=32, budget=6, score="hamming"), 1),
    (3, 2, 64, jnp.float32, hj.HataConfig(rbit=64, budget=7, score="asymmetric"), 2),
])
def test_offloaded_step_equals_hata_decode_attention(rng, randn, ragged_lengths, group, kv_heads, rbit, dtype, config,
                                                     extra_rows):
    """Several steps on a batch of ragged lengths (one short enough that every token is selected
    at first), with a row cache of budget + extra_rows slots: the same outputs, bit for bit, and
    after each step the same cache contents and a row cache that holds host rows."""
    batch, capacity, prompt, head_dim = 3, 48, 31, 64
    lengths = np.array(ragged_lengths(batch, config.budget + 1, prompt))
    lengths[rng.integers(batch)] = config.budget - 2
    on_device, offloaded, w = twin_caches(randn, batch, kv_heads, capacity, head_dim, rbit, dtype, lengths, prompt,
                                          rows=config.budget + extra_rows)
    assert_same_contents(on_device, offloaded)
    q = randn(batch, kv_heads * group, head_dim, dtype=dtype)
    for step in range(6):
        if step != 3:  # step 3 repeats step 2's query: most of its selection is resident
            q = randn(batch, kv_heads * group, head_dim, dtype=dtype)
        k_new, v_new = randn(batch, kv_heads, head_dim), randn(batch, kv_heads, head_dim)
        want, on_device = hj.hata_decode_attention(q, k_new, v_new, on_device, w, config, impl=REF)
        fetched = offloaded.stats.rows_fetched
        got = offload_decode_attention(q, k_new, v_new, offloaded, w, config, impl=REF)
        assert got.dtype == want.dtype == q.dtype
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
        assert_same_contents(on_device, offloaded)
        assert_rows_match_host(offloaded)
        if step == 3:  # at most the new token and the recent window's newcomer per pair cross
            assert offloaded.stats.rows_fetched - fetched <= 2 * batch * kv_heads
    assert offloaded.stats.steps == 6 and offloaded.stats.hit_rate > 0


def lru_oracle(selections, counts, rows: int):
    """Plain-Python row cache of `rows` slots for one pair: per step (the slot of each selected
    position, the misses by position, the positions held afterwards). The misses, by position, take
    the free slots (not holding a position selected this step) least recently selected first, the
    lower slot first."""
    slots: list[int | None] = [None] * rows
    stamps = [-1] * rows
    out = []
    for step, (sel, count) in enumerate(zip(selections, counts)):
        sel = [int(x) for x in sel[:count]]
        where = {x: slots.index(x) for x in sel if x in slots}
        free = sorted((i for i in range(rows) if i not in where.values()), key=lambda i: (stamps[i], i))
        misses = sorted(x for x in sel if x not in where)
        for x, i in zip(misses, free):
            slots[i] = x
            where[x] = i
        for x in sel:
            stamps[where[x]] = step
        out.append(([where[x] for x in sel], misses, {x for x in slots if x is not None}))
    return out


@pytest.mark.parametrize("rows, budget", [(5, 5), (9, 5), (16, 4)])
def test_plan_fetch_is_an_lru_row_cache(rng, rows, budget):
    """plan_fetch against a plain-Python LRU cache over random selections of a small range (many
    repeats), ragged counts: the listed rows (pair by pair, by position), the slots each lands in,
    every selected position's slot, and the positions held afterwards."""
    batch, kv_heads, capacity, head_dim, steps = 2, 3, 24, 1, 12
    pairs = batch * kv_heads
    rc = RowCache.empty(batch, kv_heads, rows, head_dim, jnp.float32)
    sels = np.array([[[rng.permutation(12)[:budget] for _ in range(kv_heads)] for _ in range(batch)]
                     for _ in range(steps)], np.int32)
    counts = rng.integers(1, budget + 1, (steps, batch, kv_heads)).astype(np.int32)
    oracle = {(b, h): lru_oracle(sels[:, b, h], counts[:, b, h], rows) for b, h in np.ndindex(batch, kv_heads)}
    plan = jax.jit(plan_fetch, static_argnames="capacity")
    for step in range(steps):
        lengths = jnp.full((batch,), 100 + step, jnp.int32)
        fetch, rc = plan(jnp.asarray(sels[step]), jnp.asarray(counts[step]), rc, lengths, capacity=capacity)
        listed = np.asarray(fetch.host_rows)[:int(fetch.fetch_count)]
        fill = np.asarray(fetch.fill_slots)
        pair_of = list(np.ndindex(batch, kv_heads))
        want_listed, want_fill = [], []
        for p, (b, h) in enumerate(pair_of):
            slot_of, misses, _ = oracle[b, h][step]
            sel = sels[step, b, h, :counts[step, b, h]].tolist()
            want_listed += [p * capacity + x for x in misses]
            want_fill += [p * rows + slot_of[sel.index(x)] for x in misses]
        assert listed.tolist() == want_listed
        assert fill[:len(listed)].tolist() == want_fill
        assert (fill[len(listed):] == pairs * rows).all()
        slots, positions = np.asarray(fetch.slots), np.asarray(rc.positions)
        for b, h in pair_of:
            slot_of, _, held = oracle[b, h][step]
            assert slots[b, h, :counts[step, b, h]].tolist() == slot_of
            assert set(positions[b, h][positions[b, h] >= 0].tolist()) == held


@pytest.mark.parametrize("n", [0, 1, 255, 256, 700, 2100, 2400])
def test_gather_to_device_moves_the_listed_rows(rng, n):
    """One landing buffer of the smallest landing size that holds the rows, filled in order; the
    buffer is reused by the next gather without changing the first one's copy."""
    source = rng.standard_normal((3000, 2, 4)).astype(np.float32)
    staging = host_memory.PinnedStaging((2, 4), np.float32)
    assert staging.pinned == ON_GPU  # a CPU device's memory is host memory: plain buffers
    idx = rng.integers(0, len(source), n)
    landing = host_memory.gather_to_device(source, idx, staging, 2400)
    assert landing.shape == (host_memory.landing_rows(n, 2400), 2, 4)
    first = np.asarray(landing)[:n].copy()
    np.testing.assert_array_equal(first, source[idx])
    again = host_memory.gather_to_device(source, idx[::-1].copy(), staging, 2400)
    np.testing.assert_array_equal(np.asarray(landing)[:n], first)
    np.testing.assert_array_equal(np.asarray(again)[:n], source[idx[::-1]])


def test_pinned_buffers_take_writes_through_their_views(rng):
    """The mechanism the GPU path uses (a pinned_host jax array written through a numpy view of its
    buffer) on this backend: the written values are what the array holds."""
    array = host_memory._zeros_on_host((5, 3), "float32", jax.devices()[0])()
    assert array.sharding.memory_kind == "pinned_host"
    values = rng.standard_normal((5, 3)).astype(np.float32)
    host_memory._view(array)[...] = values
    np.testing.assert_array_equal(np.asarray(array), values)


@pytest.mark.parametrize("shape, dtype", [((3, 5, 2, 4), jnp.bfloat16), ((0, 4), np.float32), ((1 << 20,), np.int8)])
def test_host_zeros_are_writable_zeros(rng, shape, dtype):
    array = host_memory.host_zeros(shape, dtype)
    assert array.shape == shape and array.dtype == np.dtype(dtype) and not array.any()
    values = rng.standard_normal(shape).astype(dtype)
    array[...] = values
    np.testing.assert_array_equal(array, values)


@pytest.mark.parametrize("shape", [(3, -1), (2.5,), (True, 4)])
def test_host_zeros_rejects_a_bad_shape(shape):
    with pytest.raises(ValueError, match="host_zeros: shape must be non-negative ints"):
        host_memory.host_zeros(shape, np.float32)


def test_landing_sizes():
    assert host_memory.landing_sizes(32768) == [4096, 8192, 16384, 32768]
    assert host_memory.landing_sizes(48) == [6, 12, 24, 48]
    assert host_memory.landing_sizes(3) == [1, 2, 3]
    assert [host_memory.landing_rows(n, 32768) for n in (0, 1, 4096, 4097, 20000, 32768)] == [
        4096, 4096, 4096, 8192, 32768, 32768]
    with pytest.raises(ValueError, match=r"rows must lie in \[0, 48\]"):
        host_memory.landing_rows(49, 48)
    with pytest.raises(ValueError, match="threads must be a positive int"):
        host_memory.set_gather_threads(0)


@pytest.mark.parametrize("block_tokens", [5, 16, 64])
def test_offloaded_dense_attention_equals_dense_decode_attention(randn, block_tokens):
    """Streaming every row in blocks (not dividing the lengths) and merging by log-sum-exp gives
    dense attention over the cache with the new token; the step's codes are appended too."""
    batch, kv_heads, capacity, head_dim = 3, 2, 48, 32
    config = hj.HataConfig(rbit=32, budget=6)
    on_device, offloaded, w = twin_caches(randn, batch, kv_heads, capacity, head_dim, 32, jnp.float32, [31, 7, 20], 31,
                                          rows=6)
    for _ in range(2):
        q = randn(batch, kv_heads * 2, head_dim)
        k_new, v_new = randn(batch, kv_heads, head_dim), randn(batch, kv_heads, head_dim)
        on_device = on_device.append(k_new, v_new, w, impl=REF)
        want = hj.dense_decode_attention(q, on_device.k, on_device.v, on_device.lengths, impl=REF)
        got = offload_dense_attention(q, k_new, v_new, offloaded, w, block_tokens=block_tokens, impl=REF)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-6)
        assert_same_contents(on_device, offloaded)
    blocks = -(-32 // block_tokens) + -(-33 // block_tokens)
    assert offloaded.stats.host_to_device_bytes == blocks * batch * kv_heads * block_tokens * 2 * head_dim * 4
    # a HATA step may follow a dense one
    q = randn(batch, kv_heads * 2, head_dim)
    k_new, v_new = randn(batch, kv_heads, head_dim), randn(batch, kv_heads, head_dim)
    want, on_device = hj.hata_decode_attention(q, k_new, v_new, on_device, w, config, impl=REF)
    np.testing.assert_array_equal(offload_decode_attention(q, k_new, v_new, offloaded, w, config, impl=REF), want)


def test_prefill_from_host_arrays_equals_from_device_arrays(rng, randn):
    batch, kv_heads, capacity, prompt, head_dim = 2, 2, 20, 13, 64
    w = randn(kv_heads, head_dim, 64)
    k, v = randn(batch, kv_heads, prompt, head_dim), randn(batch, kv_heads, prompt, head_dim)
    lengths = np.array([13, 4])
    caches = []
    for arrays in ((k, v), (np.asarray(k), np.asarray(v))):
        cache = OffloadedCache.init(batch, kv_heads, capacity, head_dim, rbit=64, dtype=jnp.bfloat16)
        cache.prefill(*arrays, w, lengths, impl=REF)
        caches.append(cache)
    for a, b in zip(jax.tree.leaves(caches[0].codes) + [caches[0].kv],
                    jax.tree.leaves(caches[1].codes) + [caches[1].kv]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    on_device = hj.HataCache.init(batch, kv_heads, capacity, head_dim, rbit=64, dtype=jnp.bfloat16).prefill(
        k, v, w, jnp.asarray(lengths, jnp.int32), impl=REF)
    assert_same_contents(on_device, caches[1])
    assert not caches[1].kv[:, :, prompt:].any()  # unwritten positions stay zero


def test_prefill_and_write_reject_what_does_not_fit(randn):
    cache = OffloadedCache.init(2, 2, 8, 64, rbit=32, dtype=jnp.float32)
    w = randn(2, 64, 32)
    with pytest.raises(ValueError, match="capacity is 8"):
        cache.prefill(randn(2, 2, 9, 64), randn(2, 2, 9, 64), w, np.array([9, 9]))
    with pytest.raises(ValueError, match=r"lengths \(prefill\)"):
        cache.prefill(randn(2, 2, 5, 64), randn(2, 2, 5, 64), w, np.array([6, 2]))
    with pytest.raises(ValueError, match="w must have shape"):
        cache.prefill(randn(2, 2, 5, 64), randn(2, 2, 5, 64), randn(2, 64, 64), np.array([5, 2]))
    with pytest.raises(ValueError, match="do not fit"):
        cache.write(randn(2, 2, 3, 2, 64), jnp.zeros((2, 2, 3, 1), jnp.uint32), jnp.zeros((2, 2, 3)), start=6)
    with pytest.raises(ValueError, match="codes must have shape"):
        cache.write(randn(2, 2, 3, 2, 64), jnp.zeros((2, 2, 3, 2), jnp.uint32), jnp.zeros((2, 2, 3)))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 8\]"):
        cache.set_lengths([9, 1])


def test_overflow_raises_at_once_and_changes_nothing(randn):
    """The host knows every length, so a step that would write past the capacity raises before
    any work (HataCache's rule for concrete lengths); the cache stays as it was."""
    batch, kv_heads, capacity, head_dim = 3, 2, 12, 64
    config = hj.HataConfig(rbit=32, budget=4)
    _, cache, w = twin_caches(randn, batch, kv_heads, capacity, head_dim, 32, jnp.float32, [11, 9, 10], 11, rows=4)

    def step():
        offload_decode_attention(randn(batch, 2 * kv_heads, head_dim), randn(batch, kv_heads, head_dim),
                                 randn(batch, kv_heads, head_dim), cache, w, config, impl=REF)

    step()  # lengths 12, 10, 11
    kv, codes, lengths = cache.kv.copy(), jax.tree.map(np.asarray, cache.codes), cache.lengths.copy()
    with pytest.raises(ValueError, match=r"cache overflow: sequences \[0\] already hold capacity=12"):
        step()
    np.testing.assert_array_equal(cache.kv, kv)
    np.testing.assert_array_equal(cache.lengths, lengths)
    for a, b in zip(jax.tree.leaves(cache.codes), jax.tree.leaves(codes)):
        np.testing.assert_array_equal(a, b)
    assert cache.stats.steps == 1


def test_device_codes_drop_a_write_past_the_capacity(randn):
    """Inside jit (no host check) a full sequence's code is dropped and its length stays."""
    codes = DeviceCodes(jnp.zeros((2, 1, 3, 1), jnp.uint32), jnp.zeros((2, 1, 3)), jnp.array([3, 1], jnp.int32))
    new = jax.jit(DeviceCodes.append)(codes, jnp.full((2, 1, 1), 7, jnp.uint32), jnp.full((2, 1), 2.0))
    np.testing.assert_array_equal(new.lengths, [3, 2])
    np.testing.assert_array_equal(new.codes[:, 0, :, 0], [[0, 0, 0], [0, 7, 0]])
    np.testing.assert_array_equal(new.norms[:, 0], [[0, 0, 0], [0, 2, 0]])


@pytest.mark.parametrize("dtype, budget", [(jnp.bfloat16, 16), (jnp.float32, 5)])
def test_bytes_moved_per_step(randn, dtype, budget):
    """The first step fetches every selected row (an empty row cache); each step copies one landing
    buffer holding its fetched rows and reads back one int32 per slot and the new token."""
    batch, kv_heads, head_dim, steps = 2, 3, 64, 3
    config = hj.HataConfig(rbit=32, budget=budget)
    _, cache, w = twin_caches(randn, batch, kv_heads, 40, head_dim, 32, dtype, [20, 3], 20, rows=budget)
    item = jnp.dtype(dtype).itemsize
    want = {"host_to_device": batch * kv_heads * budget * 2 * head_dim * item,
            "device_to_host": batch * kv_heads * (4 * budget + 2 * head_dim * item)}
    assert step_transfer_bytes(batch, kv_heads, budget, head_dim, dtype) == want
    copied = 0
    for step in range(steps):
        fetched = cache.stats.rows_fetched
        offload_decode_attention(randn(batch, kv_heads, head_dim), randn(batch, kv_heads, head_dim),
                                 randn(batch, kv_heads, head_dim), cache, w, config, impl=REF)
        rows = cache.stats.rows_fetched - fetched
        if step == 0:
            assert rows == batch * kv_heads * budget - kv_heads * (budget - 4)  # sequence 1 holds 4 tokens
        copied += host_memory.landing_rows(rows, batch * kv_heads * budget) * 2 * head_dim * item
    assert cache.stats.steps == steps
    assert cache.stats.rows_selected == kv_heads * (steps * budget + sum(min(budget, n) for n in (4, 5, 6)))
    assert cache.stats.host_to_device_bytes == copied
    assert cache.stats.device_to_host_bytes == steps * want["device_to_host"]


@pytest.mark.parametrize("name, rows", [("llama-gqa", None), ("qwen2-tied", 9), ("llama-gqa", 20)])
def test_generation_equals_on_device_hata(rng, name, rows):
    """Offloaded HATA layers generate the tokens of on-device HATA (every step HATA: no
    short-context policy; the same ops, bit for bit), with budgets below the prompt lengths and row
    caches of several sizes, and count their rows and bytes. (A chunked prefill sums in another
    order, so a code bit may flip and the selection part: test_chunked_prefill_equals_whole_prefill.)"""
    model, _ = random_model(HF_CONFIGS[name], rng)
    config = model.config
    hata = hj.HataConfig(rbit=32, budget=6)
    plan = AttentionPlan.uniform(config.num_layers, "hata", hata, dense_layers=1)
    weights = rng.standard_normal((config.num_layers, config.num_kv_heads, config.head_dim, 32)).astype(np.float32)
    prompts = ragged_prompts(rng, HF_CONFIGS[name]["vocab_size"], [19, 9, 14])
    want = generate(model, prompts, max_new_tokens=7, plan=plan, hash_weights=weights, dense_below=0)
    got, caches = generate_offloaded(model, prompts, max_new_tokens=7, plan=plan, hash_weights=weights, rows=rows)
    assert got.tokens == want.tokens
    assert got.prompt_lengths == [19, 9, 14] and got.decode_steps == 5
    kinds = [type(c).__name__ for c in caches]
    assert kinds == ["HataCache"] + ["OffloadedCache"] * (config.num_layers - 1)
    assert caches[1].staging is caches[-1].staging  # one set of staging buffers per decoder
    row_bytes = 2 * config.head_dim * jnp.dtype(model.dtype).itemsize
    for cache in caches[1:]:
        assert cache.rows.rows == (rows or hata.budget)
        assert cache.stats.steps == 6
        assert cache.stats.rows_selected == 6 * 3 * config.num_kv_heads * hata.budget
        assert 0 < cache.stats.rows_fetched < cache.stats.rows_selected
        assert cache.stats.host_to_device_bytes >= cache.stats.rows_fetched * row_bytes
        np.testing.assert_array_equal(cache.lengths, np.array([19, 9, 14]) + 6)
        assert_rows_match_host(cache)


@pytest.mark.parametrize("name, chunk, block_tokens", [("llama-gqa", 4, 3), ("qwen2-tied", 7, 16),
                                                       ("llama-gqa", 19, 5)])
def test_chunked_prefill_equals_whole_prefill(rng, name, chunk, block_tokens):
    """A prompt prefilled in chunks (earlier tokens read in blocks from host memory, or from the
    device for a dense layer) fills the caches the whole prefill fills, up to float32 rounding."""
    model, _ = random_model(HF_CONFIGS[name], rng)
    config = model.config
    plan = AttentionPlan.uniform(config.num_layers, "hata", hj.HataConfig(rbit=32, budget=6), dense_layers=1)
    weights = rng.standard_normal((config.num_layers, config.num_kv_heads, config.head_dim, 32)).astype(np.float32)
    prompts = ragged_prompts(rng, HF_CONFIGS[name]["vocab_size"], [19, 9, 14])
    tokens = np.zeros((3, 19), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt)] = prompt
    lengths = np.array([19, 9, 14])
    decoder = OffloadDecoder(model, plan, weights, rows=8)
    _, whole = decoder.prefill(tokens, lengths, 32)
    _, chunked = decoder.prefill(tokens, lengths, 32, chunk=chunk, block_tokens=block_tokens)
    np.testing.assert_allclose(np.asarray(chunked[0].k), np.asarray(whole[0].k), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(chunked[0].v), np.asarray(whole[0].v), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(chunked[0].lengths, lengths)
    for a, b in zip(chunked[1:], whole[1:]):
        for row, n in enumerate(lengths):
            np.testing.assert_allclose(a.kv[row, :, :n], b.kv[row, :, :n], rtol=1e-4, atol=1e-5)
        agree = np.asarray(a.codes.codes) == np.asarray(b.codes.codes)
        assert agree.mean() > 0.95  # a code bit of a projection near 0 may flip
        np.testing.assert_array_equal(a.lengths, lengths)
        assert a.stats.steps == 0 and a.stats.host_to_device_bytes == 0


def assert_same_tokens_up_to_ties(model, prompts, got, want) -> None:
    """Greedy tokens equal, except that a row may part where the reference's two best logits tie
    to float32 rounding (paths that sum in another order may then pick the other)."""
    for prompt, mine, theirs in zip(prompts, got, want):
        part = next((t for t, (a, b) in enumerate(zip(mine, theirs)) if a != b), None)
        if part is None:
            assert mine == theirs
            continue
        logits = np.asarray(model(jnp.asarray([list(prompt) + theirs[:part]])))[0, -1]
        gap = abs(float(logits[theirs[part]]) - float(logits[mine[part]]))
        assert gap < 1e-4 * float(np.abs(logits).max()), (part, gap)


def test_dense_baseline_generation_equals_on_device_dense(rng):
    """attention="dense" streams every row of the offloaded layers and generates the tokens of
    on-device dense decoding."""
    model, _ = random_model(HF_CONFIGS["llama-gqa"], rng)
    config = model.config
    hata = hj.HataConfig(rbit=32, budget=6)
    plan = AttentionPlan.uniform(config.num_layers, "hata", hata, dense_layers=1)
    prompts = ragged_prompts(rng, HF_CONFIGS["llama-gqa"]["vocab_size"], [19, 9, 14])
    want = generate(model, prompts, max_new_tokens=6, plan=AttentionPlan.uniform(config.num_layers, "dense", hata),
                    dense_below=0)
    got, caches = generate_offloaded(model, prompts, max_new_tokens=6, plan=plan, attention="dense", prefill_chunk=8)
    assert_same_tokens_up_to_ties(model, prompts, got.tokens, want.tokens)
    assert caches[1].stats.steps == 5 and caches[1].stats.rows_selected == 0
    assert caches[1].stats.host_to_device_bytes > 0


def test_generation_rejects_what_it_cannot_run(rng):
    model, _ = random_model(HF_CONFIGS["llama-gqa"], rng)
    plan = AttentionPlan.uniform(model.config.num_layers, "hata", hj.HataConfig(rbit=32, budget=4), dense_layers=1)
    with pytest.raises(ValueError, match="cannot hold the prompt"):
        generate_offloaded(model, [[1, 2, 3]], plan=plan, max_new_tokens=6, capacity=8)
    with pytest.raises(ValueError, match="layers"):
        generate_offloaded(model, [[1, 2, 3]], plan=AttentionPlan.uniform(2, "hata", plan.hata), max_new_tokens=2)
    with pytest.raises(ValueError, match="rows must be an int >= the budget 4"):
        generate_offloaded(model, [[1, 2, 3]], plan=plan, max_new_tokens=2, rows=3)
    with pytest.raises(ValueError, match="chunk"):
        generate_offloaded(model, [[1, 2, 3]], plan=plan, max_new_tokens=2, prefill_chunk=0)
    with pytest.raises(ValueError, match="attention must be one of"):
        generate_offloaded(model, [[1, 2, 3]], plan=plan, max_new_tokens=2, attention="sparse")
    cache = OffloadedCache.init(1, 2, 16, 8, rbit=32, dtype=jnp.float32, rows=3)
    args = (jnp.zeros((1, 2, 8)), jnp.zeros((1, 2, 8)), jnp.zeros((1, 2, 8)), cache, jnp.zeros((2, 8, 32)))
    with pytest.raises(ValueError, match="3 slots per sequence and KV head, fewer than the budget 4"):
        offload_decode_attention(*args, plan.hata)
    with pytest.raises(ValueError, match=r"rows \(row-cache slots"):
        OffloadedCache.init(1, 2, 16, 8, rows=17)
    with pytest.raises(ValueError, match="block_tokens"):
        offload_dense_attention(*args, block_tokens=0)


def test_device_halves_lower_for_cuda(monkeypatch):
    """select_rows and attend_rows with the Pallas kernels (compiled, as on a GPU) lower for CUDA,
    each Triton module verified (Llama-3.1-8B head shapes)."""
    monkeypatch.setattr(dispatch, "on_gpu", lambda: True)
    batch, kv_heads, group, head_dim, capacity, budget = 2, 8, 4, 128, 1024, 64
    config = hj.HataConfig(rbit=128, budget=budget)
    codes = DeviceCodes(jnp.zeros((batch, kv_heads, capacity, 4), jnp.uint32), jnp.zeros((batch, kv_heads, capacity)),
                        jnp.full((batch,), 100, jnp.int32))
    rows = RowCache.empty(batch, kv_heads, 2 * budget, head_dim, jnp.bfloat16)
    q = jnp.zeros((batch, kv_heads * group, head_dim), jnp.bfloat16)
    k_new = jnp.zeros((batch, kv_heads, head_dim), jnp.bfloat16)
    w = jnp.zeros((kv_heads, head_dim, 128))
    assert "hata_hamming" in lower_for_cuda(offload.select_rows, q, k_new, k_new, codes, rows, w, config=config,
                                            dtype=jnp.bfloat16, impl="pallas")
    fetch, *_ = jax.eval_shape(functools.partial(offload.select_rows, config=config, dtype=jnp.bfloat16,
                                                 impl="reference"), q, k_new, k_new, codes, rows, w)
    fetch = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), fetch)
    landing = jnp.zeros((batch * kv_heads * budget // 4, 2, head_dim), jnp.bfloat16)
    assert "hata_sparse_decode" in lower_for_cuda(offload.fill_and_attend, q, rows, fetch, landing, impl="pallas")


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU (Pallas kernels compiled)")
def test_offloaded_step_equals_on_device_on_gpu(randn):
    batch, kv_heads, group, head_dim, capacity = 2, 8, 4, 128, 4096
    config = hj.HataConfig(rbit=128, budget=256)
    on_device, offloaded, w = twin_caches(randn, batch, kv_heads, capacity, head_dim, 128, jnp.bfloat16,
                                          [4000, 1000], 4000, rows=512)
    for _ in range(3):
        q = randn(batch, kv_heads * group, head_dim, dtype=jnp.bfloat16)
        k_new, v_new = randn(batch, kv_heads, head_dim), randn(batch, kv_heads, head_dim)
        want, on_device = hj.hata_decode_attention(q, k_new, v_new, on_device, w, config)
        got = offload_decode_attention(q, k_new, v_new, offloaded, w, config)
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    assert_same_contents(on_device, offloaded)
    assert offloaded.staging.pinned


@pytest.mark.slow
def test_bench_small_runs(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).resolve().parents[1]))  # bench/ is not installed
    from bench import offload as bench

    out = tmp_path / "offload.json"
    assert bench.main(["--small", "--out", str(out), "--excess-precision", "--rows", "2", "--skip", "prefill"]) == 0
    data = json.loads(out.read_text())
    kinds = [r["kind"] for r in data["rows"]]
    assert data["complete"] and kinds.count("offload_step") == 3, kinds  # HATA, dense, fits
    assert "device_step" in kinds and kinds.count("skip") == 1, kinds
    for row in data["rows"]:
        if row["kind"] == "offload_step" and row["part"] == "offload":
            assert row["rows_fetched_per_step"] <= row["rows_selected_per_step"]
            assert row["h2d_bytes_per_step"] >= row["rows_fetched_per_step"] * 2 * 64 * 2
            assert row["floor_ms"] <= row["floor_all_selected_ms"]
        if row["kind"] == "offload_step" and row["part"] == "dense":
            assert row["h2d_bytes_per_step"] >= data["settings"]["big_context"] * 2 * 2 * 2 * 64 * 2
