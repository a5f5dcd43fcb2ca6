"""bench.kernels' tiling sweep: the tilings it times are valid and select what the default tiling selects."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import hata_jax as hj
from bench import kernels
from pallas_kernels import hamming_topk
from pallas_kernels import radix_select as rs


def test_tiling_variants_at_the_llama_shape():
    variants = kernels.tiling_variants(8, 131072)
    default = rs.default_tiling(8, 131072)
    assert list(variants.values())[0] == default and default.chunk == 2048
    chunks = {name: (t.chunk, t.num_stages) for name, t in variants.items()}
    assert chunks == {"default (chunk 2048)": (2048, 1), "chunk 8192, 2 stages": (8192, 2),
                      "chunk 4096, 2 stages": (4096, 2), "chunk 2048, 2 stages": (2048, 2), "chunk 1024": (1024, 1)}
    for tiling in variants.values():
        assert tiling.chunk % tiling.block == 0 and tiling.scan <= tiling.chunk


def test_tiling_variants_select_the_default_slots():
    """Each tiling of the sweep at a short row (where the longer chunks do not fit and are left out) gives
    the default tiling's slots, in interpret mode, on random codes with a ragged batch."""
    rows, seq, budget, words = 2, 1024, 48, 4
    variants = kernels.tiling_variants(rows, seq)
    assert all(t.chunk <= seq for t in variants.values()) and len(variants) >= 3
    keys = jax.random.split(jax.random.PRNGKey(3), 3)
    q = jax.random.bits(keys[0], (2, rows * 4, words), jnp.uint32)
    k = jax.random.bits(keys[1], (2, rows, seq, words), jnp.uint32)
    norms = jnp.abs(jax.random.normal(keys[2], (2, rows, seq), jnp.float32))
    lengths = jnp.array([seq, 701], jnp.int32)
    want, _ = hj.hamming_topk(q, k, norms, lengths, budget=budget, impl="reference")
    want = np.sort(np.asarray(want), axis=-1)
    for name, tiling in variants.items():
        idx, count, _ = hamming_topk.hamming_topk_with_path(q, k, norms, lengths, budget=budget, interpret=True,
                                                            tiling=tiling)
        np.testing.assert_array_equal(np.sort(np.asarray(idx), axis=-1), want, err_msg=name)
        np.testing.assert_array_equal(np.asarray(count)[:, 0], [budget, budget])
