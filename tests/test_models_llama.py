"""The Flax NNX Llama model and generation on tiny random models, against a plain-numpy forward.

The numpy reference (`numpy_forward`) reads the HF config dict and HF-named tensors directly,
so it checks config parsing, the weight mapping, RoPE (llama3 scaling), GQA, biases and tied
embeddings independently of the model code. Other test files import its helpers.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hata_jax as hj
from hata_jax import HataConfig
from hata_jax.models import (
    AttentionPlan,
    LlamaConfig,
    LlamaForCausalLM,
    Sampling,
    generate,
    generation,
    init_caches,
    model_from_tensors,
    prefill_prompts,
)
from hata_jax.models.hash_projections import hash_weights_for
from hata_jax.models.tensors import expected_shapes

# Tiny HF configs: Llama with GQA (G=3) and llama3 RoPE scaling, untied; Qwen2 with q/k/v
# biases, tied embeddings and G=1; Llama with linear RoPE scaling and G=2. Head dim 64, a size
# the Pallas kernels take, so impl="auto" works on a GPU too.
HF_CONFIGS = {
    "llama-gqa": dict(model_type="llama", vocab_size=97, hidden_size=48, intermediate_size=40,
                      num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2, head_dim=64,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                      rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                        high_freq_factor=4.0, original_max_position_embeddings=16)),
    "qwen2-tied": dict(model_type="qwen2", vocab_size=89, hidden_size=128, intermediate_size=24,
                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                       rms_norm_eps=1e-6, rope_theta=1000.0, tie_word_embeddings=True),
    "llama-linear": dict(model_type="llama", vocab_size=61, hidden_size=32, intermediate_size=36,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                         rope_theta=500.0, rope_scaling=dict(type="linear", factor=2.0)),
}


def random_tensors(hf_config: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """HF-named float32 tensors of every parameter the config implies, all random (biases too)."""
    out = {}
    for name, shape in expected_shapes(LlamaConfig.from_hf(hf_config)).items():
        if name.endswith("norm.weight"):
            out[name] = (1 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[name] = (rng.standard_normal(shape) / math.sqrt(shape[-1])).astype(np.float32)
    return out


def random_model(hf_config: dict, rng) -> tuple[LlamaForCausalLM, dict]:
    tensors = random_tensors(hf_config, rng)
    return model_from_tensors(LlamaConfig.from_hf(hf_config), tensors), tensors


def _inv_freq(cfg: dict, d: int) -> np.ndarray:
    """HF's RoPE inverse frequencies, written from the HF formulas."""
    inv = 1.0 / cfg.get("rope_theta", 10000.0) ** (np.arange(0, d, 2) / d)
    scaling = cfg.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return inv / scaling["factor"]
    if kind == "llama3":
        old, factor = scaling["original_max_position_embeddings"], scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        out = []
        for f in inv:
            wavelen = 2 * math.pi / f
            if wavelen < old / high:
                out.append(f)
            elif wavelen > old / low:
                out.append(f / factor)
            else:
                smooth = (old / wavelen - low) / (high - low)
                out.append((1 - smooth) * f / factor + smooth * f)
        return np.array(out)
    return inv


def numpy_forward(cfg: dict, tensors: dict, tokens) -> np.ndarray:
    """float64 logits [T, vocab] of one sequence, computed with plain numpy from HF tensors."""
    t = {k: np.asarray(v, np.float64) for k, v in tensors.items()}
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads", heads)
    d = cfg.get("head_dim") or cfg["hidden_size"] // heads
    eps = cfg.get("rms_norm_eps", 1e-6)
    n = len(tokens)

    def norm(x, w):
        return w * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)

    def linear(x, name):
        y = x @ t[f"{name}.weight"].T
        return y + t[f"{name}.bias"] if f"{name}.bias" in t else y

    angles = np.arange(n)[:, None] * _inv_freq(cfg, d)[None, :]
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]

    def rope(x):  # [n, heads, d]
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    x = t["model.embed_tokens.weight"][np.asarray(tokens)]
    causal = np.tril(np.ones((n, n), bool))
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = norm(x, t[p + "input_layernorm.weight"])
        q = rope(linear(h, p + "self_attn.q_proj").reshape(n, heads, d))
        k = rope(linear(h, p + "self_attn.k_proj").reshape(n, kv_heads, d))
        v = linear(h, p + "self_attn.v_proj").reshape(n, kv_heads, d)
        out = np.empty((n, heads, d))
        for head in range(heads):
            kv = head // (heads // kv_heads)
            logits = q[:, head] @ k[:, kv].T / math.sqrt(d)
            logits = np.where(causal, logits, -np.inf)
            p_attn = np.exp(logits - logits.max(-1, keepdims=True))
            out[:, head] = (p_attn / p_attn.sum(-1, keepdims=True)) @ v[:, kv]
        x = x + linear(out.reshape(n, heads * d), p + "self_attn.o_proj")
        h = norm(x, t[p + "post_attention_layernorm.weight"])
        gate = linear(h, p + "mlp.gate_proj")
        x = x + linear(gate / (1 + np.exp(-gate)) * linear(h, p + "mlp.up_proj"), p + "mlp.down_proj")
    x = norm(x, t["model.norm.weight"])
    head = t["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else t["lm_head.weight"]
    return x @ head.T


def ragged_prompts(rng, vocab: int, lengths) -> list[list[int]]:
    return [rng.integers(0, vocab, size=n).tolist() for n in lengths]


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_forward_matches_numpy_on_a_ragged_batch(rng, name):
    cfg = HF_CONFIGS[name]
    model, tensors = random_model(cfg, rng)
    prompts = ragged_prompts(rng, cfg["vocab_size"], [5, 13, 9])
    width = max(map(len, prompts))
    tokens = np.zeros((3, width), np.int32)
    for row, p in enumerate(prompts):
        tokens[row, : len(p)] = p
    logits = np.asarray(model(jnp.asarray(tokens), jnp.asarray([len(p) for p in prompts], jnp.int32)))
    for row, p in enumerate(prompts):
        np.testing.assert_allclose(logits[row, : len(p)], numpy_forward(cfg, tensors, p), rtol=2e-4, atol=2e-4)


@functools.partial(jax.jit, static_argnames=("graphdef", "plan"), donate_argnames=("caches",))
def _prefill_then_decode(graphdef, state, prompt, lengths, steps, caches, weights, plan):
    """Teacher-forced decoding: logits of every step, float32[n_steps, B, vocab]."""
    model = nnx.merge(graphdef, state)
    _, caches = model.prefill(prompt, lengths, caches, weights, plan.impl)
    out = []
    for step in range(steps.shape[1]):
        logits, caches = model.decode(steps[:, step], caches, weights, plan)
        out.append(logits)
    return jnp.stack(out), caches


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-tied"])
@pytest.mark.parametrize("attention", ["dense", "hata"])
def test_decode_steps_match_numpy(rng, name, attention):
    """Prefill ragged prompts, then decode 4 forced tokens: each step's logits equal the numpy
    forward at that position (HATA with a budget >= context selects every token), and every
    layer's cache holds the codes and norms of all its keys, prompt and decoded alike."""
    cfg = HF_CONFIGS[name]
    model, tensors = random_model(cfg, rng)
    config = model.config
    plan = AttentionPlan.uniform(config.num_layers, attention, HataConfig(rbit=64, budget=32), dense_layers=1)
    lengths = [7, 3, 11]
    prompts = ragged_prompts(rng, cfg["vocab_size"], lengths)
    forced = rng.integers(0, cfg["vocab_size"], size=(3, 4))
    tokens = np.zeros((3, 11), np.int32)
    for row, p in enumerate(prompts):
        tokens[row, : len(p)] = p
    caches = init_caches(config, 3, 32, rbit=64, dtype=jnp.float32)
    weights = hash_weights_for(config, plan, np.asarray(rng.standard_normal((config.num_layers, config.num_kv_heads,
                                                                              config.head_dim, 64)), np.float32))
    graphdef, state = nnx.split(model)
    logits, caches = _prefill_then_decode(graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths, jnp.int32),
                                          jnp.asarray(forced, jnp.int32), caches, weights, plan)
    valid = np.broadcast_to(np.arange(32)[None, None, :] < (np.array(lengths) + 4)[:, None, None],
                            caches[0].norms.shape)
    for cache, w in zip(caches, weights):
        np.testing.assert_array_equal(np.asarray(cache.lengths), np.array(lengths) + 4)
        codes = np.asarray(hj.encode(cache.k, w, head_axis=1))
        np.testing.assert_array_equal(np.asarray(cache.codes)[valid], codes[valid])
        np.testing.assert_allclose(np.asarray(cache.norms)[valid], np.asarray(hj.key_norms(cache.k))[valid], rtol=1e-6)
    for row, p in enumerate(prompts):
        expected = numpy_forward(cfg, tensors, p + forced[row].tolist())[len(p):]
        np.testing.assert_allclose(np.asarray(logits[:, row]), expected, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-tied"])
def test_fused_projections_equal_separate_ones(rng, name):
    """`project_qkv` multiplies by the three matrices concatenated (biases too): the same q, k, v as the
    three nnx.Linear layers (the head-sharded path), at batch 1 and for a prompt."""
    model, _ = random_model(HF_CONFIGS[name], rng)
    attn = model.layers[0].self_attn
    for shape in ((1, model.config.hidden_size), (2, 5, model.config.hidden_size)):
        x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        positions = jnp.broadcast_to(jnp.arange(shape[-2]) if len(shape) == 3 else jnp.array([7]), shape[:-1])
        for fused, separate in zip(attn.project_qkv(x, positions), attn.project_qkv(x, positions, fused=False)):
            np.testing.assert_allclose(np.asarray(fused), np.asarray(separate), rtol=1e-5, atol=1e-5)


def test_decode_step_compiles_once(rng, fresh_traces):
    """Steps 2, 3, ... of a generation and a second generation with the same shapes reuse the
    first compiled decode step."""
    model, _ = random_model(HF_CONFIGS["llama-gqa"], rng)
    prompts = ragged_prompts(rng, 97, [4, 9])
    first = generate(model, prompts, max_new_tokens=5)
    assert fresh_traces["decode"] == 1
    generate(model, ragged_prompts(rng, 97, [6, 3]), max_new_tokens=5)
    assert fresh_traces["decode"] == 1
    assert generation.ModelSteps(model).decode is generation.ModelSteps(model).decode  # one jitted step per structure
    assert all(len(t) == 5 for t in first.tokens) and first.decode_steps == 3


def test_hata_with_full_budget_reproduces_dense_generation(rng):
    model, _ = random_model(HF_CONFIGS["llama-gqa"], rng)
    prompts = ragged_prompts(rng, 97, [10, 3, 17])
    dense = generate(model, prompts, max_new_tokens=8)
    plan = AttentionPlan.uniform(3, "hata", HataConfig(rbit=64, budget=128), dense_layers=1)
    with pytest.warns(UserWarning, match="UNTRAINED"):
        hata = generate(model, prompts, max_new_tokens=8, plan=plan, dense_below=0)
    assert hata.tokens == dense.tokens


def test_hata_with_small_budget_differs_from_dense_logits(rng):
    """A budget below the context really selects: one decode step's logits differ from the dense
    step's on the same caches, while a budget covering the context reproduces them."""
    model, _ = random_model(HF_CONFIGS["llama-gqa"], rng)
    prompts = ragged_prompts(rng, 97, [40, 25])
    weights = {i: jax.random.normal(jax.random.PRNGKey(i), (2, 64, 32)) for i in range(3)}
    prefilled = prefill_prompts(model, prompts, capacity=48, hash_weights=weights)
    tokens = jnp.asarray([3, 5], jnp.int32)

    def step(budget):
        plan = AttentionPlan.uniform(3, "hata", HataConfig(rbit=32, budget=budget), dense_layers=1)
        caches = jax.tree.map(jnp.copy, prefilled.caches)
        return np.asarray(model.decode(tokens, caches, [weights[i] for i in range(3)], plan)[0])

    plan = AttentionPlan.uniform(3, "hata", HataConfig(rbit=32, budget=4), dense_layers=1)
    dense = np.asarray(model.decode(tokens, jax.tree.map(jnp.copy, prefilled.caches),
                                    [weights[i] for i in range(3)], plan.as_dense())[0])
    np.testing.assert_allclose(step(41), dense, rtol=1e-4, atol=1e-4)
    assert np.abs(step(4) - dense).max() > 1e-2


def test_ragged_batch_matches_prompts_alone(rng):
    model, _ = random_model(HF_CONFIGS["qwen2-tied"], rng)
    prompts = ragged_prompts(rng, 89, [3, 14, 8])
    batch = generate(model, prompts, max_new_tokens=6)
    for row, prompt in enumerate(prompts):
        assert generate(model, [prompt], max_new_tokens=6).tokens[0] == batch.tokens[row]


def test_greedy_is_the_argmax_of_the_numpy_logits(rng):
    cfg = HF_CONFIGS["llama-linear"]
    model, tensors = random_model(cfg, rng)
    prompt = ragged_prompts(rng, cfg["vocab_size"], [6])[0]
    out = generate(model, [prompt], max_new_tokens=4).tokens[0]
    seq = list(prompt)
    for token in out:
        assert token == int(np.argmax(numpy_forward(cfg, tensors, seq)[-1]))
        seq.append(token)


def test_stop_tokens_end_a_row_and_are_not_emitted(rng):
    model, _ = random_model(HF_CONFIGS["llama-gqa"], rng)
    prompts = ragged_prompts(rng, 97, [5, 8])
    free = generate(model, prompts, max_new_tokens=6).tokens
    stop = free[0][2]
    streamed = []
    stopped = generate(model, prompts, max_new_tokens=6, stop_ids=[stop], on_tokens=streamed.append)
    for row in range(2):
        cut = free[row].index(stop) if stop in free[row] else 6
        assert stopped.tokens[row] == free[row][:cut]
    assert [s[0] for s in streamed if s[0] is not None] == stopped.tokens[0]


def test_sampling(rng):
    model, _ = random_model(HF_CONFIGS["llama-gqa"], rng)
    prompts = ragged_prompts(rng, 97, [5, 8])
    greedy = generate(model, prompts, max_new_tokens=5).tokens
    tiny_nucleus = generate(model, prompts, max_new_tokens=5, sampling=Sampling(temperature=1.0, top_p=1e-6), seed=3)
    assert tiny_nucleus.tokens == greedy
    hot = Sampling(temperature=5.0, top_p=0.95)
    a = generate(model, prompts, max_new_tokens=5, sampling=hot, seed=1).tokens
    assert generate(model, prompts, max_new_tokens=5, sampling=hot, seed=1).tokens == a
    assert generate(model, prompts, max_new_tokens=5, sampling=hot, seed=2).tokens != a
    assert all(0 <= x < 97 for row in a for x in row)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 2000, jnp.float32))
    keys = jax.random.PRNGKey(0)
    drawn = np.asarray(generation.sample(logits, keys, Sampling(temperature=1.0, top_p=0.7)))
    assert set(drawn.tolist()) == {0, 1}
    assert abs((drawn == 0).mean() - 0.5 / 0.8) < 0.05


def test_generation_errors(rng):
    model, _ = random_model(HF_CONFIGS["qwen2-tied"], rng)
    prompt = ragged_prompts(rng, 89, [20])
    with pytest.raises(ValueError, match="prompt has 20 tokens but the cache capacity is 16"):
        generate(model, prompt, max_new_tokens=2, capacity=16)
    with pytest.raises(ValueError, match="cannot hold the prompt"):
        generate(model, prompt, max_new_tokens=8, capacity=24)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, [[1, 89]], max_new_tokens=2)
    with pytest.raises(ValueError, match="every prompt must have tokens"):
        generate(model, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="temperature"):
        Sampling(temperature=-1.0)
    with pytest.raises(ValueError, match="unknown attention kinds"):
        AttentionPlan(layers=("dense", "bogus"))
    with pytest.raises(ValueError, match=r"mesh_split must be one of \('heads', 'positions'\), got 'rows'"):
        AttentionPlan(layers=("dense",), mesh_split="rows")
    with pytest.raises(ValueError, match="plan has 3 layers"):
        model.decode(jnp.zeros((1,), jnp.int32), [], [], AttentionPlan.uniform(3, "dense"))
