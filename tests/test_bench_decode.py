"""The end-to-end decode benchmark (bench.decode): a --small run on the CPU writes every result,
skips what does not fit, its report renders; its own decode steps (exact top-k, cuDNN layout)
agree with the model's."""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SESSION_SEED
from flax import nnx

import hata_jax as hj
from hata_jax import HataConfig, dispatch
from hata_jax.models import AttentionPlan, LlamaConfig, LlamaForCausalLM, generation
from hata_jax.models.generation import ModelSteps
from hata_jax.models.presets import FULL_MODELS, SMALL_MODELS
from pallas_kernels.backend import lower_for_cuda

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # bench/ is not an installed package
from bench import decode, decode_bytes, decode_report, decode_steps  # noqa: E402

TINY = LlamaConfig(vocab_size=61, hidden_size=48, intermediate_size=40, num_layers=3, num_heads=6, num_kv_heads=2,
                   head_dim=64)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("decode") / "decode.json"
    with pytest.MonkeyPatch.context() as patch:  # main() sets the GPU allocator's memory fraction
        patch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75")
        assert decode.main(["--out", str(out), "--small", "--models", "llama", "--contexts", "160", "--batches", "1",
                            "--cudnn-step", "always"]) == 0
    return out, json.loads(out.read_text())


def test_small_run_records_every_method(small_run):
    _, data = small_run
    s = decode.Settings(**{**data["settings"], **{k: tuple(data["settings"][k]) for k in
                                                  ("models", "contexts", "batches", "methods")}})
    assert data["complete"] and s.small and s.models == ("llama",)
    rows = data["rows"]
    assert not [r for r in rows if r["kind"] in ("error", "skip")]
    for model in s.models:
        config = SMALL_MODELS[model]
        attention = {r["method"]: r for r in rows if r["kind"] == "attention" and r["model"] == model}
        steps = {r["method"]: r for r in rows if r["kind"] == "step" and r["model"] == model}
        assert sorted(attention) == sorted(steps) == sorted(decode_report.METHODS)
        for method, r in steps.items():
            assert r["tokens_per_s"] == pytest.approx(1 / (r["median_ms"] / 1e3))
            assert r["p10_ms"] <= r["median_ms"] <= r["p90_ms"] and r["steps"] == s.reps
            assert r["attention_share"] > 0 and r["of_floor"] > 0
            assert 160 - s.slack < r["lengths"][0] <= r["lengths"][1] <= 160
            assert ("loop_ms" in r) == (method in decode_steps.PRODUCT_METHODS)
            assert r["pipelined_ms"] > 0 and r["pipelined_steps"] == decode.PIPELINE
        # bytes of a HATA step, written out: weights read + 2 dense layers + the rest HATA
        row, width = config.head_dim * 2, s.rbit // 8 + 4
        weights = data["models"][model]["param_bytes"] - (0 if config.tie_word_embeddings else
                                                          config.vocab_size * config.hidden_size * 2)
        dense_layer = config.num_kv_heads * 160 * 2 * row
        hata_layer = config.num_kv_heads * (160 * width + s.budget * (2 * row + 4))
        assert steps["hata"]["bytes"] == weights + 2 * dense_layer + (config.num_layers - 2) * hata_layer
        assert steps["dense"]["bytes"] == steps["cudnn"]["bytes"] == weights + config.num_layers * dense_layer
        assert attention["hata"]["bytes"] == hata_layer


@pytest.mark.parametrize("name", sorted(FULL_MODELS))
def test_weight_bytes_are_the_models(name):
    """The memory plan's weight bytes (computed before building) are the built model's; a step
    reads all of them but an untied embedding table."""
    config = FULL_MODELS[name]
    built = nnx.eval_shape(lambda: LlamaForCausalLM(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    total = decode_bytes.param_bytes(nnx.state(built))
    assert decode_bytes.weight_bytes(config, 2) == total
    table = config.vocab_size * config.hidden_size * 2
    assert decode_bytes.weight_read_bytes(config, total, 2) == (total if name == "smollm2" else total - table)
    if name == "llama":
        assert round(total / 1e9, 2) == 16.06


def test_report_of_a_small_run_writes_plots(small_run, capsys):
    out, _ = small_run
    assert decode.main(["--report", str(out)]) == 0
    text = capsys.readouterr().out
    assert "llama (small): decode step latency (ms) vs context, batch 1" in text
    assert "llama (small): attention only, one layer" in text
    for name in ("decode_latency_vs_context.png", "attention_latency_vs_context.png"):
        assert (out.parent / name).stat().st_size > 0


def test_memory_and_time_limits_skip_configs_with_the_reason(tmp_path):
    out = tmp_path / "skips.json"
    decode.main(["--out", str(out), "--small", "--memory-gb", "0.000001", "--models", "llama"])
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 4 + 1 and all(r["kind"] == "skip" and r["reason"].startswith("memory: needs") for r in rows)
    decode.main(["--out", str(out), "--small", "--time-budget", "0", "--contexts", "160", "--batches", "1", "3"])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["context"], r["batch"], r["method"]) for r in rows] == [
        ("llama", 160, 1, None), ("llama", 160, 3, None), ("llama", 160, 1, "extras"),
        ("smollm2", 160, 1, None), ("smollm2", 160, 3, None), ("smollm2", 160, 1, "extras")]
    assert all(r["kind"] == "skip" and r["reason"].startswith("time budget") for r in rows)


def test_jobs_run_goals_first():
    jobs = decode.ordered_jobs(decode.Settings())
    goals = [("llama", 131072, 1), ("llama", 32768, 8), ("llama", 4096, 1)]
    assert [(j.model, j.context, j.batch, j.extras) for j in jobs[:7]] == (
        [g + (False,) for g in goals] + [("llama", 32768, 1, False)] + [g + (True,) for g in goals])
    assert jobs.index(decode.Job("smollm2", 131072, 1)) == 11
    assert len(jobs) == 2 * (6 * 4 + 3) and len(set(jobs)) == len(jobs)


def _row(kind, model, context, batch, method, value):
    timing = {"median_ms": value, "tokens_per_s": batch / value * 1e3, "p10_ms": value, "p90_ms": value,
              "bytes": 1e9, "floor_ms": 1.0, "of_floor": value, "first_call_s": 1.0} if kind == "step" else \
             {"median_us": value, "of_floor": 2.0}
    return {"kind": kind, "model": model, "context": context, "batch": batch, "method": method,
            "implementation": "pallas", **timing}


def test_report_states_the_goals(tmp_path, capsys, monkeypatch):
    """Each goal is judged against the best dense method of its config; the report renders them,
    the skipped configs and the plots."""
    rows = [_row("attention", "llama", 131072, 1, "dense", 400.0),
            _row("attention", "llama", 131072, 1, "cudnn", 380.0),
            _row("attention", "llama", 131072, 1, "hata", 30.0), _row("attention", "llama", 32768, 1, "dense", 100.0),
            _row("attention", "llama", 32768, 1, "hata", 25.0), _row("attention", "llama", 8192, 1, "dense", 20.0),
            _row("attention", "llama", 8192, 1, "hata", 24.0),
            _row("step", "llama", 131072, 1, "dense", 20.0), _row("step", "llama", 131072, 1, "cudnn", 19.0),
            _row("step", "llama", 131072, 1, "hata", 8.0), _row("step", "llama", 32768, 8, "dense", 30.0),
            _row("step", "llama", 32768, 8, "hata", 12.0), _row("step", "llama", 32768, 1, "dense", 9.0),
            _row("step", "llama", 32768, 1, "hata", 7.0), _row("step", "llama", 4096, 1, "dense", 6.0),
            _row("step", "llama", 4096, 1, "hata", 6.9)]
    data = {"environment": {"device": "H100", "backend": "gpu", "jax": "0.11.2", "commit": "abc", "date": "today"},
            "bandwidth": {"copy_gbps": 2400.0, "read_gbps": 3000.0, "floor_gbps": 3000.0},
            "settings": dataclasses.asdict(decode.Settings()), "complete": True,
            "rows": rows + [{"kind": "skip", "model": "llama", "context": 131072, "batch": 4, "method": None,
                             "reason": "memory: needs 93.0 GB"}]}
    steps = [r for r in rows if r["kind"] == "step"]
    attention = [r for r in rows if r["kind"] == "attention"]
    judged = decode_report.goals(steps, attention, budget=2048)  # dense_below (40K at batch 1) covers 4K
    assert [(g["value"], g["versus"], g["met"]) for g in judged] == [
        (pytest.approx(380 / 30), "cudnn", "yes"), (pytest.approx(19 / 8), "cudnn", "yes"),
        (pytest.approx(30 / 12), "dense", "NO"), (pytest.approx(6.9 / 6), "dense", "by the policy")]
    monkeypatch.setattr(generation, "DENSE_BELOW_KV_BYTES", 4095 * 4096)  # a policy that stops short of 4K
    assert decode_report.goals(steps, attention, budget=512)[-1]["met"] == "NO"
    path = tmp_path / "decode_h100.json"
    path.write_text(json.dumps(data))
    assert decode.main(["--report", str(path), "--plots", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert all(g["goal"] in text for g in judged)
    assert "from context 32768 on" in text  # HATA attention wins at 32K and 128K, not at 8K
    assert "memory: needs 93.0 GB" in text
    for name in ("decode_latency_vs_context.png", "attention_latency_vs_context.png",
                 "decode_tokens_per_s_vs_batch.png"):
        assert (tmp_path / name).stat().st_size > 0


# ----------------------------------------------------------------------------- the benchmark's steps

def _tiny_setup(rng, lengths, capacity, dtype=jnp.float32):
    model = LlamaForCausalLM(TINY, dtype=dtype, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    keys = jax.random.split(jax.random.PRNGKey(int(rng.integers(1 << 30))), TINY.num_layers + 1)
    weights = [jax.random.normal(k, (TINY.num_kv_heads, TINY.head_dim, 64)) for k in keys[1:]]
    shape = (len(lengths), TINY.num_kv_heads, capacity, TINY.head_dim)
    caches = [dataclasses.replace(decode_steps.random_hata_cache(k, w, capacity, shape=shape, dtype=dtype),
                                  lengths=jnp.asarray(lengths, jnp.int32)) for k, w in zip(keys[1:], weights)]
    tokens = jnp.asarray(rng.integers(0, TINY.vocab_size, len(lengths)), jnp.int32)
    return model, weights, caches, tokens


def test_bench_steps_match_the_model_decode(rng):
    """With budget >= capacity, the exact top-k step selects every token: its logits (through
    `decode_with`) equal the model's dense decode step; so do the token-major dot_product_attention
    step's. Codes and norms of the random caches are those of their keys."""
    lengths, capacity = [37, 12, 50], 64
    model, weights, caches, tokens = _tiny_setup(rng, lengths, capacity)
    for cache, w in zip(caches, weights):
        np.testing.assert_array_equal(np.asarray(cache.codes), np.asarray(hj.encode(cache.k, w, head_axis=1)))
    plan = AttentionPlan.uniform(TINY.num_layers, "hata", HataConfig(rbit=64, budget=capacity), dense_layers=1)
    expected, expected_caches = model.decode(tokens, caches, weights, plan.as_dense())
    attend = lambda *a: decode_steps.attend_exact(*a, weights=weights, plan=plan)  # noqa: E731
    exact, exact_caches = decode_steps.decode_with(model, tokens, caches, attend)
    np.testing.assert_allclose(np.asarray(exact), np.asarray(expected), rtol=1e-5, atol=1e-5)
    for a, b in zip(exact_caches, expected_caches):
        np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))
    token_major = [decode_steps.TokenMajorCache(jnp.swapaxes(c.k, 1, 2), jnp.swapaxes(c.v, 1, 2), c.lengths)
                   for c in caches]
    attend = lambda *a: decode_steps.attend_dpa(*a, weights=weights, plan=plan)  # noqa: E731
    dpa, dpa_caches = decode_steps.decode_with(model, tokens, token_major, attend)
    np.testing.assert_allclose(np.asarray(dpa), np.asarray(expected), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(dpa_caches[0].lengths), np.array(lengths) + 1)
    np.testing.assert_allclose(np.asarray(jnp.swapaxes(dpa_caches[1].k, 1, 2)), np.asarray(expected_caches[1].k),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hq, hkv", [(6, 2), (4, 4)])
def test_exact_topk_selects_the_largest_softmax_mass(rng, hq, hkv):
    b, s, d, budget = 3, 80, 64, 9
    lengths = np.array([80, 23, 51])
    q = rng.standard_normal((b, hq, d)).astype(np.float32)
    k = rng.standard_normal((b, hkv, s, d)).astype(np.float32)
    v = rng.standard_normal((b, hkv, s, d)).astype(np.float32)
    mass = np.asarray(decode_steps.softmax_mass(jnp.asarray(q), jnp.asarray(k), jnp.asarray(lengths)))
    g = hq // hkv
    cache = hj.HataCache(k=jnp.asarray(k), v=jnp.asarray(v), codes=jnp.zeros((b, hkv, s, 1), jnp.uint32),
                         norms=jnp.ones((b, hkv, s)), lengths=jnp.asarray(lengths, jnp.int32),
                         starts=jnp.zeros((b,), jnp.int32), overflow=jnp.zeros((b,), bool),
                         uncoded=jnp.zeros((b,), bool))
    out = np.asarray(decode_steps.exact_topk_attention(jnp.asarray(q), cache, budget, "reference"))
    for row in range(b):
        n = lengths[row]
        for h in range(hkv):
            logits = np.einsum("gd,sd->gs", q[row, h * g:(h + 1) * g], k[row, h, :n]) / math.sqrt(d)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            want = (p / p.sum(-1, keepdims=True)).sum(0)
            np.testing.assert_allclose(mass[row, h, :n], want, rtol=1e-5, atol=1e-6)
            assert not mass[row, h, n:].any()
            top = np.argsort(-want)[:budget]
            for i in range(g):
                head = h * g + i
                lg = k[row, h, top] @ q[row, head] / math.sqrt(d)
                w = np.exp(lg - lg.max())
                np.testing.assert_allclose(out[row, head], (w / w.sum()) @ v[row, h, top], rtol=1e-4, atol=1e-5)


def test_exact_step_and_loop_lower_for_cuda(rng, monkeypatch):
    """The benchmark's exact top-k step and the in-jit loop of the HATA step lower for CUDA with
    the Pallas kernels (impl="auto" resolving as on a GPU; each Triton module verified)."""
    model, weights, caches, tokens = _tiny_setup(rng, [30, 7], 128, dtype=jnp.bfloat16)
    steps = ModelSteps(model)
    plan = AttentionPlan.uniform(TINY.num_layers, "hata", HataConfig(rbit=64, budget=16), dense_layers=1)
    key = jax.random.PRNGKey(0)
    monkeypatch.setattr(dispatch, "on_gpu", lambda: True)
    exact = lower_for_cuda(lambda *a: decode_steps.bench_step(*a, merge=steps.merge, method="exact", plan=plan),
                           steps.state_leaves, tokens, caches, weights, key)
    # kernel names: hata_select_* (selection), hata_hamming_* (scoring), hata_{sparse,dense}_decode
    assert "hata_select" in exact and "hata_sparse_decode" in exact and "hata_dense_decode" in exact
    assert "hata_hamming" not in exact
    step = decode_steps.step_function(steps, "hata", plan)
    loop = lower_for_cuda(lambda *a: decode_steps.run_steps(*a, step=step, n=3), steps.state_leaves, tokens, caches,
                          weights, key)
    assert "hata_hamming" in loop and "hata_sparse_decode" in loop and "stablehlo.while" in loop


@pytest.mark.parametrize("score", ["key_norm", "asymmetric"])
def test_hata_attention_follows_the_configs_score(score):
    """bench's per-layer HATA work selects by the config's score (the step's), then attends."""
    rng = np.random.default_rng([SESSION_SEED, 31])
    b, hkv, g, s, d, rbit, budget = 2, 2, 3, 97, 32, 64, 12
    w = jnp.asarray(rng.normal(size=(hkv, d, rbit)), jnp.float32)
    cache = decode_steps.random_hata_cache(jax.random.PRNGKey(int(rng.integers(1 << 30))), w, s - 6,
                                           shape=(b, hkv, s, d), dtype=jnp.float32)
    q = jnp.asarray(rng.normal(size=(b, hkv * g, d)), jnp.float32)
    k_new = jnp.asarray(rng.normal(size=(b, hkv, d)), jnp.float32)
    config = HataConfig(rbit=rbit, budget=budget, score=score)
    got = decode_steps.hata_attention(q, k_new, cache, w, config, "reference")
    if score == "asymmetric":
        q_codes, q_scales = hj.query_planes(q, w, impl="reference")
    else:
        q_codes, q_scales = hj.encode(q, w, head_axis=1, impl="reference"), None
    scores = hj.hamming_scores(q_codes, cache.codes, cache.norms, cache.lengths, score=score, q_scales=q_scales,
                               impl="reference")
    keep = scores >= jax.lax.top_k(scores, budget)[0][..., -1:]  # random data: no ties at the k-th score
    logits = jnp.einsum("bhgd,bhsd->bhgs", q.reshape(b, hkv, g, d), cache.k) / np.sqrt(d)
    logits = jnp.where(keep[:, :, None], logits, -jnp.inf)
    want = jnp.einsum("bhgs,bhsd->bhgd", jax.nn.softmax(logits, -1), cache.v).reshape(b, hkv * g, d)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
