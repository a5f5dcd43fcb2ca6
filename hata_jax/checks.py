"""Argument checks shared by the public functions: each raises a ValueError naming the argument."""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def check_rank(x, rank: int, name: str, layout: str) -> None:
    if jnp.ndim(x) != rank:
        raise ValueError(f"{name} must have shape {layout}, got shape {tuple(jnp.shape(x))}")


def check_floating(x, name: str) -> None:
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(f"{name} must be a floating-point array, got dtype {jnp.result_type(x)}")


def check_integer(x, name: str) -> None:
    if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
        raise ValueError(f"{name} must be an integer array, got dtype {jnp.result_type(x)}")


def check_dtype(x, dtypes: Sequence, name: str) -> None:
    dtype = jnp.result_type(x)
    if dtype not in [jnp.dtype(d) for d in dtypes]:
        raise ValueError(f"{name} must have dtype {' or '.join(str(jnp.dtype(d)) for d in dtypes)}, got {dtype}")


def check_dim(x, axis: int, expected: int, name: str, what: str) -> None:
    got = jnp.shape(x)[axis]
    if got != expected:
        raise ValueError(f"{name} has {what} {got} along axis {axis}, expected {expected} "
                         f"(shape {tuple(jnp.shape(x))})")


def group_size(q_heads: int, kv_heads: int, name: str) -> int:
    if kv_heads <= 0 or q_heads % kv_heads:
        raise ValueError(
            f"{name}: query heads ({q_heads}) must be a positive multiple of KV heads ({kv_heads})"
        )
    return q_heads // kv_heads


def is_concrete(x) -> bool:
    """True when `x` holds values we can read on the host (not a tracer)."""
    return not isinstance(x, jax.core.Tracer)


def check_lengths(lengths, batch: int, capacity: int, name: str = "lengths") -> None:
    """lengths: int[batch] in [0, capacity]; values are checked when they are concrete."""
    check_rank(lengths, 1, name, "[batch]")
    check_dim(lengths, 0, batch, name, "batch size")
    check_integer(lengths, name)
    if is_concrete(lengths):
        values = np.asarray(lengths)
        if values.size and (values.min() < 0 or values.max() > capacity):
            raise ValueError(f"{name} must lie in [0, {capacity}] (the cache capacity), got {values.tolist()}")
