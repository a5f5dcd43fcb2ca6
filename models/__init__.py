"""Flax NNX Llama-family models with per-layer dense or HATA decode attention, weight loaders
(HF safetensors directories, GGUF files), tokenizers and jit-compiled generation.

    from models import AttentionPlan, generate, load_model
    model, tokenizer = load_model("smollm2")            # or a HF directory, or a .gguf file
    plan = AttentionPlan.uniform(model.config.num_layers, "hata", HataConfig(budget=256))
    ids = tokenizer.encode_prompt("What is the capital of France?", chat=True)
    result = generate(model, [ids], plan=plan, stop_ids=tokenizer.stop_ids, max_new_tokens=32)
    print(tokenizer.decode(result.tokens[0]))

Short-context policy: with HATA layers in the plan, `generate` runs a step with dense attention in
every layer while every sequence holds at most `dense_below` tokens (default 4 x the budget,
`dense_below=0` disables; `hata-jax generate --dense-below N`), switching to the plan's HATA step
on the host once the context grows past it; see :mod:`models.generation`.
"""
from models.attention import AttentionPlan, hash_weights_for, load_hash_weights, random_projections
from models.config import LlamaConfig, RopeScaling
from models.generation import GenerationResult, Sampling, generate
from models.llama import LlamaForCausalLM, init_caches
from models.load import load_model
from models.tokenizer import Tokenizer
from models.weights import model_from_tensors, model_tensors

__all__ = [
    "AttentionPlan",
    "GenerationResult",
    "LlamaConfig",
    "LlamaForCausalLM",
    "RopeScaling",
    "Sampling",
    "Tokenizer",
    "generate",
    "hash_weights_for",
    "init_caches",
    "load_hash_weights",
    "load_model",
    "model_from_tensors",
    "model_tensors",
    "random_projections",
]
