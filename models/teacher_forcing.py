"""Teacher-forced logits of a whole sequence with each layer's attention restricted to what its
plan's selector keeps, the quality measure of a selector (perplexity) without decoding token by token.

Query t of a "sparse" layer attends to the keys `hata_jax.selectors.selection_mask` keeps among
positions <= t: the selection a decode step at that position would make (same budget, sink,
recent). A "hata" layer does the same through the `hata` selector with the layer's projection
(HATA's codes and the plan's score, "key_norm" or "asymmetric": the ranking of its decode path).
Dense layers are dense causal.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from hata_jax.models.llama import LlamaForCausalLM
from hata_jax.models.plan import AttentionPlan
from hata_jax.selectors import make_selector, selection_mask, sparse_causal_attention


def layer_selectors(plan: AttentionPlan) -> tuple:
    """Per layer the selector that restricts its attention: the plan's for "sparse", HATA's (rbit
    of `plan.hata`) for "hata", None for "dense"."""
    if plan.hashed_layers and plan.hata.score == "hamming":
        raise ValueError("teacher forcing scores 'hata' layers with the 'key_norm' or 'asymmetric' score, "
                         "not 'hamming'")
    hata = make_selector("hata", rbit=plan.hata.rbit, score=plan.hata.score) if plan.hashed_layers else None
    return tuple({"dense": None, "hata": hata, "sparse": plan.selector}[kind] for kind in plan.layers)


def selected_attention(selector, params, q, k, v, lengths, plan: AttentionPlan):
    """Causal attention of every query over the keys `selector` keeps for it.

    q: [B, T, Hq, D], k, v: [B, T, Hkv, D] post-RoPE (token-major, as the prefill makes them),
    lengths: int32[B] -> [B, T, Hq, D].
    """
    b, t = q.shape[:2]
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    state = selector.init_state(params, k, lengths)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    hata = plan.hata
    mask = selection_mask(selector, params, state, q, k, positions, lengths, budget=hata.budget, sink=hata.sink,
                          recent=hata.recent, impl=plan.impl)
    return sparse_causal_attention(q, k, v, mask)


@functools.partial(jax.jit, static_argnames=("graphdef", "plan", "selectors"))
def _sparse_logits(graphdef, state, tokens, lengths, params, *, plan: AttentionPlan, selectors: tuple):
    model = nnx.merge(graphdef, state)
    b, t = tokens.shape
    x = model.embed_tokens(tokens)
    for layer, selector, p in zip(model.layers, selectors, params):
        if selector is None:
            x, _ = layer.prefill(x, lengths, None, None, plan.impl)
            continue
        attn = layer.self_attn
        q, k, v = attn.project_qkv(layer.input_layernorm(x), jnp.broadcast_to(jnp.arange(t), (b, t)))
        out = selected_attention(selector, p, q, k, v, lengths, plan)
        x = layer.add_residual_and_mlp(x, attn.o_proj(out.reshape(b, t, -1)))
    return model.logits(model.norm(x))


def sparse_logits(model: LlamaForCausalLM, tokens, lengths, plan: AttentionPlan, params=None) -> jax.Array:
    """Teacher-forced logits float32[B, T, vocab] under `plan`.

    Args:
      tokens: int[B, T], rows right-padded to `lengths` int[B] (positions past a row's length
        are padding: their logits mean nothing).
      plan: per-layer attention; its budget is lowered to T when larger (every visible key kept).
      params: one entry per layer (:func:`hata_jax.train.selector_params`): a "hata" layer's projection
        float[Hkv, D, rbit], a "sparse" layer's selector params; None when no layer needs any.
    """
    num_layers = model.config.num_layers
    if len(plan.layers) != num_layers:
        raise ValueError(f"the attention plan has {len(plan.layers)} layers, the model {num_layers}")
    if params is None:
        params = [None] * num_layers
    if len(params) != num_layers:
        raise ValueError(f"params must have one entry per layer ({num_layers}), got {len(params)}")
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must have shape [batch, seq], got {tokens.shape}")
    if plan.hata.budget > tokens.shape[1]:
        plan = plan.with_budget(tokens.shape[1])
    selectors = layer_selectors(plan)
    params = [None if s is None else jax.tree.map(jnp.asarray, p) for s, p in zip(selectors, params)]
    graphdef, state = nnx.split(model)
    return _sparse_logits(graphdef, state, tokens, jnp.asarray(lengths, jnp.int32), params, plan=plan,
                          selectors=selectors)
