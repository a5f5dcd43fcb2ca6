"""Flax NNX Llama-family models, weight loaders and generation (see the model issue)."""
