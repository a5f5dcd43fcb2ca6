"""Greedy generation with the HATA layers' K/V caches in host memory (:mod:`hata_jax.offload`).

    plan = AttentionPlan.uniform(model.config.num_layers, "hata", HataConfig(budget=2048))
    result = generate_offloaded(model, prompts, plan=plan, max_new_tokens=64)

The "hata" layers of the plan keep an :class:`hata_jax.offload.OffloadedCache` (K/V in host RAM,
codes and norms on the device); the "dense" layers (the first `dense_layers`, 2 by default) keep
the usual on-device :class:`hata_jax.HataCache`: they attend to every token, so offloading them
would move their whole cache at every step (for Llama-3.1-8B at 256K and batch 2, the two dense
layers hold 4 GiB on the device, the 30 offloaded ones 60 GiB on the host).

A decode step (:meth:`OffloadDecoder.step`) runs the model's own modules in small jitted pieces,
each compiled once for all layers (they share one structure): the embedding; per dense layer
`DecoderLayer.decode` (cache donated); per HATA layer the layer's norm, `SelfAttention.project_qkv` and
:func:`hata_jax.offload.select_rows` (codes donated), then on the host
:meth:`~hata_jax.offload.OffloadedCache.append_and_gather`, then :func:`hata_jax.offload.attend_rows`,
`o_proj` and `DecoderLayer.add_residual_and_mlp` (residuals and MLP); the final norm, LM head and argmax. The
host waits once per HATA layer for its selection (see :mod:`hata_jax.offload` on what overlaps).

The prefill runs layer by layer on the device (dense causal attention, `DecoderLayer.prefill`) and
moves each HATA layer's prompt K/V to the host right after its layer, so the device holds one
layer's prompt K/V at a time. There is no short-context policy (:mod:`hata_jax.models.generation` runs
dense steps at short contexts): a dense step would move whole offloaded caches. Tokens equal
`hata_jax.models.generate(..., plan=plan, dense_below=0)`'s, which runs the same HATA step on the device.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hata_jax import HataCache
from hata_jax.models.generation import (
    CAPACITY_BUCKET,
    PROMPT_BUCKET,
    GenerationResult,
    TokenRecorder,
    check_prompts,
    check_room,
    round_up,
)
from hata_jax.models.hash_projections import hash_weights_for
from hata_jax.models.llama import LlamaForCausalLM
from hata_jax.models.plan import AttentionPlan
from hata_jax.offload import OffloadedCache, attend_rows, select_rows

KINDS = ("dense", "hata")


@dataclasses.dataclass(frozen=True)
class _Pieces:
    """The jitted pieces of a step for one model structure (see the module docstring)."""

    embed: object
    head: object
    prefill_layer: object
    dense_layer: object
    hata_select: object
    hata_finish: object


@functools.lru_cache(maxsize=16)
def _pieces(model_def: nnx.GraphDef, model_treedef, layer_def: nnx.GraphDef, layer_treedef) -> _Pieces:
    def model_of(leaves) -> LlamaForCausalLM:
        return nnx.merge(model_def, jax.tree_util.tree_unflatten(model_treedef, leaves))

    def layer_of(leaves):
        return nnx.merge(layer_def, jax.tree_util.tree_unflatten(layer_treedef, leaves))

    @jax.jit
    def embed(model_leaves, tokens):
        """tokens int[...] -> hidden [..., hidden_size]."""
        return model_of(model_leaves).embed_tokens(tokens)

    @jax.jit
    def head(model_leaves, x):
        """x [B, hidden_size] (before the final norm) -> greedy tokens int32[B]."""
        model = model_of(model_leaves)
        return jnp.argmax(model.logits(model.norm(x)), axis=-1).astype(jnp.int32)

    @functools.partial(jax.jit, static_argnames=("impl",), donate_argnames=("cache",))
    def prefill_layer(layer_leaves, x, lengths, cache, w, *, impl):
        return layer_of(layer_leaves).prefill(x, lengths, cache, w, impl)

    @functools.partial(jax.jit, static_argnames=("plan",), donate_argnames=("cache",))
    def dense_layer(layer_leaves, x, cache, w, *, plan):
        return layer_of(layer_leaves).decode(x, cache, w, "dense", plan)

    @functools.partial(jax.jit, static_argnames=("plan", "dtype"), donate_argnames=("codes",))
    def hata_select(layer_leaves, x, codes, w, *, plan, dtype):
        """-> (q, idx, count, kv_new, codes): the layer's attention inputs and its selection."""
        layer = layer_of(layer_leaves)
        q, k, v = layer.self_attn.project_qkv(layer.input_layernorm(x), codes.lengths)
        return (q, *select_rows(q, k, v, codes, w, plan.hata, dtype=dtype, impl=plan.impl))

    @functools.partial(jax.jit, static_argnames=("impl",))
    def hata_finish(layer_leaves, x, q, blocks, count, *, impl):
        """The layer's output from the moved rows: attention, o_proj, residuals and MLP."""
        layer = layer_of(layer_leaves)
        out = attend_rows(q, blocks, count, impl=impl)
        return layer.add_residual_and_mlp(x, layer.self_attn.o_proj(out.reshape(x.shape[0], -1)))

    return _Pieces(embed, head, prefill_layer, dense_layer, hata_select, hata_finish)


class OffloadDecoder:
    """A model's prefill and greedy decode step with its "hata" layers' K/V in host memory.

    Caches: a list with one entry per layer, a :class:`hata_jax.HataCache` (on the device) for a
    "dense" layer and an :class:`hata_jax.offload.OffloadedCache` for a "hata" layer; the methods
    update the list in place.
    """

    def __init__(self, model: LlamaForCausalLM, plan: AttentionPlan, hash_weights=None):
        """`hash_weights`: per-layer projections as :func:`hata_jax.models.hash_projections.hash_weights_for`
        takes them (None: random, with a warning)."""
        config = model.config
        if len(plan.layers) != config.num_layers:
            raise ValueError(f"the attention plan has {len(plan.layers)} layers, the model {config.num_layers}")
        bad = sorted(set(plan.layers) - set(KINDS))
        if bad:
            raise ValueError(f"offloaded decoding runs the attention kinds {KINDS}, the plan has {bad}")
        self.config, self.plan, self.dtype = config, plan, model.dtype
        self.hash_weights = hash_weights_for(config, plan, hash_weights)
        model_def, state = nnx.split(model)
        self.model_leaves, model_treedef = jax.tree_util.tree_flatten(state)
        layer_def = nnx.split(model.layers[0])[0]  # every decoder layer has this structure
        splits = [jax.tree_util.tree_flatten(nnx.split(layer)[1]) for layer in model.layers]
        self.layer_leaves = [leaves for leaves, _ in splits]
        layer_treedef = splits[0][1]
        if any(treedef != layer_treedef for _, treedef in splits):
            raise ValueError("offloaded decoding needs decoder layers of one structure")
        self._pieces = _pieces(model_def, model_treedef, layer_def, layer_treedef)

    def prefill(self, tokens, lengths, capacity: int, *, cache_dtype=None):
        """Prompts int[B, T] right-padded to `lengths` -> (first new tokens int32[B], caches of
        `capacity` tokens per sequence holding the prompts)."""
        p, plan, config = self._pieces, self.plan, self.config
        tokens, lengths = jnp.asarray(tokens, jnp.int32), np.asarray(lengths, np.int32)
        batch, t = tokens.shape
        dtype = jnp.dtype(cache_dtype or self.dtype)
        if t > capacity:
            raise ValueError(f"the prompt has {t} tokens but the cache capacity is {capacity}")

        def hata_cache(tokens_held):
            return HataCache.init(batch, config.num_kv_heads, tokens_held, config.head_dim, rbit=plan.hata.rbit,
                                  dtype=dtype)

        x = p.embed(self.model_leaves, tokens)
        device_lengths = jnp.asarray(lengths)
        caches = []
        for leaves, w, kind in zip(self.layer_leaves, self.hash_weights, plan.layers):
            cache = hata_cache(capacity if kind == "dense" else t)
            x, cache = p.prefill_layer(leaves, x, device_lengths, cache, w, impl=plan.impl)
            if kind == "hata":
                prompt = cache
                cache = OffloadedCache.init(batch, config.num_kv_heads, capacity, config.head_dim,
                                            rbit=plan.hata.rbit, dtype=dtype)
                cache.write(jnp.stack([prompt.k, prompt.v], axis=3), prompt.codes, prompt.norms)
                cache.set_lengths(lengths)
                del prompt
            caches.append(cache)
        return p.head(self.model_leaves, x[jnp.arange(batch), lengths - 1]), caches

    def step(self, tokens, caches: list) -> jax.Array:
        """One token per sequence: tokens int32[B] -> next tokens int32[B]; `caches` updated."""
        p, plan = self._pieces, self.plan
        for cache in caches:
            if isinstance(cache, OffloadedCache):
                cache.check_room()
        x = p.embed(self.model_leaves, tokens)
        for i, (leaves, w, kind) in enumerate(zip(self.layer_leaves, self.hash_weights, plan.layers)):
            if kind == "dense":
                x, caches[i] = p.dense_layer(leaves, x, caches[i], w, plan=plan)
                continue
            cache = caches[i]
            q, idx, count, kv_new, cache.codes = p.hata_select(leaves, x, cache.codes, w, plan=plan, dtype=cache.dtype)
            x = p.hata_finish(leaves, x, q, cache.append_and_gather(idx, kv_new), count, impl=plan.impl)
        return p.head(self.model_leaves, x)


def generate_offloaded(
    model: LlamaForCausalLM,
    prompts: Sequence[Sequence[int]],
    *,
    plan: AttentionPlan,
    max_new_tokens: int = 64,
    hash_weights=None,
    stop_ids: Sequence[int] = (),
    capacity: int | None = None,
    cache_dtype=None,
) -> tuple[GenerationResult, list]:
    """Greedy generation (a batch of prompts of different lengths) with offloaded HATA layers.

    Args:
      plan: "dense" and "hata" layers; a budget above the capacity is lowered to it.
      hash_weights: as :func:`hata_jax.models.generate` takes them.
      stop_ids: a row stops after producing one of these (not included in its output).
      capacity: cache tokens per sequence; default: longest prompt + max_new_tokens, rounded up
        to a multiple of CAPACITY_BUCKET.
      cache_dtype: KV cache dtype, default the model's.

    Returns:
      (the tokens and timings as :func:`hata_jax.models.generate` returns them, the final caches: their
      `stats` hold each offloaded layer's bytes moved).
    """
    lengths = check_prompts(prompts, model.config.vocab_size)
    if capacity is None:
        capacity = round_up(max(lengths) + max_new_tokens, CAPACITY_BUCKET)
    check_room(lengths, max_new_tokens, capacity)
    if plan.hata.budget > capacity:
        plan = plan.with_budget(capacity)
    decoder = OffloadDecoder(model, plan, hash_weights)
    tokens = np.zeros((len(prompts), min(round_up(max(lengths), PROMPT_BUCKET), capacity)), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = prompt

    recorder = TokenRecorder(len(prompts), max_new_tokens, stop_ids)

    start = time.perf_counter()
    next_tokens, caches = decoder.prefill(tokens, lengths, capacity, cache_dtype=cache_dtype)
    recorder.record(next_tokens)
    prefill_seconds = time.perf_counter() - start
    times = []
    while not recorder.finished:
        start = time.perf_counter()
        next_tokens = decoder.step(next_tokens, caches)
        recorder.record(next_tokens)
        times.append(time.perf_counter() - start)
    for cache in caches:
        if isinstance(cache, HataCache):
            cache.raise_if_overflowed()
    result = GenerationResult(tokens=recorder.outputs, prompt_lengths=lengths, prefill_seconds=prefill_seconds,
                              first_step_seconds=times[0] if times else 0.0, decode_seconds=float(sum(times[1:])),
                              decode_steps=max(len(times) - 1, 0))
    return result, caches
