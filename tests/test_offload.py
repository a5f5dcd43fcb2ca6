"""HATA with the K/V cache in host memory (hata_jax.offload, models.offload): the offloaded layer
step against hata_decode_attention, generation against on-device HATA, overflow, bytes moved."""
from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_models_llama import HF_CONFIGS, ragged_prompts, random_model

import hata_jax as hj
from hata_jax import dispatch, offload
from hata_jax.models import AttentionPlan, generate
from hata_jax.models.offload import generate_offloaded
from hata_jax.offload import DeviceCodes, OffloadedCache, offload_decode_attention, step_transfer_bytes
from pallas_kernels.backend import lower_for_cuda

REF = "reference"
ON_GPU = jax.default_backend() == "gpu"


def twin_caches(randn, batch, kv_heads, capacity, head_dim, rbit, dtype, lengths, prompt):
    """A HataCache and an OffloadedCache holding the same random prompt (from device arrays), and w."""
    w = randn(kv_heads, head_dim, rbit)
    k, v = randn(batch, kv_heads, prompt, head_dim), randn(batch, kv_heads, prompt, head_dim)
    lengths = jnp.asarray(lengths, jnp.int32)
    on_device = hj.HataCache.init(batch, kv_heads, capacity, head_dim, rbit=rbit, dtype=dtype).prefill(
        k, v, w, lengths, impl=REF)
    offloaded = OffloadedCache.init(batch, kv_heads, capacity, head_dim, rbit=rbit, dtype=dtype)
    offloaded.prefill(k, v, w, lengths, impl=REF)
    return on_device, offloaded, w


def assert_same_contents(on_device: hj.HataCache, offloaded: OffloadedCache) -> None:
    np.testing.assert_array_equal(offloaded.kv[..., 0, :], np.asarray(on_device.k))
    np.testing.assert_array_equal(offloaded.kv[..., 1, :], np.asarray(on_device.v))
    np.testing.assert_array_equal(offloaded.codes.codes, on_device.codes)
    np.testing.assert_array_equal(offloaded.codes.norms, on_device.norms)
    np.testing.assert_array_equal(offloaded.codes.lengths, on_device.lengths)
    np.testing.assert_array_equal(offloaded.lengths, on_device.lengths)


@pytest.mark.parametrize("group, kv_heads, rbit, dtype, config", [
    (1, 2, 32, jnp.float32, hj.HataConfig(rbit=32, budget=8)),
    (3, 2, 128, jnp.bfloat16, hj.HataConfig(rbit=128, budget=8)),
    (4, 1, 64, jnp.float32, hj.HataConfig(rbit=64, budget=10, sink=2, recent=3)),
    (2, 3, 32, jnp.float16, hj.HataConfig(rbit=32, budget=6, score="hamming")),
])
def test_offloaded_step_equals_hata_decode_attention(rng, randn, ragged_lengths, group, kv_heads, rbit, dtype, config):
    """Several steps on a batch of ragged lengths (one short enough that every token is selected
    at first): the same outputs and, after each step, the same cache contents."""
    batch, capacity, prompt, head_dim = 3, 48, 31, 64
    lengths = np.array(ragged_lengths(batch, config.budget + 1, prompt))
    lengths[rng.integers(batch)] = config.budget - 2
    on_device, offloaded, w = twin_caches(randn, batch, kv_heads, capacity, head_dim, rbit, dtype, lengths, prompt)
    assert_same_contents(on_device, offloaded)
    for _ in range(4):
        q = randn(batch, kv_heads * group, head_dim, dtype=dtype)
        k_new, v_new = randn(batch, kv_heads, head_dim), randn(batch, kv_heads, head_dim)
        want, on_device = hj.hata_decode_attention(q, k_new, v_new, on_device, w, config, impl=REF)
        got = offload_decode_attention(q, k_new, v_new, offloaded, w, config, impl=REF)
        assert got.dtype == want.dtype == q.dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=1e-6, atol=1e-6)
        assert_same_contents(on_device, offloaded)


@pytest.mark.parametrize("chunks", [1, 2, 5, 100])
def test_gathered_rows_are_the_selected_ones(randn, ragged_lengths, chunks):
    """append_and_gather writes the new token at each sequence's length and returns exactly the
    rows at the given positions, in (sequence, KV head) order, however the pairs are chunked."""
    batch, kv_heads, capacity, head_dim, budget = 2, 3, 40, 64, 7
    _, cache, _ = twin_caches(randn, batch, kv_heads, capacity, head_dim, 32, jnp.float32,
                              ragged_lengths(batch, 5, 20), 20)
    cache.copy_chunks = chunks
    before = cache.lengths.copy()
    idx = jnp.asarray(np.random.default_rng(0).integers(0, capacity, (batch, kv_heads, budget)), jnp.int32)
    kv_new = randn(batch, kv_heads, 2, head_dim)
    blocks = cache.append_and_gather(idx, kv_new)
    assert len(blocks) == min(chunks, batch * kv_heads)
    rows = np.concatenate([np.asarray(b) for b in blocks]).reshape(batch, kv_heads, budget, 2, head_dim)
    np.testing.assert_array_equal(rows, np.take_along_axis(cache.kv, np.asarray(idx)[..., None, None], axis=2))
    np.testing.assert_array_equal(cache.kv[np.arange(batch), :, before], kv_new)
    np.testing.assert_array_equal(cache.lengths, before + 1)


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
    _, cache, w = twin_caches(randn, batch, kv_heads, capacity, head_dim, 32, jnp.float32, [11, 9, 10], 11)

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
    batch, kv_heads, head_dim, steps = 2, 3, 64, 3
    config = hj.HataConfig(rbit=32, budget=budget)
    _, cache, w = twin_caches(randn, batch, kv_heads, 40, head_dim, 32, dtype, [20, 3], 20)
    for _ in range(steps):
        offload_decode_attention(randn(batch, kv_heads, head_dim), randn(batch, kv_heads, head_dim),
                                 randn(batch, kv_heads, head_dim), cache, w, config, impl=REF)
    item = jnp.dtype(dtype).itemsize
    want = {"host_to_device": batch * kv_heads * budget * 2 * head_dim * item,
            "device_to_host": batch * kv_heads * (4 * budget + 2 * head_dim * item)}
    assert step_transfer_bytes(batch, kv_heads, budget, head_dim, dtype) == want
    assert cache.stats.steps == steps
    assert cache.stats.host_to_device_bytes == steps * want["host_to_device"]
    assert cache.stats.device_to_host_bytes == steps * want["device_to_host"]


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-tied"])
def test_generation_equals_on_device_hata(rng, name):
    """Offloaded HATA layers generate the tokens of on-device HATA (every step HATA: no
    short-context policy), with budgets below the prompt lengths, and count their bytes."""
    model, _ = random_model(HF_CONFIGS[name], rng)
    config = model.config
    hata = hj.HataConfig(rbit=32, budget=6)
    plan = AttentionPlan.uniform(config.num_layers, "hata", hata, dense_layers=1)
    weights = rng.standard_normal((config.num_layers, config.num_kv_heads, config.head_dim, 32)).astype(np.float32)
    prompts = ragged_prompts(rng, HF_CONFIGS[name]["vocab_size"], [19, 9, 14])
    want = generate(model, prompts, max_new_tokens=7, plan=plan, hash_weights=weights, dense_below=0)
    got, caches = generate_offloaded(model, prompts, max_new_tokens=7, plan=plan, hash_weights=weights)
    assert got.tokens == want.tokens
    assert got.prompt_lengths == [19, 9, 14] and got.decode_steps == 5
    kinds = [type(c).__name__ for c in caches]
    assert kinds == ["HataCache"] + ["OffloadedCache"] * (config.num_layers - 1)
    per_step = step_transfer_bytes(3, config.num_kv_heads, hata.budget, config.head_dim, model.dtype)
    for cache in caches[1:]:
        assert cache.stats.steps == 6
        assert cache.stats.host_to_device_bytes == 6 * per_step["host_to_device"]
        np.testing.assert_array_equal(cache.lengths, np.array([19, 9, 14]) + 6)


def test_generation_rejects_what_it_cannot_run(rng):
    model, _ = random_model(HF_CONFIGS["llama-gqa"], rng)
    plan = AttentionPlan.uniform(model.config.num_layers, "hata", hj.HataConfig(rbit=32, budget=4), dense_layers=1)
    with pytest.raises(ValueError, match="cannot hold the prompt"):
        generate_offloaded(model, [[1, 2, 3]], plan=plan, max_new_tokens=6, capacity=8)
    with pytest.raises(ValueError, match="layers"):
        generate_offloaded(model, [[1, 2, 3]], plan=AttentionPlan.uniform(2, "hata", plan.hata), max_new_tokens=2)


def test_device_halves_lower_for_cuda(monkeypatch):
    """select_rows and attend_rows with the Pallas kernels (compiled, as on a GPU) lower for CUDA,
    each Triton module verified (Llama-3.1-8B head shapes)."""
    monkeypatch.setattr(dispatch, "on_gpu", lambda: True)
    batch, kv_heads, group, head_dim, capacity, budget = 2, 8, 4, 128, 1024, 64
    config = hj.HataConfig(rbit=128, budget=budget)
    codes = DeviceCodes(jnp.zeros((batch, kv_heads, capacity, 4), jnp.uint32), jnp.zeros((batch, kv_heads, capacity)),
                        jnp.full((batch,), 100, jnp.int32))
    q = jnp.zeros((batch, kv_heads * group, head_dim), jnp.bfloat16)
    k_new = jnp.zeros((batch, kv_heads, head_dim), jnp.bfloat16)
    w = jnp.zeros((kv_heads, head_dim, 128))
    assert "hata_hamming" in lower_for_cuda(offload.select_rows, q, k_new, k_new, codes, w, config=config,
                                            dtype=jnp.bfloat16, impl="pallas")
    blocks = [jnp.zeros((6, budget, 2, head_dim), jnp.bfloat16), jnp.zeros((10, budget, 2, head_dim), jnp.bfloat16)]
    counts = jnp.zeros((batch, kv_heads), jnp.int32)
    assert "hata_sparse_decode" in lower_for_cuda(offload.attend_rows, q, blocks, counts, impl="pallas")


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU (Pallas kernels compiled)")
def test_offloaded_step_equals_on_device_on_gpu(randn):
    batch, kv_heads, group, head_dim, capacity = 2, 8, 4, 128, 4096
    config = hj.HataConfig(rbit=128, budget=256)
    on_device, offloaded, w = twin_caches(randn, batch, kv_heads, capacity, head_dim, 128, jnp.bfloat16,
                                          [4000, 1000], 4000)
    for _ in range(3):
        q = randn(batch, kv_heads * group, head_dim, dtype=jnp.bfloat16)
        k_new, v_new = randn(batch, kv_heads, head_dim), randn(batch, kv_heads, head_dim)
        want, on_device = hj.hata_decode_attention(q, k_new, v_new, on_device, w, config)
        got = offload_decode_attention(q, k_new, v_new, offloaded, w, config)
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    assert_same_contents(on_device, offloaded)


@pytest.mark.slow
def test_bench_small_runs(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).resolve().parents[1]))  # bench/ is not installed
    from bench import offload as bench

    out = tmp_path / "offload.json"
    assert bench.main(["--small", "--out", str(out), "--excess-precision"]) == 0
    data = json.loads(out.read_text())
    kinds = [r["kind"] for r in data["rows"]]
    assert data["complete"] and "offload_step" in kinds and "device_step" in kinds, kinds
    for row in data["rows"]:
        if row["kind"] == "offload_step":
            assert row["h2d_bytes_per_step"] == row["expected_h2d_bytes_per_step"]
