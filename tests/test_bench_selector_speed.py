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
        plan = AttentionPlan.for_method(config.num_layers, r["method"], HataConfig(budget=10))
        assert r["selection_bytes"] == selection_bytes_per_token(plan, 160, config.num_kv_heads, config.head_dim)
    assert small_run["settings"]["small"] and small_run["environment"]["backend"] == "cpu"


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
