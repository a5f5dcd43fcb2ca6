"""Attention-level quality of a selector versus dense attention, per layer, on eval prompts.

For sampled query positions of a prompt (its last position, where the answer starts, and others
drawn from its second half), one dense prefill records every layer's post-RoPE queries and keys
(`capture_qk`, as :mod:`hata_jax.train.collect` does) and values (from the caches). For each selecting
layer of a method's plan, the selector's :func:`hata_jax.selectors.selection_mask` gives the keys
each query keeps (HATA's layers use the `hata` selector with the layer's projection, exactly as
:func:`hata_jax.models.sparse_logits` does), and

- mass recall: the share of the exact softmax mass (each query head over every key it sees)
  that falls inside the kept keys, averaged over query heads and positions;
- relative output error: `||o_sparse - o_dense|| / ||o_dense||` of each query head's attention
  output over the kept keys versus over every key, averaged the same way.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hata_jax.models.llama import init_caches
from hata_jax.models.plan import AttentionPlan
from hata_jax.models.teacher_forcing import layer_selectors
from hata_jax.selectors import selection_mask, sparse_causal_attention


def query_positions(length: int, count: int, seed: int) -> np.ndarray:
    """int32[min(count, ...)], sorted: the last position `length - 1` and `count - 1` distinct
    positions drawn from the second half `[length // 2, length - 1)`."""
    low = length // 2
    others = np.arange(low, length - 1)
    drawn = np.random.default_rng(seed).choice(others, min(count - 1, others.size), replace=False)
    return np.sort(np.append(drawn, length - 1)).astype(np.int32)


@functools.lru_cache(maxsize=8)
def _capture_fn(graphdef):
    @jax.jit
    def capture(state, tokens, positions):
        model = nnx.merge(graphdef, state)
        config = model.config
        t = tokens.shape[1]
        caches = init_caches(config, 1, t, rbit=32, dtype=jnp.float32)
        weights = [jnp.ones((config.num_kv_heads, config.head_dim, 32), jnp.float32)] * config.num_layers
        run = nnx.capture(lambda m, x: m.prefill(x, jnp.array([t], jnp.int32), caches, weights, "reference",
                                                 capture_qk=True), nnx.Intermediate)
        (_, caches), inter = run(model, tokens)
        out = []
        for i, cache in enumerate(caches):
            (q, _), = inter["layers"][i]["self_attn"]["qk"]
            out.append((q[:, positions].astype(jnp.float32), cache.k.astype(jnp.float32),
                        cache.v.astype(jnp.float32)))
        return out

    return capture


def capture_attention_inputs(model, tokens, positions) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
    """One dense prefill of a prompt; per layer `(q float32[1, m, Hq, D] at positions,
    k float32[1, Hkv, T, D], v float32[1, Hkv, T, D])`, post-RoPE.

    Args:
      tokens: int[T] the prompt; positions: int[m] query positions in [0, T).
    """
    graphdef, state = nnx.split(model)
    return _capture_fn(graphdef)(state, jnp.asarray(tokens, jnp.int32)[None], jnp.asarray(positions, jnp.int32))


@functools.partial(jax.jit, static_argnames=("selector", "budget", "sink", "recent", "impl"))
def layer_metrics(selector, params, q, k, v, positions, *, budget: int, sink: int = 0, recent: int = 0,
                  impl: str = "reference") -> tuple[jax.Array, jax.Array]:
    """(mass recall, relative output error) of one layer, float32 scalars averaged over the
    queries and query heads.

    Args:
      q: float32[1, m, Hq, D] at `positions` int32[m]; k, v: float32[1, Hkv, T, D] (every key).
      budget, sink, recent: the selection's (budget <= T).
    """
    _, m, hq, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    lengths = jnp.array([t], jnp.int32)
    q_positions = positions[None]
    state = selector.init_state(params, k, lengths)
    keep = selection_mask(selector, params, state, q, k, q_positions, lengths, budget=budget, sink=sink,
                          recent=recent, impl=impl)  # [1, H, m, T], H = Hkv or Hq (per query head)
    visible = jnp.broadcast_to(jnp.arange(t)[None, None, None, :] <= positions[None, None, :, None],
                               (1, hkv, m, t))
    qg = q.reshape(1, m, hkv, hq // hkv, d)
    logits = jnp.einsum("bmhgd,bhtd->bhgmt", qg, k, precision=jax.lax.Precision.HIGHEST) / math.sqrt(d)
    probs = jax.nn.softmax(jnp.where(visible[:, :, None], logits, -jnp.inf), axis=-1)
    kept = keep.reshape(1, hkv, keep.shape[1] // hkv, m, t)  # group axis 1 (shared) or G
    mass = jnp.sum(jnp.where(kept, probs, 0.0), axis=-1)  # [1, Hkv, G, m]
    dense = sparse_causal_attention(q, k, v, visible)
    sparse = sparse_causal_attention(q, k, v, keep)  # [1, m, Hq, D]
    error = jnp.linalg.norm(sparse - dense, axis=-1) / jnp.linalg.norm(dense, axis=-1)
    return jnp.mean(mass), jnp.mean(error)


def plan_metrics(plan: AttentionPlan, params, inputs, positions) -> dict[str, list]:
    """{"layers", "mass", "error"}: :func:`layer_metrics` of every selecting layer of `plan`.

    Args:
      params: one entry per layer (:func:`hata_jax.train.selector_params`), or None.
      inputs: :func:`capture_attention_inputs`'s output for the same prompt and `positions`.
    """
    selectors = layer_selectors(plan)
    params = params if params is not None else [None] * len(selectors)
    t = inputs[0][1].shape[2]
    hata = plan.hata
    out = {"layers": [], "mass": [], "error": []}
    for layer, (selector, p, (q, k, v)) in enumerate(zip(selectors, params, inputs)):
        if selector is None:
            continue
        p = None if p is None else jax.tree.map(jnp.asarray, p)
        mass, error = layer_metrics(selector, p, q, k, v, jnp.asarray(positions, jnp.int32),
                                    budget=min(hata.budget, t), sink=hata.sink, recent=hata.recent)
        out["layers"].append(layer)
        out["mass"].append(float(mass))
        out["error"].append(float(error))
    return out
