"""Eager calls of the public ops with the Pallas kernels compile once per shape: a `pallas_call`
run eagerly compiles its kernel at every call (found as 40 s of compiling in an 8K-token chunked
prefill on an H100), so the kernel wrappers are jitted. Interpreted Pallas on the CPU compiles the
same way."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import hata_jax as hj

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@pytest.fixture
def compiles():
    """A list that grows by one for every backend compilation while the test runs."""
    seen: list[str] = []

    def listener(event, _secs, **_kwargs):
        if event == COMPILE_EVENT:
            seen.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    yield seen
    jax.monitoring.unregister_event_duration_listener(listener)


def _ops(randn):
    batch, kv_heads, group, seq, head_dim, rbit = 2, 2, 3, 96, 64, 32
    k, v = randn(batch, kv_heads, seq, head_dim), randn(batch, kv_heads, seq, head_dim)
    q, w = randn(batch, kv_heads * group, head_dim), randn(kv_heads, head_dim, rbit)
    lengths = jnp.array([90, 41], jnp.int32)
    idx = jnp.tile(jnp.arange(0, 40, 3, dtype=jnp.int32)[None, None], (batch, kv_heads, 1))
    count = jnp.full((batch, kv_heads), idx.shape[2], jnp.int32)
    config = hj.HataConfig(rbit=rbit, budget=16)
    cache = hj.HataCache.init(batch, kv_heads, seq, head_dim, rbit=rbit, dtype=jnp.float32).prefill(
        k, v, w, lengths, impl="reference")
    q_codes, k_codes = hj.encode(q, w, impl="reference"), hj.encode(k, w, head_axis=1, impl="reference")
    return {
        "encode": lambda: hj.encode(k, w, head_axis=1, impl="pallas"),
        "encode_step": lambda: hj.encode_step(q, k[:, :, 0], w, impl="pallas"),
        "hamming_topk": lambda: hj.hamming_topk(q_codes, k_codes, cache.norms, lengths, budget=16, impl="pallas"),
        "dense_decode_attention": lambda: hj.dense_decode_attention(q, k, v, lengths, impl="pallas"),
        "sparse_decode_attention": lambda: hj.sparse_decode_attention(q, k, v, idx, count, impl="pallas"),
        "hata_decode_attention": lambda: hj.hata_decode_attention(q, k[:, :, 0], v[:, :, 0], cache, w, config,
                                                                  impl="pallas")[0],
    }


@pytest.mark.parametrize("name", ["encode", "encode_step", "hamming_topk", "dense_decode_attention",
                                  "sparse_decode_attention", "hata_decode_attention"])
def test_an_eager_op_compiles_once(randn, compiles, name):
    op = _ops(randn)[name]
    jax.block_until_ready(op())
    first = len(compiles)
    assert first > 0  # the listener sees compilations
    for _ in range(2):
        jax.block_until_ready(op())
    assert len(compiles) == first, f"{name}: {len(compiles) - first} compilations on later eager calls"
