"""Labels and losses of the selector trainers against hand-computed values and pair-by-pair numpy."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hata_jax.selectors import HashAttentionSelector
from hata_jax.selectors.mlp import mlp_apply
from hata_jax.train.hashattention_objective import HashAttentionObjective, top_k_targets, weighted_bce
from hata_jax.train.hata_objective import (
    HataLoss,
    HataObjective,
    LabelConfig,
    balance_term,
    decorrelation_term,
    rank_weights,
    relax,
    similarity_term,
)


def h(x, sigma=0.1):
    return np.tanh(sigma * np.asarray(x, np.float64) / 2)


# ---------------------------------------------------------------- hand-computed values

def test_rank_weights_by_hand():
    scores = jnp.array([[5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0, 0.0, 4.0, 6.0, -1.0, 10.0]])
    valid = jnp.array([[True] * 11 + [False]])  # the 10.0 is not attended: never a pair
    cfg = LabelConfig(top_fraction=0.3, max_weight=20.0, min_weight=2.0, negative_weight=-1.0)
    # 11 valid keys -> round(3.3) = 3 positives: 9 (20), 8 (11), 7 (2); the others -1; invalid 0.
    expected = [-1, -1, 20, -1, 2, -1, 11, -1, -1, -1, -1, 0]
    np.testing.assert_allclose(np.asarray(rank_weights(scores, valid, cfg))[0], expected)
    # default: 10% of 11 keys rounds to 1 positive with the top weight 20
    np.testing.assert_allclose(np.asarray(rank_weights(scores, valid))[0], [-1, -1, 20] + [-1] * 8 + [0])


def test_relax_is_twice_sigmoid_minus_one():
    x = jnp.linspace(-50, 50, 11)
    np.testing.assert_allclose(np.asarray(relax(x, 0.1)), 2 / (1 + np.exp(-0.1 * np.asarray(x))) - 1, atol=1e-6)


def test_decorrelation_by_hand():
    w = jnp.array([[[1.0, 0.0], [0.0, 2.0]], [[1.0, 1.0], [0.0, 0.0]]])  # [Hkv=2, D=2, r=2]
    # head 0: W^T W - I = diag(0, 3); head 1: [[1, 1], [1, 1]] - I = [[0, 1], [1, 0]]
    assert float(decorrelation_term(w, 2.0)) == pytest.approx(2 * math.sqrt(9 + 2))


def test_hata_loss_checks_its_fields():
    assert HataLoss() == HataLoss(sigma=0.1, eps=0.01, balance=1.0, decorrelation=2.0)  # the paper's
    HataLoss(eps=0, balance=0, decorrelation=0)  # a term may be switched off
    for field in ("sigma", "eps", "balance", "decorrelation"):
        for bad in (-1.0, math.nan, math.inf, True, "1"):
            with pytest.raises(ValueError, match=rf"HataLoss\.{field} must be a finite float >=? 0, got"):
                HataLoss(**{field: bad})
    with pytest.raises(ValueError, match=r"HataLoss\.sigma must be a finite float > 0, got 0"):
        HataLoss(sigma=0)


def test_similarity_and_balance_by_hand():
    # One sequence, one query position, G = 1, Hkv = 1, rbit = 2, two keys (+20 and -1) and one key
    # after the query (not a pair).
    w = jnp.eye(2)[None]
    q = jnp.array([[[[10.0, -20.0]]]])  # [n, m, Hq, D]
    k = jnp.array([[[[10.0, -10.0]], [[-30.0, 40.0]], [[5.0, 5.0]]]])  # [n, S, Hkv, D]
    valid = jnp.array([[[True, True, False]]])
    weights = jnp.array([[[[[20.0, -1.0, 0.0]]]]])
    hq, hk0, hk1 = h([10, -20]), h([10, -10]), h([-30, 40])
    n_pairs = 2
    expected_sim = 0.01 * (20 * np.sum((hq - hk0) ** 2) - 1 * np.sum((hq - hk1) ** 2)) / n_pairs
    hq_j = relax(jnp.einsum("nmhgd,hdr->nmhgr", q[:, :, None], w), 0.1)
    hk_j = relax(jnp.einsum("nshd,hdr->nshr", k, w), 0.1)
    assert float(similarity_term(hq_j, hk_j, weights, valid, 0.01)) == pytest.approx(expected_sim, rel=1e-5)
    mean = (2 * hq + hk0 + hk1) / n_pairs
    assert float(balance_term(hq_j, hk_j, valid, 1.0)) == pytest.approx(np.sum((mean / 2) ** 2), rel=1e-5)


def test_weighted_bce_by_hand():
    logits = jnp.array([2.0, -1.0, 0.5, 3.0])
    targets = jnp.array([1.0, 0.0, 1.0, 0.0])
    valid = jnp.array([True, True, True, False])
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731
    expected = (20 * sp(-2.0) + sp(-1.0) + 20 * sp(-0.5)) / 3
    assert float(weighted_bce(logits, targets, valid, 20.0)) == pytest.approx(expected, rel=1e-6)


def test_top_k_targets_by_hand():
    scores = jnp.array([[3.0, -jnp.inf, 7.0, 1.0, 5.0], [-jnp.inf, 2.0, -jnp.inf, -jnp.inf, -jnp.inf]])
    np.testing.assert_array_equal(np.asarray(top_k_targets(scores, 2)), [[0, 0, 1, 0, 1], [0, 1, 0, 0, 0]])


# ---------------------------------------------------------------- pair by pair on random data

def _batch(rng, n=2, m=3, hkv=2, g=3, d=8, seq=11):
    q = rng.standard_normal((n, m, hkv * g, d)).astype(np.float32) * 6
    k = rng.standard_normal((n, seq, hkv, d)).astype(np.float32) * 6
    positions = rng.integers(seq // 2, seq, (n, m))
    valid = np.arange(seq) <= positions[..., None]
    scores = np.einsum("nmhgd,nshd->nmhgs", q.reshape(n, m, hkv, g, d), k).reshape(n, m, hkv * g, seq)
    return q, k, valid, np.where(valid[:, :, None], scores, -np.inf)


def _brute_rank_weights(scores, valid, cfg):
    out = np.zeros(scores.shape)
    for idx in np.ndindex(scores.shape[:-1]):
        ok = np.flatnonzero(valid[idx[:2]])
        positives = max(1, int(np.round(cfg.top_fraction * len(ok))))
        order = ok[np.argsort(-scores[idx][ok], kind="stable")]
        out[idx][ok] = cfg.negative_weight
        out[idx][order[:positives]] = np.linspace(cfg.max_weight, cfg.min_weight, positives) if positives > 1 \
            else cfg.max_weight
    return out


@pytest.mark.parametrize("g", [1, 3])
def test_hata_loss_matches_pair_by_pair_numpy(rng, g):
    q, k, valid, scores = _batch(rng, g=g)
    n, m, hq, d = q.shape
    hkv, rbit = k.shape[2], 32
    selector = HataObjective(rbit=rbit, loss_config=HataLoss(sigma=0.1, eps=0.01, balance=1.0, decorrelation=2.0),
                            labels=LabelConfig(top_fraction=0.2))
    weights = np.asarray(selector.targets(jnp.asarray(scores), jnp.asarray(valid)[:, :, None]))
    np.testing.assert_allclose(weights, _brute_rank_weights(scores, valid, selector.labels), atol=1e-5)
    w = rng.standard_normal((hkv, d, rbit)).astype(np.float32)
    total, terms = selector.loss(jnp.asarray(w), {"q": jnp.asarray(q), "k": jnp.asarray(k),
                                                  "targets": jnp.asarray(weights), "valid": jnp.asarray(valid)})
    sim, pairs = 0.0, 0
    sums = np.zeros((hkv, rbit))
    counts = np.zeros(hkv)
    for b, j, i, t in np.ndindex(n, m, hq, k.shape[1]):
        if not valid[b, j, t]:
            continue
        head = i // g
        hq_ = h(q[b, j, i] @ w[head])
        hk_ = h(k[b, t, head] @ w[head])
        sim += weights[b, j, i, t] * np.sum((hq_ - hk_) ** 2)
        pairs += 1
        sums[head] += hq_ + hk_
        counts[head] += 1
    expected = {
        "similarity": 0.01 * sim / pairs,
        "balance": np.sum((sums / counts[:, None] / rbit) ** 2),
        "decorrelation": 2.0 * np.sqrt(sum(np.sum((w[x].T @ w[x] - np.eye(rbit)) ** 2) for x in range(hkv))),
    }
    for name, value in expected.items():
        assert float(terms[name]) == pytest.approx(value, rel=2e-4), name
    assert float(total) == pytest.approx(sum(expected.values()), rel=2e-4)


def test_hashattention_loss_matches_pair_by_pair_numpy(rng):
    q, k, valid, scores = _batch(rng, g=2, seq=9)
    n, m, hq, d = q.shape
    hkv = k.shape[2]
    selector = HashAttentionObjective(bits=8, hidden=16, top_k=3, pos_weight=20.0)
    params = selector.init(jax.random.PRNGKey(int(rng.integers(1 << 30))), hq, hkv, d)
    params["threshold"] = jnp.asarray(rng.standard_normal(hq), jnp.float32)
    targets = np.asarray(selector.targets(jnp.asarray(scores), jnp.asarray(valid)[:, :, None]))
    assert np.all(targets.sum(-1) == 3)
    loss, terms = selector.loss(params, {"q": jnp.asarray(q), "k": jnp.asarray(k), "targets": jnp.asarray(targets),
                                         "valid": jnp.asarray(valid)})
    cq = np.tanh(np.asarray(mlp_apply(params["query"], jnp.asarray(q)), np.float64))
    ck = np.tanh(np.asarray(mlp_apply(params["key"], jnp.asarray(k)), np.float64))
    threshold = np.asarray(params["threshold"], np.float64)
    total, count = 0.0, 0
    for b, j, i, t in np.ndindex(n, m, hq, k.shape[1]):
        if valid[b, j, t]:
            z = cq[b, j, i] @ ck[b, t, i // (hq // hkv)] - threshold[i]
            y = targets[b, j, i, t]
            total += 20 * y * np.log1p(np.exp(-z)) + (1 - y) * np.log1p(np.exp(z))
            count += 1
    assert float(loss) == pytest.approx(total / count, rel=1e-4)
    assert float(terms["bce"]) == float(loss)


def test_hashattention_training_scores_are_the_selectors(rng):
    """The scores recall is measured with are the ones decoding selects by
    (:class:`hata_jax.selectors.HashAttentionSelector`, from packed key codes)."""
    m, s, hq, hkv, d = 3, 11, 6, 2, 16
    objective = HashAttentionObjective(bits=32, hidden=16)
    params = objective.init(jax.random.PRNGKey(int(rng.integers(1 << 30))), hq, hkv, d)
    q = jnp.asarray(rng.standard_normal((m, hq, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((s, hkv, d)), jnp.float32)
    selector = HashAttentionSelector(bits=32)
    keys = jnp.swapaxes(k, 0, 1)[None]  # [1, Hkv, S, D]
    state = selector.init_state(params, keys, jnp.array([s]))
    decoded = selector.token_scores(params, state, q[None], keys, jnp.full((1, m), s - 1))  # [1, Hkv, m, S]
    np.testing.assert_array_equal(np.asarray(objective.scores(params, q, k)), np.swapaxes(np.asarray(decoded[0]), 0, 1))
