"""Per-head MLPs (HashAttention's query and key maps): plain JAX, shared by the selector and its trainer."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def mlp_init(key, heads: int, widths: tuple[int, ...]) -> dict:
    """Per-head MLP parameters: w<i> float32[heads, in, out] ~ N(0, 1/in), b<i> zeros[heads, out]."""
    params = {}
    keys = jax.random.split(key, len(widths) - 1)
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        params[f"w{i}"] = jax.random.normal(keys[i], (heads, n_in, n_out), jnp.float32) / np.sqrt(n_in)
        params[f"b{i}"] = jnp.zeros((heads, n_out), jnp.float32)
    return params


def mlp_apply(params: dict, x: jax.Array) -> jax.Array:
    """x: [..., heads, in] -> [..., heads, out]: SiLU between layers, linear output."""
    depth = len(params) // 2
    for i in range(depth):
        x = jnp.einsum("...hi,hio->...ho", x, params[f"w{i}"]) + params[f"b{i}"]
        if i < depth - 1:
            x = jax.nn.silu(x)
    return x
