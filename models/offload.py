"""Greedy generation with the HATA layers' K/V caches in host memory (:mod:`hata_jax.offload`).

    plan = AttentionPlan.uniform(model.config.num_layers, "hata", HataConfig(budget=2048))
    result, caches = generate_offloaded(model, prompts, plan=plan, max_new_tokens=64, prefill_chunk=8192)

The "hata" layers of the plan keep an :class:`hata_jax.offload.OffloadedCache` (K/V in host RAM;
codes, norms and a row cache of `rows` slots per sequence and KV head on the device); the "dense"
layers (the first `dense_layers`, 2 by default) keep the usual on-device :class:`hata_jax.HataCache`:
they attend to every token, so offloading them would move their whole cache at every step (for
Llama-3.1-8B at 256K and batch 2, the two dense layers hold 4 GiB on the device, the 30 offloaded
ones 60 GiB on the host).

A decode step (:meth:`OffloadDecoder.step`) runs the model's own modules in small jitted pieces,
each compiled once for all layers (they share one structure): the embedding; per dense layer
`DecoderLayer.decode` (cache donated); per HATA layer the layer's norm, `SelfAttention.project_qkv` and
:func:`hata_jax.offload.select_rows` (codes and rows donated), then on the host
:meth:`~hata_jax.offload.OffloadedCache.append_and_gather`, then :func:`hata_jax.offload.fill_and_attend`,
`o_proj` and `DecoderLayer.add_residual_and_mlp`; the finish of one HATA layer and the selection of
the next run as one program (`hata_finish_select`: one dispatch per layer); the final norm, LM head
and argmax. The host waits once per HATA layer for its selection. `attention="dense"` runs the same step with
:func:`hata_jax.offload.offload_dense_attention` in the offloaded layers: the baseline that moves
every row of the cache at every step.

Prefill: without `prefill_chunk`, the whole prompt runs layer by layer on the device (dense causal
attention, `DecoderLayer.prefill`) and each HATA layer's K/V moves to the host right after its
layer, so the device holds one layer's prompt K/V at a time. With `prefill_chunk=C`, the prompt runs
C tokens at a time through every layer: a chunk attends to the earlier tokens (for a HATA layer,
streamed from host memory in blocks, :meth:`~hata_jax.offload.OffloadedCache.fold_blocks`) and
to itself (causal), the partial results merged by log-sum-exp; its K/V then goes to the host. The
device holds one chunk's activations and one or two streamed blocks: a prompt whose K/V never fits
the device can be started. There is no short-context policy (:mod:`hata_jax.models.generation` runs
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
from hata_jax.attention import chunk_attention, combine, scale_or_default
from hata_jax.hashing import encode, key_norms
from hata_jax.host_memory import PinnedStaging
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
from hata_jax.offload import OffloadedCache, fill_and_attend, offload_dense_attention, select_rows

KINDS = ("dense", "hata")
PREFILL_BLOCK_TOKENS = 4096
ATTENTIONS = ("hata", "dense")


@dataclasses.dataclass(frozen=True)
class _Pieces:
    """The jitted pieces of a step for one model structure (see the module docstring)."""

    embed: object
    head: object
    prefill_layer: object
    dense_layer: object
    hata_select: object
    hata_finish: object
    hata_finish_select: object
    project: object
    finish: object
    chunk_self: object
    chunk_block: object


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

    def select(layer_leaves, x, codes, rows, w, plan, dtype):
        layer = layer_of(layer_leaves)
        q, k, v = layer.self_attn.project_qkv(layer.input_layernorm(x), codes.lengths)
        return (q, *select_rows(q, k, v, codes, rows, w, plan.hata, dtype=dtype, impl=plan.impl))

    def finish_hata(layer_leaves, x, q, rows, fetch, landing, impl):
        layer = layer_of(layer_leaves)
        out, rows = fill_and_attend(q, rows, fetch, landing, impl=impl)
        return layer.add_residual_and_mlp(x, layer.self_attn.o_proj(out.reshape(x.shape[0], -1))), rows

    @functools.partial(jax.jit, static_argnames=("plan", "dtype"), donate_argnames=("codes", "rows"))
    def hata_select(layer_leaves, x, codes, rows, w, *, plan, dtype):
        """-> (q, fetch, kv_new, codes, rows): the layer's queries, its selection and fetch plan."""
        return select(layer_leaves, x, codes, rows, w, plan, dtype)

    @functools.partial(jax.jit, static_argnames=("impl",), donate_argnames=("rows",))
    def hata_finish(layer_leaves, x, q, rows, fetch, landing, *, impl):
        """-> (the layer's output, its filled rows): attention over the row cache, o_proj, residuals, MLP."""
        return finish_hata(layer_leaves, x, q, rows, fetch, landing, impl)

    @functools.partial(jax.jit, static_argnames=("plan", "dtype"), donate_argnames=("rows", "next_codes", "next_rows"))
    def hata_finish_select(layer_leaves, x, q, rows, fetch, landing, next_leaves, next_codes, next_rows, next_w, *,
                           plan, dtype):
        """hata_finish of a layer, then hata_select of the next HATA layer, in one program (one
        dispatch per layer) -> (output, filled rows, the next layer's q, fetch, kv_new, codes, rows)."""
        x, rows = finish_hata(layer_leaves, x, q, rows, fetch, landing, plan.impl)
        return (x, rows, *select(next_leaves, x, next_codes, next_rows, next_w, plan, dtype))

    @jax.jit
    def project(layer_leaves, x, positions):
        """x [..., hidden], positions int[...] -> post-RoPE q, k, v."""
        layer = layer_of(layer_leaves)
        return layer.self_attn.project_qkv(layer.input_layernorm(x), positions)

    @jax.jit
    def finish(layer_leaves, x, out):
        """x [..., hidden], attention out [..., Hq, D] -> the layer's output (o_proj, residuals, MLP)."""
        layer = layer_of(layer_leaves)
        return layer.add_residual_and_mlp(x, layer.self_attn.o_proj(out.reshape(*x.shape[:-1], -1).astype(x.dtype)))

    @jax.jit
    def chunk_self(q, k, v, valid):
        """The chunk's causal attention over itself: q [B, C, Hq, D], k, v [B, C, Hkv, D], valid
        int32[B] its tokens that are prompt -> (out, lse) as :func:`chunk_attention`."""
        c, group = q.shape[1], q.shape[2] // k.shape[2]
        causal = jnp.tile(jnp.arange(c)[None, :] <= jnp.arange(c)[:, None], (group, 1))
        mask = causal[None, None] & (jnp.arange(c)[None, None, None, :] < valid[:, None, None, None])
        return chunk_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask,
                               scale_or_default(None, q.shape[-1]))

    @jax.jit
    def chunk_block(q, block, held, out, lse):
        """Merge the chunk's attention over one block of earlier rows [B, Hkv, T, 2, D] (rows
        [0, held[b]) of it) into the running (out, lse)."""
        mask = jnp.arange(block.shape[2])[None, None, None, :] < held[:, None, None, None]
        part, part_lse = chunk_attention(q, block[..., 0, :], block[..., 1, :], mask,
                                         scale_or_default(None, q.shape[-1]))
        return combine(jnp.stack([out, part]), jnp.stack([lse, part_lse]))

    return _Pieces(embed, head, prefill_layer, dense_layer, hata_select, hata_finish, hata_finish_select, project,
                   finish, chunk_self, chunk_block)


class OffloadDecoder:
    """A model's prefill and greedy decode step with its "hata" layers' K/V in host memory.

    Caches: a list with one entry per layer, a :class:`hata_jax.HataCache` (on the device) for a
    "dense" layer and an :class:`hata_jax.offload.OffloadedCache` for a "hata" layer; the methods
    update the list in place.
    """

    def __init__(self, model: LlamaForCausalLM, plan: AttentionPlan, hash_weights=None, *, rows: int | None = None):
        """`hash_weights`: per-layer projections as :func:`hata_jax.models.hash_projections.hash_weights_for`
        takes them (None: random, with a warning); `rows`: row-cache slots per sequence and KV head
        of each offloaded layer (>= the budget; None: the budget, i.e. the previous step's selection)."""
        config = model.config
        if len(plan.layers) != config.num_layers:
            raise ValueError(f"the attention plan has {len(plan.layers)} layers, the model {config.num_layers}")
        bad = sorted(set(plan.layers) - set(KINDS))
        if bad:
            raise ValueError(f"offloaded decoding runs the attention kinds {KINDS}, the plan has {bad}")
        self.rows = plan.hata.budget if rows is None else rows
        if isinstance(self.rows, bool) or not isinstance(self.rows, int) or self.rows < plan.hata.budget:
            raise ValueError(f"rows must be an int >= the budget {plan.hata.budget}, got {rows!r}")
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
        self._staging: dict[np.dtype, PinnedStaging] = {}

    def staging(self, dtype) -> PinnedStaging:
        """The staging buffers every offloaded layer of this decoder shares (its layers' steps run
        one after another), one set per cache dtype."""
        dtype = np.dtype(dtype)
        if dtype not in self._staging:
            self._staging[dtype] = PinnedStaging((2, self.config.head_dim), dtype)
        return self._staging[dtype]

    def offloaded_cache(self, batch: int, capacity: int, dtype) -> OffloadedCache:
        """An empty offloaded layer cache of this decoder (its row-cache size, shared staging)."""
        return OffloadedCache.init(batch, self.config.num_kv_heads, capacity, self.config.head_dim,
                                   rbit=self.plan.hata.rbit, dtype=dtype, rows=min(self.rows, capacity),
                                   staging=self.staging(dtype))

    def prefill(self, tokens, lengths, capacity: int, *, cache_dtype=None, chunk: int | None = None,
                block_tokens: int = PREFILL_BLOCK_TOKENS):
        """Prompts int[B, T] right-padded to `lengths` -> (first new tokens int32[B], caches of
        `capacity` tokens per sequence holding the prompts).

        `chunk`: run the prompt `chunk` tokens at a time (see the module docstring; None: at once);
        `block_tokens`: the blocks a chunk reads the earlier tokens in (a block's logits are
        float32[B, Hq * chunk, block_tokens]).
        """
        tokens, lengths = jnp.asarray(tokens, jnp.int32), np.asarray(lengths, np.int32)
        dtype = jnp.dtype(cache_dtype or self.dtype)
        if tokens.shape[1] > capacity:
            raise ValueError(f"the prompt has {tokens.shape[1]} tokens but the cache capacity is {capacity}")
        if chunk is None:
            return self._prefill_whole(tokens, lengths, capacity, dtype)
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk (prefill tokens at a time) must be a positive int, got {chunk!r}")
        return self._prefill_chunked(tokens, lengths, capacity, dtype, chunk, block_tokens)

    def _prefill_whole(self, tokens, lengths, capacity: int, dtype):
        p, plan, config = self._pieces, self.plan, self.config
        batch, t = tokens.shape
        x = p.embed(self.model_leaves, tokens)
        device_lengths = jnp.asarray(lengths)
        caches = []
        for leaves, w, kind in zip(self.layer_leaves, self.hash_weights, plan.layers):
            cache = HataCache.init(batch, config.num_kv_heads, capacity if kind == "dense" else t, config.head_dim,
                                   rbit=plan.hata.rbit, dtype=dtype)
            x, cache = p.prefill_layer(leaves, x, device_lengths, cache, w, impl=plan.impl)
            if kind == "hata":
                prompt = cache
                cache = self.offloaded_cache(batch, capacity, dtype)
                cache.write(jnp.stack([prompt.k, prompt.v], axis=3), prompt.codes, prompt.norms)
                cache.set_lengths(lengths)
                del prompt
            caches.append(cache)
        return p.head(self.model_leaves, x[jnp.arange(batch), lengths - 1]), caches

    def _prefill_chunked(self, tokens, lengths, capacity: int, dtype, chunk: int, block_tokens: int):
        p, plan, config = self._pieces, self.plan, self.config
        batch, t = tokens.shape
        kv_shape = (batch, config.num_kv_heads, capacity, config.head_dim)
        dense = {i: (jnp.zeros(kv_shape, dtype), jnp.zeros(kv_shape, dtype))
                 for i, kind in enumerate(plan.layers) if kind == "dense"}
        caches = [None if kind == "dense" else self.offloaded_cache(batch, capacity, dtype) for kind in plan.layers]
        last = jnp.zeros((batch, config.hidden_size), self.dtype)
        for first in range(0, t, chunk):
            size = min(chunk, t - first)
            positions = jnp.broadcast_to(jnp.arange(first, first + size, dtype=jnp.int32), (batch, size))
            valid = jnp.asarray(np.clip(lengths - first, 0, size), jnp.int32)
            held = jnp.asarray(np.minimum(lengths, first), jnp.int32)
            x = p.embed(self.model_leaves, tokens[:, first:first + size])
            for i, (leaves, w, kind) in enumerate(zip(self.layer_leaves, self.hash_weights, plan.layers)):
                q, k, v = p.project(leaves, x, positions)
                out, lse = p.chunk_self(q, k, v, valid)
                k, v = k.transpose(0, 2, 1, 3).astype(dtype), v.transpose(0, 2, 1, 3).astype(dtype)
                if kind == "dense":
                    dense_k, dense_v = dense[i]
                    for start in range(0, first, block_tokens):
                        block = jnp.stack([dense_k[:, :, start:start + block_tokens],
                                           dense_v[:, :, start:start + block_tokens]], axis=3)
                        out, lse = p.chunk_block(q, block, jnp.clip(held - start, 0, block.shape[2]), out, lse)
                    dense[i] = (jax.lax.dynamic_update_slice_in_dim(dense_k, k, first, axis=2),
                                jax.lax.dynamic_update_slice_in_dim(dense_v, v, first, axis=2))
                else:
                    def step(carry, start, block, q=q):
                        return p.chunk_block(q, block, jnp.clip(held - start, 0, block.shape[2]), *carry)

                    out, lse = caches[i].fold_blocks(first, step, (out, lse), block_tokens)
                    caches[i].write(jnp.stack([k, v], axis=3), encode(k, w, head_axis=1, impl=plan.impl), key_norms(k),
                                    first)
                x = p.finish(leaves, x, out)
            ends = lengths - 1 - first
            inside = jnp.asarray((ends >= 0) & (ends < size))
            last = jnp.where(inside[:, None], x[jnp.arange(batch), jnp.asarray(np.clip(ends, 0, size - 1))], last)
        for i, (k, v) in dense.items():
            caches[i] = HataCache.from_kv(k, v, self.hash_weights[i], jnp.asarray(lengths), impl=plan.impl)
        for cache in caches:
            if isinstance(cache, OffloadedCache):
                cache.set_lengths(lengths)
                cache.stats = type(cache.stats)()  # the prefill's streaming is not a decode step's
        return p.head(self.model_leaves, last), caches

    def step(self, tokens, caches: list, *, attention: str = "hata") -> jax.Array:
        """One token per sequence: tokens int32[B] -> next tokens int32[B]; `caches` updated.

        `attention`: what the offloaded layers run: "hata", or "dense" (every row streams from the
        host: the baseline).
        """
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        p, plan = self._pieces, self.plan
        for cache in caches:
            if isinstance(cache, OffloadedCache):
                cache.check_room()
        x = p.embed(self.model_leaves, tokens)
        pending = None  # a HATA layer selected and gathered, not yet finished: (layer, q, fetch, landing)

        def finish(x):
            i, q, fetch, landing = pending
            x, caches[i].rows = p.hata_finish(self.layer_leaves[i], x, q, caches[i].rows, fetch, landing,
                                              impl=plan.impl)
            return x

        for i, (leaves, w, kind) in enumerate(zip(self.layer_leaves, self.hash_weights, plan.layers)):
            cache = caches[i]
            if kind == "dense" or attention == "dense":
                if pending:
                    x, pending = finish(x), None
                if kind == "dense":
                    x, caches[i] = p.dense_layer(leaves, x, cache, w, plan=plan)
                else:
                    q, k, v = p.project(leaves, x, jnp.asarray(cache.lengths))
                    x = p.finish(leaves, x, offload_dense_attention(q, k, v, cache, w, impl=plan.impl))
                continue
            if pending is None:
                q, fetch, kv_new, cache.codes, cache.rows = p.hata_select(leaves, x, cache.codes, cache.rows, w,
                                                                          plan=plan, dtype=cache.dtype)
            else:  # finish the previous HATA layer and select this one in one dispatch
                j, q, fetch, landing = pending
                x, caches[j].rows, q, fetch, kv_new, cache.codes, cache.rows = p.hata_finish_select(
                    self.layer_leaves[j], x, q, caches[j].rows, fetch, landing, leaves, cache.codes, cache.rows, w,
                    plan=plan, dtype=cache.dtype)
            pending = (i, q, fetch, cache.append_and_gather(fetch, kv_new))
        if pending:
            x = finish(x)
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
    rows: int | None = None,
    prefill_chunk: int | None = None,
    attention: str = "hata",
    on_tokens=None,
) -> tuple[GenerationResult, list]:
    """Greedy generation (a batch of prompts of different lengths) with offloaded HATA layers.

    Args:
      plan: "dense" and "hata" layers; a budget above the capacity is lowered to it.
      hash_weights: as :func:`hata_jax.models.generate` takes them.
      stop_ids: a row stops after producing one of these (not included in its output).
      capacity: cache tokens per sequence; default: longest prompt + max_new_tokens, rounded up
        to a multiple of CAPACITY_BUCKET.
      cache_dtype: KV cache dtype, default the model's.
      rows: row-cache slots per sequence and KV head (see :class:`OffloadDecoder`).
      prefill_chunk: prompt tokens per prefill chunk (see :meth:`OffloadDecoder.prefill`).
      attention: "hata", or "dense" (the offloaded layers stream every row: the baseline).
      on_tokens: called with each step's new tokens (a list, None for a finished row).

    Returns:
      (the tokens and timings as :func:`hata_jax.models.generate` returns them, the final caches: their
      `stats` hold each offloaded layer's bytes moved and row-cache hits).
    """
    lengths = check_prompts(prompts, model.config.vocab_size)
    if capacity is None:
        capacity = round_up(max(lengths) + max_new_tokens, CAPACITY_BUCKET)
    check_room(lengths, max_new_tokens, capacity)
    if plan.hata.budget > capacity:
        plan = plan.with_budget(capacity)
    decoder = OffloadDecoder(model, plan, hash_weights, rows=None if rows is None else min(rows, capacity))
    width = max(lengths) if prefill_chunk else round_up(max(lengths), PROMPT_BUCKET)
    tokens = np.zeros((len(prompts), min(width, capacity)), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = prompt

    recorder = TokenRecorder(len(prompts), max_new_tokens, stop_ids, on_tokens)

    start = time.perf_counter()
    next_tokens, caches = decoder.prefill(tokens, lengths, capacity, cache_dtype=cache_dtype, chunk=prefill_chunk)
    if attention == "hata":
        for cache in caches:
            if isinstance(cache, OffloadedCache):
                cache.prepare(plan.hata.budget)
    recorder.record(next_tokens)
    prefill_seconds = time.perf_counter() - start
    times = []
    while not recorder.finished:
        start = time.perf_counter()
        next_tokens = decoder.step(next_tokens, caches, attention=attention)
        recorder.record(next_tokens)
        times.append(time.perf_counter() - start)
    for cache in caches:
        if isinstance(cache, HataCache):
            cache.raise_if_overflowed()
    result = GenerationResult(tokens=recorder.outputs, prompt_lengths=lengths, prefill_seconds=prefill_seconds,
                              first_step_seconds=times[0] if times else 0.0, decode_seconds=float(sum(times[1:])),
                              decode_steps=max(len(times) - 1, 0))
    return result, caches
