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


SEQ_MAJOR_HINT = "(a [batch, seq, kv_heads, head_dim] cache? pass jnp.swapaxes({name}, 1, 2))"


CACHE_LAYOUTS = {2: "[batch, kv_heads, seq, head_dim]", 1: "[batch, seq, kv_heads, head_dim]"}


def check_seq_axis(seq_axis) -> int:
    """The sequence axis of a [B, Hkv, S, D] (2) or [B, S, Hkv, D] (1) cache."""
    if isinstance(seq_axis, bool) or seq_axis not in CACHE_LAYOUTS:
        raise ValueError(f"seq_axis must be 2 ({CACHE_LAYOUTS[2]}) or 1 ({CACHE_LAYOUTS[1]}), got {seq_axis!r}")
    return int(seq_axis)


def check_kv_heads(k, q_heads: int, name: str, seq_axis: int, hint: str) -> None:
    """k: a cache laid out as `CACHE_LAYOUTS[seq_axis]` (rank already checked) with KV heads
    dividing `q_heads`; the ValueError names that layout, with `hint` (what to pass instead) when
    the other layout would fit."""
    def fits(n):
        return n > 0 and q_heads % n == 0

    heads, seq = (1, 2) if seq_axis == 2 else (2, 1)
    if not fits(k.shape[heads]):
        hint = f" (a {CACHE_LAYOUTS[3 - seq_axis]} cache? {hint})" if fits(k.shape[seq]) else ""
        raise ValueError(f"{name} must be {CACHE_LAYOUTS[seq_axis]} with KV heads dividing the {q_heads} query "
                         f"heads; got shape {tuple(k.shape)}{hint}")


def check_query(q) -> None:
    """q: [batch, q_heads, head_dim] (one decode token per sequence), with a hint for a query
    that keeps its token axis."""
    if jnp.ndim(q) == 4 and q.shape[2] == 1:
        raise ValueError(f"q must have shape [batch, q_heads, head_dim] (one token per sequence), got shape "
                         f"{tuple(q.shape)} (a [batch, q_heads, 1, head_dim] query? pass q[:, :, 0])")
    check_rank(q, 3, "q", "[batch, q_heads, head_dim]")


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


def check_starts(starts, lengths, batch: int, capacity: int) -> None:
    """starts: int[batch] in [0, lengths[b]] (a left-padded cache's first rows); values are
    checked when they are concrete."""
    check_lengths(starts, batch, capacity, "starts")
    if is_concrete(starts) and is_concrete(lengths) and (np.asarray(starts) > np.asarray(lengths)).any():
        raise ValueError(f"starts must not exceed lengths, got starts {np.asarray(starts).tolist()} and lengths "
                         f"{np.asarray(lengths).tolist()}")


def check_ring(starts, lengths, batch: int, capacity: int) -> None:
    """A ring buffer's rows `[starts[b], lengths[b])` modulo `capacity`: starts in [0, capacity),
    lengths in [starts[b], starts[b] + capacity]; values are checked when they are concrete."""
    for name, x in (("starts", starts), ("lengths", lengths)):
        check_rank(x, 1, name, "[batch]")
        check_dim(x, 0, batch, name, "batch size")
        check_integer(x, name)
    if is_concrete(starts) and is_concrete(lengths):
        s, n = np.asarray(starts), np.asarray(lengths)
        if ((s < 0) | (s >= capacity) | (n < s) | (n > s + capacity)).any():
            raise ValueError(f"a ring buffer needs starts in [0, {capacity}) and lengths in [starts, starts + "
                             f"{capacity}] (at most the capacity held), got starts {s.tolist()} and lengths "
                             f"{n.tolist()}")


def as_array(x, name: str, kind: str = "float") -> jax.Array:
    """`x` (a jax or numpy array, or a nested list of numbers) as a jax array whose dtype is of
    `kind` ("float", "int", or "number": either, e.g. K/V that may be quantized); raises a
    ValueError naming `name` for anything else (strings, ragged lists, objects, the wrong kind
    of number). Arrays pass through unchanged (tracers too)."""
    if kind not in ("float", "int", "number"):
        raise ValueError(f"kind must be 'float', 'int' or 'number', got {kind!r}")
    if not isinstance(x, (jax.Array, np.ndarray, np.generic)):
        try:
            converted = np.asarray(x)
        except (TypeError, ValueError) as err:  # ragged lists
            raise ValueError(f"{name} must be an array of {kind}s, got {type(x).__name__} ({err})") from None
        if converted.dtype == object or not (np.issubdtype(converted.dtype, np.number) or converted.dtype == bool):
            raise ValueError(f"{name} must be an array of {kind}s, got {type(x).__name__} of dtype {converted.dtype}")
        x = converted.astype(np.int32) if kind == "int" and np.issubdtype(converted.dtype, np.integer) else converted
        x = jnp.asarray(x, jnp.float32) if kind == "float" and not np.issubdtype(converted.dtype, np.floating) else x
        x = jnp.asarray(x)
    if kind != "number":
        (check_floating if kind == "float" else check_integer)(x, name)
    return x


def as_int(x, name: str, low: int | None = None) -> int:
    """`x` (a Python int, a numpy integer scalar or a 0-d concrete integer array) as a Python
    int, at least `low` if given; a ValueError naming `name` otherwise (bools and floats too)."""
    if isinstance(x, (jax.Array, np.ndarray)) and x.ndim == 0 and is_concrete(x):
        x = x.item() if jnp.issubdtype(x.dtype, jnp.integer) else x
    what = "a positive int" if low == 1 else "an int" if low is None else f"an int >= {low}"
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or (low is not None and x < low):
        raise ValueError(f"{name} must be {what}, got {type(x).__name__} {x!r}")
    return int(x)


def check_scale(scale, name: str = "scale") -> float | None:
    """None, or `scale` as a finite positive float; a ValueError naming `name` otherwise."""
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a positive float or None (1/sqrt(D)), got {type(scale).__name__} {scale!r}")
    value = float(scale)
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite float > 0 or None (1/sqrt(D)), got {value}")
    return value


def check_finite(x, name: str) -> None:
    """Raise a ValueError if floating-point `x` holds NaN or inf, naming `name`, the count and the
    first bad index. Tracers (values unknown on the host) and non-float arrays are not checked."""
    if not is_concrete(x) or not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
        return
    values = np.asarray(x)
    bad = ~np.isfinite(values)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name} holds {int(bad.sum())} non-finite values of {values.size} (first {values[first]} "
                         f"at index {list(first)})")
