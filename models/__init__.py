"""Flax NNX Llama-family models with per-layer dense or HATA decode attention, weight loaders
(HF safetensors directories, GGUF files), tokenizers and jit-compiled generation.

    from hata_jax.models import AttentionPlan, generate, load_model
    model, tokenizer = load_model("smollm2")            # or a HF directory, or a .gguf file
    plan = AttentionPlan.uniform(model.config.num_layers, "hata", HataConfig(budget=256))
    ids = tokenizer.encode_prompt("What is the capital of France?", chat=True)
    result = generate(model, [ids], plan=plan, stop_ids=tokenizer.stop_ids, max_new_tokens=32)
    print(tokenizer.decode(result.tokens[0]))

Comparing methods and budgets on one prefill (selectors from :mod:`hata_jax.selectors`):

    prefilled = prefill_prompts(model, [ids], capacity=4096)
    for method in ("hata", "quest", "loki"):
        plan = AttentionPlan.for_method(model.config.num_layers, method, HataConfig(budget=256))
        params = selector_params(method, model, tokenizer=tokenizer)   # hata_jax.train.selector_params
        result = generate_from(prefilled, plan, params, max_new_tokens=32, stop_ids=tokenizer.stop_ids)
    logits = sparse_logits(model, tokens, lengths, plan, params)      # teacher-forced, float32[B, T, V]

Short-context policy: with "hata" or "sparse" layers in the plan, `generate` runs a step with
dense attention in every layer while every sequence holds at most `dense_below` tokens (default
4 x the budget, `dense_below=0` disables; `hata-jax generate --dense-below N`), switching to the
plan's step on the host once the context grows past it; see :mod:`hata_jax.models.generation`.
"""
from hata_jax.models.config import LlamaConfig, RopeScaling
from hata_jax.models.generation import GenerationResult, Prefilled, Sampling, generate, generate_from, prefill_prompts
from hata_jax.models.hash_projections import hash_weights_for, load_hash_weights, random_projections
from hata_jax.models.llama import LlamaForCausalLM, init_caches
from hata_jax.models.load import load_model
from hata_jax.models.plan import METHODS, AttentionPlan
from hata_jax.models.selector_cache import SelectorCache, with_selector_states
from hata_jax.models.teacher_forcing import sparse_logits
from hata_jax.models.tensors import model_from_tensors, model_tensors
from hata_jax.models.tokenizer import Tokenizer

__all__ = [
    "METHODS",
    "AttentionPlan",
    "GenerationResult",
    "LlamaConfig",
    "LlamaForCausalLM",
    "Prefilled",
    "RopeScaling",
    "Sampling",
    "SelectorCache",
    "Tokenizer",
    "generate",
    "generate_from",
    "hash_weights_for",
    "init_caches",
    "load_hash_weights",
    "load_model",
    "model_from_tensors",
    "model_tensors",
    "prefill_prompts",
    "random_projections",
    "sparse_logits",
    "with_selector_states",
]
