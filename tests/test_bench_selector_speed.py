"""bench.selector_speed: every method's decode step and per-layer attention (a small CPU run), random
selector params that each selector accepts, and the limits that skip configs."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest

from bench import check_kernels, selector_speed
from hata_jax import HataConfig
from hata_jax.evaluation.frontier import selection_bytes_per_token
from hata_jax.models import AttentionPlan
from hata_jax.models.plan import METHODS
from hata_jax.models.presets import SMALL_MODELS


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("selector_speed") / "speed.json"
    assert selector_speed.main(["--out", str(out), "--small", "--models", "smollm2"]) == 0
    return json.loads(out.read_text())


def test_small_run_times_every_method(small_run):
    config = SMALL_MODELS["smollm2"]
    rows = [r for r in small_run["rows"] if r["kind"] == "method"]
    assert [r["method"] for r in rows] == list(METHODS)
    for r in rows:
        assert (r["model"], r["context"], r["batch"], r["budget"], r["fraction"]) == ("smollm2", 160, 2, 10, "1/16")
        assert r["median_ms"] > 0 and r["p10_ms"] <= r["median_ms"] <= r["p90_ms"] and r["steps"] == 2
        assert r["tokens_per_s"] == pytest.approx(2e3 / r["median_ms"])
        assert r["attention"]["median_us"] > 0
        if r["method"] == "dense":
            assert "speed_vs_dense" not in r
        else:  # the dense control timed right after the method
            assert r["dense_beside_ms"] > 0
            assert r["speed_vs_dense"] == pytest.approx(r["dense_beside_ms"] / r["median_ms"])
        plan = AttentionPlan.for_method(config.num_layers, r["method"], HataConfig(budget=10))
        assert r["selection_bytes"] == selection_bytes_per_token(plan, 160, config.num_kv_heads, config.head_dim)
    assert small_run["settings"]["small"] and small_run["environment"]["backend"] == "cpu"


def test_step_bytes_and_floor(small_run):
    config, rows = SMALL_MODELS["smollm2"], {r["method"]: r for r in small_run["rows"] if r["kind"] == "method"}
    kv, row, layers = config.num_kv_heads, config.head_dim * 2, config.num_layers
    dense_layer = 2 * 160 * row * kv * 2  # batch 2
    weights = rows["dense"]["step_bytes"] - layers * dense_layer
    assert weights > 0 and small_run["bandwidth"]["floor_gbps"] > 0
    for method in ("hata", "loki", "streaming"):
        sparse_layer = 2 * kv * (160 * rows[method]["selection_bytes"] + 10 * (2 * row + 4))
        assert rows[method]["step_bytes"] == weights + 2 * dense_layer + (layers - 2) * sparse_layer
    for r in rows.values():
        assert r["floor_ms"] == pytest.approx(r["step_bytes"] / (small_run["bandwidth"]["floor_gbps"] * 1e6))
        assert selector_speed.row_step_bytes(r, small_run["settings"]) == r["step_bytes"]


def test_speed_tables(small_run, tmp_path, capsys):
    table = selector_speed.speed_tables(small_run).splitlines()
    assert table[0] == "smollm2, 160 tokens, batch 2, budget 10 (1/16)"
    assert table[2].startswith("| method | selection B / token | step ms [p10, p90] |")
    rows = {line.split(" | ")[0][2:]: line for line in table[4:] if line.startswith("| ")}
    assert list(rows) == list(METHODS)
    assert " | - | " in rows["dense"] and "x (beside) |" in rows["hata"] and "| 20 |" in rows["simhash"]
    path = tmp_path / "speed.json"
    path.write_text(json.dumps(small_run))
    assert selector_speed.main(["--table", str(path)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("### `speed.json` (") and "\nsmollm2, 160 tokens" in printed
    with pytest.raises(SystemExit, match="needs one or more"):
        selector_speed.main(["--table"])


@pytest.mark.parametrize("method", sorted(set(METHODS) - {"dense", "hata"}))
def test_random_params_fit_each_selector(method):
    config = SMALL_MODELS["llama"]
    plan = AttentionPlan.for_method(config.num_layers, method, HataConfig(rbit=64, budget=8))
    params = selector_speed.random_selector_params(plan, jax.random.PRNGKey(0), config.num_heads,
                                                   config.num_kv_heads, config.head_dim)
    plan.selector.check_params(params, config.num_kv_heads, config.head_dim, config.num_heads)


def test_limits_skip_configs_with_the_reason(tmp_path):
    out = tmp_path / "speed.json"
    selector_speed.main(["--out", str(out), "--small", "--memory-gb", "0.000001", "--models", "smollm2"])
    [row] = json.loads(out.read_text())["rows"]
    assert row["kind"] == "skip" and row["reason"].startswith("memory: needs")
    selector_speed.main(["--out", str(out), "--small", "--time-budget", "0", "--models", "smollm2"])
    [row] = json.loads(out.read_text())["rows"]
    assert row["kind"] == "skip" and row["reason"] == "time budget spent"
    with pytest.raises(SystemExit):
        selector_speed.main(["--out", str(out), "--small", "--fractions", "400"])


@pytest.mark.parametrize("method", sorted(set(METHODS) - {"dense", "hata"}))
def test_check_kernels_selector_case_passes_in_interpret_mode(method):
    """bench.check_kernels' selector case (kernels' path against the reference path) on a ragged
    batch, GQA 3, run by Pallas' interpreter here; the GPU runs the same case compiled."""
    result = check_kernels.check_selector_attention(11, method, 2, 2, 3, 333, 64, 20, jnp.float32)
    assert result["problems"] == [] and result["rel_err"] < 1e-4
