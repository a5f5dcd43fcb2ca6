"""Sequence-sharded decode attention (hata_jax.sequence_sharding) against one device.

The checks need several devices, so they run in a child process with 4 virtual CPU devices
(`--xla_force_host_platform_device_count`); each test here reads the child's verdict for one
check. Each check decodes several steps on one cache split over 2 or 4 devices and on the same
cache unsplit, from fresh random data: outputs equal to float tolerance (with random keys and
values, so HATA selected the same tokens) and the appended caches equal, with ragged lengths, lengths that cross a shard
boundary during the steps, sequences within the budget, sink/recent positions, GQA groups 1
and 4, budgets above a shard's size, and the Pallas kernels (interpreted) inside shard_map; and a
tiny Llama's greedy generation with its caches split by positions gives one device's tokens.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest

DEVICES = 4
CHECKS = ("hata_reference", "hata_group_1_budget_over_shard", "hata_pallas", "dense", "overflow", "errors",
          "generation")


def _child_results() -> dict:
    from conftest import TEST_XLA_FLAGS

    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES} {TEST_XLA_FLAGS}",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, __file__, "--child"], env=env, capture_output=True, text=True, timeout=1200)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    results = {r["check"]: r for r in map(json.loads, lines)}
    if proc.returncode != 0 and not results:
        raise RuntimeError(f"the child failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return results


@pytest.fixture(scope="module")
def results():
    return _child_results()


@pytest.mark.parametrize("check", CHECKS)
def test_sequence_sharded_equals_one_device(results, check):
    assert check in results, f"the child did not report {check}"
    assert results[check]["ok"], results[check]["error"]


# ------------------------------------------------------------------------------------------- child


def _run_checks() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh

    import hata_jax as hj
    from hata_jax import sequence_sharding as ss

    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))

    def normal(*shape, dtype=jnp.float32):
        return jnp.asarray(rng.standard_normal(shape), dtype)

    def mesh(n):
        return Mesh(np.array(jax.devices()[:n]).reshape(n, 1), ("seq", "other"))

    def caches(batch, kv_heads, capacity, d, rbit, lengths, w):
        cache = hj.HataCache.init(batch, kv_heads, capacity, d, rbit=rbit, dtype=jnp.float32)
        shape = (batch, kv_heads, capacity, d)
        return cache.prefill(normal(*shape), normal(*shape), w, jnp.asarray(lengths, jnp.int32), impl="reference")

    def decode_case(n, batch, kv_heads, group, capacity, lengths, config, steps, impl, dense=False, d=16):
        rbit = config.rbit if config else 64
        w = normal(kv_heads, d, rbit)
        one = caches(batch, kv_heads, capacity, d, rbit, lengths, w)
        m = mesh(n)
        split = jax.device_put(one, ss.cache_shardings(m, "seq"))
        if dense:
            sharded = jax.jit(functools.partial(ss.sequence_sharded_dense_decode_attention, mesh=m, axis="seq",
                                                impl=impl))
            single = jax.jit(lambda q, kn, vn, c, w: _dense_one(hj, q, kn, vn, c, w))
        else:
            sharded = jax.jit(functools.partial(ss.sequence_sharded_decode_attention, config=config, mesh=m,
                                                axis="seq", impl=impl))
            single = jax.jit(functools.partial(hj.hata_decode_attention, config=config, impl="reference"))
        worst = 0.0
        for step in range(steps):
            q, kn, vn = normal(batch, kv_heads * group, d), normal(batch, kv_heads, d), normal(batch, kv_heads, d)
            got, split = sharded(q, kn, vn, split, w)
            want, one = single(q, kn, vn, one, w)
            got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
            assert np.array_equal(np.isnan(got), np.isnan(want)), f"step {step}: NaN rows differ"
            err = float(np.nanmax(np.abs(got - want))) if np.isfinite(want).any() else 0.0
            assert err < 2e-5, f"step {step}: output differs by {err}"
            worst = max(worst, err)
            for name in ("k", "v", "codes", "norms", "lengths", "overflow"):
                assert np.array_equal(np.asarray(getattr(split, name)), np.asarray(getattr(one, name))), (
                    f"step {step}: cache.{name} differs"
                )
        assert split.k.sharding.spec == ss.positions_spec("seq")
        return {"max_abs_err": worst}

    def check_hata_reference():
        # 4 shards of 16 positions; row 0 crosses from shard 1 into shard 2, row 1 stays within the budget.
        cfg = hj.HataConfig(rbit=64, budget=12, sink=2, recent=3)
        return decode_case(4, 2, 2, 4, 64, [29, 7], cfg, steps=6, impl="reference")

    def check_hata_group_1_budget_over_shard():
        cfg = hj.HataConfig(rbit=32, budget=24, sink=0, recent=0)  # budget > 16 positions per shard
        return decode_case(4, 3, 3, 1, 64, [60, 33, 17], cfg, steps=3, impl="reference")

    def check_hata_pallas():
        cfg = hj.HataConfig(rbit=64, budget=8, sink=1, recent=1)
        return decode_case(2, 2, 2, 2, 64, [40, 19], cfg, steps=2, impl="pallas", d=64)

    def check_dense():
        return decode_case(4, 2, 2, 2, 64, [31, 5], None, steps=3, impl="reference", dense=True)

    def check_overflow():
        cfg = hj.HataConfig(rbit=64, budget=8)
        return decode_case(2, 2, 2, 2, 32, [31, 10], cfg, steps=2, impl="reference")

    def check_errors():
        cfg = hj.HataConfig(rbit=64, budget=8)
        w = normal(2, 16, 64)
        cache = caches(1, 2, 30, 16, 64, [5], w)
        q, kn = normal(1, 4, 16), normal(1, 2, 16)
        for call, fragment in (
            (lambda: ss.sequence_sharded_decode_attention(q, kn, kn, cache, w, cfg, mesh=mesh(4), axis="seq"),
             "capacity 30 over mesh axis 'seq' of 4"),
            (lambda: ss.sequence_sharded_decode_attention(q, kn, kn, cache, w, cfg, mesh=mesh(2), axis="heads"),
             "'heads' is not in the mesh"),
            (lambda: ss.sequence_sharded_decode_attention(q, kn, kn, cache, w, "cfg", mesh=mesh(2), axis="seq"),
             "config must be a HataConfig"),
            (lambda: ss.sequence_sharded_decode_attention(q[0], kn, kn, cache, w, cfg, mesh=mesh(2), axis="seq"),
             "q"),
            (lambda: ss.sequence_sharded_decode_attention(q, kn, kn, hj.HataCache.init(1, 2, 32, 16, rbit=64,
                                                                                       seq_axis=1), w, cfg,
                                                          mesh=mesh(2), axis="seq"), "seq_axis 1"),
        ):
            try:
                call()
            except ValueError as err:
                assert fragment in str(err), f"{fragment!r} not in {err}"
            else:
                raise AssertionError(f"no error for {fragment!r}")
        return {}

    def check_generation():
        """Greedy generation (ragged prompts) of a tiny Llama on one device and with the caches
        split along the positions over 2 and 4 devices: the same tokens, dense and HATA plans
        (budget below the context), the same prefill logits, the caches split by positions."""
        from flax import nnx

        from hata_jax.models import (
            AttentionPlan,
            LlamaConfig,
            LlamaForCausalLM,
            generate,
            prefill_prompts,
            random_projections,
        )
        from hata_jax.models.sharding import make_mesh

        config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=8,
                             num_kv_heads=4, head_dim=64)
        seed = int(rng.integers(1 << 30))
        model = LlamaForCausalLM(config, rngs=nnx.Rngs(seed))
        prompts = [rng.integers(0, config.vocab_size, n).tolist() for n in (5, 37, 22)]
        hata = hj.HataConfig(rbit=64, budget=12)
        weights = random_projections(config, hata.rbit, seed)
        for attention in ("dense", "hata"):
            plan = AttentionPlan.uniform(config.num_layers, attention, hata, impl="reference", dense_layers=1)
            want = generate(model, prompts, plan=plan, hash_weights=weights, max_new_tokens=6, dense_below=0)
            want_logits = prefill_prompts(model, prompts, capacity=128, hash_weights=weights).logits
            for devices in (2, 4):
                mesh = make_mesh(jax.devices()[:devices], axis="seq")
                split = plan.on_mesh(mesh, "seq", split="positions")
                got = generate(model, prompts, plan=split, hash_weights=weights, max_new_tokens=6, dense_below=0)
                assert got.tokens == want.tokens, (attention, devices, got.tokens, want.tokens)
                prefilled = prefill_prompts(model, prompts, capacity=128, hash_weights=weights, mesh=mesh,
                                            mesh_axis="seq", mesh_split="positions")
                np.testing.assert_allclose(np.asarray(prefilled.logits), np.asarray(want_logits), rtol=1e-4,
                                           atol=1e-4)
                assert prefilled.caches[0].k.sharding.spec == ss.positions_spec("seq")
        return {}

    for name in CHECKS:
        try:
            result = {"check": name, "ok": True, **locals()[f"check_{name}"]()}
        except Exception as err:  # report every check, not only the first failure
            result = {"check": name, "ok": False, "error": f"{type(err).__name__}: {err}"}
        print(json.dumps(result), flush=True)


def _dense_one(hj, q, k_new, v_new, cache, w):
    """One device's dense layer step: append (with codes, as the sharded step does), attend."""
    _, codes, norms = hj.encode_step(q, k_new, w, impl="reference")
    cache = cache.append_encoded(k_new, v_new, codes, norms)
    out = hj.dense_decode_attention(q, cache.k, cache.v, cache.lengths, impl="reference")
    return _nan_if(out, cache), cache


def _nan_if(out, cache):
    import jax.numpy as jnp

    return jnp.where(cache.overflow[:, None, None], jnp.nan, out).astype(out.dtype)


if __name__ == "__main__" and sys.argv[1:] == ["--child"]:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _run_checks()
