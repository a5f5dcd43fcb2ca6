"""The decode steps the decode benchmarks time, and the random caches they run on.

A step has the signature of `hata_jax.models.generation.ModelSteps.decode`:
`(state_leaves, tokens int32[B], caches, hash_weights, key) -> (tokens int32[B], caches, key)`,
greedy, caches donated. :func:`step_function` gives the model's own step for "dense" and "hata"
(:data:`PRODUCT_METHODS`) and a step built here for "exact" (exact top-k selection by softmax mass,
the oracle) and "cudnn" (`jax.nn.dot_product_attention` over a token-major cache,
:class:`TokenMajorCache`), whose per-layer attention replaces the model's (:func:`decode_with`).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import hata_jax as hj
from bench.timing import compile_timed
from hata_jax import HataCache, HataConfig
from hata_jax.hashing import encode_step_for
from hata_jax.models import AttentionPlan, LlamaForCausalLM, generation

PRODUCT_METHODS = ("dense", "hata")  # run by the model's own decode step
GREEDY = generation.Sampling()


@functools.partial(jax.tree_util.register_dataclass, data_fields=["k", "v", "lengths"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class TokenMajorCache:
    """A plain KV cache in the layout cuDNN takes: k, v [B, S, Hkv, D], lengths int32[B]."""

    k: jax.Array
    v: jax.Array
    lengths: jax.Array

    def append(self, k_new, v_new) -> TokenMajorCache:
        """k_new, v_new: [B, Hkv, D], written at position lengths[b]."""
        rows = jnp.arange(self.k.shape[0])

        def put(buf, val):
            return buf.at[rows, self.lengths].set(val.astype(buf.dtype), mode="drop")

        return TokenMajorCache(put(self.k, k_new), put(self.v, v_new), self.lengths + 1)


def dpa_implementation() -> str:
    return "cudnn" if jax.default_backend() == "gpu" else "xla"


def dpa_attention(q, k, v, lengths):
    """q: [B, Hq, D]; k, v: [B, S, Hkv, D] -> [B, Hq, D] over the first lengths[b] tokens."""
    out = jax.nn.dot_product_attention(q[:, None], k, v, key_value_seq_lengths=lengths,
                                       implementation=dpa_implementation())
    return out[:, 0]


def softmax_mass(q, k, lengths):
    """q: [B, Hq, D], k: [B, Hkv, S, D] -> float32[B, Hkv, S]: each token's softmax probability
    summed over its KV head's query heads (0 at positions >= lengths[b])."""
    b, hq, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    logits = jnp.einsum("bhgd,bhsd->bhgs", q.reshape(b, hkv, hq // hkv, d), k,
                        preferred_element_type=jnp.float32) / math.sqrt(d)
    valid = jnp.arange(s)[None, None, None, :] < lengths[:, None, None, None]
    return jnp.sum(jax.nn.softmax(jnp.where(valid, logits, -jnp.inf), axis=-1), axis=2)


def exact_topk_attention(q, cache: HataCache, budget: int, impl: str):
    """Attention over the `budget` tokens of largest softmax mass per (sequence, KV head)."""
    idx, count = hj.select_topk(softmax_mass(q, cache.k, cache.lengths), budget, cache.lengths, impl=impl)
    return hj.sparse_decode_attention(q, cache.k, cache.v, idx, count, impl=impl)


def hata_attention(q, k_new, cache: HataCache, w, hata: HataConfig, impl: str):
    """HATA's attention work of one layer on a full cache: hash q (and k_new) for `hata.score`, score
    and select (`hata`'s budget, sink and recent), attend."""
    q_codes, q_scales, _, _ = encode_step_for(hata, q, k_new, w, impl=impl)
    idx, count = hj.hamming_topk(q_codes, cache.codes, cache.norms, cache.lengths, budget=hata.budget,
                                 score=hata.score, q_scales=q_scales, sink=hata.sink, recent=hata.recent, impl=impl)
    return hj.sparse_decode_attention(q, cache.k, cache.v, idx, count, impl=impl)


# The per-layer attention of the bench's steps is jitted (as `hata_jax.models.llama.decode_attention`), so
# the layers share one trace and lowering.
@functools.partial(jax.jit, static_argnames=("dense", "budget", "impl"))
def exact_layer_attention(q, k_new, v_new, cache: HataCache, w, *, dense: bool, budget: int, impl: str):
    cache = cache.append(k_new, v_new, w, impl=impl)
    if dense:
        return hj.dense_decode_attention(q, cache.k, cache.v, cache.lengths, impl=impl), cache
    return exact_topk_attention(q, cache, budget, impl), cache


@jax.jit
def dpa_layer_attention(q, k_new, v_new, cache: TokenMajorCache):
    cache = cache.append(k_new, v_new)
    return dpa_attention(q, cache.k, cache.v, cache.lengths), cache


def attend_exact(layer, q, k_new, v_new, cache: HataCache, *, weights, plan: AttentionPlan):
    return exact_layer_attention(q, k_new, v_new, cache, weights[layer], dense=plan.layers[layer] == "dense",
                                 budget=plan.hata.budget, impl=plan.impl)


def attend_dpa(layer, q, k_new, v_new, cache: TokenMajorCache, *, weights, plan: AttentionPlan):
    return dpa_layer_attention(q, k_new, v_new, cache)


BENCH_ATTENTION = {"exact": attend_exact, "cudnn": attend_dpa}


def decode_with(model: LlamaForCausalLM, tokens, caches, attend):
    """:meth:`LlamaForCausalLM.decode` with layer i's attention replaced by
    `attend(i, q, k_new, v_new, cache) -> (out [B, Hq, D], cache)` (tests check the two agree)."""
    x = model.embed_tokens(tokens)
    new_caches = []
    for i, (layer, cache) in enumerate(zip(model.layers, caches)):
        attn = layer.self_attn
        q, k, v = attn.project_qkv(layer.input_layernorm(x), cache.lengths)
        out, cache = attend(i, q, k, v, cache)
        x = layer.add_residual_and_mlp(x, attn.o_proj(out.reshape(x.shape[0], -1)))
        new_caches.append(cache)
    return model.logits(model.norm(x)), new_caches


@functools.partial(jax.jit, static_argnames=("merge", "method", "plan"), donate_argnames=("caches",))
def bench_step(state_leaves, tokens, caches, hash_weights, key, *, merge, method: str, plan: AttentionPlan):
    """A decode step with `BENCH_ATTENTION[method]`, the signature of `generation.ModelSteps.decode`;
    `merge` is the model's `ModelSteps.merge`."""
    model = merge(state_leaves)
    attend = functools.partial(BENCH_ATTENTION[method], weights=hash_weights, plan=plan)
    logits, caches = decode_with(model, tokens, caches, attend)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), caches, key


def step_function(steps: generation.ModelSteps, method: str, plan: AttentionPlan):
    """(state_leaves, tokens, caches, hash_weights, key) -> (tokens, caches, key) for `steps`' model."""
    if method in PRODUCT_METHODS:
        step_plan = plan if method == "hata" else plan.as_dense()
        return functools.partial(steps.decode, plan=step_plan, sampling=GREEDY)
    return functools.partial(bench_step, merge=steps.merge, method=method, plan=plan)


@functools.partial(jax.jit, static_argnames=("step", "n"), donate_argnames=("caches",))
def run_steps(state_leaves, tokens, caches, hash_weights, key, *, step, n: int):
    """`n` decode steps inside one jitted program (no host dispatch or sync between them)."""
    def body(_, carry):
        tokens, caches, key = carry
        return step(state_leaves, tokens, caches, hash_weights, key)

    return lax.fori_loop(0, n, body, (tokens, caches, key))


def compile_step(step, state_leaves, caches, hash_weights, batch: int, loop_steps: int = 0):
    """`step` (a `functools.partial` of a jitted step, see :func:`step_function`) compiled ahead of
    time for caches of the avals `caches` (ShapeDtypeStructs suffice): (a callable
    `(state_leaves, tokens, caches, hash_weights, key) -> (tokens, caches, key)`, seconds per
    compile phase). With `loop_steps`, the program of :func:`run_steps` with that many steps."""
    args = (state_leaves, jax.ShapeDtypeStruct((batch,), jnp.int32), caches, hash_weights,
            jax.eval_shape(lambda: jax.random.PRNGKey(0)))
    if loop_steps:
        return compile_timed(run_steps, *args, step=step, n=loop_steps)
    return compile_timed(step.func, *args, **step.keywords)


# ----------------------------------------------------------------------------- random caches

@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def random_hata_cache(key, w, length, *, shape, dtype) -> HataCache:
    """Random k, v [B, Hkv, S, D] ~ N(0, 1), their codes under `w`, their norms; `length` tokens each."""
    key_k, key_v = jax.random.split(key)
    k = jax.random.normal(key_k, shape, dtype)
    return HataCache(k=k, v=jax.random.normal(key_v, shape, dtype), codes=hj.encode(k, w, head_axis=1),
                     norms=hj.key_norms(k), lengths=jnp.full((shape[0],), length, jnp.int32),
                     starts=jnp.zeros((shape[0],), jnp.int32), overflow=jnp.zeros((shape[0],), bool),
                     uncoded=jnp.zeros((shape[0],), bool))


@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def random_token_major_cache(key, length, *, shape, dtype) -> TokenMajorCache:
    """Random k, v [B, S, Hkv, D] ~ N(0, 1); `length` tokens each."""
    key_k, key_v = jax.random.split(key)
    return TokenMajorCache(jax.random.normal(key_k, shape, dtype), jax.random.normal(key_v, shape, dtype),
                           jnp.full((shape[0],), length, jnp.int32))


def with_length(caches, length: int):
    """The caches with every sequence at `length` tokens (a lengths buffer per layer: each is donated)."""
    return [dataclasses.replace(c, lengths=jnp.full(c.lengths.shape, length, jnp.int32)) for c in caches]


def check_no_overflow(caches) -> None:
    if isinstance(caches[0], HataCache) and np.asarray(caches[0].overflow).any():
        raise AssertionError("the benchmark overflowed its cache: Settings.slack is too small")


def surviving(caches):
    """`caches`, or None if a failed donating call deleted any of their buffers."""
    return None if any(x.is_deleted() for x in jax.tree.leaves(caches)) else caches


def free(tree) -> None:
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array) and not leaf.is_deleted():
            leaf.delete()
