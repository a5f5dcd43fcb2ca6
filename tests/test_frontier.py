"""The selectors' accuracy-cost frontier: selection bytes per token of each plan, the Pareto front,
the table and the plot."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import SESSION_SEED

from hata_jax import HataConfig
from hata_jax.evaluation import frontier
from hata_jax.models import AttentionPlan

# SmolLM2-135M: 3 KV heads of 64 dimensions; 2048 tokens, budget 128 (1/16).
LENGTH, BUDGET, KV_HEADS, HEAD_DIM = 2048, 128, 3, 64


def _bytes(method, hata=HataConfig(budget=BUDGET), **options):
    plan = AttentionPlan.for_method(30, method, hata, selector_options=options)
    return frontier.selection_bytes_per_token(plan, LENGTH, KV_HEADS, HEAD_DIM)


def test_selection_bytes_per_token_of_each_method():
    assert _bytes("dense") is None
    assert _bytes("hata") == _bytes("simhash") == _bytes("hata", HataConfig(budget=BUDGET, score="key_norm")) == 20
    assert _bytes("hata", HataConfig(rbit=256, budget=BUDGET)) == 36
    # two-stage: the codes of every token plus the keys of 4 x 128 candidates, spread over 2048 tokens
    assert _bytes("hata", HataConfig(budget=BUDGET, candidates=4)) == _bytes("hata_rerank", candidates=4) == 20 + 32
    assert _bytes("exact") == 2 * HEAD_DIM
    assert _bytes("loki") == 64 and _bytes("loki", channels=8) == 16
    assert _bytes("quest_authors") == _bytes("quest") == 16 and _bytes("quest_authors", page_size=8) == 32
    assert _bytes("hashattention") == _bytes("hashattention_authors") == 4
    assert _bytes("streaming") == 0
    with pytest.raises(ValueError, match="length must be >= 1"):
        frontier.selection_bytes_per_token(AttentionPlan.for_method(3, "hata"), 0, KV_HEADS, HEAD_DIM)
    with pytest.raises(ValueError, match="kv_heads must be an int >= 1"):
        frontier.selection_bytes_per_token(AttentionPlan.for_method(3, "loki"), LENGTH, 0, HEAD_DIM)


def _brute_front(costs, scores):
    on = []
    for i in range(len(costs)):
        dominated = False
        for j in range(len(costs)):
            better_or_equal = costs[j] <= costs[i] and scores[j] >= scores[i]
            if j != i and better_or_equal and (costs[j], scores[j]) != (costs[i], scores[i]):
                dominated = True
        on.append(not dominated)
    return on


@pytest.mark.parametrize("points", [3, 12, 40])
def test_pareto_front_matches_brute_force(points):
    rng = np.random.default_rng([SESSION_SEED, points])
    costs = rng.integers(0, 6, points).astype(float).tolist()  # few values: ties in cost and score
    scores = rng.integers(0, 5, points).astype(float).tolist()
    assert frontier.pareto_front(costs, scores) == _brute_front(costs, scores)
    assert any(frontier.pareto_front(costs, scores))


def test_pareto_front_cases_and_errors():
    assert frontier.pareto_front([0, 20, 64, 128], [10, 53, 50, 55]) == [True, True, False, True]
    assert frontier.pareto_front([4, 4], [7, 7]) == [True, True]  # equal points stay on it
    assert frontier.pareto_front([], []) == []
    with pytest.raises(ValueError, match="one entry per point"):
        frontier.pareto_front([1, 2], [1])


def _rows():
    rows = [{"method": m, "budget": b, "fraction": f"1/{LENGTH // b}", "score": s, "ci95": [s - 4, s + 4],
             "selection_bytes": c}
            for m, c, s, b in (("hata", 20, 53.2, 128), ("loki", 64, 50.0, 128), ("exact", 128, 54.7, 128),
                               ("streaming", 0, 12.0, 128), ("hata", 20, 46.7, 64), ("exact", 128, 53.7, 64))]
    for budget in (128, 64):
        group = [r for r in rows if r["budget"] == budget]
        for r, on in zip(group, frontier.pareto_front([r["selection_bytes"] for r in group],
                                                      [r["score"] for r in group])):
            r["on_front"] = on
    return rows


def test_frontier_table_and_plot(tmp_path):
    rows = _rows()
    table = frontier.frontier_table(rows).splitlines()
    assert table[0].startswith("| budget | method | selection bytes / token") and "tokens/s" not in table[0]
    assert table[2] == "| 64 (1/32) | hata | 20 | 46.7 [42.7, 50.7] | yes |"
    assert "| 128 (1/16) | loki | 64 | 50.0 [46.0, 54.0] |  |" in table
    assert table.index("| 128 (1/16) | streaming | 0 | 12.0 [8.0, 16.0] | yes |") == 4  # cheapest first
    rows[0]["tokens_per_s"] = 1234.4
    timed = frontier.frontier_table(rows)
    assert "| tokens/s |" in timed and "| 1234 |" in timed and "| yes | - |" in timed
    path = tmp_path / "frontier.png"
    frontier.frontier_plot(rows, path, "SmolLM2", dense_score=55.4)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
