"""Sequence-sharded decode attention (hata_jax.sequence_sharding) against one device.

The checks need several devices, so they run in a child process with 4 virtual CPU devices
(`--xla_force_host_platform_device_count`); each test here reads the child's verdict for one
check. Each check decodes several steps on one cache split over 2 or 4 devices and on the same
cache unsplit, from fresh random data: outputs equal to float tolerance (with random keys and
values, so HATA selected the same tokens) and the appended caches equal, with ragged lengths, lengths that cross a shard
boundary during the steps, sequences within the budget, sink/recent positions, GQA groups 1
and 4, budgets above a shard's size, and the Pallas kernels (interpreted) inside shard_map; and a
tiny Llama's greedy generation with its caches split by positions gives one device's tokens.

Chunked prefill (`prefill_chunk`): one chunk step against dense causal attention over the whole
prompt and the whole-prompt sharded prefill (with and without codes); a tiny Llama's chunked
prefill gives the whole-prompt prefill's caches and logits (ragged rows, rows shorter than a
chunk, chunks that cross shard boundaries, a prompt that is not a multiple of the chunk, a chunk
longer than the prompt) and greedy generation one device's tokens; bad chunks raise.
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
          "generation", "prefill_chunk_step", "chunked_prefill", "chunked_generation", "chunk_errors",
          "chunked_prefill_memory", "cli_prefill_chunk")


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

    def check_hata_pallas():  # the kernels with the asymmetric score's query planes
        cfg = hj.HataConfig(rbit=64, budget=8, sink=1, recent=1, score="asymmetric")
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
        _expect_errors((
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
        ))
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

    def check_prefill_chunk_step():
        """Chunks of 10 of a 37-token prompt (the last one padded) over 4 shards of 16: each
        chunk's output is dense causal attention's over the whole prompt, the cache the
        whole-prompt sharded prefill's; with w None the codes stay zero and rows are uncoded."""
        m, (b, hkv, group, d, s, t, c) = mesh(4), (3, 2, 2, 16, 64, 37, 10)
        lengths = jnp.asarray([37, 20, 4], jnp.int32)
        q = normal(b, t, hkv * group, d)
        k, v = normal(b, hkv, t, d), normal(b, hkv, t, d)
        want = jax.nn.dot_product_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), is_causal=True,
                                            key_value_seq_lengths=lengths)
        valid = np.arange(t)[None, :] < np.asarray(lengths)[:, None]
        step = jax.jit(functools.partial(ss.sequence_sharded_prefill_chunk, prompt_tokens=t, mesh=m, axis="seq",
                                         impl="reference"))
        padded = -(-t // c) * c
        qp = jnp.pad(q, ((0, 0), (0, padded - t), (0, 0), (0, 0)))
        kp, vp = (jnp.pad(x, ((0, 0), (0, 0), (0, padded - t), (0, 0))) for x in (k, v))
        worst = 0.0
        for w in (normal(hkv, d, 64), None):
            whole = ss.sequence_sharded_prefill(ss.init_cache(b, hkv, s, d, rbit=64, dtype=jnp.float32, mesh=m,
                                                              axis="seq"), k, v, w, lengths, mesh=m, axis="seq",
                                                impl="reference")
            cache = ss.init_cache(b, hkv, s, d, rbit=64, dtype=jnp.float32, mesh=m, axis="seq")
            outs = []
            for first in range(0, t, c):
                out, cache = step(qp[:, first:first + c], kp[:, :, first:first + c], vp[:, :, first:first + c],
                                  cache, w, lengths, jnp.int32(first))
                outs.append(out)
                assert np.array_equal(np.asarray(cache.lengths), np.minimum(np.asarray(lengths), first + c))
            got = np.asarray(jnp.concatenate(outs, axis=1)[:, :t])
            err = float(np.abs(got - np.asarray(want))[valid].max())
            assert err < 2e-5, f"w {w is not None}: output differs by {err}"
            worst = max(worst, err)
            for name in ("k", "v", "codes", "norms", "lengths", "starts", "overflow", "uncoded"):
                np.testing.assert_allclose(np.asarray(getattr(cache, name)), np.asarray(getattr(whole, name)),
                                           rtol=1e-5, atol=1e-5, err_msg=name)
            assert cache.k.sharding.spec == ss.positions_spec("seq")
            assert np.asarray(cache.uncoded).tolist() == [w is None] * b
        return {"max_abs_err": worst}

    def tiny_llama():
        from flax import nnx

        from hata_jax.models import LlamaConfig, LlamaForCausalLM, random_projections

        config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=8,
                             num_kv_heads=4, head_dim=64)
        seed = int(rng.integers(1 << 30))
        model = LlamaForCausalLM(config, rngs=nnx.Rngs(seed))
        # Rows 5 and 22 are shorter than some chunks; 37 pads the prompt to 64 tokens (PROMPT_BUCKET).
        prompts = [rng.integers(0, config.vocab_size, n).tolist() for n in (5, 37, 22)]
        return model, prompts, random_projections(config, 64, seed)

    def check_chunked_prefill():
        """A tiny Llama's prefill split by positions over 2 and 4 devices (64 or 32 positions
        each), 10, 24 and 100 tokens at a time, against the whole-prompt prefill: the same
        caches (codes: but for a bit flipped by rounding) and logits, and one device's logits."""
        from hata_jax.models import prefill_prompts
        from hata_jax.models.sharding import make_mesh

        model, prompts, weights = tiny_llama()
        one = prefill_prompts(model, prompts, capacity=128, hash_weights=weights).logits
        worst = 0.0
        for devices, chunk in ((4, 10), (4, 100), (2, 24)):
            m = make_mesh(jax.devices()[:devices], axis="seq")
            split = {"capacity": 128, "hash_weights": weights, "mesh": m, "mesh_axis": "seq", "mesh_split": "positions"}
            whole = prefill_prompts(model, prompts, **split)
            got = prefill_prompts(model, prompts, prefill_chunk=chunk, **split)
            for want in (whole.logits, one):
                np.testing.assert_allclose(np.asarray(got.logits), np.asarray(want), rtol=1e-4, atol=1e-4)
            worst = max(worst, float(np.abs(np.asarray(got.logits) - np.asarray(whole.logits)).max()))
            for layer, (a, b) in enumerate(zip(got.caches, whole.caches)):
                assert a.k.sharding.spec == ss.positions_spec("seq")
                for name in ("k", "v", "norms"):
                    np.testing.assert_allclose(np.asarray(getattr(a, name)), np.asarray(getattr(b, name)), rtol=1e-4,
                                               atol=1e-4, err_msg=f"{devices} devices, chunk {chunk}, layer {layer}")
                for name in ("lengths", "starts", "overflow", "uncoded"):
                    assert np.array_equal(np.asarray(getattr(a, name)), np.asarray(getattr(b, name))), name
                flipped = np.unpackbits((np.asarray(a.codes) ^ np.asarray(b.codes)).view(np.uint8)).mean()
                assert flipped < 1e-3, f"{devices} devices, chunk {chunk}, layer {layer}: {flipped:.2%} bits differ"
        return {"max_logit_err": worst}

    def check_chunked_generation():
        """Greedy generation with the caches split by positions over 4 devices, prefilled 10
        tokens at a time: one device's tokens, dense and HATA plans."""
        from hata_jax.models import AttentionPlan, generate
        from hata_jax.models.sharding import make_mesh

        model, prompts, weights = tiny_llama()
        hata = hj.HataConfig(rbit=64, budget=12)
        m = make_mesh(jax.devices()[:4], axis="seq")
        for attention in ("dense", "hata"):
            plan = AttentionPlan.uniform(3, attention, hata, impl="reference", dense_layers=1)
            want = generate(model, prompts, plan=plan, hash_weights=weights, max_new_tokens=6, dense_below=0)
            got = generate(model, prompts, plan=plan.on_mesh(m, "seq", split="positions"), hash_weights=weights,
                           max_new_tokens=6, dense_below=0, prefill_chunk=10)
            assert got.tokens == want.tokens, (attention, got.tokens, want.tokens)
        return {}

    def check_chunk_errors():
        from hata_jax.models import prefill_prompts
        from hata_jax.models.sharding import make_mesh

        model, prompts, weights = tiny_llama()
        m = make_mesh(jax.devices()[:2], axis="seq")
        split = {"mesh": m, "mesh_axis": "seq", "mesh_split": "positions"}
        cache = ss.init_cache(1, 2, 32, 16, rbit=64, dtype=jnp.float32, mesh=m, axis="seq")
        q, k = normal(1, 4, 4, 16), normal(1, 2, 4, 16)
        _expect_errors([
            *((lambda bad=bad: prefill_prompts(model, prompts, capacity=128, prefill_chunk=bad, **split),
               f"prefill_chunk (prompt tokens per prefill chunk) must be a positive int, got {bad!r}")
              for bad in (0, -3, True, 2.5, "8")),
            (lambda: prefill_prompts(model, prompts, capacity=128, prefill_chunk=8),
             "prefill_chunk=8 prefills into caches split by positions: it needs a mesh"),
            (lambda: prefill_prompts(model, prompts, capacity=128, prefill_chunk=8, mesh=m, mesh_axis="seq"),
             "mesh_split='heads'"),
            (lambda: model.prefill_chunked(jnp.zeros((1, 4), jnp.int32), jnp.asarray([4]), [], weights, chunk=0,
                                           mesh=m), "prefill_chunk"),
            (lambda: ss.sequence_sharded_prefill_chunk(q, k, k, cache, None, jnp.asarray([4]), 0, prompt_tokens=40,
                                                       mesh=m, axis="seq"), "the prompt has 40 tokens"),
            (lambda: ss.sequence_sharded_prefill_chunk(q[0], k, k, cache, None, jnp.asarray([4]), 0, prompt_tokens=8,
                                                       mesh=m, axis="seq"), "q must have shape"),
            (lambda: ss.sequence_sharded_prefill_chunk(q[:, :3], k, k, cache, None, jnp.asarray([4]), 0,
                                                       prompt_tokens=8, mesh=m, axis="seq"), "chunk length"),
            (lambda: ss.sequence_sharded_prefill_chunk(q, k, k, cache, None, jnp.asarray([9]), 0, prompt_tokens=8,
                                                       mesh=m, axis="seq"), "lengths"),
        ])
        return {}

    def check_chunked_prefill_memory():
        """The compiled prefill's scratch memory per device (4 devices, one 2-layer model): the
        whole prompt's grows with T x T, 128 tokens at a time with T (chunk x slice)."""
        from flax import nnx

        from hata_jax.models import LlamaConfig, LlamaForCausalLM
        from hata_jax.models.generation import ModelSteps
        from hata_jax.models.llama import init_caches
        from hata_jax.models.sharding import make_mesh

        config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=8,
                             num_kv_heads=4, head_dim=64)
        steps = ModelSteps(LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
        weights = [normal(4, 64, 64) for _ in range(2)]
        m = make_mesh(jax.devices()[:4], axis="seq")
        temp = {}
        for t in (1024, 4096):
            caches = init_caches(config, 1, t, rbit=64, dtype=jnp.float32, mesh=m, mesh_axis="seq",
                                 mesh_split="positions")
            for chunk in (None, 128):
                compiled = steps.prefill.lower(steps.state_leaves, jnp.zeros((1, t), jnp.int32),
                                               jnp.asarray([t], jnp.int32), caches, weights, impl="reference", mesh=m,
                                               mesh_axis="seq", mesh_split="positions", chunk=chunk).compile()
                temp[t, chunk] = compiled.memory_analysis().temp_size_in_bytes
        assert temp[4096, 128] < temp[4096, None] / 10, temp
        assert temp[4096, 128] < 6 * temp[1024, 128], temp  # linear in T, not quadratic
        return {"temp_mib": {f"{t}/{chunk}": round(v / 2**20, 1) for (t, chunk), v in temp.items()}}

    def check_cli_prefill_chunk():
        """`hata-jax generate --mesh 2 --mesh-split positions --prefill-chunk 3` on a tiny
        checkpoint prints the text of the whole-prompt prefill and says the chunk size."""
        import contextlib
        import io
        import pathlib
        import tempfile

        from test_models_loaders import _checkpoint

        from hata_jax.cli import main as cli

        with tempfile.TemporaryDirectory() as tmp:
            _checkpoint(pathlib.Path(tmp) / "ckpt", rng, name="qwen2-tied")
            args = ["generate", "--model", str(pathlib.Path(tmp) / "ckpt"), "--prompt", "a prompt of a few tokens",
                    "--max-new-tokens", "4", "--no-chat", "--mesh", "2", "--mesh-split", "positions"]
            texts, logs = [], []
            for extra in ([], ["--prefill-chunk", "3"]):
                out, err = io.StringIO(), io.StringIO()
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                    assert cli.main(args + extra) == 0, err.getvalue()
                texts.append(out.getvalue())
                logs.append(err.getvalue())
        assert texts[0] == texts[1], texts
        assert "(3 tokens per chunk)" in logs[1], logs[1]
        return {}

    for name in CHECKS:
        try:
            result = {"check": name, "ok": True, **locals()[f"check_{name}"]()}
        except Exception as err:  # report every check, not only the first failure
            result = {"check": name, "ok": False, "error": f"{type(err).__name__}: {err}"}
        print(json.dumps(result), flush=True)


def _expect_errors(cases) -> None:
    """Each (call, fragment): the call raises a ValueError whose message holds the fragment."""
    for call, fragment in cases:
        try:
            call()
        except ValueError as err:
            assert fragment in str(err), f"{fragment!r} not in {err}"
        else:
            raise AssertionError(f"no error for {fragment!r}")


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
