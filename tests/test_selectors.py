"""hata_jax.selectors: every selector against float64 numpy brute force, state updates, the common
selection/mask/attention functions, and bad input.

Inputs: B=2 sequences with ragged odd lengths (one at the capacity S=13), Hkv=2 KV heads, group
sizes G=1 and G=3, head_dim 16, fresh random data per test.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hata_jax as hj
from hata_jax import selectors as sel
from hata_jax.selectors import base

REF = "reference"
B, HKV, S, D = 2, 2, 13, 16
NAMES = ["exact", "hata", "hata_rerank", "simhash", "hashattention", "hashattention_authors", "quest", "quest_authors",
         "loki", "streaming"]
# Small options so that every code path runs at these sizes.
OPTIONS = {"hata": dict(rbit=64), "hata_rerank": dict(rbit=64, candidates=2), "simhash": dict(rbit=32),
           "hashattention_authors": dict(sink=1, recent=2), "quest": dict(page_size=4),
           "quest_authors": dict(page_size=4), "loki": dict(channels=8), "streaming": dict(sink=2)}
HIDDEN = 16


def f64(x) -> np.ndarray:
    return np.asarray(np.asarray(x, np.float32), np.float64)


def random_mlp(rng, heads: int, widths) -> dict:
    params = {}
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        params[f"w{i}"] = jnp.asarray(rng.standard_normal((heads, n_in, n_out), np.float32) / np.sqrt(n_in))
        params[f"b{i}"] = jnp.asarray(0.1 * rng.standard_normal((heads, n_out), np.float32))
    return params


def make_params(rng, name: str, selector, group: int):
    name = sel.params_source(name)
    if name == "hata":
        return jnp.asarray(rng.standard_normal((HKV, D, selector.rbit), np.float32))
    if name == "simhash":
        return selector.init_params(jax.random.key(int(rng.integers(2**31))), HKV, D)
    if name == "hashattention":
        widths = (D, HIDDEN, HIDDEN, selector.bits)
        return {"query": random_mlp(rng, HKV * group, widths), "key": random_mlp(rng, HKV, widths),
                "threshold": jnp.zeros((HKV * group,), jnp.float32)}
    if name == "loki":
        calibration = rng.standard_normal((64, HKV, D), np.float32) * np.linspace(3.0, 0.2, D, dtype=np.float32)
        return sel.loki_basis(jnp.asarray(calibration + 1.0))
    return None


def make_case(rng, name: str, group: int, dtype=jnp.float32):
    """A selector with params and inputs: k, v [B, HKV, S, D], q [B, S, Hq, D] (one query per position),
    ragged odd lengths (one at S), the state over them."""
    selector = sel.make_selector(name, **OPTIONS.get(name, {}))
    params = make_params(rng, name, selector, group)

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)

    k, v, q = normal(B, HKV, S, D), normal(B, HKV, S, D), normal(B, S, HKV * group, D)
    lengths = jnp.asarray(rng.permutation([S, rng.choice([3, 5, 7, 9, 11])]), jnp.int32)
    state = selector.init_state(params, k, lengths)
    return types.SimpleNamespace(selector=selector, params=params, k=k, v=v, q=q, lengths=lengths, state=state,
                                 group=group, name=name)


def rows(c) -> int:
    """Selection rows per sequence: query heads for a per-query-head selector, else KV heads."""
    return HKV * c.group if c.selector.per_query_head else HKV


def query_positions(rng, lengths, t: int):
    """int32[B, t]: random positions of queries, each below its row's length."""
    return jnp.asarray(np.stack([rng.integers(0, int(n), size=t) for n in lengths]), jnp.int32)


# ---------------------------------------------------------------- numpy brute force


def silu(x):
    return x / (1.0 + np.exp(-x))


def mlp_np(params, x):
    """x: [..., heads, in] float64 -> [..., heads, out], as hata_jax.selectors.mlp.mlp_apply."""
    depth = len(params) // 2
    for i in range(depth):
        x = np.einsum("...hi,hio->...ho", x, f64(params[f"w{i}"])) + f64(params[f"b{i}"])
        if i < depth - 1:
            x = silu(x)
    return x


def ambiguous(proj, bound):
    """Bits whose float64 projection is within float32 rounding of 0 (their sign may differ)."""
    return np.abs(proj) <= 1e-4 * bound


def sign_scores_np(q_out, q_bound, k_out, k_bound, group: int, positions):
    """Brute-force `sum_{i in group} <sign q_i, sign k_t>` and its tolerance for ambiguous bits.

    q_out: [B, T, Hq, r], k_out: [B, Hkv, S, r] float64 code projections (bound: the scale of
    their rounding error). Returns (scores, tolerance) float64[B, Hkv, T, S] and asserts that
    ambiguous bits are rare.
    """
    out = np.zeros((B, HKV, positions.shape[1], S))
    tol = np.zeros_like(out)
    qs, ks = np.where(q_out > 0, 1.0, -1.0), np.where(k_out > 0, 1.0, -1.0)
    q_amb, k_amb = ambiguous(q_out, q_bound), ambiguous(k_out, k_bound)
    for b in range(B):
        for h in range(HKV):
            heads = range(h * group, (h + 1) * group)
            for t in range(positions.shape[1]):
                for s in range(S):
                    out[b, h, t, s] = sum(qs[b, t, i] @ ks[b, h, s] for i in heads)
                    tol[b, h, t, s] = 2 * sum(q_amb[b, t, i].sum() for i in heads) + 2 * group * k_amb[b, h, s].sum()
    # About 0.03% of the bits are ambiguous on these inputs (0.56 of 2176 on average over 300 seeds, 5 at
    # most); the tolerance stays meaningful while fewer than 1% are.
    assert q_amb.sum() + k_amb.sum() <= 0.01 * (q_amb.size + k_amb.size)
    return out, tol


def exact_np(c, positions):
    q, k = f64(c.q), f64(c.k)
    out = np.zeros((B, HKV, positions.shape[1], S))
    for b in range(B):
        for h in range(HKV):
            for t, p in enumerate(positions[b]):
                for i in range(h * c.group, (h + 1) * c.group):
                    logits = k[b, h, : p + 1] @ q[b, t, i] / math.sqrt(D)
                    w = np.exp(logits - logits.max())
                    out[b, h, t, : p + 1] += w / w.sum()
    return out


def quest_pages_np(c, positions, page: int):
    """float64[B, Hkv, T, P] page scores; the query's own page bounded over keys <= its position."""
    q, k = f64(c.q), f64(c.k)
    pages = -(-S // page)
    out = np.full((B, HKV, positions.shape[1], pages), -np.inf)
    for b in range(B):
        n = int(c.lengths[b])
        for h in range(HKV):
            for t, p in enumerate(positions[b]):
                for j in range(pages):
                    end = min((j + 1) * page, n, p + 1 if j == p // page else S)
                    if end <= j * page:
                        continue
                    kmin, kmax = k[b, h, j * page: end].min(0), k[b, h, j * page: end].max(0)
                    heads = q[b, t, h * c.group: (h + 1) * c.group]
                    out[b, h, t, j] = np.maximum(heads * kmin, heads * kmax).sum()
    return out


def causal_attention_np(q, k, v, lengths, positions):
    """float64[B, T, Hq, D]: each query over keys at positions <= its own (and < length)."""
    q, k, v = f64(q), f64(k), f64(v)
    group = q.shape[2] // k.shape[1]
    out = np.zeros(q.shape)
    for b in range(q.shape[0]):
        for t, p in enumerate(positions[b]):
            n = min(int(p) + 1, int(lengths[b]))
            for i in range(q.shape[2]):
                logits = k[b, i // group, :n] @ q[b, t, i] / math.sqrt(q.shape[3])
                w = np.exp(logits - logits.max())
                out[b, t, i] = w @ v[b, i // group, :n] / w.sum()
    return out


# ---------------------------------------------------------------- scores against brute force

GROUPS = [1, 3]


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("name", ["hata", "simhash"])
def test_hash_code_scores_match_brute_force(rng, name, group):
    """The paper's key_norm score over the query heads' sign codes (the asymmetric one equals
    hata_jax.hamming_scores': test_hata_selection_equals_hamming_topk)."""
    c = make_case(rng, name, group)
    positions = query_positions(rng, c.lengths, 4)
    q = c.q[:, :4]
    selector = dataclasses.replace(c.selector, score="key_norm")
    scores = selector.token_scores(c.params, c.state, q, c.k, positions)
    w = f64(c.params)
    q_out = np.einsum("bthd,hdr->bthr", f64(q), np.repeat(w, group, axis=0))
    q_bound = np.einsum("bthd,hdr->bthr", np.abs(f64(q)), np.repeat(np.abs(w), group, axis=0))
    k_out = np.einsum("bhsd,hdr->bhsr", f64(c.k), w)
    k_bound = np.einsum("bhsd,hdr->bhsr", np.abs(f64(c.k)), np.abs(w))
    dots, tol = sign_scores_np(q_out, q_bound, k_out, k_bound, group, np.asarray(positions))
    norms = np.sqrt((f64(c.k) ** 2).sum(-1))[:, :, None, :]
    rbit = selector.rbit
    expected, tol = norms * dots / rbit, norms * tol / rbit
    valid = (np.arange(S) < np.asarray(c.lengths)[:, None])[:, None, None, :]
    got = np.asarray(scores)
    assert scores.shape == (B, HKV, 4, S) and scores.dtype == jnp.float32
    assert np.all(~valid | (np.abs(got - expected) <= tol + 1e-5 * np.abs(expected) + 1e-6))


@pytest.mark.parametrize("group", GROUPS)
def test_hashattention_scores_match_brute_force(rng, group):
    c = make_case(rng, "hashattention", group)
    positions = query_positions(rng, c.lengths, 4)
    q = c.q[:, :4]
    scores = c.selector.token_scores(c.params, c.state, q, c.k, positions)
    q_out = mlp_np(c.params["query"], f64(q))
    k_out = np.moveaxis(mlp_np(c.params["key"], np.moveaxis(f64(c.k), 1, 2)), 2, 1)
    expected, tol = sign_scores_np(q_out, 1.0, k_out, 1.0, group, np.asarray(positions))
    valid = (np.arange(S) < np.asarray(c.lengths)[:, None])[:, None, None, :]
    assert scores.shape == (B, HKV, 4, S)
    assert np.all(~valid | (np.abs(np.asarray(scores) - expected) <= tol))


@pytest.mark.parametrize("group", GROUPS)
def test_exact_scores_match_brute_force(rng, group):
    c = make_case(rng, "exact", group)
    positions = query_positions(rng, c.lengths, 5)
    scores = c.selector.token_scores(c.params, c.state, c.q[:, :5], c.k, positions)
    np.testing.assert_allclose(scores, exact_np(c, np.asarray(positions)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("channels", [8, D])
def test_loki_scores_match_brute_force(rng, group, channels):
    c = make_case(rng, "loki", group)
    selector = sel.LokiSelector(channels=channels)
    state = selector.init_state(c.params, c.k, c.lengths)
    positions = query_positions(rng, c.lengths, 5)
    q = c.q[:, :5]
    scores = np.asarray(selector.token_scores(c.params, state, q, c.k, positions))
    basis = f64(c.params)[:, :, :channels]
    q_rot = np.einsum("bthd,hdc->bthc", f64(q), np.repeat(basis, group, axis=0))
    q_rot = q_rot.reshape(B, 5, HKV, group, channels).sum(3)
    k_rot = np.einsum("bhsd,hdc->bhsc", f64(c.k), basis)
    expected = np.einsum("bthc,bhsc->bhts", q_rot, k_rot)
    valid = (np.arange(S) < np.asarray(c.lengths)[:, None])[:, None, None, :]
    np.testing.assert_allclose(np.where(valid, scores, 0.0), np.where(valid, expected, 0.0), rtol=1e-4, atol=1e-4)
    if channels == D:  # a full orthonormal rotation keeps q . k
        raw = np.einsum("bthd,bhsd->bhts", f64(q).reshape(B, 5, HKV, group, D).sum(3), f64(c.k))
        np.testing.assert_allclose(np.where(valid, scores, 0.0), np.where(valid, raw, 0.0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("page", [4, 16])
def test_quest_scores_match_brute_force(rng, group, page):
    c = make_case(rng, "quest", group)
    selector = sel.QuestSelector(page_size=page)
    state = selector.init_state(None, c.k, c.lengths)
    positions = query_positions(rng, c.lengths, 6)
    q = c.q[:, :6]
    expected = quest_pages_np(c, np.asarray(positions), page)
    pages = np.asarray(selector.page_scores(None, state, q, c.k, positions))
    assert np.array_equal(np.isinf(pages), np.isinf(expected))
    np.testing.assert_allclose(pages[np.isfinite(pages)], expected[np.isfinite(expected)], rtol=1e-5, atol=1e-5)
    # Every token scores its page's rank (stable: the later of two equal pages ranks higher).
    ranks = np.argsort(np.argsort(expected, axis=-1, kind="stable"), axis=-1, kind="stable")
    tokens = np.asarray(selector.token_scores(None, state, q, c.k, positions))
    np.testing.assert_array_equal(tokens, ranks[..., np.arange(S) // page])


def test_quest_selects_whole_pages(rng):
    c = make_case(rng, "quest", 3)
    idx, count = sel.select_indices(c.selector, None, c.state, c.q[:, -1], c.k, jnp.full((B,), S, jnp.int32),
                                    budget=8)
    for b in range(B):
        for h in range(HKV):
            pages = np.asarray(idx[b, h, : count[b, h]]) // 4
            counts = np.bincount(pages, minlength=4)
            assert count[b, h] == 8
            assert sorted(counts[counts > 0].tolist()) in ([4, 4], [1, 3, 4]), counts  # [1, ...]: the last page holds 1
            assert np.sum((counts > 0) & (counts < np.array([4, 4, 4, 1]))) <= 1  # at most one page cut by the budget


def test_streaming_keeps_sink_and_recent(rng):
    c = make_case(rng, "streaming", 3)
    idx, count = sel.select_indices(c.selector, None, c.state, c.q[:, -1], c.k, c.lengths, budget=5)
    positions = query_positions(rng, c.lengths, 6)
    mask = np.asarray(sel.selection_mask(c.selector, None, c.state, c.q[:, :6], c.k, positions, c.lengths, budget=5))
    for b, n in enumerate(np.asarray(c.lengths)):
        expected = {0, 1} | set(range(n - 3, n))
        for h in range(HKV):
            assert set(np.asarray(idx[b, h, : count[b, h]]).tolist()) == expected
            for t, p in enumerate(np.asarray(positions[b])):
                want = set(range(p + 1)) if p < 5 else {0, 1} | set(range(p - 2, p + 1))
                assert set(np.flatnonzero(mask[b, h, t]).tolist()) == want


@pytest.mark.parametrize("selector_sink", [0, 1, 4, 9])
def test_streaming_selection_is_the_ranking_of_its_scores(rng, selector_sink):
    """StreamingLLM's decode selection is built from the lengths alone; it must equal select_topk over its
    scores (the same set in the first `count` slots, UNUSED after them) for every length, budget and forced
    sink/recent."""
    selector = sel.StreamingSelector(sink=selector_sink)
    batch, kv_heads, capacity = 5, 2, 23
    k = jnp.asarray(rng.standard_normal((batch, kv_heads, capacity, 8)), jnp.float32)
    q = jnp.asarray(rng.standard_normal((batch, 2 * kv_heads, 8)), jnp.float32)
    for budget, sink, recent in [(1, 0, 0), (3, 0, 2), (6, 2, 1), (8, 0, 0), (8, 5, 3), (23, 1, 4), (12, 0, 12)]:
        lengths = jnp.asarray(rng.choice(np.arange(capacity + 1), batch, replace=False), jnp.int32)
        idx, count = sel.select_indices(selector, None, None, q, k, lengths, budget=budget, sink=sink, recent=recent)
        scores = selector.token_scores(None, None, q[:, None], k, (lengths - 1)[:, None])[:, :, 0]
        want_idx, want_count = hj.select_topk(scores, budget, lengths, sink=sink, recent=recent, impl="reference")
        assert idx.dtype == want_idx.dtype and count.dtype == want_count.dtype
        np.testing.assert_array_equal(np.asarray(count), np.asarray(want_count), err_msg=f"{budget, sink, recent}")
        idx, want_idx = np.asarray(idx), np.asarray(want_idx)
        np.testing.assert_array_equal(np.sort(idx, axis=-1), np.sort(want_idx, axis=-1),
                                      err_msg=f"{budget, sink, recent}")
        slots = np.arange(budget)[None, None, :]
        assert np.all((idx >= 0) == (slots < np.asarray(count)[..., None])), "UNUSED exactly after the count"


def numpy_selection(scores, visible: int, budget: int) -> set[int]:
    """The `budget` best of positions [0, visible) by float64 score, ties to the earlier position."""
    order = sorted(range(visible), key=lambda t: (-scores[t], t))
    return set(order[:budget])


@pytest.mark.parametrize("group", GROUPS)
def test_hashattention_authors_scores_and_selection(rng, group):
    """Per query head: the head's own code agreements (brute force), its first/last forced tokens
    (each at most budget // 4), then its best other tokens, ties to the earlier position."""
    c = make_case(rng, "hashattention", group)
    selector = sel.HashAttentionAuthorsSelector(sink=3, recent=1)
    state = selector.init_state(c.params, c.k, c.lengths)
    positions = query_positions(rng, c.lengths, 5)
    q = c.q[:, :5]
    q_out = mlp_np(c.params["query"], f64(q))  # [B, T, Hq, bits]
    k_out = np.moveaxis(mlp_np(c.params["key"], np.moveaxis(f64(c.k), 1, 2)), 2, 1)  # [B, Hkv, S, bits]
    scores = np.asarray(selector.token_scores(c.params, state, q, c.k, positions))
    assert scores.shape == (B, HKV * group, 5, S)
    qs, ks = np.where(q_out > 0, 1.0, -1.0), np.where(k_out > 0, 1.0, -1.0)
    expected = np.einsum("btir,bisr->bits", qs, np.repeat(ks, group, axis=1))
    # Bits within float32 rounding of 0 may flip (each moves the score by 2).
    tol = (2 * ambiguous(q_out, 1.0).sum(-1).transpose(0, 2, 1)[..., None]
           + 2 * np.repeat(ambiguous(k_out, 1.0).sum(-1), group, axis=1)[:, :, None, :])
    valid = (np.arange(S) < np.asarray(c.lengths)[:, None])[:, None, None, :]
    assert np.all(~valid | (np.abs(scores - expected) <= tol))

    for budget in (4, 8, 12):  # forced: min(3, budget // 4) sink, min(1, budget // 4) recent
        sink, recent = min(3, budget // 4), min(1, budget // 4)
        at = jnp.asarray([int(n) - 1 for n in c.lengths], jnp.int32)
        q_last = c.q[jnp.arange(B), at]
        idx, count = sel.select_indices(selector, c.params, state, q_last, c.k, at + 1, budget=budget)
        last = np.asarray(selector.token_scores(c.params, state, q_last[:, None], c.k, at[:, None]))[:, :, 0]
        for b, n in enumerate(np.asarray(at) + 1):
            for i in range(HKV * group):
                forced = set(range(min(sink, n))) | set(range(n - recent, n))
                rest = last[b, i].copy()
                rest[sorted(forced)] = np.inf
                want = numpy_selection(rest, n, min(n, budget))
                assert forced <= want
                assert set(np.asarray(idx[b, i, : count[b, i]]).tolist()) == want, (budget, b, i)


@pytest.mark.parametrize("group", GROUPS)
def test_quest_authors_pages_per_query_head_and_own_page_kept(rng, group):
    c = make_case(rng, "quest", group)
    selector = sel.QuestAuthorsSelector(page_size=4)
    state = selector.init_state(None, c.k, c.lengths)
    positions = query_positions(rng, c.lengths, 6)
    q = c.q[:, :6]
    pages = np.asarray(selector.page_scores(None, state, q, c.k, positions))  # [B, Hq, T, P]
    assert pages.shape == (B, HKV * group, 6, 4)
    for i in range(HKV * group):  # query head i alone, as Quest with G = 1 over its KV head's keys
        alone = types.SimpleNamespace(q=c.q[:, :, i: i + 1], k=c.k[:, i // group: i // group + 1], lengths=c.lengths,
                                      group=1)
        expected = quest_pages_np_heads(alone, np.asarray(positions), 4)[:, 0]
        got = pages[:, i]
        assert np.array_equal(np.isinf(got), np.isinf(expected))
        np.testing.assert_allclose(got[np.isfinite(got)], expected[np.isfinite(expected)], rtol=1e-5, atol=1e-5)
    tokens = np.asarray(selector.token_scores(None, state, q, c.k, positions))
    ranks = np.argsort(np.argsort(pages, axis=-1, kind="stable"), axis=-1, kind="stable")[..., np.arange(S) // 4]
    own = (np.arange(S) // 4)[None, None, None, :] == (np.asarray(positions) // 4)[:, None, :, None]
    np.testing.assert_array_equal(tokens, np.where(own, 4, ranks))

    # A decode step at the last position keeps the page being filled, then whole pages by rank.
    at = c.lengths - 1
    q_last = c.q[jnp.arange(B), at]
    idx, count = sel.select_indices(selector, None, state, q_last, c.k, c.lengths, budget=8)
    last = np.asarray(selector.page_scores(None, state, q_last[:, None], c.k, at[:, None]))[:, :, 0]  # [B, Hq, P]
    for b, n in enumerate(np.asarray(c.lengths)):
        if n <= 8:
            continue
        for i in range(HKV * group):
            kept = set(np.asarray(idx[b, i, : count[b, i]]).tolist())
            filled = set(range(4 * ((n - 1) // 4), n))
            assert filled <= kept and len(kept) == 8
            best = max((j for j in range(4) if j != (n - 1) // 4), key=lambda j: (last[b, i, j], j))
            assert set(range(4 * best, 4 * best + 4)) <= kept


def quest_pages_np_heads(c, positions, page: int):
    """quest_pages_np for inputs with their own head counts (c.k [B, h, S, D], c.q [B, T, h * G, D])."""
    q, k = f64(c.q), f64(c.k)
    pages = -(-S // page)
    out = np.full((q.shape[0], k.shape[1], positions.shape[1], pages), -np.inf)
    for b in range(q.shape[0]):
        n = int(c.lengths[b])
        for h in range(k.shape[1]):
            for t, p in enumerate(positions[b]):
                for j in range(pages):
                    end = min((j + 1) * page, n, p + 1 if j == p // page else S)
                    if end > j * page:
                        kmin, kmax = k[b, h, j * page: end].min(0), k[b, h, j * page: end].max(0)
                        heads = q[b, t, h * c.group: (h + 1) * c.group]
                        out[b, h, t, j] = np.maximum(heads * kmin, heads * kmax).sum()
    return out


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("candidates, budget", [(2, 3), (3, 2)])
def test_hata_rerank_against_numpy(rng, group, candidates, budget):
    """HATA's scores pick candidates * budget, the group's softmax over those candidates (float64)
    picks the budget."""
    c = make_case(rng, "hata", group)
    selector = sel.HataRerankSelector(rbit=c.selector.rbit, candidates=candidates)
    positions = query_positions(rng, c.lengths, 6)
    q = c.q[:, :6]
    hamming = np.asarray(c.selector.token_scores(c.params, c.state, q, c.k, positions))
    mask = np.asarray(sel.selection_mask(selector, c.params, c.state, q, c.k, positions, c.lengths, budget=budget))
    qf, kf = f64(q), f64(c.k)
    for b in range(B):
        for h in range(HKV):
            for t, p in enumerate(np.asarray(positions[b])):
                visible = min(int(p) + 1, int(c.lengths[b]))
                pool = sorted(numpy_selection(hamming[b, h, t], visible, candidates * budget))
                exact = np.zeros(S)
                for i in range(h * group, (h + 1) * group):
                    logits = kf[b, h, pool] @ qf[b, t, i] / math.sqrt(D)
                    w = np.exp(logits - logits.max())
                    exact[pool] += w / w.sum()
                score = np.where(np.isin(np.arange(S), pool), exact, -1.0)
                want = numpy_selection(score, visible, min(visible, budget))
                assert set(np.flatnonzero(mask[b, h, t]).tolist()) == want, (b, h, t)


def test_hata_rerank_limits(rng):
    """candidates = 1 selects what HATA selects; candidates * budget >= S what the exact oracle selects
    (compared at the real queries, positions < lengths[b]: a padding query's candidates may include
    tokens past the sequence's length, which HATA's own selection never counts)."""
    c = make_case(rng, "hata", 3)
    positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    real = (np.arange(S)[None, :] < np.asarray(c.lengths)[:, None])[:, None, :, None]  # [B, 1, T, 1]

    def mask(selector, params=c.params):
        got = sel.selection_mask(selector, params, c.state, c.q, c.k, positions, c.lengths, budget=3)
        return np.where(real, np.asarray(got), False)

    rerank = functools.partial(sel.HataRerankSelector, rbit=c.selector.rbit)
    np.testing.assert_array_equal(mask(rerank(candidates=1)), mask(c.selector))
    np.testing.assert_array_equal(mask(rerank(candidates=5)), mask(sel.ExactSelector(), None))


def test_per_query_head_mask_attention(rng):
    """sparse_causal_attention with a [B, Hq, T, S] mask: each query head over its own kept keys."""
    group = 3
    c = make_case(rng, "exact", group)
    mask = rng.random((B, HKV * group, S, S)) < 0.5
    mask |= np.eye(S, dtype=bool)[None, None]  # every query keeps its own position
    mask &= np.tril(np.ones((S, S), bool))[None, None]
    out = np.asarray(sel.sparse_causal_attention(c.q, c.k, c.v, jnp.asarray(mask)))
    q, k, v = f64(c.q), f64(c.k), f64(c.v)
    for b in range(B):
        for t in range(S):
            for i in range(HKV * group):
                keep = np.flatnonzero(mask[b, i, t])
                logits = k[b, i // group, keep] @ q[b, t, i] / math.sqrt(D)
                w = np.exp(logits - logits.max())
                np.testing.assert_allclose(out[b, t, i], w @ v[b, i // group, keep] / w.sum(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- state updates


@pytest.mark.parametrize("name", ["hata", "simhash", "hashattention", "quest", "loki"])
def test_append_state_matches_init_state(rng, name):
    c = make_case(rng, name, 3)
    # Row lengths: one on a quest page boundary, one inside a page.
    lengths = jnp.asarray(rng.permutation([8, rng.choice([5, 6, 7, 9, 10, 11])]), jnp.int32)
    state = c.selector.init_state(c.params, c.k, lengths)
    k_new = c.k[jnp.arange(B), :, lengths]
    appended = c.selector.append_state(c.params, state, k_new, lengths)
    expected = c.selector.init_state(c.params, c.k, lengths + 1)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                                                         rtol=1e-6, atol=1e-6), appended, expected)


@pytest.mark.parametrize("name", ["hashattention", "quest"])
def test_appends_from_empty_build_the_state(rng, name):
    c = make_case(rng, name, 1)
    n = int(rng.integers(6, S))
    state = c.selector.init_state(c.params, c.k, jnp.zeros((B,), jnp.int32))
    for p in range(n):
        state = c.selector.append_state(c.params, state, c.k[:, :, p], jnp.full((B,), p, jnp.int32))
    expected = c.selector.init_state(c.params, c.k, jnp.full((B,), n, jnp.int32))
    jax.tree.map(np.testing.assert_array_equal, state, expected)


# ---------------------------------------------------------------- common selection and attention


@pytest.mark.parametrize("group, dtype", [(1, jnp.float32), (3, jnp.bfloat16)])
@pytest.mark.parametrize("name", NAMES)
def test_full_budget_is_dense_attention(rng, name, group, dtype):
    c = make_case(rng, name, group, dtype)
    q = c.q[jnp.arange(B), c.lengths - 1]
    idx, count = sel.select_indices(c.selector, c.params, c.state, q, c.k, c.lengths, budget=S)
    np.testing.assert_array_equal(count, jnp.broadcast_to(c.lengths[:, None], (B, rows(c))))
    k, v = (jnp.repeat(x, rows(c) // HKV, axis=1) for x in (c.k, c.v))  # per query head: keys repeated
    sparse = hj.sparse_decode_attention(q, k, v, idx, count, impl=REF)
    dense = hj.dense_decode_attention(q, c.k, c.v, c.lengths, impl=REF)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2  # bf16: the two paths may round one ulp apart
    np.testing.assert_allclose(f64(sparse), f64(dense), rtol=tol, atol=tol)

    positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    mask = sel.selection_mask(c.selector, c.params, c.state, c.q, c.k, positions, c.lengths, budget=S)
    causal = (np.arange(S)[None, :] <= np.arange(S)[:, None])[None, None] & (
        np.arange(S) < np.asarray(c.lengths)[:, None])[:, None, None, :]
    np.testing.assert_array_equal(mask, np.broadcast_to(causal, mask.shape))
    out = sel.sparse_causal_attention(c.q, c.k, c.v, mask)
    assert out.shape == c.q.shape and out.dtype == dtype
    np.testing.assert_allclose(f64(out), causal_attention_np(c.q, c.k, c.v, c.lengths, np.asarray(positions)),
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("group, sink, recent", [(1, 0, 0), (3, 1, 1)])
@pytest.mark.parametrize("name", NAMES)
def test_selection_mask_rows(rng, name, group, sink, recent):
    """Each query keeps min(visible, budget) keys it can see (forced ones included), and its row is
    the selection of a decode step at its position, at the last position and at a random one."""
    c = make_case(rng, name, group)
    budget = 4
    positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    mask = np.asarray(sel.selection_mask(c.selector, c.params, c.state, c.q, c.k, positions, c.lengths,
                                         budget=budget, sink=sink, recent=recent))
    assert mask.shape == (B, rows(c), S, S) and mask.dtype == bool
    lengths = np.asarray(c.lengths)
    for b, n in enumerate(lengths):
        for t in range(S):
            visible = min(t + 1, n)
            row = mask[b, :, t]
            assert np.all(row.sum(-1) == min(visible, budget))
            assert not row[:, visible:].any()
            forced = sorted(set(range(min(sink, visible))) | set(range(visible - recent, visible)))
            assert row[:, forced].all()
    for at in (lengths - 1, np.array([rng.integers(0, n) for n in lengths])):
        at = jnp.asarray(at, jnp.int32)
        idx, count = sel.select_indices(c.selector, c.params, c.state, c.q[jnp.arange(B), at], c.k, at + 1,
                                        budget=budget, sink=sink, recent=recent)
        for b in range(B):
            for h in range(rows(c)):
                assert set(np.flatnonzero(mask[b, h, int(at[b])]).tolist()) == set(
                    np.asarray(idx[b, h, : count[b, h]]).tolist()), (b, h, int(at[b]))


def test_hata_selection_equals_hamming_topk(rng):
    for group, rbit, budget, sink, recent, score in [(1, 64, 5, 0, 0, "key_norm"), (3, 128, 4, 1, 2, "key_norm"),
                                                     (3, 64, 4, 1, 2, "asymmetric"), (1, 128, 6, 0, 0, "asymmetric")]:
        selector = sel.HataSelector(rbit=rbit, score=score)
        w = jnp.asarray(rng.standard_normal((HKV, D, rbit), np.float32))
        k = jnp.asarray(rng.standard_normal((B, HKV, S, D), np.float32))
        q = jnp.asarray(rng.standard_normal((B, HKV * group, D), np.float32))
        lengths = jnp.asarray(rng.permutation([S, rng.choice([5, 7, 9])]), jnp.int32)
        state = selector.init_state(w, k, lengths)
        idx, count = sel.select_indices(selector, w, state, q, k, lengths, budget=budget, sink=sink, recent=recent)
        k_codes = hj.encode(k, w, head_axis=1, impl=REF)
        q_codes, q_scales = hj.query_planes(q, w, impl=REF) if score == "asymmetric" else (hj.encode(q, w, impl=REF),
                                                                                          None)
        ref_idx, ref_count = hj.hamming_topk(q_codes, k_codes, hj.key_norms(k), lengths, budget=budget, score=score,
                                             q_scales=q_scales, sink=sink, recent=recent, impl=REF)
        np.testing.assert_array_equal(idx, ref_idx)
        np.testing.assert_array_equal(count, ref_count)
        scores = selector.token_scores(w, state, q[:, None], k, (lengths - 1)[:, None])[:, :, 0]
        ref = hj.hamming_scores(q_codes, k_codes, hj.key_norms(k), lengths, score=score, q_scales=q_scales, impl=REF)
        np.testing.assert_array_equal(jnp.where(jnp.isfinite(ref), scores, -jnp.inf), ref)


@pytest.mark.parametrize("name", ["exact", "quest"])
def test_chunked_queries_match_one_chunk(rng, monkeypatch, name):
    c = make_case(rng, name, 3)
    positions = query_positions(rng, c.lengths, S)

    def mask():
        return sel.selection_mask(c.selector, c.params, c.state, c.q, c.k, positions, c.lengths, budget=5, sink=1)

    whole = mask()
    out = sel.sparse_causal_attention(c.q, c.k, c.v, whole)
    monkeypatch.setattr(base, "QUERY_CHUNK_ELEMENTS", B * HKV * 3 * S * 4)  # 4 queries per chunk, 13 = 3*4 + 1
    assert base.query_chunk(B, HKV * 3, S, S) == 4
    np.testing.assert_array_equal(mask(), whole)
    np.testing.assert_allclose(sel.sparse_causal_attention(c.q, c.k, c.v, whole), out, rtol=1e-6, atol=1e-6)


def test_jit_with_selector_static(rng):
    c = make_case(rng, "hata", 3)
    q = c.q[:, -1]
    step = jax.jit(sel.select_indices, static_argnames=("selector", "budget", "sink", "recent"))
    idx, count = step(c.selector, c.params, c.state, q, c.k, c.lengths, budget=4)
    ref_idx, ref_count = sel.select_indices(c.selector, c.params, c.state, q, c.k, c.lengths, budget=4)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(count, ref_count)
    append = jax.jit(c.selector.append_state)
    first = jnp.zeros((B,), jnp.int32)
    jitted = append(c.params, c.state, c.k[:, :, 0], first)
    eager = c.selector.append_state(c.params, c.state, c.k[:, :, 0], first)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), jitted, eager)  # norms: last bit may differ


# ---------------------------------------------------------------- Loki basis, memory, registry


def test_loki_basis_is_centered_pca(rng):
    scales = np.linspace(4.0, 0.1, D, dtype=np.float32)
    mix = np.linalg.qr(rng.standard_normal((D, D)))[0].astype(np.float32)
    keys = (rng.standard_normal((200, HKV, D), np.float32) * scales) @ mix + 5.0  # a large mean
    basis = np.asarray(sel.loki_basis(jnp.asarray(keys)), np.float64)
    assert basis.shape == (HKV, D, D) and sel.loki_basis(jnp.asarray(keys)).dtype == jnp.float32
    for h in range(HKV):
        np.testing.assert_allclose(basis[h].T @ basis[h], np.eye(D), atol=1e-4)
        centered = f64(keys[:, h]) - f64(keys[:, h]).mean(0)
        variances = ((centered @ basis[h]) ** 2).mean(0)
        assert np.all(np.diff(variances) <= 1e-3 * variances[0])
        np.testing.assert_allclose(variances, np.linalg.eigvalsh(centered.T @ centered / 200)[::-1], rtol=1e-3,
                                   atol=1e-4)
        peak = basis[h][np.abs(basis[h]).argmax(0), np.arange(D)]
        assert np.all(peak > 0)


def test_extra_bytes_per_token():
    """Llama-3.1-8B layer shapes: 8 KV heads, head_dim 128."""
    expected = {"exact": 0, "hata": 8 * (16 + 4), "hata_rerank": 8 * (16 + 4), "simhash": 8 * (16 + 4),
                "hashattention": 8 * 4, "hashattention_authors": 8 * 4, "quest": 8 * 32, "quest_authors": 8 * 32,
                "loki": 8 * 64, "streaming": 0}
    assert {name: sel.make_selector(name).extra_bytes_per_token(8, 128) for name in NAMES} == expected
    assert sel.make_selector("quest").extra_bytes_per_token(3, 64) == 3 * 16


def test_selection_bytes():
    """SmolLM2-135M layer shapes (3 KV heads, head_dim 64) at 2048 tokens, budget 128: metadata of
    every token, plus the keys a selector scores exactly."""
    length, budget, per_token = 2048, 128, {"exact": 128, "hata": 20, "simhash": 20, "hashattention": 4,
                                            "hashattention_authors": 4, "quest": 16, "quest_authors": 16,
                                            "loki": 64, "streaming": 0}
    for name in NAMES:
        got = sel.make_selector(name).selection_bytes(length, budget, 3, 64)
        want = 3 * length * 20 + 3 * 4 * budget * 128 if name == "hata_rerank" else 3 * length * per_token[name]
        assert got == want, name
    assert sel.make_selector("hata_rerank", candidates=64).selection_bytes(length, budget, 3, 64) == 3 * length * 148
    assert sel.make_selector("loki", channels=8).selection_bytes(length, budget, 3, 64) == 3 * length * 16
    assert sel.make_selector("exact").selection_bytes(0, budget, 3, 64) == 0
    for args, name in (((-1, budget, 3, 64), "length"), ((length, 0, 3, 64), "budget"),
                       ((length, budget, 3, 64.0), "head_dim"), ((length, budget, True, 64), "kv_heads")):
        with pytest.raises(ValueError, match=f"selection_bytes: {name} must be an int"):
            sel.make_selector("hata").selection_bytes(*args)


def test_registry():
    assert sorted(sel.SELECTORS) == sorted(NAMES)
    for name, cls in sel.SELECTORS.items():
        selector = sel.make_selector(name)
        assert type(selector) is cls and selector.name == name
        hash(selector)
    assert sel.make_selector("streaming", sink=7) == sel.StreamingSelector(sink=7)


# ---------------------------------------------------------------- bad input


@pytest.fixture
def bad(rng):
    cases = {name: make_case(rng, name, 3) for name in ("hata", "hashattention", "loki", "quest")}
    return types.SimpleNamespace(**cases)


def _scores(c, **changes):
    args = dict(params=c.params, state=c.state, q=c.q, k=c.k,
                q_positions=jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S)))
    args.update(changes)
    return c.selector.token_scores(**args)


BAD_INPUTS = [
    (lambda a: sel.make_selector("nope"), r"name must be one of"),
    (lambda a: sel.make_selector("quest", rbit=64), r"options \['rbit'\] are not options of the 'quest'"),
    (lambda a: sel.HataSelector(rbit=48), r"HataSelector.rbit must be a positive multiple of 32"),
    (lambda a: sel.HataSelector(score="hamming"), r"HataSelector.score must be 'key_norm' or 'asymmetric'"),
    (lambda a: sel.make_selector("hata_rerank", score="dot"),
     r"HataRerankSelector.score must be 'key_norm' or 'asymmetric'"),
    (lambda a: sel.QuestSelector(page_size=0), r"page_size must be a positive int"),
    (lambda a: sel.StreamingSelector(sink=-1), r"sink must be an int >= 0"),
    (lambda a: sel.HashAttentionSelector(bits=20), r"bits must be a positive multiple of 32"),
    (lambda a: sel.HashAttentionAuthorsSelector(recent=-1), r"HashAttentionAuthorsSelector.recent must be an int"),
    (lambda a: sel.HataRerankSelector(candidates=0), r"HataRerankSelector.candidates must be an int >= 1"),
    (lambda a: a.hata.selector.init_state(a.hata.params[:, :, :32], a.hata.k, a.hata.lengths),
     r"params \(the hata projection W\) must have shape \[kv_heads, head_dim, rbit\] = \(2, 16, 64\)"),
    (lambda a: a.hata.selector.init_state(None, a.hata.k, a.hata.lengths), r"params .* must have shape"),
    (lambda a: a.hata.selector.init_state(a.hata.params, a.hata.k[0], a.hata.lengths),
     r"k must have shape \[batch, kv_heads, seq, head_dim\]"),
    (lambda a: a.hata.selector.init_state(a.hata.params, a.hata.k, jnp.array([S + 1, 2], jnp.int32)),
     rf"lengths must lie in \[0, {S}\]"),
    (lambda a: a.hata.selector.append_state(a.hata.params, a.hata.state, a.hata.k, a.hata.lengths),
     r"k_new must have shape \[batch, kv_heads, head_dim\]"),
    (lambda a: a.hata.selector.append_state(a.hata.params, a.hata.state, a.hata.k[:, :, 0], a.hata.lengths[:1]),
     r"positions must have shape \[batch\]"),
    (lambda a: _scores(a.hata, q=a.hata.q[:, 0]), r"q must have shape \[batch, queries, q_heads, head_dim\]"),
    (lambda a: _scores(a.hata, q=a.hata.q[:, :, :5]), r"query heads \(5\) must be a positive multiple of KV heads"),
    (lambda a: _scores(a.hata, q_positions=jnp.zeros((B, 3), jnp.int32)), r"q_positions must have shape"),
    (lambda a: _scores(a.hata, q_positions=jnp.zeros((B, S), jnp.float32)), r"q_positions must be an integer"),
    (lambda a: _scores(a.quest, params=a.hata.params), r"params must be None for the 'quest' selector"),
    (lambda a: _scores(a.loki, params=a.loki.params[:, :8]),
     r"params \(the Loki PCA basis\) must have shape \[kv_heads, head_dim, head_dim\]"),
    (lambda a: sel.LokiSelector(channels=D + 1).init_state(a.loki.params, a.loki.k, a.loki.lengths),
     r"channels \(17\) must not exceed head_dim \(16\)"),
    (lambda a: sel.loki_basis(a.loki.k[0, 0]), r"keys must have shape \[samples, kv_heads, head_dim\]"),
    (lambda a: _scores(a.hashattention, params={"query": a.hashattention.params["query"]}),
     r"params must be the HashAttention dict"),
    (lambda a: sel.HashAttentionSelector(bits=64).init_state(a.hashattention.params, a.hashattention.k,
                                                             a.hashattention.lengths),
     r"params\['key'\] must output 64 bits"),
    (lambda a: _scores(a.hashattention, q=a.hashattention.q[:, :, :2]),
     r"params\['query'\]\['w0'\] must have shape \[2, 16, out\]"),
    (lambda a: sel.select_indices(a.hata.selector, a.hata.params, a.hata.state, a.hata.q[:, -1], a.hata.k,
                                  a.hata.lengths, budget=S + 1), rf"budget \({S + 1}\) must not exceed"),
    (lambda a: sel.select_indices("hata", a.hata.params, a.hata.state, a.hata.q[:, -1], a.hata.k, a.hata.lengths,
                                  budget=2), r"selector must be a hata_jax.selectors.Selector"),
    (lambda a: sel.select_indices(a.hata.selector, a.hata.params, a.hata.state, a.hata.q, a.hata.k, a.hata.lengths,
                                  budget=2), r"q must have shape \[batch, q_heads, head_dim\]"),
    (lambda a: sel.selection_mask(a.hata.selector, a.hata.params, a.hata.state, a.hata.q, a.hata.k,
                                  jnp.zeros((B, S), jnp.int32), a.hata.lengths, budget=2, sink=2, recent=1),
     r"sink \(2\) and recent \(1\) must be >= 0 and sum to at most budget \(2\)"),
    (lambda a: sel.sparse_causal_attention(a.hata.q, a.hata.k, a.hata.k, jnp.ones((B, HKV, S, S - 1), bool)),
     r"mask must have shape \[batch, kv_heads or q_heads, queries, seq\]"),
    (lambda a: sel.sparse_causal_attention(a.hata.q, a.hata.k, a.hata.k[:, :, :4], jnp.ones((B, HKV, S, S), bool)),
     r"v must have the shape of k"),
]


@pytest.mark.parametrize("call, message", BAD_INPUTS)
def test_bad_input_raises(bad, call, message):
    with pytest.raises(ValueError, match=message):
        call(bad)
