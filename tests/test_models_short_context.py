"""The short-context policy of `hata_jax.models.generate`: dense attention in every layer while every
sequence holds at most `dense_below` tokens, the plan's HATA step after that, chosen on the host
between two compiled decode steps."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_models_llama import HF_CONFIGS, ragged_prompts, random_model, random_tensors
from test_models_loaders import write_hf_checkpoint

import hata_jax as hj
from hata_jax import HataConfig
from hata_jax.cli import main as cli
from hata_jax.models import AttentionPlan, generate, generation, init_caches
from hata_jax.models.generation import short_context_threshold

RBIT = 32


def hata_setup(rng, name: str, budget: int):
    model, _ = random_model(HF_CONFIGS[name], rng)
    config = model.config
    plan = AttentionPlan.uniform(config.num_layers, "hata", HataConfig(rbit=RBIT, budget=budget), dense_layers=1)
    weights = rng.standard_normal((config.num_layers, config.num_kv_heads, config.head_dim, RBIT)).astype(np.float32)
    return model, plan, weights


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-tied"])
def test_short_context_steps_equal_the_dense_plan(rng, name):
    """Every step under the threshold runs the all-dense step: the tokens are the dense plan's,
    although a budget of 4 would select only part of these contexts."""
    model, plan, weights = hata_setup(rng, name, budget=4)
    prompts = ragged_prompts(rng, HF_CONFIGS[name]["vocab_size"], [5, 11, 8])
    dense = generate(model, prompts, max_new_tokens=6)
    policy = generate(model, prompts, max_new_tokens=6, plan=plan, hash_weights=weights, dense_below=17)
    assert policy.tokens == dense.tokens
    assert policy.dense_steps == 5  # 11 + 6 = 17 tokens at the last of the 5 decode steps
    assert generate(model, prompts, max_new_tokens=6, plan=plan, hash_weights=weights, dense_below=0).dense_steps == 0


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("caches",))
def _prefill(graphdef, state, prompt, lengths, caches, weights):
    return nnx.merge(graphdef, state).prefill(prompt, lengths, caches, weights, "auto")[1]


@functools.partial(jax.jit, static_argnames=("graphdef", "plan"), donate_argnames=("caches",))
def _decode_logits(graphdef, state, tokens, caches, weights, plan):
    """One decode step of `plan` on the forced tokens: (logits [B, V], caches). Jitted per plan, so
    a run of steps compiles the prefill and each plan's step once, not one program per sequence of plans."""
    return nnx.merge(graphdef, state).decode(tokens, caches, weights, plan)


def _forced_logits(graphdef, state, prompt, lengths, forced, caches, weights, plans):
    """Prefill, then decode the forced tokens with `plans[i]` at step i: (logits [steps, B, V], caches)."""
    caches = _prefill(graphdef, state, prompt, lengths, caches, weights)
    out = []
    for step, plan in enumerate(plans):
        logits, caches = _decode_logits(graphdef, state, forced[:, step], caches, weights, plan)
        out.append(logits)
    return jnp.stack(out), caches


def test_switch_to_hata_is_exact(rng):
    """Dense steps up to the budget, then HATA, equal HATA all along (which selects every token
    while lengths <= budget): the same logits at every step and the same codes and norms in every
    layer, so the dense steps kept the codes current. The HATA steps really select (lengths > budget)."""
    budget, dense_steps, steps = 12, 3, 8
    model, plan, weights = hata_setup(rng, "llama-gqa", budget=budget)
    config = model.config
    lengths = np.array([9, 4, 7])
    assert lengths.max() + dense_steps <= budget < lengths.max() + steps
    prompt = np.zeros((3, 9), np.int32)
    for row, p in enumerate(ragged_prompts(rng, config.vocab_size, lengths)):
        prompt[row, : len(p)] = p
    forced = jnp.asarray(rng.integers(0, config.vocab_size, (3, steps)), jnp.int32)
    graphdef, state = nnx.split(model)
    weights = [jnp.asarray(w) for w in weights]

    def run(plans):
        caches = init_caches(config, 3, 32, rbit=RBIT, dtype=jnp.float32)
        return _forced_logits(graphdef, state, jnp.asarray(prompt), jnp.asarray(lengths, jnp.int32), forced, caches,
                              weights, plans)

    switched, switched_caches = run((plan.as_dense(),) * dense_steps + (plan,) * (steps - dense_steps))
    hata, hata_caches = run((plan,) * steps)
    np.testing.assert_allclose(np.asarray(switched), np.asarray(hata), rtol=1e-5, atol=1e-5)
    for a, b in zip(switched_caches, hata_caches):
        np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))
        np.testing.assert_allclose(np.asarray(a.norms), np.asarray(b.norms), rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(a.lengths), lengths + steps)


def test_generation_across_the_threshold_compiles_each_step_once(rng, fresh_traces):
    """Crossing the threshold traces the dense step and the HATA step once each (the HATA layers
    share one trace of the layer's attention: scoring and selection are traced once), a second
    generation traces nothing, and the tokens equal HATA all along (threshold = budget, where HATA
    selects every token)."""
    budget = 8
    model, plan, weights = hata_setup(rng, "llama-gqa", budget=budget)
    prompts = ragged_prompts(rng, 97, [3, 6])
    run = functools.partial(generate, model, prompts, max_new_tokens=10, plan=plan, hash_weights=weights,
                            capacity=224)
    selections = ("hamming_topk", hj.default_impl())
    selects = hj.TRACE_LOG[selections]
    first = run(dense_below=budget)
    assert fresh_traces["decode"] == 2
    assert len(plan.hashed_layers) > 1 and hj.TRACE_LOG[selections] == selects + 1
    assert first.dense_steps == budget - 6  # the longest prompt has 6 tokens: steps over 7 and 8 tokens
    assert first.decode_steps == 9 - 2  # 9 decode steps, less the first of each step function
    assert run(dense_below=budget).tokens == first.tokens
    assert run(dense_below=0).tokens == first.tokens
    assert fresh_traces["decode"] == 2


def test_threshold_default_and_bad_values():
    hata = AttentionPlan.uniform(3, "hata", HataConfig(budget=16), dense_layers=1)
    llama_b1 = generation.kv_token_bytes(1, 8, 128, jnp.bfloat16)  # Llama-3.1-8B shapes: 4 KiB per token
    assert llama_b1 == 4096
    assert short_context_threshold(hata, None, llama_b1) == generation.DENSE_BELOW_KV_BYTES // 4096 == 40960
    assert short_context_threshold(hata, None, 8 * llama_b1) == 5120  # batch 8: dense up to 5K tokens
    assert short_context_threshold(hata, None, 2**30) == 16  # never below the budget
    assert short_context_threshold(hata, 0, llama_b1) == 0
    assert short_context_threshold(hata, 100, llama_b1) == 100
    assert short_context_threshold(AttentionPlan.uniform(3, "dense"), 100, llama_b1) == 0  # nothing to switch
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="dense_below must be an int >= 0"):
            short_context_threshold(hata, bad, llama_b1)
    for bad in (0, -5, 2.5):
        with pytest.raises(ValueError, match="token_bytes must be a positive int"):
            short_context_threshold(hata, None, bad)


def stopless_checkpoint(folder, rng) -> str:
    """A random tiny Llama checkpoint in `folder` without a stop token (every requested token comes)."""
    cfg = HF_CONFIGS["llama-gqa"]
    write_hf_checkpoint(folder, cfg, random_tensors(cfg, rng))
    for name in ("tokenizer_config.json", "generation_config.json"):
        (folder / name).write_text("{}")
    return str(folder)


def test_cli_dense_below(tmp_path, rng, capsys):
    args = ["generate", "--model", stopless_checkpoint(tmp_path / "ckpt", rng), "--prompt", "hello world", "--no-chat",
            "--max-new-tokens", "5", "--attention", "hata", "--rbit", "32", "--budget", "4", "--dense-layers", "1"]
    assert cli.main(args + ["--dense-below", "4"]) == 0
    err = capsys.readouterr().err
    # "hello world" is 2 tokens: the 4 decode steps run over 3, 4, 5 and 6 tokens
    assert "2 prompt tokens, 5 new tokens" in err
    assert "dense while the context is <= 4 tokens" in err and "(2 steps dense by --dense-below)" in err
    assert cli.main(args + ["--dense-below", "0"]) == 0
    err = capsys.readouterr().err
    assert "dense while" not in err and "steps dense" not in err
