"""The attention-mass metric against brute force and hata_jax's own selection; the recall
evaluation, its table, plot and held-out check."""
from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train_trainer import planted_collection

import hata_jax as hj
from hata_jax.train import recall
from hata_jax.train.collect import read_manifest, write_manifest
from hata_jax.train.hata_objective import HataObjective
from hata_jax.train.metrics import FRACTIONS, captured_mass, exact_scores, probs_from_raw, reranked_mass


def _problem(rng, m=3, hkv=2, g=3, length=50, integer_scores=False):
    raw = rng.standard_normal((m, hkv * g, length)).astype(np.float32) * 4
    n = rng.integers(length // 2, length + 1, m)
    valid = np.arange(length) < n[:, None]
    raw = np.where(valid[:, None], raw, -np.inf)
    probs = np.asarray(probs_from_raw(jnp.asarray(raw), 16, hkv))
    scores = rng.integers(-3, 4, (m, hkv, length)) if integer_scores else rng.standard_normal((m, hkv, length))
    return probs, scores.astype(np.float32), valid, n


def _brute_mass(probs, scores, valid, fraction):
    """Expected kept mass under a uniformly random tie-break, level by level."""
    m, hkv, g, _ = probs.shape
    out = np.zeros(m)
    for j in range(m):
        n = valid[j].sum()
        budget = max(1, math.ceil(fraction * n))
        for h in range(hkv):
            left, kept = budget, np.zeros(g)
            for level in sorted(set(scores[j, h, valid[j]].tolist()), reverse=True):
                members = np.flatnonzero(valid[j] & (scores[j, h] == level))
                take = min(left, len(members))
                kept += probs[j, h][:, members].sum(axis=-1) * take / len(members)
                left -= take
                if left == 0:
                    break
            out[j] += kept.mean() / hkv
    return out


@pytest.mark.parametrize("integer_scores", [False, True])
def test_mass_matches_brute_force_with_ties(rng, integer_scores):
    probs, scores, valid, _ = _problem(rng, integer_scores=integer_scores)
    got = captured_mass(jnp.asarray(probs), jnp.asarray(scores), jnp.asarray(valid))
    assert got.shape == (len(FRACTIONS), 3)
    for row, fraction in enumerate(FRACTIONS):
        np.testing.assert_allclose(got[row], _brute_mass(probs, scores, valid, fraction), rtol=1e-5, atol=1e-6)


def test_mass_of_hata_selection_matches_select_topk(rng):
    """Without ties the metric is the mass inside hata_jax.select_topk's tokens."""
    probs, scores, valid, n = _problem(rng, m=4)
    fraction = 1 / 8
    got = captured_mass(jnp.asarray(probs), jnp.asarray(scores), jnp.asarray(valid), (fraction,))[0]
    for j in range(4):
        budget = max(1, math.ceil(fraction * n[j]))
        idx, count = hj.select_topk(jnp.asarray(scores[j:j + 1]), budget, jnp.asarray(n[j:j + 1], jnp.int32),
                                    impl="reference")
        kept = np.mean([probs[j, h][:, np.asarray(idx[0, h, :count[0, h]])].sum(-1).mean() for h in range(2)])
        assert got[j] == pytest.approx(kept, rel=1e-5)


def test_exact_top_k_is_the_upper_bound(rng):
    probs, scores, valid, _ = _problem(rng, m=5)
    exact = captured_mass(jnp.asarray(probs), exact_scores(jnp.asarray(probs)), jnp.asarray(valid))
    other = captured_mass(jnp.asarray(probs), jnp.asarray(scores), jnp.asarray(valid))
    assert np.all(exact >= other - 1e-6)
    assert np.all(np.diff(exact, axis=0) >= -1e-6)  # more budget never keeps less
    everything = captured_mass(jnp.asarray(probs), jnp.asarray(scores), jnp.asarray(valid), (1.0,))
    np.testing.assert_allclose(everything, 1.0, rtol=1e-5)


def _brute_reranked_mass(probs, scores, valid, factor, fraction):
    """Two-stage selection query by query: candidates by score (ties to the earlier position),
    then the best `budget` by the group's softmax over the candidates (continuous data: no ties)."""
    m, hkv, g, _ = probs.shape
    out = np.zeros(m)
    for j in range(m):
        n = int(valid[j].sum())
        budget = max(1, math.ceil(fraction * n))
        for h in range(hkv):
            order = sorted(range(n), key=lambda t: (-scores[j, h, t], t))
            candidates = np.array(order[: min(factor * budget, n)])
            restricted = probs[j, h][:, candidates] / probs[j, h][:, candidates].sum(axis=1, keepdims=True)
            kept = candidates[np.argsort(-restricted.sum(axis=0))[:budget]]
            out[j] += probs[j, h][:, kept].sum() / (hkv * g)
    return out


@pytest.mark.parametrize("factor", [1, 2, 5])
def test_reranked_mass_matches_brute_force(rng, factor):
    probs, scores, valid, _ = _problem(rng, m=4, length=60)
    got = reranked_mass(jnp.asarray(probs), jnp.asarray(scores), jnp.asarray(valid), factor)
    for i, fraction in enumerate(FRACTIONS):
        np.testing.assert_allclose(got[i], _brute_reranked_mass(probs, scores, valid, factor, fraction), rtol=1e-5)


def test_reranked_mass_spans_hata_to_exact(rng):
    """Factor 1 keeps the selector's own top budget; a factor covering the whole context keeps the
    exact top-k; in between the mass never exceeds the exact top-k's."""
    probs, scores, valid, _ = _problem(rng, m=5, length=80)
    args = jnp.asarray(probs), jnp.asarray(scores), jnp.asarray(valid)
    np.testing.assert_allclose(reranked_mass(*args, 1), captured_mass(*args), rtol=1e-5)
    exact = captured_mass(args[0], exact_scores(args[0]), args[2])
    np.testing.assert_allclose(reranked_mass(*args, 80), exact, rtol=1e-5)
    assert np.all(reranked_mass(*args, 3) <= exact + 1e-6)
    with pytest.raises(ValueError, match="factor must be an int >= 1"):
        reranked_mass(*args, 0)


def test_evaluate_table_plot_and_report(tmp_path, rng):
    samples = planted_collection(tmp_path / "heldout", rng, sequences=2, length=128, queries=4)
    selector = HataObjective(rbit=32)
    w = {layer: jax.random.normal(jax.random.PRNGKey(layer), (2, 64, 32)) for layer in (1, 2)}
    methods = {recall.TRAINED: (selector, w), recall.RANDOM: (selector, {i: 0.5 * v for i, v in w.items()})}
    result = recall.evaluate(samples, [1, 2], methods, rerank=(4,))
    assert list(result["methods"]) == [recall.EXACT, recall.TRAINED, recall.RANDOM, recall.reranked_name(4)]
    for data in result["methods"].values():
        assert np.asarray(data["per_layer"]).shape == (2, len(FRACTIONS))
        np.testing.assert_allclose(data["mean"], np.mean(data["per_layer"], axis=0))
    exact = np.asarray(result["methods"][recall.EXACT]["per_layer"])
    for name in (recall.TRAINED, recall.reranked_name(4)):
        assert np.all(exact >= np.asarray(result["methods"][name]["per_layer"]) - 1e-6), name
    # sign codes do not change when the projection is scaled
    np.testing.assert_allclose(result["methods"][recall.TRAINED]["per_layer"],
                               result["methods"][recall.RANDOM]["per_layer"])
    table = recall.format_table(result)
    assert "budget 1/16" in table and "average over layers" in table and "1/64" in table and "1/4" in table
    recall.plot(result, tmp_path / "recall.png", "test")
    assert (tmp_path / "recall.png").read_bytes()[:4] == b"\x89PNG"
    checkpoints = {"run": {"selector": {"name": "hata"}, "rbit": 32, "training": {}, "collection": {},
                           "corpus": {"name": "planted", "files": [{"path": "a.txt", "sha256": "aa"}]},
                           "metrics": {"layer_01": {"seconds": 2.0}, "layer_02": {"seconds": 3.0}}}}
    document = recall.report(result, samples, checkpoints, "planted")
    recall.write_json(document, tmp_path / "recall.json")
    loaded = json.loads((tmp_path / "recall.json").read_text())
    assert loaded["checkpoints"]["run"]["train_seconds"] == 5.0 and loaded["methods"] == result["methods"]
    recall.check_heldout(samples, checkpoints)
    manifest = read_manifest(samples)
    manifest["corpus"]["files"] = [{"path": "b.txt", "sha256": "aa"}]
    write_manifest(samples, manifest)
    with pytest.raises(ValueError, match=r"shares 1 files with the training text of run \(e.g. \['b.txt'\]\)"):
        recall.check_heldout(samples, checkpoints)
