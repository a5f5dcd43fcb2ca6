"""Two-stage HATA (HataConfig.candidates > 1): the candidates' exact scores pick the budget.

Checked against a numpy oracle: the codes' exact top `c x budget` (`exact_slots`), then each
row's candidates ranked by `sum_g softmax over the candidates (scale q_g . k)` (forced sink and
recent tokens kept, ties to the earlier position), on fresh random caches, left padding, both
layouts, GQA groups of 1 and 3; the Pallas step against the reference step.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hata_jax as hj
from hata_jax.models import AttentionPlan
from hata_jax.rerank import rerank_candidates
from hata_jax.selection import exact_slots
from hata_jax.selectors import make_selector


def _oracle(q, k, candidates, count, lengths, budget, scale, sink, recent, offsets):
    """numpy two-stage answer: int32[B, Hkv, budget] positions (from each row's start), ascending."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)  # k: [B, Hkv, S, D]
    batch, hq, _ = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    out = np.full((batch, hkv, budget), -1, np.int32)
    for b, h in np.ndindex(batch, hkv):
        pos = np.asarray(candidates[b, h, : count[b, h]])
        logits = scale * q[b, h * g:(h + 1) * g] @ k[b, h, pos + offsets[b]].T  # [G, n]
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        score = (probs / probs.sum(axis=1, keepdims=True)).sum(axis=0)
        score = np.where((pos < sink) | (pos >= lengths[b] - recent), np.inf, score)
        best = np.lexsort((np.arange(pos.size), -score))[:budget]
        out[b, h, : best.size] = np.sort(pos[best])
    return out


def _case(rng, batch, hkv, group, capacity, d, lengths, starts=None, seq_axis=2):
    k, v = (rng.standard_normal((batch, hkv, capacity, d)).astype(np.float32) for _ in range(2))
    w = rng.standard_normal((hkv, d, 64)).astype(np.float32)
    q = 2 * rng.standard_normal((batch, hkv * group, d)).astype(np.float32)  # peaked enough to rank
    lengths = np.asarray(lengths, np.int32)
    starts = np.zeros(batch, np.int32) if starts is None else np.asarray(starts, np.int32)
    layout = (lambda x: x) if seq_axis == 2 else (lambda x: np.swapaxes(x, 1, 2))
    cache = hj.HataCache.from_kv(jnp.asarray(layout(k)), jnp.asarray(layout(v)), jnp.asarray(w), lengths,
                                 starts=starts if starts.any() else None, seq_axis=seq_axis, impl="reference")
    return jnp.asarray(q), k, cache, jnp.asarray(w)


@pytest.mark.parametrize("group,candidates,sink,recent", [(1, 2, 0, 0), (3, 4, 2, 3), (3, 50, 0, 1)])
def test_rerank_candidates_matches_the_oracle(rng, group, candidates, sink, recent):
    batch, hkv, capacity, d, budget = 2, 2, 300, 32, 12
    lengths, starts = [300, 157], [0, 40]
    q, k, cache, w = _case(rng, batch, hkv, group, capacity, d, lengths, starts)
    rel = cache.lengths - cache.starts
    q_codes, _, _ = hj.encode_step(q, q[:, :hkv], w, impl="reference")
    scores = hj.hamming_scores(q_codes, cache.codes, cache.norms, rel, impl="reference")
    picked = min(candidates * budget, capacity)
    first = jnp.asarray(exact_slots(scores, np.asarray(rel), picked, sink, recent))
    count = jnp.minimum(rel, picked)[:, None] * jnp.ones((1, hkv), jnp.int32)
    scale = 1 / math.sqrt(d)
    got, kept = rerank_candidates(q, cache.k, first, count, rel, budget, scale=scale, sink=sink, recent=recent,
                                  offsets=cache.starts)
    want = _oracle(q, k, np.asarray(first), np.asarray(count), np.asarray(rel), budget, scale, sink, recent,
                   np.asarray(starts))
    np.testing.assert_array_equal(np.asarray(got), want)
    np.testing.assert_array_equal(np.asarray(kept), np.minimum(np.asarray(count), budget))


@pytest.mark.parametrize("seq_axis", [1, 2])
def test_two_stage_decode_step_attends_over_the_oracle_selection(rng, seq_axis):
    """hata_decode_attention with candidates = 3 on a left-padded cache: the output is the sparse
    attention over the oracle's two-stage selection after the step's append; the cache is the
    one-stage step's."""
    batch, hkv, group, capacity, d, budget = 3, 2, 2, 200, 32, 10
    lengths, starts = [150, 90, 199], [0, 30, 5]
    q, _, cache, w = _case(rng, batch, hkv, group, capacity, d, lengths, starts, seq_axis)
    k_new, v_new = (jnp.asarray(rng.standard_normal((batch, hkv, d)).astype(np.float32)) for _ in range(2))
    config = hj.HataConfig(rbit=64, budget=budget, candidates=3, sink=1, recent=2)
    out, after = hj.hata_decode_attention(q, k_new, v_new, cache, w, config, impl="reference")
    _, plain = hj.hata_decode_attention(q, k_new, v_new, cache, w, dataclasses.replace(config, candidates=1),
                                        impl="reference")
    for field in ("k", "v", "codes", "norms", "lengths"):
        np.testing.assert_array_equal(np.asarray(getattr(after, field)), np.asarray(getattr(plain, field)))
    rel = after.lengths - after.starts
    q_planes, q_scales = hj.query_planes(q, w, impl="reference")  # the default score's query
    scores = hj.hamming_scores(q_planes, after.codes, after.norms, rel, score="asymmetric", q_scales=q_scales,
                               impl="reference")
    first = exact_slots(scores, np.asarray(rel), 3 * budget, 1, 2)
    count = np.minimum(np.asarray(rel), 3 * budget)[:, None].repeat(hkv, axis=1)
    k_heads = np.asarray(after.k if seq_axis == 2 else jnp.swapaxes(after.k, 1, 2))
    want_idx = _oracle(q, k_heads, first, count, np.asarray(rel), budget, 1 / math.sqrt(d), 1, 2, np.asarray(starts))
    want_idx = np.where(want_idx >= 0, want_idx + np.asarray(starts)[:, None, None], -1)
    want = hj.sparse_decode_attention(q, after.k, after.v, jnp.asarray(want_idx), jnp.minimum(jnp.asarray(count),
                                      budget), seq_axis=seq_axis, impl="reference")
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_pallas_two_stage_step_equals_the_reference(rng):
    q, _, cache, w = _case(rng, 2, 2, 4, 256, 64, [256 - 1, 77])
    k_new, v_new = (jnp.asarray(rng.standard_normal((2, 2, 64)).astype(np.float32)) for _ in range(2))
    config = hj.HataConfig(rbit=64, budget=16, candidates=4)
    want, _ = hj.hata_decode_attention(q, k_new, v_new, cache, w, config, impl="reference")
    got, _ = jax.jit(lambda c: hj.hata_decode_attention(q, k_new, v_new, c, w, config, impl="pallas"))(cache)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-6)


def test_candidates_is_validated_and_refused_where_it_would_be_ignored():
    with pytest.raises(ValueError, match=r"HataConfig.candidates must be >= 1, got 0"):
        hj.HataConfig(candidates=0)
    with pytest.raises(ValueError, match=r"HataConfig.candidates must be an int"):
        hj.HataConfig(candidates=2.0)
    assert hj.HataConfig(budget=100, candidates=4).candidate_budget(300) == 300
    two_stage = hj.HataConfig(budget=8, candidates=2)
    with pytest.raises(ValueError, match=r"the offloaded HATA step runs one-stage HATA only"):
        two_stage.require_one_stage("the offloaded HATA step")
    plan = AttentionPlan.for_method(4, "quest", hj.HataConfig(budget=8))
    with pytest.raises(ValueError, match=r"HataConfig.candidates \(2\) applies to 'hata' layers"):
        dataclasses.replace(plan, hata=two_stage)
    assert make_selector("hata_rerank", candidates=2).candidates == 2


def test_rerank_candidates_names_bad_arguments(rng):
    q = jnp.zeros((2, 4, 16))
    k = jnp.zeros((2, 2, 40, 16))
    positions = jnp.zeros((2, 2, 8), jnp.int32)
    count = jnp.full((2, 2), 8, jnp.int32)
    lengths = jnp.full((2,), 40, jnp.int32)

    def call(**changes):
        args = dict(q=q, k=k, positions=positions, count=count, lengths=lengths, budget=4, scale=0.25)
        args.update(changes)
        return rerank_candidates(**args)

    for changes, message in [
        ({"q": jnp.zeros((2, 4, 1, 16))}, r"q must have shape \[batch, q_heads, head_dim\]"),
        ({"k": jnp.zeros((2, 40, 16))}, r"k must have shape \[batch, kv_heads, seq, head_dim\]"),
        ({"k": jnp.zeros((2, 40, 2, 16))}, r"pass seq_axis=1"),
        ({"positions": positions.astype(jnp.float32)}, r"positions must be an integer array"),
        ({"positions": jnp.zeros((2, 3, 8), jnp.int32)}, r"positions must have shape \[batch, kv_heads, candidates\]"),
        ({"count": jnp.full((2,), 8, jnp.int32)}, r"count must have shape \[batch, kv_heads\] = \(2, 2\)"),
        ({"lengths": jnp.full((3,), 40, jnp.int32)}, r"lengths"),
        ({"budget": 9}, r"budget must lie in \[1, 8\]"),
        ({"budget": 0}, r"budget must be a positive int"),
        ({"sink": 3, "recent": 2}, r"sink"),
        ({"seq_axis": 3}, r"seq_axis must be"),
    ]:
        with pytest.raises(ValueError, match=message):
            call(**changes)
