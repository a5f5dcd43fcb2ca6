"""A Llama-family decoder in Flax NNX whose decode attention is chosen per layer (dense or HATA).

Parameter names mirror the HF checkpoint names (`layers[i].self_attn.q_proj.kernel` is
`model.layers.{i}.self_attn.q_proj.weight`, transposed), see :mod:`hata_jax.models.tensors`.

Batches are right-padded: row `b` holds its prompt at positions `[0, lengths[b])`; RoPE
positions are token indices, and decode appends each sequence's token at `lengths[b]`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import hata_jax
from hata_jax import HataCache, sequence_sharding
from hata_jax import sharding as head_sharding
from hata_jax.models.config import LlamaConfig
from hata_jax.models.plan import AttentionPlan
from hata_jax.models.rope import apply_rope, inverse_frequencies
from hata_jax.models.selector_cache import SelectorCache, append_token, selector_decode_attention


class RMSNorm(nnx.Module):
    """`weight * x / rms(x)`, normalised in float32 (as HF Llama)."""

    def __init__(self, dim: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * xf.astype(x.dtype)


class SelfAttention(nnx.Module):
    """GQA self-attention: dense causal over a prompt, per-layer dense or HATA when decoding."""

    def __init__(self, config: LlamaConfig, dtype, rngs: nnx.Rngs):
        h, d = config.hidden_size, config.head_dim

        def linear(n_in, n_out, bias):
            return nnx.Linear(n_in, n_out, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs)

        self.q_proj = linear(h, config.num_heads * d, config.qkv_bias)
        self.k_proj = linear(h, config.num_kv_heads * d, config.qkv_bias)
        self.v_proj = linear(h, config.num_kv_heads * d, config.qkv_bias)
        self.o_proj = linear(config.num_heads * d, h, config.o_bias)
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, d
        self.inv_freq = tuple(float(f) for f in inverse_frequencies(config))

    def project_qkv(self, x, positions, fused: bool = True):
        """The q, k, v projections and RoPE of one layer.

        x: [..., hidden], positions: int[...] -> q [..., Hq, D], k, v [..., Hkv, D] (post-RoPE, in
        the projections' dtype). `fused`: one product with the three matrices concatenated inside
        the program (the faster form at small batch: BENCHMARKS.md, "batch-1 k/v projections");
        False: three products, as head-sharded weights need (their shards line up with the heads).
        """
        lead = x.shape[:-1]
        widths = [self.num_heads * self.head_dim] + [self.num_kv_heads * self.head_dim] * 2
        linears = (self.q_proj, self.k_proj, self.v_proj)
        if fused:
            kernel = jnp.concatenate([linear.kernel[...] for linear in linears], axis=1)
            x, kernel = nnx.nn.dtypes.promote_dtype((x, kernel), dtype=self.q_proj.dtype)
            out = jnp.dot(x, kernel, precision=self.q_proj.precision)
            if self.q_proj.use_bias:
                out = out + jnp.concatenate([linear.bias[...] for linear in linears]).astype(out.dtype)
            q, k, v = jnp.split(out, np.cumsum(widths[:2]), axis=-1)
        else:
            q, k, v = (linear(x) for linear in linears)
        q = q.reshape(*lead, self.num_heads, self.head_dim)
        k = k.reshape(*lead, self.num_kv_heads, self.head_dim)
        v = v.reshape(*lead, self.num_kv_heads, self.head_dim)
        return apply_rope(q, positions, self.inv_freq), apply_rope(k, positions, self.inv_freq), v

    def prefill(self, x, lengths, cache: HataCache | None, w, impl: str, capture_qk: bool = False, mesh=None,
                mesh_axis: str = "model", mesh_split: str = "heads"):
        """x: [B, T, hidden], lengths: int[B] -> ([B, T, hidden], cache with the prompt written).

        With a `mesh`, the cache is written split over its `mesh_axis`: the KV heads (`mesh_split`
        "heads", :mod:`hata_jax.sharding`) or the positions ("positions",
        :mod:`hata_jax.sequence_sharding`).

        With `capture_qk` (inside `nnx.capture(..., nnx.Intermediate)`), sows the post-RoPE
        `(q [B, T, Hq, D], k [B, T, Hkv, D])` as the intermediate "qk".
        """
        b, t, _ = x.shape
        q, k, v = self.project_qkv(x, jnp.broadcast_to(jnp.arange(t), (b, t)), fused=not _heads_split(mesh, mesh_split))
        if capture_qk:
            self.sow(nnx.Intermediate, "qk", (q, k))
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=lengths)
        if cache is not None:
            k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
            if mesh is not None and mesh_split == "positions":
                cache = sequence_sharding.sequence_sharded_prefill(cache, k, v, w, lengths, mesh=mesh, axis=mesh_axis,
                                                                   impl=impl)
            else:
                cache = head_sharding.sharded_prefill(cache, k, v, w, lengths, mesh=mesh, axis=mesh_axis, impl=impl)
        return self.o_proj(out.reshape(b, t, -1)), cache

    def prefill_chunk(self, x, first, lengths, cache: HataCache, w, impl: str, *, prompt_tokens: int, mesh,
                      mesh_axis: str):
        """One chunk of a chunked prefill on a cache split by positions over `mesh_axis`
        (:func:`hata_jax.sequence_sharding.sequence_sharded_prefill_chunk`).

        x: [B, C, hidden], the prompts' tokens at positions `[first, first + C)` (first: int32
        scalar) of prompts of `prompt_tokens` tokens right-padded to `lengths` int[B] ->
        ([B, C, hidden], the cache with the chunk written).
        """
        b, c, _ = x.shape
        q, k, v = self.project_qkv(x, jnp.broadcast_to(first + jnp.arange(c), (b, c)))
        out, cache = sequence_sharding.sequence_sharded_prefill_chunk(
            q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), cache, w, lengths, first, prompt_tokens=prompt_tokens,
            mesh=mesh, axis=mesh_axis, impl=impl)
        return self.o_proj(out.reshape(b, c, -1)), cache

    def decode(self, x, cache: HataCache | SelectorCache, w, kind: str, plan: AttentionPlan, params=None):
        """x: [B, hidden], one new token per sequence at position `cache.lengths[b]`; `params`: the
        layer's selector params (a "sparse" layer's, or to keep a SelectorCache's state current)."""
        q, k, v = self.project_qkv(x, cache.lengths, fused=not _heads_split(plan.mesh, plan.mesh_split))
        out, cache = decode_attention(q, k, v, cache, w, params, kind=kind, plan=plan)
        return self.o_proj(out.reshape(x.shape[0], -1)), cache


@functools.partial(jax.jit, static_argnames=("kind", "plan"))
def decode_attention(q, k_new, v_new, cache: HataCache | SelectorCache, w, params, *, kind: str, plan: AttentionPlan):
    """One layer's decode attention of `kind` ("dense", "hata" or "sparse"): append the token, attend.

    q: [B, Hq, D], k_new, v_new: [B, Hkv, D] (post-RoPE) -> (out [B, Hq, D], cache). A jitted
    function, so that the layers of one kind share one trace and one lowering (a step traces and
    lowers its Pallas kernels once, not once per layer).
    """
    sharded = {"mesh": plan.mesh, "axis": plan.mesh_axis}  # mesh None: one device
    if plan.mesh is not None and plan.mesh_split == "positions":  # only "dense" and "hata" layers with a mesh
        if kind == "hata":
            return sequence_sharding.sequence_sharded_decode_attention(q, k_new, v_new, cache, w, plan.hata,
                                                                       impl=plan.impl, **sharded)
        return sequence_sharding.sequence_sharded_dense_decode_attention(q, k_new, v_new, cache, w, impl=plan.impl,
                                                                         **sharded)
    if kind == "hata":
        return head_sharding.sharded_hata_decode_attention(q, k_new, v_new, cache, w, plan.hata, impl=plan.impl,
                                                           **sharded)
    if kind == "sparse":
        return selector_decode_attention(q, k_new, v_new, cache, w, plan, params)
    if plan.mesh is not None:  # a plan with a mesh has no "sparse" layers (AttentionPlan refuses them)
        cache = head_sharding.sharded_append(cache, k_new, v_new, w, impl=plan.impl, **sharded)
        return head_sharding.sharded_dense_decode_attention(q, cache.k, cache.v, cache.lengths, impl=plan.impl,
                                                    **sharded), cache
    cache = append_token(cache, k_new, v_new, w, plan, params)
    return hata_jax.dense_decode_attention(q, cache.k, cache.v, cache.lengths, impl=plan.impl), cache


class MLP(nnx.Module):
    """SwiGLU: `down(silu(gate(x)) * up(x))`."""

    def __init__(self, config: LlamaConfig, dtype, rngs: nnx.Rngs):
        h, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nnx.Linear(h, f, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.up_proj = nnx.Linear(h, f, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.down_proj = nnx.Linear(f, h, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, config: LlamaConfig, dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = SelfAttention(config, dtype, rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = MLP(config, dtype, rngs)

    def add_residual_and_mlp(self, x, attn_out):
        """x, attn_out: [..., hidden] -> the layer's output: `h = x + attn_out; h + mlp(norm(h))`."""
        x = x + attn_out
        return x + self.mlp(self.post_attention_layernorm(x))

    def prefill(self, x, lengths, cache, w, impl, capture_qk=False, mesh=None, mesh_axis="model", mesh_split="heads"):
        attn_out, cache = self.self_attn.prefill(self.input_layernorm(x), lengths, cache, w, impl, capture_qk, mesh,
                                                 mesh_axis, mesh_split)
        return self.add_residual_and_mlp(x, attn_out), cache

    def prefill_chunk(self, x, first, lengths, cache, w, impl, **split):
        """:meth:`SelfAttention.prefill_chunk` of the layer: x [B, C, hidden] -> ([B, C, hidden], cache)."""
        attn_out, cache = self.self_attn.prefill_chunk(self.input_layernorm(x), first, lengths, cache, w, impl,
                                                       **split)
        return self.add_residual_and_mlp(x, attn_out), cache

    def decode(self, x, cache, w, kind, plan, params=None):
        attn_out, cache = self.self_attn.decode(self.input_layernorm(x), cache, w, kind, plan, params)
        return self.add_residual_and_mlp(x, attn_out), cache


class LlamaForCausalLM(nnx.Module):
    """Llama / Qwen2 decoder with an LM head (tied to the embedding or separate).

    Build with random weights: `LlamaForCausalLM(config, rngs=nnx.Rngs(0))`; load real ones with
    :func:`hata_jax.models.load_model` or :func:`hata_jax.models.tensors.model_from_tensors`.
    """

    def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(config, dtype, rngs) for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        if not config.tie_word_embeddings:
            self.lm_head = nnx.Linear(config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype,
                                      param_dtype=dtype, rngs=rngs)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden: [..., hidden_size] (final-normed) -> float32 logits [..., vocab]."""
        if self.config.tie_word_embeddings:
            out = self.embed_tokens.attend(hidden)
        else:
            out = self.lm_head(hidden)
        return out.astype(jnp.float32)

    def prefill(self, tokens, lengths, caches: list[HataCache] | None = None, hash_weights=None,
                impl: str = "auto", capture_qk: bool = False, mesh=None, mesh_axis: str = "model",
                mesh_split: str = "heads"):
        """Dense causal attention over right-padded prompts; fills every layer's cache if given.

        Args:
          tokens: int[B, T]; lengths: int[B] valid tokens per row (<= T).
          caches: one HataCache per layer (capacity >= T), or None for a cache-free forward.
          hash_weights: one float[Hkv, D, rbit] per layer (needed with caches).
          capture_qk: sow every layer's post-RoPE q and k (see :meth:`SelfAttention.prefill`);
            read them with `nnx.capture(..., nnx.Intermediate)` (used by :mod:`hata_jax.train.collect`).
          mesh, mesh_axis, mesh_split: write the caches split over this axis, by KV heads
            (:mod:`hata_jax.models.sharding`) or positions (see :class:`AttentionPlan`; to run the
            prompt in chunks instead of attending over it whole on every device: :meth:`prefill_chunked`).

        Returns:
          (hidden [B, T, hidden_size] after the final norm, the filled caches or None).
        """
        x = self.embed_tokens(tokens)
        new_caches = None if caches is None else []
        for i, layer in enumerate(self.layers):
            cache = None if caches is None else caches[i]
            x, cache = layer.prefill(x, lengths, cache, None if hash_weights is None else hash_weights[i], impl,
                                     capture_qk, mesh, mesh_axis, mesh_split)
            if caches is not None:
                new_caches.append(cache)
        return self.norm(x), new_caches

    def prefill_chunked(self, tokens, lengths, caches: list[HataCache], hash_weights, *, chunk: int, mesh,
                        mesh_axis: str = "model", impl: str = "auto"):
        """:meth:`prefill` into caches split by positions over `mesh_axis` (made by
        :func:`init_caches` with `mesh_split="positions"`), `chunk` prompt tokens at a time.

        Each chunk runs through every layer: its queries attend causally to the prompt up to them
        (the chunks before it, read from the split caches, and itself), the partial results of
        the devices merged by log-sum-exp, and its keys, values, codes and norms go to the devices
        that hold their positions (:meth:`SelfAttention.prefill_chunk`). A device holds one
        chunk's activations and logits over its own slice of the positions (`[B, Hq x chunk,
        capacity / devices]` float32 per layer at a time), never the whole prompt's attention;
        the caches and the next-token logits equal :meth:`prefill`'s (up to float rounding).

        Args:
          tokens: int[B, T]; lengths: int[B] valid tokens per row (<= T).
          caches, hash_weights: as :meth:`prefill` (capacity >= T).
          chunk: prompt tokens per chunk (static, a positive int; a prompt of T tokens runs in
            `ceil(T / chunk)` chunks, the last one padded; above T: one chunk of T).

        Returns:
          (hidden [B, hidden_size] after the final norm at each row's last prompt token
          `lengths[b] - 1`, the filled caches).
        """
        check_prefill_chunk(chunk, mesh, "positions")
        b, t = tokens.shape
        c = min(chunk, t)
        chunks = -(-t // c)
        tokens = jnp.pad(tokens, ((0, 0), (0, chunks * c - t))).reshape(b, chunks, c).transpose(1, 0, 2)
        firsts = jnp.arange(chunks, dtype=jnp.int32) * c
        split = {"prompt_tokens": t, "mesh": mesh, "mesh_axis": mesh_axis}
        hash_weights = [None] * len(self.layers) if hash_weights is None else hash_weights

        def one_chunk(carry, inputs):
            caches, last = carry
            first, chunk_tokens = inputs
            x = self.embed_tokens(chunk_tokens)
            new_caches = []
            for layer, cache, w in zip(self.layers, caches, hash_weights):
                x, cache = layer.prefill_chunk(x, first, lengths, cache, w, impl, **split)
                new_caches.append(cache)
            end = lengths - 1 - first  # each row's last prompt token, if in this chunk
            inside = (end >= 0) & (end < c)
            last = jnp.where(inside[:, None], x[jnp.arange(b), jnp.clip(end, 0, c - 1)], last)
            return (new_caches, last), None

        last = jnp.zeros((b, self.config.hidden_size), self.dtype)
        (caches, last), _ = jax.lax.scan(one_chunk, (list(caches), last), (firsts, tokens))
        return self.norm(last), caches

    def __call__(self, tokens, lengths=None):
        """Full-sequence logits float32[B, T, vocab] (no cache); `lengths` as in :meth:`prefill`."""
        if lengths is None:
            lengths = jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32)
        hidden, _ = self.prefill(tokens, lengths)
        return self.logits(hidden)

    def decode(self, tokens, caches: list[HataCache | SelectorCache], hash_weights, plan: AttentionPlan,
               selector_params=None):
        """One decode step: tokens int[B] -> (logits float32[B, vocab], updated caches).

        `selector_params`: one entry per layer, the "sparse" layers' selector params (their caches
        are SelectorCaches, see :func:`hata_jax.models.selector_cache.with_selector_states`); None without.
        """
        if len(plan.layers) != len(self.layers):
            raise ValueError(f"the attention plan has {len(plan.layers)} layers, the model {len(self.layers)}")
        x = self.embed_tokens(tokens)
        new_caches = []
        params = [None] * len(self.layers) if selector_params is None else selector_params
        for layer, cache, w, kind, p in zip(self.layers, caches, hash_weights, plan.layers, params):
            x, cache = layer.decode(x, cache, w, kind, plan, p)
            new_caches.append(cache)
        return self.logits(self.norm(x)), new_caches


def init_caches(config: LlamaConfig, batch: int, capacity: int, *, rbit: int, dtype, mesh=None,
                mesh_axis: str = "model", mesh_split: str = "heads") -> list[HataCache]:
    """An empty HataCache per layer: k, v [batch, Hkv, capacity, D] in `dtype`; with a `mesh`,
    made split over its `mesh_axis` by KV heads (:func:`hata_jax.sharding.init_cache`) or by
    positions (`mesh_split="positions"`, :func:`hata_jax.sequence_sharding.init_cache`)."""
    args = (batch, config.num_kv_heads, capacity, config.head_dim)
    if mesh is not None and mesh_split == "positions":
        return [sequence_sharding.init_cache(*args, rbit=rbit, dtype=dtype, mesh=mesh, axis=mesh_axis)
                for _ in range(config.num_layers)]
    return [head_sharding.init_cache(*args, rbit=rbit, dtype=dtype, mesh=mesh, axis=mesh_axis)
            for _ in range(config.num_layers)]


def check_prefill_chunk(chunk, mesh, mesh_split: str) -> None:
    """Raise unless `chunk` (prompt tokens per prefill chunk) is None or a positive int, and
    given only with a `mesh` split by positions (the layout :meth:`LlamaForCausalLM.prefill_chunked`
    writes)."""
    if chunk is None:
        return
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ValueError(f"prefill_chunk (prompt tokens per prefill chunk) must be a positive int, got {chunk!r}")
    if mesh is None or mesh_split != "positions":
        raise ValueError(f"prefill_chunk={chunk} prefills into caches split by positions: it needs a mesh and "
                         f"mesh_split='positions', got mesh {'None' if mesh is None else 'given'} and "
                         f"mesh_split={mesh_split!r}")


def _heads_split(mesh, mesh_split: str) -> bool:
    """Whether the attention weights are head-sharded (then q, k, v are three products)."""
    return mesh is not None and mesh_split == "heads"
