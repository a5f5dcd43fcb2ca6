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
    return [{"method": m, "budget": b, "fraction": f"1/{LENGTH // b}", "score": s, "ci95": [s - 4, s + 4],
             "selection_bytes": c}
            for m, c, s, b in (("hata", 20, 53.2, 128), ("loki", 64, 50.0, 128), ("exact", 128, 54.7, 128),
                               ("streaming", 0, 12.0, 128), ("hata", 20, 46.7, 64), ("exact", 128, 53.7, 64))]


def test_mark_fronts_per_budget_and_speed_with_dense_competing():
    rows = _rows()
    frontier.mark_fronts(rows)
    assert [r["on_front"] for r in rows] == [True, False, True, True, True, True]
    assert not any("on_speed_front" in r for r in rows)  # nothing timed
    for r, rate in zip(rows, (150.0, 140.0, 170.0, 200.0, 160.0, 165.0)):
        r["tokens_per_s"] = rate
    frontier.mark_fronts(rows)
    # 1/16: exact (170, 54.7) beats loki (140, 50.0) and hata (150, 53.2); streaming is the fastest
    assert [r["on_speed_front"] for r in rows[:4]] == [False, False, True, True]
    assert [r["on_speed_front"] for r in rows[4:]] == [False, True]  # 1/32: exact (165, 53.7) beats hata (160, 46.7)
    frontier.mark_fronts(rows, dense={"score": 55.4, "tokens_per_s": 180.0})
    # dense, faster and better than both selectors at 1/16 and 1/32, leaves only the faster streaming
    assert [r["on_speed_front"] for r in rows] == [False, False, False, True, False, False]
    del rows[1]["tokens_per_s"]
    frontier.mark_fronts(rows, dense={"score": 55.4})  # an untimed dense does not compete
    assert "on_speed_front" not in rows[1] and rows[2]["on_speed_front"] and not rows[0]["on_speed_front"]
    with pytest.raises(ValueError, match=r"points\[1\] lacks \['score'\]"):
        frontier.mark_fronts([rows[0], {"budget": 128, "selection_bytes": 4}])
    with pytest.raises(ValueError, match="dense must hold a 'score'"):
        frontier.mark_fronts(rows, dense={"tokens_per_s": 1.0})


def test_frontier_table_and_plot(tmp_path):
    rows = _rows()
    frontier.mark_fronts(rows)
    table = frontier.frontier_table(rows).splitlines()
    assert table[0].startswith("| budget | method | selection bytes / token") and "tokens/s" not in table[0]
    assert "perplexity" not in table[0]
    assert table[2] == "| 64 (1/32) | hata | 20 | 46.7 [42.7, 50.7] | yes |"
    assert "| 128 (1/16) | loki | 64 | 50.0 [46.0, 54.0] |  |" in table
    assert table.index("| 128 (1/16) | streaming | 0 | 12.0 [8.0, 16.0] | yes |") == 4  # cheapest first
    rows[0]["tokens_per_s"], rows[0]["perplexity_vs_dense"] = 1234.4, 2.481
    frontier.mark_fronts(rows)
    timed = frontier.frontier_table(rows).splitlines()
    assert timed[0].endswith("| on the front | perplexity vs dense | tokens/s | on the speed front |")
    assert "| 128 (1/16) | hata | 20 | 53.2 [49.2, 57.2] | yes | +2.48% | 1234 | yes |" in timed
    assert "| 128 (1/16) | loki | 64 | 50.0 [46.0, 54.0] |  | - | - | |" in timed
    for dense in (None, {"1/16": {"score": 55.4, "tokens_per_s": 2000.0}, "1/32": {"score": 55.4}}):
        path = tmp_path / f"frontier_{dense is None}.png"
        frontier.frontier_plot(rows, path, "SmolLM2", dense=dense)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
