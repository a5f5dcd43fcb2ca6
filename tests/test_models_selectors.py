"""Selectors in the model: "sparse" plans, one prefill shared across plans (`prefill_prompts`,
`generate_from`), selector states kept current by every step, teacher-forced `sparse_logits` and
`selector_params`, on tiny random Llamas."""
from __future__ import annotations

import dataclasses
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_models_llama import HF_CONFIGS, ragged_prompts, random_model

from hata_jax import HataConfig, dispatch
from hata_jax import selectors as sel
from hata_jax.models import (
    METHODS,
    AttentionPlan,
    generate,
    generate_from,
    generation,
    init_caches,
    prefill_prompts,
    sparse_logits,
    with_selector_states,
)
from hata_jax.selectors import loki_basis, make_selector, params_source
from hata_jax.train.hashattention_objective import HashAttentionObjective
from hata_jax.train.selector_params import LokiCalibration, selector_params
from pallas_kernels.backend import lower_for_cuda

RBIT = 32
HASHATTENTION_RUN = pathlib.Path.home() / ".cache" / "hata-jax" / "runs" / "smollm2-hashattention"


# The MLPs' random init, jitted once: run eagerly it compiles each of its small ops, for every test.
_hashattention_init = jax.jit(HashAttentionObjective(hidden=16).init, static_argnums=(1, 2, 3))


def random_params(method: str, model, rng) -> list | None:
    """Per-layer params of `method` for a random model: random projections, MLPs, PCA bases."""
    config = model.config
    hkv, d, layers = config.num_kv_heads, config.head_dim, config.num_layers
    method = method if method in ("dense", "hata") else params_source(method)
    if method in ("hata", "simhash"):
        return [jnp.asarray(rng.standard_normal((hkv, d, RBIT)), jnp.float32) for _ in range(layers)]
    if method == "hashattention":
        return [_hashattention_init(jax.random.PRNGKey(int(rng.integers(1 << 30))), config.num_heads, hkv, d)
                for _ in range(layers)]
    if method == "loki":
        return [loki_basis(jnp.asarray(rng.standard_normal((50, hkv, d)), jnp.float32)) for _ in range(layers)]
    return None


def sparse_plan(plan: AttentionPlan, selector) -> AttentionPlan:
    """`plan` with its "hata" layers turned into "sparse" layers of `selector`."""
    return AttentionPlan(tuple("sparse" if k == "hata" else k for k in plan.layers), plan.hata, plan.impl, selector)


def test_for_method_builds_each_plan():
    hata = HataConfig(rbit=64, budget=16)
    assert AttentionPlan.for_method(3, "dense", hata, dense_layers=1).layers == ("dense",) * 3
    fast = AttentionPlan.for_method(3, "hata", hata, dense_layers=1)
    assert fast.layers == ("dense", "hata", "hata") and fast.selector is None
    assert AttentionPlan.uniform(3, "hata", hata).layers == ("dense", "dense", "hata")  # 2 dense by default
    assert AttentionPlan.uniform(3, "hata", hata, dense_layers=np.int64(0)).layers == ("hata",) * 3
    for bad in (-1, 1.0, True):
        with pytest.raises(ValueError, match="dense_layers must be an int >= 0"):
            AttentionPlan.for_method(3, "quest", hata, dense_layers=bad)
    assert fast == AttentionPlan.uniform(3, "hata", hata, dense_layers=1)
    for method in set(METHODS) - {"dense", "hata"}:
        plan = AttentionPlan.for_method(3, method, hata, impl="reference", dense_layers=1)
        assert plan.layers == ("dense", "sparse", "sparse") and plan.selector.name == method
        assert plan.sparse_layers == plan.selecting_layers == [1, 2] and plan.hashed_layers == []
        hash(plan)
    assert AttentionPlan.for_method(3, "simhash", hata, dense_layers=1).selector.rbit == 64
    options = {"candidates": 3, "channels": 8, "page_size": 4}  # each selector takes its own fields
    assert AttentionPlan.for_method(3, "loki", hata, selector_options=options).selector == sel.LokiSelector(channels=8)
    assert (AttentionPlan.for_method(3, "quest_authors", hata, selector_options=options).selector
            == sel.QuestAuthorsSelector(page_size=4))
    assert (AttentionPlan.for_method(3, "hata_rerank", hata, selector_options=options).selector
            == sel.HataRerankSelector(rbit=64, candidates=3))
    assert AttentionPlan.for_method(3, "streaming", hata, selector_options=options).selector == sel.StreamingSelector()
    with pytest.raises(ValueError, match="LokiSelector.channels must be a positive int"):
        AttentionPlan.for_method(3, "loki", hata, selector_options={"channels": 0})
    with pytest.raises(ValueError, match="selector_options must be a dict"):
        AttentionPlan.for_method(3, "loki", hata, selector_options=[("channels", 8)])
    with pytest.raises(ValueError, match="unknown attention method 'bogus'"):
        AttentionPlan.for_method(3, "bogus", hata, dense_layers=1)
    with pytest.raises(ValueError, match="'sparse' .* needs a selector"):
        AttentionPlan(layers=("dense", "sparse"))
    with pytest.raises(ValueError, match="must be a hata_jax.selectors.Selector"):
        AttentionPlan(layers=("dense", "sparse"), selector="quest")
    with pytest.raises(ValueError, match="unknown attention kinds"):
        AttentionPlan(layers=("dense", "bogus"))


def test_every_selector_with_full_budget_reproduces_dense_generation(rng):
    """One prefill, every method at a budget >= the context: the dense plan's tokens each time."""
    model, _ = random_model(HF_CONFIGS["llama-gqa"], rng)
    prompts = ragged_prompts(rng, 97, [10, 3, 17])
    prefilled = prefill_prompts(model, prompts, capacity=32)
    hata = HataConfig(rbit=RBIT, budget=32)
    run = functools.partial(generate_from, prefilled, max_new_tokens=6, dense_below=0)
    dense = run(AttentionPlan.for_method(3, "dense", hata, dense_layers=1))
    assert dense.tokens == generate(model, prompts, max_new_tokens=6, capacity=32).tokens
    for method in sorted(set(METHODS) - {"dense"}):
        plan = AttentionPlan.for_method(3, method, hata, impl="reference", dense_layers=1)
        assert run(plan, random_params(method, model, rng)).tokens == dense.tokens, method
    # "sparse" with the hata selector: the "hata" tokens (test_sparse_hata_selector_equals_the_hata_path)


@pytest.mark.parametrize("name, sink, recent", [("llama-gqa", 0, 0), ("qwen2-tied", 1, 2)])
def test_sparse_hata_selector_equals_the_hata_path(rng, name, sink, recent):
    """At a budget below the context, "sparse" with the `hata` selector picks HATA's tokens: the
    same generation as kind "hata" with the same projections (via `generate`, and via
    `generate_from` re-encoding a prefill made with other projections)."""
    cfg = HF_CONFIGS[name]
    model, _ = random_model(cfg, rng)
    prompts = ragged_prompts(rng, cfg["vocab_size"], [29, 17, 40])
    layers = model.config.num_layers
    hata = HataConfig(rbit=RBIT, budget=7, sink=sink, recent=recent)
    plan = AttentionPlan.for_method(layers, "hata", hata, dense_layers=1)
    w = random_params("hata", model, rng)
    fast = generate(model, prompts, max_new_tokens=8, plan=plan, hash_weights=w, dense_below=0)
    prefilled = prefill_prompts(model, prompts, capacity=64)  # random projections: re-encoded below
    run = functools.partial(generate_from, prefilled, max_new_tokens=8, dense_below=0)
    assert run(plan, w).tokens == fast.tokens
    assert run(sparse_plan(plan, make_selector("hata", rbit=RBIT)), w).tokens == fast.tokens


def test_generate_from_leaves_the_prefill_usable_and_repeats(rng):
    model, _ = random_model(HF_CONFIGS["llama-gqa"], rng)
    prompts = ragged_prompts(rng, 97, [21, 9])
    prefilled = prefill_prompts(model, prompts, capacity=48)
    before = jax.tree.map(np.asarray, prefilled.caches)
    hata = HataConfig(rbit=RBIT, budget=5)
    plan = AttentionPlan.for_method(3, "quest", hata, dense_layers=1)
    hot = generation.Sampling(temperature=2.0)
    first = generate_from(prefilled, plan, max_new_tokens=7, sampling=hot, seed=4)
    again = generate_from(prefilled, plan, max_new_tokens=7, sampling=hot, seed=4)
    assert again.tokens == first.tokens and all(len(t) == 7 for t in first.tokens)
    assert not any(x.is_deleted() for x in jax.tree.leaves(prefilled.caches))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, prefilled.caches), before)
    dense = generate_from(prefilled, AttentionPlan.for_method(3, "dense"), max_new_tokens=7)
    assert dense.tokens == generate(model, prompts, max_new_tokens=7, capacity=48).tokens


def test_each_plan_compiles_once(rng, fresh_traces):
    """The start step and the decode step trace once per plan and shape; other plans and budgets
    add one each, repeats none."""
    model, _ = random_model(HF_CONFIGS["llama-gqa"], rng)
    prefilled = prefill_prompts(model, ragged_prompts(rng, 97, [12, 30]), capacity=176)
    params = random_params("simhash", model, rng)
    plans = [AttentionPlan.for_method(3, "simhash", HataConfig(rbit=RBIT, budget=b), dense_layers=1) for b in (4, 8)]
    for plan in plans + plans:
        generate_from(prefilled, plan, params, max_new_tokens=5, dense_below=0)
    assert fresh_traces["start"] == 2 and fresh_traces["decode"] == 2


@functools.partial(jax.jit, static_argnames=("graphdef", "plan"))
def _dense_steps(graphdef, state, tokens, caches, weights, params, plan):
    model = nnx.merge(graphdef, state)
    for step in range(tokens.shape[1]):
        _, caches = model.decode(tokens[:, step], caches, weights, plan.as_dense(), params)
    return caches


@pytest.mark.parametrize("method", ["simhash", "quest", "loki"])
def test_dense_steps_keep_the_selector_state_current(rng, method, ragged_lengths):
    """Dense steps (the short-context policy) append to a "sparse" layer's selector state: after
    them it equals the state `init_state` makes from all the keys."""
    model, _ = random_model(HF_CONFIGS["llama-gqa"], rng)
    config = model.config
    lengths = ragged_lengths(3, 2, 11)
    plan = AttentionPlan.for_method(3, method, HataConfig(rbit=RBIT, budget=8), dense_layers=1)
    params = random_params(method, model, rng)
    weights = random_params("hata", model, rng)
    caches = [c.prefill(jnp.asarray(rng.standard_normal(c.k.shape[:2] + (11, c.head_dim)), jnp.float32),
                        jnp.asarray(rng.standard_normal(c.k.shape[:2] + (11, c.head_dim)), jnp.float32),
                        w, lengths) for c, w in zip(init_caches(config, 3, 24, rbit=RBIT, dtype=jnp.float32), weights)]
    caches = with_selector_states(caches, plan, params)
    tokens = jnp.asarray(rng.integers(0, 97, (3, 3)), jnp.int32)
    graphdef, state = nnx.split(model)
    caches = _dense_steps(graphdef, state, tokens, caches, weights, params, plan)
    for i in plan.sparse_layers:
        cache = caches[i]
        np.testing.assert_array_equal(np.asarray(cache.lengths), np.asarray(lengths) + 3)
        expected = plan.selector.init_state(None if params is None else params[i], cache.k, cache.lengths)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5),
                     cache.state, expected)


def test_sparse_steps_lower_for_cuda(rng, monkeypatch):
    """The model's decode step with a "sparse" layer lowers for CUDA with the Pallas selection and
    sparse attention kernels (impl "auto" resolving as on a GPU; each Triton module verified), and
    so does `sparse_logits` with the Pallas selection."""
    model, _ = random_model(HF_CONFIGS["llama-gqa"], rng)
    config = model.config
    plan = AttentionPlan.for_method(3, "quest", HataConfig(rbit=RBIT, budget=16), dense_layers=2)
    caches = [dataclasses.replace(c, lengths=jnp.asarray([30, 7], jnp.int32))
              for c in init_caches(config, 2, 64, rbit=RBIT, dtype=jnp.float32)]
    caches = with_selector_states(caches, plan, None)
    steps = generation.ModelSteps(model)
    monkeypatch.setattr(dispatch, "on_gpu", lambda: True)
    text = lower_for_cuda(lambda *a: steps.decode(*a, plan=plan, sampling=generation.Sampling()), steps.state_leaves,
                          jnp.asarray([3, 5], jnp.int32), caches, random_params("hata", model, rng),
                          jax.random.PRNGKey(0))
    assert "hata_select" in text and "hata_sparse_decode" in text
    text = lower_for_cuda(lambda t: sparse_logits(model, t, jnp.asarray([20, 11]), plan, None),
                          jnp.zeros((2, 20), jnp.int32))
    assert "hata_select" in text


def test_short_context_policy_with_a_sparse_plan_is_exact(rng):
    """Dense steps up to the budget, then "sparse" steps: the tokens of "sparse" all along."""
    model, _ = random_model(HF_CONFIGS["llama-gqa"], rng)
    prefilled = prefill_prompts(model, ragged_prompts(rng, 97, [3, 6]), capacity=32)
    plan = AttentionPlan.for_method(3, "loki", HataConfig(rbit=RBIT, budget=8), dense_layers=1)
    params = random_params("loki", model, rng)
    switched = generate_from(prefilled, plan, params, max_new_tokens=10, dense_below=8)
    assert switched.dense_steps == 2
    assert switched.tokens == generate_from(prefilled, plan, params, max_new_tokens=10, dense_below=0).tokens


@pytest.mark.parametrize("method", ["hata", "quest", "hashattention", "quest_authors", "hashattention_authors",
                                    "hata_rerank"])
def test_sparse_logits(rng, method):
    """Budget >= the sequence: the dense forward. A small budget: finite logits that differ."""
    model, _ = random_model(HF_CONFIGS["llama-gqa"], rng)
    lengths = [23, 9, 16]
    tokens = np.zeros((3, 23), np.int32)
    for row, p in enumerate(ragged_prompts(rng, 97, lengths)):
        tokens[row, : len(p)] = p
    params = random_params(method, model, rng)
    dense = np.asarray(model(jnp.asarray(tokens), jnp.asarray(lengths, jnp.int32)))
    full = AttentionPlan.for_method(3, method, HataConfig(rbit=RBIT, budget=64), dense_layers=1)
    logits = np.asarray(sparse_logits(model, tokens, lengths, full, params))
    small = np.asarray(sparse_logits(model, tokens, lengths, full.with_budget(4), params))
    assert logits.shape == small.shape == (3, 23, 97) and logits.dtype == np.float32
    for row, n in enumerate(lengths):
        np.testing.assert_allclose(logits[row, :n], dense[row, :n], rtol=2e-4, atol=2e-4)
        assert np.isfinite(small[row, :n]).all()
        np.testing.assert_allclose(small[row, :4], dense[row, :4], rtol=2e-4, atol=2e-4)  # <= 4 keys visible
        assert np.abs(small[row, 4:n] - dense[row, 4:n]).max() > 1e-3


def test_sparse_logits_hata_matches_the_sparse_hata_selector(rng):
    model, _ = random_model(HF_CONFIGS["qwen2-tied"], rng)
    tokens = jnp.asarray(rng.integers(0, 89, (2, 19)), jnp.int32)
    lengths = [19, 12]
    w = random_params("hata", model, rng)
    plan = AttentionPlan.for_method(2, "hata", HataConfig(rbit=RBIT, budget=5, sink=1), dense_layers=1)
    np.testing.assert_allclose(np.asarray(sparse_logits(model, tokens, lengths, plan, w)),
                               np.asarray(sparse_logits(model, tokens, lengths,
                                                        sparse_plan(plan, make_selector("hata", rbit=RBIT)), w)),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="params must have one entry per layer"):
        sparse_logits(model, tokens, lengths, plan, w[:1])


def test_generate_from_errors(rng):
    model, _ = random_model(HF_CONFIGS["qwen2-tied"], rng)
    prefilled = prefill_prompts(model, ragged_prompts(rng, 89, [20]), capacity=24)
    plan = AttentionPlan.for_method(2, "hata", HataConfig(rbit=RBIT, budget=4), dense_layers=1)
    with pytest.raises(ValueError, match="cannot hold the prompt"):
        generate_from(prefilled, plan, max_new_tokens=5)
    with pytest.raises(ValueError, match="no projection for the 'hata' layers \\[1\\]"):
        generate_from(prefilled, plan, [None, None], max_new_tokens=2)
    with pytest.raises(ValueError, match="one entry per layer"):
        generate_from(prefilled, plan, [None], max_new_tokens=2)
    with pytest.raises(ValueError, match="plan has 3 layers"):
        generate_from(prefilled, AttentionPlan.for_method(3, "quest"), max_new_tokens=2)
    with pytest.raises(ValueError, match="params .* must have shape"):
        generate_from(prefilled, AttentionPlan.for_method(2, "loki", HataConfig(), dense_layers=1), max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt has 20 tokens but the cache capacity is 16"):
        prefill_prompts(model, ragged_prompts(rng, 89, [20]), capacity=16)


def test_selector_params(rng, tmp_path, monkeypatch):
    model, _ = random_model(HF_CONFIGS["llama-gqa"], rng)
    config = model.config
    assert selector_params("quest", model) == [None] * 3
    simhash = selector_params("simhash", model, rbit=64, seed=3)
    assert [w.shape for w in simhash] == [(2, 64, 64)] * 3
    np.testing.assert_array_equal(simhash[2], selector_params("simhash", model, rbit=64, seed=3)[2])
    with pytest.raises(ValueError, match="unknown method 'bogus'"):
        selector_params("bogus", model)
    with pytest.raises(ValueError, match="no trained projections are shipped for this model"):
        selector_params("hata", model)
    np.savez(tmp_path / "w.npz", layer_2=rng.standard_normal((2, 64, 32)).astype(np.float32))
    from_npz = selector_params("hata", model, rbit=32, hash_weights=tmp_path / "w.npz")
    assert from_npz[:2] == [None, None] and from_npz[2].shape == (2, 64, 32)
    with pytest.raises(ValueError, match="not rbit 128"):
        selector_params("hata", model, hash_weights=tmp_path / "w.npz")
    with pytest.raises(ValueError, match="does not exist"):
        selector_params("hata", model, hash_weights=tmp_path / "missing")
    with pytest.raises(ValueError, match="needs hashattention_dir"):
        selector_params("hashattention", model)
    with pytest.raises(ValueError, match="run directory .* does not exist"):
        selector_params("hashattention", model, hashattention_dir=tmp_path / "missing")
    if HASHATTENTION_RUN.is_dir():
        with pytest.raises(ValueError, match="made for another model"):
            selector_params("hashattention", model, hashattention_dir=HASHATTENTION_RUN)

    monkeypatch.setenv("HATA_JAX_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="pass tokenizer="):
        selector_params("loki", model)

    class CharTokenizer:
        def encode(self, text, add_special_tokens=False):
            return [ord(c) % config.vocab_size for c in text]

    calibration = LokiCalibration(sequences=2, seq_len=40)
    bases = selector_params("loki", model, loki_calibration=calibration, tokenizer=CharTokenizer())
    assert len(list((tmp_path / "cache" / "loki").glob("*.npz"))) == 1
    for basis in bases:
        assert basis.shape == (2, 64, 64)
        np.testing.assert_allclose(np.einsum("hdc,hde->hce", basis, basis), np.broadcast_to(np.eye(64), (2, 64, 64)),
                                   atol=1e-4)
    cached = selector_params("loki", model, loki_calibration=calibration)  # no tokenizer needed
    jax.tree.map(np.testing.assert_array_equal, cached, bases)
    with pytest.raises(ValueError, match="pass tokenizer="):
        selector_params("loki", model, loki_calibration=LokiCalibration(sequences=3, seq_len=40))
