"""Head-sharded decoding (hata_jax.sharding, models.sharding) equals single-device decoding.

The device count must be set before jax starts its backend, which this pytest process has
already done, so the checks run in child processes: `python tests/test_sharding.py SEED` runs
every check on 4 virtual CPU devices and prints one JSON line per check; `... SEED --process I
--port P` is one of two processes (2 devices each) of a `jax.distributed` run. Each test below
asserts that its check passed (its traceback is the failure message). Data comes from the
session seed (conftest), so it differs between runs and `HATA_TEST_SEED` replays one.

In a one-process run the children start right after collection (conftest's
`pytest_collection_finish` calls :func:`start_children` when a test of this file is selected), so
they run beside the rest of the suite: the pytest process keeps about one core busy, the children
use the other. Under pytest-xdist (the README's `-n 2 --dist loadfile`) they start when the worker
that is sent this file runs its first test, while the other worker goes on with other files.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np
import pytest

DEVICES = 4
HERE = os.path.abspath(__file__)


# ----------------------------------------------------------------------------- the checks (child process)

def _rand(rng, *shape):
    import jax.numpy as jnp

    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32))


def _mesh(n, explicit=False):
    import jax
    from jax.sharding import AxisType

    kind = AxisType.Explicit if explicit else AxisType.Auto
    return jax.make_mesh((n,), ("model",), (kind,), devices=jax.devices()[:n])


def _assert_head_split(x, heads, devices):
    """x's axis 1 (`heads` long) is split in `devices` equal parts, one per device."""
    shards = x.addressable_shards
    assert len(shards) == devices and {s.data.shape[1] for s in shards} == {heads // devices}, x.sharding


def _assert_caches_equal(got, want):
    for field in ("k", "v", "lengths", "overflow"):
        np.testing.assert_array_equal(np.asarray(getattr(got, field)), np.asarray(getattr(want, field)), err_msg=field)
    np.testing.assert_allclose(np.asarray(got.norms), np.asarray(want.norms), rtol=1e-6)
    # Codes: the same bits but for projections within rounding of zero, whose sign may differ when
    # the sharded and the plain program sum a dot in different orders (eager calls): at most 1e-4
    # of the bits (a wrong code, head or position changes about half of its bits).
    flipped = np.unpackbits((np.asarray(got.codes) ^ np.asarray(want.codes)).view(np.uint8))
    assert flipped.mean() <= 1e-4, f"codes: {int(flipped.sum())} of {flipped.size} bits differ"


def _attention_case(rng, kv_heads, group, devices, impl="reference", explicit=False, jit=True, capacity=160):
    """Prefill, HATA decode, append and dense decode, sharded and not, on a ragged batch."""
    import jax
    import jax.numpy as jnp

    import hata_jax as hj
    from hata_jax import sharding as hs

    batch, d, rbit, budget = 3, 64, 64, 24
    mesh = _mesh(devices, explicit)
    k, v = _rand(rng, batch, kv_heads, capacity, d), _rand(rng, batch, kv_heads, capacity, d)
    w = _rand(rng, kv_heads, d, rbit)
    lengths = jnp.asarray([rng.integers(1, budget), rng.integers(budget, capacity - 2), capacity - 2], jnp.int32)
    plain = hj.HataCache.init(batch, kv_heads, capacity, d, rbit=rbit, dtype=jnp.float32)
    plain = plain.prefill(k, v, w, lengths, impl=impl)
    sharded = hs.init_cache(batch, kv_heads, capacity, d, rbit=rbit, dtype=jnp.float32, mesh=mesh)
    _assert_head_split(sharded.k, kv_heads, devices)
    assert sharded.lengths.sharding.is_fully_replicated
    sharded = hs.sharded_prefill(sharded, k, v, w, lengths, mesh=mesh, impl=impl)
    for x in (sharded.k, sharded.v, sharded.codes, sharded.norms):
        _assert_head_split(x, kv_heads, devices)
    _assert_caches_equal(sharded, plain)
    placed = hs.shard_cache(plain, mesh)
    _assert_head_split(placed.codes, kv_heads, devices)
    _assert_caches_equal(placed, plain)

    config = hj.HataConfig(rbit=rbit, budget=budget)
    wrap = jax.jit if jit else (lambda f: f)
    q = _rand(rng, batch, kv_heads * group, d)
    k_new, v_new = _rand(rng, batch, kv_heads, d), _rand(rng, batch, kv_heads, d)
    want, plain = hj.hata_decode_attention(q, k_new, v_new, plain, w, config, impl=impl)
    got, sharded = wrap(lambda *a: hs.sharded_hata_decode_attention(*a, config, mesh=mesh, impl=impl))(q, k_new, v_new,
                                                                                              sharded, w)
    _assert_head_split(got, kv_heads * group, devices)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
    _assert_caches_equal(sharded, plain)

    k_new, v_new = _rand(rng, batch, kv_heads, d), _rand(rng, batch, kv_heads, d)
    plain = plain.append(k_new, v_new, w, impl=impl)
    sharded = wrap(lambda *a: hs.sharded_append(*a, mesh=mesh, impl=impl))(sharded, k_new, v_new, w)
    _assert_caches_equal(sharded, plain)
    want = hj.dense_decode_attention(q, plain.k, plain.v, plain.lengths, return_lse=True, impl=impl)
    got = wrap(lambda *a: hs.sharded_dense_decode_attention(*a, mesh=mesh, return_lse=True, impl=impl))(
        q, sharded.k, sharded.v, sharded.lengths)
    for g, e in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=2e-5, atol=2e-5)


def check_attention_wrappers(rng):
    """Hkv 4 and 8 over 4 and 2 devices (1 and 4 heads a device), G 3 and 1, jitted (the reference
    path); the other checks add G 2 and 2 and 1 heads a device."""
    for kv_heads, group, devices in ((4, 3, 4), (8, 1, 2)):
        _attention_case(rng, kv_heads, group, devices)


def check_pallas_inside_shard_map(rng):
    """The interpreted Pallas kernels inside the shard_map, G 2."""
    _attention_case(rng, 4, 2, 2, impl="pallas")


def check_explicit_mesh_eager_calls(rng):
    """A mesh of Explicit axes (jax.make_mesh's default) and calls outside jit on unplaced arrays."""
    _attention_case(rng, 4, 2, 4, explicit=True, jit=False)


# Every public op, run by `_public_ops`, with the roles of its arrays' axes ("b" batch, "h" heads).
OPS_SHAPE = dict(batch=2, kv_heads=2, group=2, capacity=48, prompt=40, head_dim=64, rbit=32, budget=8)


def _ops_inputs(rng):
    b, hkv, g, t, d, r = (OPS_SHAPE[n] for n in ("batch", "kv_heads", "group", "prompt", "head_dim", "rbit"))
    return dict(k=rng.standard_normal((b, hkv, t, d), np.float32), v=rng.standard_normal((b, hkv, t, d), np.float32),
                w=rng.standard_normal((hkv, d, r), np.float32), q=rng.standard_normal((b, hkv * g, d), np.float32),
                k_new=rng.standard_normal((b, hkv, d), np.float32), v_new=rng.standard_normal((b, hkv, d), np.float32),
                lengths=np.array([t, int(rng.integers(OPS_SHAPE["budget"] + 1, t))], np.int32))


def _public_ops(x, impl, out_sharding=None):
    """Every public op on the inputs `x` (a dict of arrays): {name: output}."""
    import hata_jax as hj

    s, r, budget = OPS_SHAPE["capacity"], OPS_SHAPE["rbit"], OPS_SHAPE["budget"]
    b, hkv, _, d = x["k"].shape  # local shapes inside a shard_map
    cache = hj.HataCache.init(b, hkv, s, d, rbit=r, dtype=np.float32, out_sharding=out_sharding)
    out = {"init": cache}
    cache = out["prefill"] = cache.prefill(x["k"], x["v"], x["w"], x["lengths"], impl=impl)
    out["append"] = cache.append(x["k_new"], x["v_new"], x["w"], impl=impl)
    out["encode"] = hj.encode(x["k"], x["w"], head_axis=1, impl=impl)
    q_codes, k_codes, k_norms = out["encode_step"] = hj.encode_step(x["q"], x["k_new"], x["w"], impl=impl)
    out["key_norms"] = hj.key_norms(x["k"])
    codes = (q_codes, cache.codes, cache.norms, cache.lengths)
    scores = out["hamming_scores"] = hj.hamming_scores(*codes, impl=impl)
    out["select_topk"] = hj.select_topk(scores, budget, cache.lengths, impl=impl)
    idx, count = out["hamming_topk"] = hj.hamming_topk(*codes, budget=budget, impl=impl)
    out["sparse_decode_attention"] = hj.sparse_decode_attention(x["q"], cache.k, cache.v, idx, count, impl=impl)
    out["dense_decode_attention"] = hj.dense_decode_attention(x["q"], cache.k, cache.v, cache.lengths,
                                                              return_lse=True, impl=impl)
    out["hata_decode_attention"] = hj.hata_decode_attention(x["q"], x["k_new"], x["v_new"], cache, x["w"],
                                                            hj.HataConfig(rbit=r, budget=budget), impl=impl)
    return out


def _assert_ops_equal(got, want):
    import jax

    from hata_jax import HataCache

    for name in want:
        for g, e in zip(jax.tree.leaves(got[name]), jax.tree.leaves(want[name])):
            g, e = np.asarray(g), np.asarray(e)
            if g.dtype == np.uint32 and name != "init":  # codes: see _assert_caches_equal
                assert (np.unpackbits((g ^ e).view(np.uint8))).mean() <= 1e-4, name
            else:
                np.testing.assert_allclose(g, e, rtol=2e-5, atol=2e-5, err_msg=name)
        if isinstance(want[name], HataCache):
            assert got[name].lengths.tolist() == want[name].lengths.tolist(), name


def _assert_split(x, spec):
    """x's type is split as `spec` on the explicit mesh."""
    import jax

    entries = tuple(jax.typeof(x).sharding.spec)
    assert entries[:len(spec)] == tuple(spec) and not any(entries[len(spec):]), (entries, spec)


def check_explicit_mode_every_op(rng):
    """Every public op under `jax.set_mesh` with Explicit axes (a 1x1 mesh; batch-, head- and
    batch-and-head-sharded caches on a 2x2 mesh; replicated inputs given to a split cache),
    eager (batch-sharded) and jitted, reference path; the interpreted kernels on the batch-and-head-sharded
    mesh: the single-device results, laid out as the cache."""
    import jax
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    x = _ops_inputs(rng)
    want = {impl: jax.jit(lambda y: _public_ops(y, impl))(x) for impl in ("reference", "pallas")}
    roles = {"k": "bh", "v": "bh", "q": "bh", "k_new": "bh", "v_new": "bh", "w": "h", "lengths": "b"}
    # (mesh shape, the cache's layout, impl, jitted, inputs laid out as the cache (else unplaced))
    cases = [((1, 1), P(), "reference", True, True), ((2, 2), P("data"), "reference", False, True),
             ((2, 2), P(None, "model"), "reference", True, False),
             ((2, 2), P("data", "model"), "reference", True, True), ((2, 2), P("data", "model"), "pallas", True, True)]
    for shape, spec, impl, jit, placed in cases:
        mesh = jax.make_mesh(shape, ("data", "model"), (AxisType.Explicit,) * 2,
                             devices=jax.devices()[:shape[0] * shape[1]])
        split = dict(zip("bh", tuple(spec) + (None, None)))
        inputs = {n: jax.device_put(a, NamedSharding(mesh, P(*(split[r] for r in roles[n])))) if placed else a
                  for n, a in x.items()}
        with jax.set_mesh(mesh):
            run = (lambda y: _public_ops(y, impl, spec))
            got = jax.jit(run)(inputs) if jit else run(inputs)
        _assert_ops_equal(got, want[impl])
        for name in ("init", "prefill", "append"):
            _assert_split(got[name].k, spec)
            _assert_split(got[name].lengths, spec[:1])
        _assert_split(got["hata_decode_attention"][1].codes, spec)
        _assert_split(got["hata_decode_attention"][0], spec)
        _assert_split(got["hamming_topk"][0], spec)


def check_explicit_mode_caller_storage(rng):
    """HATA over a caller's storage under a 2x2 Explicit mesh, jitted: a paged int8 pool split on
    its KV heads (the page table and lengths on the batch), and a sequence-major fp8 cache split on
    batch and KV heads; `from_kv`, a HATA step and dense attention over the storage equal the
    single-device run, and the storage keeps its layout."""
    import jax
    from jax.sharding import AxisType
    from jax.sharding import PartitionSpec as P

    import hata_jax as hj
    from bench.kv_layouts import make_storage

    b, hkv, g, s, d, rbit = 4, 4, 2, 48, 64, 32
    k, v = _rand(rng, b, hkv, s, d), _rand(rng, b, hkv, s, d)
    q, k_new, w = _rand(rng, b, hkv * g, d), _rand(rng, b, hkv, d), _rand(rng, hkv, d, rbit)
    lengths = np.array([40, 17, 33, 5], np.int32)
    config = hj.HataConfig(rbit=rbit, budget=8)
    mesh = jax.make_mesh((2, 2), ("data", "model"), (AxisType.Explicit,) * 2, devices=jax.devices()[:4])
    for kind, pool_spec in (((1, True, "int8"), P(None, None, "model")), ((1, False, "fp8-head"),
                                                                           P("data", None, "model"))):
        storage, _, _ = make_storage(rng, k, v, *kind, page_size=16, logical=False)
        seq_axis = storage.pop("seq_axis")

        def run(st):
            st = dict(st)
            kk, vv = st.pop("k"), st.pop("v")
            dense = hj.dense_decode_attention(q, kk, vv, lengths, seq_axis=seq_axis, impl="reference", **st)
            cache = hj.HataCache.from_kv(kk, vv, w, lengths, seq_axis=seq_axis, impl="reference", **st)
            out, cache = hj.hata_decode_attention(q, k_new, k_new, cache, w, config, impl="reference")
            return dense, out, cache

        want = jax.jit(run)(storage)
        with jax.set_mesh(mesh):
            placed = dict(storage, **{n: jax.sharding.reshard(storage[n], pool_spec) for n in ("k", "v")})
            got = jax.jit(run)(placed)
        for g_arr, w_arr in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(g_arr, np.float32), np.asarray(w_arr, np.float32), rtol=1e-5,
                                       atol=1e-5)
        assert tuple(jax.typeof(got[2].k).sharding.spec)[:3] == tuple(pool_spec)[:3], (kind, got[2].k.sharding)
        _assert_split(got[2].codes, P(*[x for x in (pool_spec[0], "model")]))


def check_auto_mode_and_inside_shard_map(rng):
    """Every public op jitted on a mesh of Auto axes with batch- and head-split inputs (XLA
    partitions), and inside a `shard_map` over a batch-and-head-split Explicit mesh (local
    arrays): the single-device results."""
    import jax
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    x = _ops_inputs(rng)
    want = _public_ops(x, "reference")
    mesh = jax.make_mesh((2, 2), ("data", "model"), (AxisType.Auto,) * 2, devices=jax.devices()[:4])
    heads = {"k": P("data", "model"), "v": P("data", "model"), "q": P("data", "model"), "k_new": P("data", "model"),
             "v_new": P("data", "model"), "w": P("model"), "lengths": P("data")}
    inputs = {n: jax.device_put(a, NamedSharding(mesh, heads[n])) for n, a in x.items()}
    with jax.set_mesh(mesh):
        got = jax.jit(lambda y: _public_ops(y, "reference", NamedSharding(mesh, P("data", "model"))))(inputs)
    _assert_ops_equal(got, want)
    assert got["prefill"].k.sharding.spec[:2] == ("data", "model")

    explicit = jax.make_mesh((2, 2), ("data", "model"), (AxisType.Explicit,) * 2, devices=jax.devices()[:4])
    local_want = {n: v for n, v in want.items() if n != "init"}  # the local cache has the local shape

    def local(y):
        out = _public_ops(y, "reference")
        return {n: v for n, v in out.items() if n != "init"}

    shapes = jax.eval_shape(local, x)
    out_specs = jax.tree.map(lambda a: P(*(("data", "model")[:min(a.ndim, 2)])) if a.ndim else P(), shapes)
    # Lengths and overflow [B] are split on the batch only.
    with jax.set_mesh(explicit):
        inputs = {n: jax.device_put(a, NamedSharding(explicit, heads[n])) for n, a in x.items()}
        in_specs = ({n: heads[n] for n in x},)
        got = jax.jit(jax.shard_map(local, mesh=explicit, in_specs=in_specs, out_specs=out_specs,
                                    check_vma=False))(inputs)
    _assert_ops_equal(got, local_want)


def _raises(fn, *fragments):
    try:
        fn()
    except ValueError as err:
        assert all(f in str(err) for f in fragments), str(err)
        return
    raise AssertionError(f"no ValueError mentioning {fragments}")


def check_clear_errors(rng):
    """Indivisible head counts, unknown axes, "sparse" layers and Explicit meshes for the model."""
    import jax.numpy as jnp
    from flax import nnx

    import hata_jax as hj
    from hata_jax import sharding as hs
    from hata_jax.models import AttentionPlan, LlamaConfig, LlamaForCausalLM
    from hata_jax.models import sharding as ms

    mesh = _mesh(4)
    cache = hj.HataCache.init(2, 6, 32, 64, rbit=32, dtype=jnp.float32)
    q, kv, w = _rand(rng, 2, 12, 64), _rand(rng, 2, 6, 64), _rand(rng, 6, 64, 32)
    _raises(lambda: hs.sharded_hata_decode_attention(q, kv, kv, cache, w, hj.HataConfig(rbit=32, budget=8), mesh=mesh),
            "cannot split 6 KV heads", "'model' of 4 devices")
    _raises(lambda: hs.sharded_dense_decode_attention(q, cache.k, cache.v, cache.lengths, mesh=mesh),
            "cannot split 6 KV heads")
    _raises(lambda: hs.sharded_append(cache, kv, kv, w, mesh=mesh), "cannot split 6 KV heads")
    _raises(lambda: hs.init_cache(2, 6, 32, 64, mesh=mesh), "cannot split 6 KV heads")
    seq_major = hj.HataCache.init(2, 4, 32, 64, rbit=32, dtype=jnp.float32, seq_axis=1)
    _raises(lambda: hs.sharded_append(seq_major, kv[:, :4], kv[:, :4], w[:4], mesh=mesh),
            "splits head-major caches", "seq_axis=1")
    _raises(lambda: hs.sharded_dense_decode_attention(q, cache.k, cache.v, cache.lengths, mesh=mesh, axis="heads"),
            "mesh axis 'heads' is not in the mesh")
    config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=64)
    _raises(lambda: ms.shard_model(LlamaForCausalLM(config, rngs=nnx.Rngs(0)), mesh), "cannot split 2 KV heads")
    _raises(lambda: ms.init_model(config, mesh), "cannot split 2 KV heads")
    _raises(lambda: ms.shard_model(LlamaForCausalLM(config, rngs=nnx.Rngs(0)), _mesh(2, explicit=True)),
            "needs an Auto axis")
    _raises(lambda: AttentionPlan.for_method(2, "quest", hj.HataConfig(), dense_layers=1).on_mesh(mesh),
            "'dense' and 'hata' layers only")
    _raises(lambda: AttentionPlan.uniform(2, "hata").on_mesh(mesh, "heads"), "mesh axis 'heads' is not in the mesh")


TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=8, num_kv_heads=4,
            head_dim=64)


def _generation_case(rng, config_args, devices_list, attentions, init_on_mesh=False):
    """Greedy generation (ragged prompts) on one device and on each mesh: the same tokens, the
    same prefill logits, caches split on the KV heads, one compiled decode step per plan."""
    import jax
    from flax import nnx
    from jax.sharding import PartitionSpec as P

    from hata_jax import HataConfig
    from hata_jax.models import (
        AttentionPlan,
        LlamaConfig,
        LlamaForCausalLM,
        generate,
        generation,
        prefill_prompts,
        random_projections,
    )
    from hata_jax.models import sharding as ms

    config = LlamaConfig(**config_args)
    seed = int(rng.integers(1 << 30))
    prompts = [rng.integers(0, config.vocab_size, n).tolist() for n in (5, 37, 22)]
    hata = HataConfig(rbit=64, budget=12)
    weights = random_projections(config, hata.rbit, seed)
    for attention in attentions:
        plan = AttentionPlan.uniform(config.num_layers, attention, hata, impl="reference", dense_layers=1)
        single_model = LlamaForCausalLM(config, rngs=nnx.Rngs(seed))
        want = generate(single_model, prompts, plan=plan, hash_weights=weights, max_new_tokens=7, dense_below=0)
        want_logits = prefill_prompts(single_model, prompts, capacity=128, hash_weights=weights).logits
        for devices in devices_list:
            mesh = ms.make_mesh(jax.devices()[:devices])
            model = (ms.init_model(config, mesh, dtype="float32", seed=seed) if init_on_mesh else
                     ms.shard_model(LlamaForCausalLM(config, rngs=nnx.Rngs(seed)), mesh))
            state = nnx.state(model)
            assert state["layers"][0]["self_attn"]["q_proj"]["kernel"][...].sharding.spec == P(None, "model")
            rows = P("model", None) if config.intermediate_size % devices == 0 else P()  # else replicated
            assert state["layers"][0]["mlp"]["down_proj"]["kernel"][...].sharding.spec == rows
            table = state["embed_tokens"]["embedding"][...].sharding.spec
            assert table == (P("model", None) if config.tie_word_embeddings else P())
            traces = generation.TRACES["decode"]
            got = generate(model, prompts, plan=plan.on_mesh(mesh), hash_weights=weights, max_new_tokens=7,
                           dense_below=0)
            assert got.tokens == want.tokens, (attention, devices, got.tokens, want.tokens)
            assert generation.TRACES["decode"] == traces + 1  # no retrace after the first step
            prefilled = prefill_prompts(model, prompts, capacity=128, hash_weights=weights, mesh=mesh)
            np.testing.assert_allclose(np.asarray(prefilled.logits), np.asarray(want_logits), rtol=1e-4, atol=1e-4)
            _assert_head_split(prefilled.caches[0].k, config.num_kv_heads, devices)


def check_generation_dense_and_hata(rng):
    """Untied LM head, G 2, over 2 and 4 devices, dense and HATA plans (budget below the context)."""
    _generation_case(rng, TINY, (2, 4), ("dense", "hata"))


def check_generation_tied_biased_g1(rng):
    """Tied embedding (vocabulary-split), q/k/v biases, G 1, an intermediate size 4 does not
    divide (replicated MLP), random weights made on the mesh; HATA over 4 devices."""
    _generation_case(rng, {**TINY, "num_heads": 4, "intermediate_size": 90, "tie_word_embeddings": True,
                           "qkv_bias": True}, (4,), ("hata",), init_on_mesh=True)


def check_sharded_step_lowers_for_cuda(rng):
    """The model's decode step on a 2-device mesh lowers for CUDA with the Pallas kernels inside
    the shard_maps (impl="auto" resolving as on a GPU; each Triton module verified)."""
    import jax
    import jax.numpy as jnp

    from hata_jax import HataConfig, dispatch
    from hata_jax.models import AttentionPlan, LlamaConfig, init_caches
    from hata_jax.models import sharding as ms
    from hata_jax.models.generation import ModelSteps, Sampling
    from pallas_kernels.backend import lower_for_cuda

    config = LlamaConfig(**TINY)
    mesh = ms.make_mesh(jax.devices()[:2])
    steps = ModelSteps(ms.init_model(config, mesh, dtype=jnp.bfloat16))
    plan = AttentionPlan.uniform(config.num_layers, "hata", HataConfig(rbit=64, budget=16), dense_layers=1)
    caches = init_caches(config, 2, 128, rbit=64, dtype=jnp.bfloat16, mesh=mesh)
    weights = ms.shard_hash_weights([_rand(rng, config.num_kv_heads, config.head_dim, 64)] * config.num_layers, mesh)
    on_gpu, dispatch.on_gpu = dispatch.on_gpu, lambda: True
    try:
        text = lower_for_cuda(lambda *a: steps.decode(*a, plan=plan.on_mesh(mesh), sampling=Sampling()),
                              steps.state_leaves, jnp.zeros(2, jnp.int32), caches, weights, jax.random.PRNGKey(0))
    finally:
        dispatch.on_gpu = on_gpu
    for kernel in ("hata_hamming", "hata_select", "hata_sparse_decode", "hata_dense_decode"):
        assert kernel in text, kernel


def check_hata_step_communicates_as_dense(rng):
    """The compiled head-sharded decode step of HATA has the collectives of the dense step, no more:
    the tensor-parallel all-reduces (two per layer) and the logits' gather; selection and attention
    run on each device's own heads without communication (issue 19, item 2)."""
    import collections
    import re

    import jax
    import jax.numpy as jnp

    from hata_jax import HataConfig
    from hata_jax.models import AttentionPlan, LlamaConfig, init_caches
    from hata_jax.models import sharding as ms
    from hata_jax.models.generation import ModelSteps, Sampling

    config = LlamaConfig(**TINY)
    mesh = ms.make_mesh(jax.devices()[:2])
    steps = ModelSteps(ms.init_model(config, mesh, dtype=jnp.float32))
    weights = ms.shard_hash_weights([_rand(rng, config.num_kv_heads, config.head_dim, 64)] * config.num_layers, mesh)
    counts = {}
    for method in ("dense", "hata"):
        plan = AttentionPlan.uniform(config.num_layers, method, HataConfig(rbit=64, budget=16), "reference",
                                     dense_layers=1).on_mesh(mesh)
        caches = init_caches(config, 2, 128, rbit=64, dtype=jnp.float32, mesh=mesh)
        text = jax.jit(lambda *a, plan=plan: steps.decode(*a, plan=plan, sampling=Sampling())).lower(
            steps.state_leaves, jnp.zeros(2, jnp.int32), caches, weights, jax.random.PRNGKey(0)).compile().as_text()
        ops = re.findall(r"= \S+ (all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)(?:-start)?\(",
                         text)
        counts[method] = collections.Counter(ops)
    assert counts["hata"] == counts["dense"], counts
    assert counts["dense"]["all-reduce"] == 2 * config.num_layers, counts


CHECKS = {name: fn for name, fn in globals().items() if name.startswith("check_")}


def run_checks(seed: int) -> None:
    import jax

    jax.config.update("jax_num_cpu_devices", DEVICES)
    for name, fn in CHECKS.items():
        rng = np.random.default_rng([seed, len(name)] + [ord(c) for c in name])
        start = time.perf_counter()
        try:
            fn(rng)
            result = {"check": name, "ok": True}
        except Exception:
            result = {"check": name, "ok": False, "error": traceback.format_exc()}
        result["seconds"] = round(time.perf_counter() - start, 1)
        print("RESULT " + json.dumps(result), flush=True)


def run_process(seed: int, process: int, port: int) -> None:
    """One of two processes of 2 CPU devices each: HATA generation over the 4-device mesh, split by
    KV heads and by positions, equals this process's own single-device generation."""
    import jax

    jax.config.update("jax_num_cpu_devices", 2)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process)
    assert len(jax.devices()) == 4 and len(jax.local_devices()) == 2
    from flax import nnx

    from hata_jax import HataConfig
    from hata_jax.models import AttentionPlan, LlamaConfig, LlamaForCausalLM, generate
    from hata_jax.models import sharding as ms

    rng = np.random.default_rng(seed)
    config = LlamaConfig(**TINY)
    prompts = [rng.integers(0, config.vocab_size, n).tolist() for n in (9, 30)]
    plan = AttentionPlan.uniform(config.num_layers, "hata", HataConfig(rbit=64, budget=12), "reference",
                                 dense_layers=1)
    want = generate(LlamaForCausalLM(config, rngs=nnx.Rngs(seed)), prompts, plan=plan, max_new_tokens=6,
                    dense_below=0, seed=seed)
    mesh = ms.make_mesh()
    got = generate(ms.init_model(config, mesh, dtype="float32", seed=seed), prompts, plan=plan.on_mesh(mesh),
                   max_new_tokens=6, dense_below=0, seed=seed)
    by_positions = generate(ms.replicate_model(LlamaForCausalLM(config, rngs=nnx.Rngs(seed)), mesh), prompts,
                            plan=plan.on_mesh(mesh, split="positions"), max_new_tokens=6, dense_below=0, seed=seed)
    print("RESULT " + json.dumps({"process": process, "tokens": got.tokens, "by_positions": by_positions.tokens,
                                  "want": want.tokens}), flush=True)


# ----------------------------------------------------------------------------- the tests (pytest process)

def _results(output: str) -> list[dict]:
    return [json.loads(line[len("RESULT "):]) for line in output.splitlines() if line.startswith("RESULT ")]


def _child_env() -> dict:
    from conftest import TEST_XLA_FLAGS

    root = os.path.dirname(os.path.dirname(os.path.abspath(HERE)))  # the checks import bench.kv_layouts
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "XLA_FLAGS": TEST_XLA_FLAGS, "JAX_PLATFORMS": "cpu", "PYTHONPATH": path}


_CHILDREN: dict = {}


def _spawn(*args: str):
    """A child process running this file with `args`, its stdout and stderr into temporary files
    (a pipe nobody reads while the suite runs would fill up and stall it)."""
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # noqa: SIM115 (read and closed by _finish)
    proc = subprocess.Popen([sys.executable, HERE, *args], stdout=out, stderr=err, text=True, env=_child_env())
    return proc, out, err


def start_children() -> dict:
    """Start (once) the checks' child process and the two processes of the `jax.distributed` run."""
    if not _CHILDREN:
        from conftest import SESSION_SEED

        with socket.socket() as s:
            s.bind(("localhost", 0))
            port = s.getsockname()[1]
        _CHILDREN["checks"] = _spawn(str(SESSION_SEED))
        _CHILDREN["distributed"] = [_spawn(str(SESSION_SEED), "--process", str(i), "--port", str(port))
                                    for i in range(2)]
    return _CHILDREN


def stop_children() -> None:
    """Kill the children that still run (the session ended before their tests)."""
    for proc, _, _ in [_CHILDREN.get("checks"), *_CHILDREN.get("distributed", [])]:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


def _finish(child, timeout: float) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of a child, once it ended."""
    proc, out, err = child
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    texts = []
    for f in (out, err):
        f.seek(0)
        texts.append(f.read())
        f.close()
    return proc.returncode, *texts


@pytest.fixture(scope="module")
def checks():
    returncode, stdout, stderr = _finish(start_children()["checks"], timeout=600)
    results = {r["check"]: r for r in _results(stdout)}
    return results, returncode, stderr


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_sharded_equals_single_device(checks, name):
    results, returncode, stderr = checks
    assert name in results, f"the check did not run (exit {returncode}):\n{stderr[-4000:]}"
    assert results[name]["ok"], f"{CHECKS[name].__doc__}\n{results[name]['error']}"


def test_two_processes_jax_distributed():
    """Two processes of 2 devices each (`jax.distributed`, gloo collectives): generation over the
    4-device mesh, split by KV heads and by positions, gives the single-device tokens in both
    processes."""
    outputs = [_finish(child, timeout=300) for child in start_children()["distributed"]]
    results = [_results(out) for _, out, _ in outputs]
    for (returncode, _, err), found in zip(outputs, results):
        assert returncode == 0 and found, f"exit {returncode}:\n{err[-4000:]}"
    for found in results:
        assert found[0]["tokens"] == found[0]["want"]
        assert found[0]["by_positions"] == found[0]["want"]


if __name__ == "__main__":
    if "--process" in sys.argv:
        run_process(int(sys.argv[1]), int(sys.argv[sys.argv.index("--process") + 1]),
                    int(sys.argv[sys.argv.index("--port") + 1]))
    else:
        run_checks(int(sys.argv[1]))
