"""Model configs by name, for building models with random weights (benchmarks, tests): the shapes
of the models the benchmarks measure, and tiny ones of the same families for CPU runs.

    LLAMA_8B       Llama-3.1-8B: 32 layers, hidden 4096, 32 q / 8 KV heads, head dim 128,
                   intermediate 14336, vocab 128256, llama3 RoPE scaling (factor 8, 8K original)
    SMOLLM2        SmolLM2-135M: 30 layers, hidden 576, 9 q / 3 KV heads, head dim 64, tied embeddings
    SMALL_MODELS   {"llama": 4 layers, 8 q / 2 KV heads; "smollm2": 3 layers, 3 q / 1 KV heads, tied}
"""
from __future__ import annotations

from hata_jax.models.config import LlamaConfig, RopeScaling

LLAMA_8B = LlamaConfig(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
    head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
    rope_scaling=RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=8192))
SMOLLM2 = LlamaConfig(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
    head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)
FULL_MODELS = {"llama": LLAMA_8B, "smollm2": SMOLLM2}
SMALL_MODELS = {
    "llama": LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=4, num_heads=8,
                         num_kv_heads=2, head_dim=64, rope_theta=500000.0),
    "smollm2": LlamaConfig(vocab_size=384, hidden_size=96, intermediate_size=128, num_layers=3, num_heads=3,
                           num_kv_heads=1, head_dim=64, tie_word_embeddings=True),
}
