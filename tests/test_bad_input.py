"""Every public function rejects bad input with a ValueError whose message names the argument.

Each case starts from a valid set of inputs (the `a` fixture: B=2, Hkv=2, G=3, D=64, rbit=64,
S=10) and breaks one thing.
"""
from __future__ import annotations

import dataclasses
import types

import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import hata_jax as hj

REF = "reference"
I32, F16 = jnp.int32, jnp.float16


@pytest.fixture
def a(rng):
    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape, dtype=np.float32))

    def codes(*shape):
        return jnp.asarray(rng.integers(0, 2**32, size=shape, dtype=np.uint32))

    k, v, w = normal(2, 2, 10, 64), normal(2, 2, 10, 64), normal(2, 64, 64)
    lengths = jnp.array([7, 3], jnp.int32)
    cache = hj.HataCache.init(2, 2, 10, 64, rbit=64, dtype=jnp.float32).prefill(k[:, :, :8], v[:, :, :8], w, lengths,
                                                                                impl=REF)
    return types.SimpleNamespace(
        q=normal(2, 6, 64), k_new=normal(2, 2, 64), v_new=normal(2, 2, 64), w=normal(2, 64, 64),
        k=k, v=v, lengths=lengths, q_codes=codes(2, 6, 2), k_codes=codes(2, 2, 10, 2),
        new_codes=codes(2, 2, 2), norms=jnp.abs(normal(2, 2, 10)), scores=normal(2, 2, 10),
        idx=jnp.asarray(np.stack([rng.permutation(10)[:4] for _ in range(4)]).reshape(2, 2, 4), jnp.int32),
        count=jnp.array([[4, 2], [0, 3]], jnp.int32), outs=normal(3, 2, 6, 64), lses=normal(3, 2, 6),
        cache=cache, config=hj.HataConfig(rbit=64, budget=4), bits=jnp.asarray(rng.random((3, 64)) < 0.5),
    )


def decode(a, **changes):
    """hata_decode_attention on `a`, with some arguments replaced."""
    args = dict(q=a.q, k_new=a.k_new, v_new=a.v_new, cache=a.cache, w=a.w, config=a.config)
    args.update(changes)
    impl = args.pop("impl", REF)
    return hj.hata_decode_attention(**args, impl=impl)


def lengths_cases(call, name=r"lengths", limit: int = 10):
    """Bad `lengths` for a function `call(a, lengths)` that takes lengths in [0, limit]."""
    return [
        (lambda a: call(a, a.lengths[None]), name + r" must have shape \[batch\]"),
        (lambda a: call(a, jnp.array([1, 2, 3], I32)), name + r" has batch size 3"),
        (lambda a: call(a, a.lengths.astype(jnp.float32)), name + r" must be an integer array"),
        (lambda a: call(a, jnp.array([limit + 1, 2], I32)), name + rf" must lie in \[0, {limit}\]"),
        (lambda a: call(a, jnp.array([3, -1], I32)), name + rf" must lie in \[0, {limit}\]"),
    ]


def qkv_cases(call):
    """Bad q, k, v for an attention function `call(a, q, k, v)`."""
    return [
        (lambda a: call(a, a.q[0], a.k, a.v), r"q must have shape \[batch, q_heads, head_dim\]"),
        (lambda a: call(a, a.q, a.k[0], a.v), r"k must have shape \[batch, kv_heads, seq, head_dim\]"),
        (lambda a: call(a, a.q.astype(I32), a.k, a.v), r"q must be a floating-point array"),
        (lambda a: call(a, a.q, a.k.astype(I32), a.v), r"k must be a floating-point array"),
        (lambda a: call(a, a.q, a.k, a.v.astype(I32)), r"v must be a floating-point array"),
        (lambda a: call(a, a.q, a.k, a.v[:, :, :9]), r"v must have the shape of k"),
        (lambda a: call(a, a.q[:1], a.k, a.v), r"q has batch size 1"),
        (lambda a: call(a, a.q[..., :32], a.k, a.v), r"q has head_dim 32"),
        (lambda a: call(a, a.q[:, :5], a.k, a.v),
         r"k must be \[batch, kv_heads, seq, head_dim\] with KV heads dividing the 5 query heads; got shape "
         r"\(2, 2, 10, 64\)$"),
        (lambda a: call(a, a.q, jnp.swapaxes(a.k, 1, 2), jnp.swapaxes(a.v, 1, 2)),
         r"k must be \[batch, kv_heads, seq, head_dim\] .* got shape \(2, 10, 2, 64\) \(a \[batch, seq, kv_heads, "
         r"head_dim\] cache\? pass seq_axis=1\)"),
        (lambda a: call(a, a.q, a.k, a.v, seq_axis=1),
         r"k must be \[batch, seq, kv_heads, head_dim\] .* got shape \(2, 2, 10, 64\) \(a \[batch, kv_heads, seq, "
         r"head_dim\] cache\? pass seq_axis=2\)"),
        (lambda a: call(a, a.q, a.k, a.v, seq_axis=3), r"seq_axis must be 2 .* or 1 .*, got 3"),
        (lambda a: call(a, a.q[:, :, None], a.k, a.v),
         r"q must have shape \[batch, q_heads, head_dim\] .* got shape \(2, 6, 1, 64\) \(a \[batch, q_heads, 1, "
         r"head_dim\] query\? pass q\[:, :, 0\]\)"),
    ]


def code_cases(call):
    """Bad codes/norms for a scoring function `call(a, q_codes, k_codes, norms)`."""
    return [
        (lambda a: call(a, a.q_codes[0], a.k_codes, a.norms), r"q_codes must have shape"),
        (lambda a: call(a, a.q_codes, a.k_codes[0], a.norms), r"k_codes must have shape"),
        (lambda a: call(a, a.q_codes, a.k_codes, a.norms[0]), r"k_norms must have shape"),
        (lambda a: call(a, a.q_codes.astype(I32), a.k_codes, a.norms), r"q_codes must have dtype uint32"),
        (lambda a: call(a, a.q_codes, a.k_codes.astype(I32), a.norms), r"k_codes must have dtype uint32"),
        (lambda a: call(a, a.q_codes, a.k_codes, a.norms.astype(F16)), r"k_norms must have dtype float32"),
        (lambda a: call(a, a.q_codes[:1], a.k_codes, a.norms), r"q_codes has batch size 1"),
        (lambda a: call(a, a.q_codes[..., :1], a.k_codes, a.norms), r"q_codes has code words 1"),
        (lambda a: call(a, a.q_codes, a.k_codes, a.norms[:, :, :9]), r"k_norms must have shape \(2, 2, 10\)"),
        (lambda a: call(a, a.q_codes[:, :5], a.k_codes, a.norms), r"q_codes heads vs k_codes heads"),
    ]


def selection_cases(call):
    """Bad budget/sink/recent for `call(a, budget, sink, recent)` with capacity 10."""
    return [
        (lambda a: call(a, 0, 0, 0), r"budget must be a positive int, got 0"),
        (lambda a: call(a, -3, 0, 0), r"budget must be a positive int, got -3"),
        (lambda a: call(a, 4.0, 0, 0), r"budget must be a positive int, got 4.0"),
        (lambda a: call(a, 11, 0, 0), r"budget \(11\) must not exceed the cache capacity \(10\)"),
        (lambda a: call(a, 4, 3, 2), r"sink \(3\) and recent \(2\) must be >= 0 and sum to at most budget \(4\)"),
        (lambda a: call(a, 4, -1, 0), r"sink \(-1\)"),
        (lambda a: call(a, 4, 0, -1), r"recent \(-1\)"),
    ]


def scores_call(a, q_codes, k_codes, norms, lengths=None, **kw):
    return hj.hamming_scores(q_codes, k_codes, norms, a.lengths if lengths is None else lengths, impl=REF, **kw)


def topk_call(a, q_codes, k_codes, norms, lengths=None, budget=4, sink=0, recent=0, **kw):
    lengths = a.lengths if lengths is None else lengths
    return hj.hamming_topk(q_codes, k_codes, norms, lengths, budget=budget, sink=sink, recent=recent, impl=REF, **kw)


def sparse_call(a, q, k, v, idx=None, count=None, seq_axis=2):
    return hj.sparse_decode_attention(q, k, v, a.idx if idx is None else idx, a.count if count is None else count,
                                      seq_axis=seq_axis, impl=REF)


def dense_call(a, q, k, v, lengths=None, seq_axis=2):
    return hj.dense_decode_attention(q, k, v, a.lengths if lengths is None else lengths, seq_axis=seq_axis, impl=REF)


def prefill_call(a, k=None, v=None, w=None, lengths=None):
    k = a.k[:, :, :8] if k is None else k
    return a.cache.prefill(k, a.v[:, :, :8] if v is None else v, a.w if w is None else w,
                           a.lengths if lengths is None else lengths, impl=REF)


CASES = {
    "encode": [
        (lambda a: hj.encode(a.q[0, 0], a.w, impl=REF), r"x must have shape \[\.\.\., heads, head_dim\]"),
        (lambda a: hj.encode(a.q.astype(I32), a.w, impl=REF), r"x must be a floating-point array"),
        (lambda a: hj.encode(a.q, a.w[0], impl=REF), r"w must have shape \[kv_heads, head_dim, rbit\]"),
        (lambda a: hj.encode(a.q, a.w.astype(I32), impl=REF), r"w must be a floating-point array"),
        (lambda a: hj.encode(a.q, a.w[..., :48], impl=REF), r"w.shape\[2\] \(rbit\) must be a positive multiple of 32"),
        (lambda a: hj.encode(a.q, a.w[:, :32], impl=REF), r"w has head_dim 32"),
        (lambda a: hj.encode(a.q[:, :5], a.w, impl=REF), r"x heads vs w: query heads \(5\)"),
        (lambda a: hj.encode(a.q, a.w, head_axis=2, impl=REF), r"head_axis must not be the last axis"),
    ],
    "key_norms": [
        (lambda a: hj.key_norms(a.k.astype(I32)), r"k must be a floating-point array"),
        (lambda a: hj.key_norms(a.k[0, 0, 0, 0]), r"k must have shape \[\.\.\., head_dim\]"),
    ],
    "pack_bits": [
        (lambda a: hj.pack_bits(a.bits[:, :48]), r"bits must have a last axis .* multiple of 32, got shape \(3, 48\)"),
        (lambda a: hj.pack_bits(a.bits.astype(I32)), r"bits must have dtype bool"),
        (lambda a: hj.pack_bits(a.bits[0, 0]), r"bits must have a last axis"),
        (lambda a: hj.unpack_bits(a.q_codes.astype(I32)), r"codes must have dtype uint32"),
        (lambda a: hj.unpack_bits(a.q_codes[0, 0, 0]), r"codes must have shape \[\.\.\., words\]"),
    ],
    "encode_step": [
        (lambda a: hj.encode_step(a.q[0], a.k_new, a.w, impl=REF), r"q must have shape \[batch, q_heads, head_dim\]"),
        (lambda a: hj.encode_step(a.q, a.k_new[None], a.w, impl=REF),
         r"k_new must have shape \[batch, kv_heads, head_dim\]"),
        (lambda a: hj.encode_step(a.q.astype(I32), a.k_new, a.w, impl=REF), r"q must be a floating-point array"),
        (lambda a: hj.encode_step(a.q, a.k_new.astype(I32), a.w, impl=REF), r"k_new must be a floating-point array"),
        (lambda a: hj.encode_step(a.q, a.k_new, a.w.astype(I32), impl=REF), r"w must be a floating-point array"),
        (lambda a: hj.encode_step(a.q, a.k_new, a.w[..., :40], impl=REF), r"w.shape\[2\] \(rbit\)"),
        (lambda a: hj.encode_step(a.q, a.k_new, a.w[:, :32], impl=REF), r"w has head_dim 32"),
        (lambda a: hj.encode_step(a.q, a.k_new[:1], a.w, impl=REF), r"k_new has batch size 1"),
        (lambda a: hj.encode_step(a.q, a.k_new[:, :1], a.w, impl=REF), r"k_new has KV heads 1"),
        (lambda a: hj.encode_step(a.q, a.k_new[..., :32], a.w, impl=REF), r"k_new has head_dim 32"),
        (lambda a: hj.encode_step(a.q[:, :5], a.k_new, a.w, impl=REF), r"q heads vs w: query heads \(5\)"),
    ],
    "hamming_scores": code_cases(scores_call) + lengths_cases(
        lambda a, lengths: scores_call(a, a.q_codes, a.k_codes, a.norms, lengths)) + [
        (lambda a: scores_call(a, a.q_codes, a.k_codes, a.norms, score="dot"), r"score must be one of"),
    ],
    "select_topk": selection_cases(
        lambda a, budget, sink, recent: hj.select_topk(a.scores, budget, a.lengths, sink=sink, recent=recent, impl=REF)
    ) + lengths_cases(lambda a, lengths: hj.select_topk(a.scores, 4, lengths, impl=REF)) + [
        (lambda a: hj.select_topk(a.scores[0], 4, a.lengths, impl=REF),
         r"scores must have shape \[batch, kv_heads, seq\]"),
        (lambda a: hj.select_topk(a.scores.astype(I32), 4, a.lengths, impl=REF),
         r"scores must be a floating-point array"),
    ],
    "hamming_topk": code_cases(topk_call) + lengths_cases(
        lambda a, lengths: topk_call(a, a.q_codes, a.k_codes, a.norms, lengths)) + selection_cases(
        lambda a, budget, sink, recent: topk_call(a, a.q_codes, a.k_codes, a.norms, budget=budget, sink=sink,
                                                  recent=recent)
    ) + [
        (lambda a: topk_call(a, a.q_codes, a.k_codes, a.norms, score="dot"), r"score must be one of"),
    ],
    "query_planes": [
        (lambda a: hj.query_planes(a.q, a.w, planes=0, impl=REF), r"planes must be an int in \[1, 8\], got 0"),
        (lambda a: hj.query_planes(a.q, a.w, planes=True, impl=REF), r"planes must be an int in \[1, 8\], got True"),
        (lambda a: hj.query_planes(a.q[0], a.w, impl=REF), r"q must have shape \[batch, q_heads, head_dim\]"),
        (lambda a: hj.query_planes(a.q, a.w[:, :32], impl=REF), r"w has head_dim 32"),
        (lambda a: hj.encode_step(a.q, a.k_new, a.w, query_planes=9, impl=REF),
         r"query_planes must be an int in \[1, 8\], got 9"),
    ],
    "asymmetric score": [
        (lambda a: scores_call(a, a.q_codes, a.k_codes, a.norms, score="asymmetric"),
         r"score='asymmetric' needs q_scales: float32\[batch, kv_heads\]"),
        (lambda a: hj.hamming_scores(a.q_codes, a.k_codes, a.norms, a.lengths, q_scales=a.norms[..., 0], impl=REF),
         r"q_scales belongs to the 'asymmetric' score only"),
        (lambda a: hj.hamming_topk(a.q_codes, a.k_codes, a.norms, a.lengths, budget=4, score="asymmetric",
                                   q_scales=a.norms, impl=REF), r"q_scales must have shape \[batch, kv_heads\]"),
        (lambda a: hj.hamming_topk(a.q_codes, a.k_codes, a.norms, a.lengths, budget=4, score="asymmetric",
                                   q_scales=a.norms[..., 0].astype(jnp.float16), impl=REF),
         r"q_scales must have dtype float32"),
    ],
    "sparse_decode_attention": qkv_cases(sparse_call) + [
        (lambda a: sparse_call(a, a.q, a.k, a.v, idx=a.idx[0]), r"idx must have shape \[batch, kv_heads, budget\]"),
        (lambda a: sparse_call(a, a.q, a.k, a.v, idx=a.idx.astype(jnp.int16)), r"idx must have dtype int32"),
        (lambda a: sparse_call(a, a.q, a.k, a.v, idx=a.idx.astype(jnp.float32)), r"idx must be an integer array"),
        (lambda a: sparse_call(a, a.q, a.k, a.v, idx=a.idx[:, :1]), r"idx must have shape \[batch, kv_heads, budget\]"),
        (lambda a: sparse_call(a, a.q, a.k, a.v, count=a.count[0]), r"count must have shape \(2, 2\)"),
        (lambda a: sparse_call(a, a.q, a.k, a.v, count=a.count[:, :, None]), r"count must have shape \(2, 2\)"),
        (lambda a: sparse_call(a, a.q, a.k, a.v, count=a.count.astype(jnp.float32)), r"count must be an integer array"),
    ],
    "dense_decode_attention": qkv_cases(dense_call) + lengths_cases(
        lambda a, lengths: dense_call(a, a.q, a.k, a.v, lengths)),
    "combine": [
        (lambda a: hj.combine(a.outs, a.lses[..., :5]), r"outs must be lses' shape plus a head_dim axis"),
        (lambda a: hj.combine(a.outs[0], a.lses), r"outs must be lses' shape plus a head_dim axis"),
        (lambda a: hj.combine(a.outs.astype(I32), a.lses), r"outs must be a floating-point array"),
        (lambda a: hj.combine(a.outs, a.lses.astype(I32)), r"lses must be a floating-point array"),
    ],
    "HataConfig": [
        (lambda a: hj.HataConfig(rbit=48), r"HataConfig.rbit must be a positive multiple of 32, got 48"),
        (lambda a: hj.HataConfig(rbit=0), r"HataConfig.rbit must be a positive multiple of 32, got 0"),
        (lambda a: hj.HataConfig(rbit="128"), r"HataConfig.rbit must be an int"),
        (lambda a: hj.HataConfig(rbit=True), r"HataConfig.rbit must be an int"),
        (lambda a: hj.HataConfig(budget=0), r"HataConfig.budget must be > 0"),
        (lambda a: hj.HataConfig(budget=2048.0), r"HataConfig.budget must be an int"),
        (lambda a: hj.HataConfig(sink=-1), r"HataConfig.sink \(-?\d+\) and recent \(-?\d+\) must be >= 0"),
        (lambda a: hj.HataConfig(sink=1.5), r"HataConfig.sink must be an int"),
        (lambda a: hj.HataConfig(recent=-2), r"HataConfig.sink \(-?\d+\) and recent \(-?\d+\) must be >= 0"),
        (lambda a: hj.HataConfig(recent=None), r"HataConfig.recent must be an int"),
        (lambda a: hj.HataConfig(budget=8, sink=5, recent=4),
         r"HataConfig.sink \(5\) and recent \(4\) must be >= 0 and sum to at most budget \(8\)"),
        (lambda a: hj.HataConfig(score="dot"), r"HataConfig.score must be one of"),
        (lambda a: dataclasses.replace(a.config, budget=-4), r"HataConfig.budget must be > 0"),
    ],
    "HataCache.init": [
        (lambda a: hj.HataCache.init(0, 2, 10, 64), r"batch must be a positive int"),
        (lambda a: hj.HataCache.init(2, -1, 10, 64), r"kv_heads must be a positive int"),
        (lambda a: hj.HataCache.init(2, 2, 0, 64), r"capacity must be a positive int"),
        (lambda a: hj.HataCache.init(2, 2, 10, 64.0), r"head_dim must be a positive int"),
        (lambda a: hj.HataCache.init(2, 2, 10, 64, rbit=100), r"rbit must be a positive multiple of 32"),
        (lambda a: hj.HataCache.init(2, 2, 10, 64, dtype=jnp.int8), r"dtype must be a floating-point dtype"),
        (lambda a: hj.HataCache.init(2, 2, 10, np.float32(64)), r"head_dim must be a positive int, got float32"),
        (lambda a: hj.HataCache.init(2, 2, 10, 64, out_sharding="model"),
         r"out_sharding must be a NamedSharding, a PartitionSpec or None, got str"),
        (lambda a: hj.HataCache.init(2, 2, 10, 64, out_sharding=P("data")),
         r"out_sharding is a PartitionSpec but no mesh is set \(jax.set_mesh\)"),
    ],
    "HataCache.prefill": lengths_cases(lambda a, lengths: prefill_call(a, lengths=lengths), r"lengths \(prefill\)",
                                       8) + [
        (lambda a: prefill_call(a, k=a.k[0]), r"k must have shape \[batch, kv_heads, tokens, head_dim\]"),
        (lambda a: prefill_call(a, k=jnp.swapaxes(a.k[:, :, :8], 1, 2), v=jnp.swapaxes(a.v[:, :, :8], 1, 2)),
         r"k must have shape \[batch, kv_heads, tokens, head_dim\] .* got \(2, 8, 2, 64\) \(a \[batch, seq, "
         r"kv_heads, head_dim\] cache\? pass jnp.swapaxes\(k, 1, 2\)\)"),
        (lambda a: prefill_call(a, k=a.k[:, :, :8].astype(I32)), r"k must be a floating-point array"),
        (lambda a: prefill_call(a, v=a.v[:, :, :8].astype(I32)), r"v must be a floating-point array"),
        (lambda a: prefill_call(a, k=a.k[:, :1, :8], v=a.v[:, :1, :8]), r"k must have shape .* Hkv=2"),
        (lambda a: prefill_call(a, k=a.k[:1, :, :8], v=a.v[:1, :, :8]), r"k must have shape .* B=2"),
        (lambda a: prefill_call(a, k=a.k[..., :8, :32], v=a.v[..., :8, :32]), r"k must have shape .* D=64"),
        (lambda a: prefill_call(a, v=a.v[:, :, :6]), r"v must have the shape of k \(2, 2, 8, 64\)"),
        (lambda a: prefill_call(a, w=a.w[:1]), r"w must have shape \[2, 64, 64\]"),
        (lambda a: prefill_call(a, w=jnp.concatenate([a.w, a.w], axis=2)), r"w must have shape \[2, 64, 64\]"),
        (lambda a: prefill_call(a, w=a.w[:, :32]), r"w has head_dim 32"),
        (lambda a: prefill_call(a, k=jnp.concatenate([a.k, a.k], 2), v=jnp.concatenate([a.v, a.v], 2)),
         r"prefill: the prompt has 20 tokens but the cache capacity is 10"),
    ],
    "HataCache.append": [
        (lambda a: a.cache.append(a.k_new[0], a.v_new, a.w, impl=REF),
         r"k must have shape \[batch, kv_heads, head_dim\]"),
        (lambda a: a.cache.append(a.k_new.astype(I32), a.v_new, a.w, impl=REF), r"k must be a floating-point array"),
        (lambda a: a.cache.append(a.k_new, a.v_new[:, :1], a.w, impl=REF), r"v must have shape .* Hkv=2"),
        (lambda a: a.cache.append(a.k_new, a.v_new, a.w[..., :32], impl=REF), r"w must have shape \[2, 64, 64\]"),
        (lambda a: a.cache.append_encoded(a.k_new, a.v_new, a.new_codes.astype(I32), a.norms[..., 0]),
         r"k_codes must have dtype uint32"),
        (lambda a: a.cache.append_encoded(a.k_new, a.v_new, a.new_codes[..., :1], a.norms[..., 0]),
         r"k_codes must have shape \(2, 2, 2\)"),
        (lambda a: a.cache.append_encoded(a.k_new, a.v_new, a.new_codes, a.norms[..., 0].astype(F16)),
         r"k_norms must have dtype float32"),
        (lambda a: a.cache.append_encoded(a.k_new, a.v_new, a.new_codes, a.norms[..., :2]),
         r"k_norms must have shape \(2, 2\)"),
        (lambda a: a.cache.append_encoded(a.k_new[:, :1], a.v_new, a.new_codes, a.norms[..., 0]),
         r"k must have shape .* Hkv=2"),
        (lambda a: a.cache.append_encoded(a.k_new, a.v_new.astype(I32), a.new_codes, a.norms[..., 0]),
         r"v must be a floating-point array"),
    ],
    "hata_decode_attention": [
        (lambda a: decode(a, config={"budget": 4}), r"config must be a HataConfig, got dict"),
        (lambda a: decode(a, q=a.q[0]), r"q must have shape \[batch, q_heads, head_dim\]"),
        (lambda a: decode(a, q=a.q[:, :, None]), r"\(a \[batch, q_heads, 1, head_dim\] query\? pass q\[:, :, 0\]\)"),
        (lambda a: decode(a, q=a.q[:1]), r"q has batch size 1"),
        (lambda a: decode(a, q=a.q.astype(I32)), r"q must be a floating-point array"),
        (lambda a: decode(a, q=a.q[..., :32]), r"q has head_dim 32"),
        (lambda a: decode(a, q=a.q[:, :5]), r"q heads vs w: query heads \(5\)"),
        (lambda a: decode(a, k_new=a.k_new.astype(I32)), r"k must be a floating-point array"),
        (lambda a: decode(a, k_new=a.k_new[:, :1]), r"k must have shape .* Hkv=2"),
        (lambda a: decode(a, v_new=a.v_new[..., :32]), r"v must have shape .* D=64"),
        (lambda a: decode(a, w=a.w[..., :32]), r"w has rbit 32 .* config.rbit is 64"),
        (lambda a: decode(a, w=a.w[:1]), r"w must have shape \[2, 64, 64\]"),
        (lambda a: decode(a, w=a.w.astype(I32)), r"w must be a floating-point array"),
        (lambda a: decode(a, config=hj.HataConfig(rbit=128, budget=4), w=jnp.concatenate([a.w, a.w], 2)),
         r"the cache holds 64-bit codes but config.rbit is 128"),
        (lambda a: decode(a, config=hj.HataConfig(rbit=64, budget=11)),
         r"budget \(11\) must not exceed the cache capacity \(10\)"),
    ],
}

IMPL_CALLS = {
    "encode": lambda a, impl: hj.encode(a.q, a.w, impl=impl),
    "encode_step": lambda a, impl: hj.encode_step(a.q, a.k_new, a.w, impl=impl),
    "hamming_scores": lambda a, impl: hj.hamming_scores(a.q_codes, a.k_codes, a.norms, a.lengths, impl=impl),
    "select_topk": lambda a, impl: hj.select_topk(a.scores, 4, a.lengths, impl=impl),
    "hamming_topk": lambda a, impl: hj.hamming_topk(a.q_codes, a.k_codes, a.norms, a.lengths, budget=4, impl=impl),
    "sparse_decode_attention": lambda a, impl: hj.sparse_decode_attention(a.q, a.k, a.v, a.idx, a.count, impl=impl),
    "dense_decode_attention": lambda a, impl: hj.dense_decode_attention(a.q, a.k, a.v, a.lengths, impl=impl),
    "HataCache.prefill": lambda a, impl: a.cache.prefill(a.k, a.v, a.w, a.lengths, impl=impl),
    "HataCache.append": lambda a, impl: a.cache.append(a.k_new, a.v_new, a.w, impl=impl),
    "hata_decode_attention": lambda a, impl: decode(a, impl=impl),
}


def test_valid_inputs_are_accepted(a):
    """The baseline of every case is valid: the failures below come from the one broken thing."""
    for call in IMPL_CALLS.values():
        call(a, REF)
    hj.pack_bits(a.bits)
    hj.unpack_bits(a.q_codes)
    hj.key_norms(a.k)
    hj.combine(a.outs, a.lses)
    a.cache.append_encoded(a.k_new, a.v_new, a.new_codes, a.norms[..., 0])
    hj.select_topk(a.scores, 4, a.lengths, sink=2, recent=2, impl=REF)


@pytest.mark.parametrize(
    "call, match",
    [pytest.param(call, match, id=f"{name}-{i}") for name, cases in CASES.items()
     for i, (call, match) in enumerate(cases)],
)
def test_bad_input_raises_naming_the_argument(a, call, match):
    with pytest.raises(ValueError, match=match):
        call(a)


@pytest.mark.parametrize("impl", ["bogus", "Pallas", "", None])
@pytest.mark.parametrize("name", sorted(IMPL_CALLS))
def test_unknown_impl_is_rejected(a, name, impl):
    with pytest.raises(ValueError, match=r"impl must be one of \('auto', 'pallas', 'reference'\)"):
        IMPL_CALLS[name](a, impl)


def test_numpy_ints_and_lists_are_ints_and_arrays(a):
    """numpy integer scalars where an int is meant and Python lists where an array is meant give
    what Python ints and jax arrays give."""
    cache = hj.HataCache.init(np.int64(2), np.int32(2), np.int64(10), np.int16(64), rbit=np.int64(64),
                              dtype=jnp.float32)
    assert (cache.batch, cache.kv_heads, cache.capacity, cache.head_dim, cache.rbit) == (2, 2, 10, 64, 64)
    lengths = [int(n) for n in a.lengths]
    from_list = cache.prefill(a.k[:, :, :8], a.v[:, :, :8], a.w, lengths, impl=REF)
    from_array = cache.prefill(a.k[:, :, :8], a.v[:, :, :8], a.w, a.lengths, impl=REF)
    for field in ("k", "codes", "norms", "lengths"):
        np.testing.assert_array_equal(np.asarray(getattr(from_list, field)), np.asarray(getattr(from_array, field)))
    assert from_list.lengths.tolist() == lengths
    np.testing.assert_array_equal(np.asarray(hj.dense_decode_attention(a.q, a.k, a.v, lengths, impl=REF)),
                                  np.asarray(hj.dense_decode_attention(a.q, a.k, a.v, a.lengths, impl=REF)))
    config = hj.HataConfig(rbit=np.int64(64), budget=np.int32(4))
    assert config == a.config and hash(config) == hash(a.config) and type(config.budget) is int
    for budget in (np.int32(4), np.int64(4)):
        got = hj.select_topk(a.scores, budget, lengths, impl=REF)
        want = hj.select_topk(a.scores, 4, a.lengths, impl=REF)
        for g, e in zip(got, want):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(e))
        got = hj.hamming_topk(a.q_codes, a.k_codes, a.norms, lengths, budget=budget, impl=REF)
        want = hj.hamming_topk(a.q_codes, a.k_codes, a.norms, a.lengths, budget=4, impl=REF)
        for g, e in zip(got, want):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(e))
