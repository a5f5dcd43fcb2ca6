"""The evaluation harness (models.eval): task generators and scoring, perplexity, attention
metrics, resumable runs, report and plots, the `eval` CLI and the demo's wiring; on a tiny random
Llama with a word-level tokenizer, and a byte-level tokenizer where the prompt text must survive."""
from __future__ import annotations

import collections
import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SESSION_SEED
from test_models_llama import HF_CONFIGS, random_tensors
from test_models_loaders import CHATML, bytes_to_unicode, write_hf_checkpoint

from hata_jax import HataConfig
from hata_jax.cli import evaluate as eval_cli
from hata_jax.cli import main as cli
from hata_jax.evaluation import attention_metrics, harness, perplexity, report, tasks
from hata_jax.models import AttentionPlan, Tokenizer, load_model

pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")

RBIT = 32
# A run small enough for the CPU: 3 prompts in batches of 2 (the last one padded), one budget.
TINY_RUN = dict(methods=("dense", "hata", "quest"), budgets=(8,), tasks=("niah_single",), lengths=(160,), samples=3,
                batch=2, perplexity_sequences=1, metric_prompts=1, metric_queries=4, dense_layers=1, rbit=RBIT)


def byte_tokenizer() -> Tokenizer:
    """Byte-level: one token per byte (decodes back to the exact text), ChatML template."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    vocab = {c: i for i, c in enumerate(sorted(bytes_to_unicode().values()))}
    backend = Backend(models.BPE(vocab=vocab, merges=[], fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|im_start|>", "<|im_end|>")])
    return Tokenizer(backend=backend, bos_id=None, stop_ids=(257,), chat_template=CHATML)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint dir, model, word tokenizer, .npz of hata projections rbit 32)."""
    rng = np.random.default_rng(SESSION_SEED)
    directory = tmp_path_factory.mktemp("eval")
    cfg = HF_CONFIGS["llama-gqa"]
    write_hf_checkpoint(directory / "ckpt", cfg, random_tensors(cfg, rng))
    model, tokenizer = load_model(directory / "ckpt")
    shape = (cfg["num_key_value_heads"], cfg["head_dim"], RBIT)
    np.savez(directory / "w.npz", **{f"layer_{i}": rng.standard_normal(shape).astype(np.float32)
                                     for i in range(cfg["num_hidden_layers"])})
    return directory / "ckpt", model, tokenizer, directory / "w.npz"


# ------------------------------------------------------------------------------------- tasks

def prompt_text(sample: tasks.Sample, tokenizer) -> str:
    return tokenizer.decode(sample.tokens, skip_special_tokens=False)


@pytest.mark.parametrize("task", list(tasks.TASKS))
def test_task_samples_fit_the_length_and_hold_their_answers(task):
    tokenizer = byte_tokenizer()
    for length, index in ((2600, 0), (4001, 1)):
        sample = tasks.make_sample(task, tokenizer, length, index, seed=SESSION_SEED % 1000)
        # The haystack grows by whole units (a sentence is at most 250 bytes here) up to the length.
        assert length - 260 <= len(sample.tokens) <= length
        text = prompt_text(sample, tokenizer)
        assert text.startswith("<|im_start|>user\n") and "<|im_start|>assistant\n" in text
        answer_turn = text.split("<|im_start|>assistant\n")[1]
        assert answer_turn and not any(a in answer_turn for a in sample.answers)  # the prefix gives nothing away
        body = text.split("<|im_start|>assistant\n")[0]
        for answer in sample.answers:
            assert answer in body
        check_task_semantics(task, body, sample.answers)
        assert sample.max_new_tokens == tasks.TASKS[task].max_new_tokens


def check_task_semantics(task: str, body: str, answers: tuple[str, ...]) -> None:
    if task.startswith("niah"):
        needles = re.findall(r"One of the special magic numbers for (\S+) is: (\d+)\.", body)
        expected = {"niah_single": (1, 1), "niah_multikey": (4, 1), "niah_multivalue": (4, 4),
                    "niah_multiquery": (2, 2)}[task]
        assert (len(needles), len(answers)) == expected
        question = body.split("\n")[-2]
        for key, value in needles:  # the question names exactly the keys of the expected answers
            assert (key in question) == (value in answers)
    elif task == "variable_tracking":
        value = re.search(r"assigned the value (\d+)", body).group(1)
        assert f"VAR {answers[0]} = {value}." in body
        for a, b in zip(answers, answers[1:]):
            assert body.index(f"VAR {a} =") < body.index(f"VAR {b} = VAR {a}.")
    elif task == "common_words":
        counts = collections.Counter(re.findall(r"\d+\. ([a-z]+)", body))
        assert set(answers) == {w for w, _ in counts.most_common(len(answers))}
        assert min(counts[a] for a in answers) > max(c for w, c in counts.items() if w not in answers)
    elif task == "frequent_words":
        text = body.split("coded words.\n")[1].split("\nQuestion")[0]
        counts = collections.Counter(text.split())
        ranked = sorted(counts, key=lambda w: -counts[w])
        assert [counts[a] for a in answers] == [counts[w] for w in ranked[:3]]


def test_samples_are_deterministic_and_differ_by_index_and_seed():
    tokenizer = byte_tokenizer()
    a = tasks.make_sample("niah_multikey", tokenizer, 900, 2, seed=7)
    assert a == tasks.make_sample("niah_multikey", tokenizer, 900, 2, seed=7)
    assert a.digest == tasks.make_sample("niah_multikey", tokenizer, 900, 2, seed=7).digest
    assert a.tokens != tasks.make_sample("niah_multikey", tokenizer, 900, 3, seed=7).tokens
    assert a.tokens != tasks.make_sample("niah_multikey", tokenizer, 900, 2, seed=8).tokens
    assert a.digest != tasks.make_sample("niah_multikey", tokenizer, 900, 3, seed=7).digest


def test_sample_errors():
    tokenizer = byte_tokenizer()
    with pytest.raises(ValueError, match="unknown task"):
        tasks.make_sample("qa", tokenizer, 1000, 0)
    with pytest.raises(ValueError, match="empty haystack"):
        tasks.make_sample("niah_single", tokenizer, 50, 0)
    with pytest.raises(ValueError, match="common_words: its text runs out"):
        tasks.make_sample("common_words", tokenizer, 10**6, 0)


def test_score_is_the_share_of_answers_found():
    assert tasks.score(" 1234567.", ["1234567"]) == 1.0
    assert tasks.score("The numbers: 111, 333", ["111", "222", "333"]) == pytest.approx(2 / 3)
    assert tasks.score("VAR abcde and XYZQW", ["ABCDE", "XYZQW", "QQQQQ", "RRRRR"]) == 0.5  # case-insensitive
    assert tasks.score("", ["x"]) == 0.0


# ------------------------------------------------------------------------------------- metrics

def plans(num_layers: int, budget: int, methods=("hata", "quest", "exact", "streaming", "loki")):
    hata = HataConfig(rbit=RBIT, budget=budget)
    return {m: AttentionPlan.for_method(num_layers, m, hata, "reference", dense_layers=1) for m in methods}


def random_params(model, method: str, rng) -> list | None:
    """Params of the methods that need them: a projection (hata), an orthonormal basis (loki)."""
    c = model.config
    if method == "hata":
        return [jnp.asarray(rng.standard_normal((c.num_kv_heads, c.head_dim, RBIT)), jnp.float32)
                for _ in range(c.num_layers)]
    if method == "loki":
        return [jnp.asarray(np.linalg.qr(rng.standard_normal((c.num_kv_heads, c.head_dim, c.head_dim)))[0],
                            jnp.float32) for _ in range(c.num_layers)]
    return None


def test_perplexity_with_a_budget_over_the_length_equals_dense(tiny, rng):
    _, model, _, _ = tiny
    tokens = rng.integers(0, model.config.vocab_size, (2, 45))
    dense = perplexity.sequence_nll(model, tokens, AttentionPlan.for_method(model.config.num_layers, "dense"))
    assert dense.shape == (2,) and np.all(dense > 0)
    for method, plan in plans(model.config.num_layers, 64).items():
        np.testing.assert_allclose(perplexity.sequence_nll(model, tokens, plan, random_params(model, method, rng)),
                                   dense, rtol=2e-5, err_msg=method)
    streaming = plans(model.config.num_layers, 4, ("streaming",))["streaming"]
    assert not np.allclose(perplexity.sequence_nll(model, tokens, streaming), dense, rtol=1e-3)
    assert perplexity.perplexity(float(dense.sum()), 2 * (45 - perplexity.scored_start(45))) > 1


def test_heldout_sequences(tiny):
    _, _, tokenizer, _ = tiny
    seqs = perplexity.heldout_sequences(tokenizer, 64, 2, seed=3)
    assert seqs.shape == (2, 64) and seqs.dtype == np.int32
    np.testing.assert_array_equal(seqs, perplexity.heldout_sequences(tokenizer, 64, 2, seed=3))


def test_attention_metrics(tiny, rng):
    _, model, _, _ = tiny
    t = 67
    tokens = rng.integers(0, model.config.vocab_size, t)
    positions = attention_metrics.query_positions(t, 6, seed=int(rng.integers(1000)))
    assert positions[-1] == t - 1 and len(set(positions.tolist())) == 6 and positions.min() >= t // 2
    inputs = attention_metrics.capture_attention_inputs(model, tokens, positions)
    assert len(inputs) == model.config.num_layers
    q, k, v = inputs[1]
    assert q.shape == (1, 6, 6, 64) and k.shape == v.shape == (1, 2, t, 64)
    # Every selecting layer (1 and 2): full budget -> all the mass, no error.
    for method, plan in plans(model.config.num_layers, t).items():
        out = attention_metrics.plan_metrics(plan, random_params(model, method, rng), inputs, positions)
        assert out["layers"] == [1, 2]
        np.testing.assert_allclose(out["mass"], 1.0, rtol=1e-5, err_msg=method)
        np.testing.assert_allclose(out["error"], 0.0, atol=1e-5, err_msg=method)
    # Small budget: exact top-k keeps the most mass; every method loses some.
    small = {m: attention_metrics.plan_metrics(plan, random_params(model, m, rng), inputs, positions)
             for m, plan in plans(model.config.num_layers, 6).items()}
    for method, out in small.items():
        assert all(0 < m < 1 for m in out["mass"]) and all(e > 0 for e in out["error"]), method
        assert all(e >= x - 1e-6 for e, x in zip(small["exact"]["mass"], out["mass"])), method


# ------------------------------------------------------------------------------------- harness

def counting(monkeypatch, module, name: str, counter: collections.Counter, fail_after: int | None = None):
    """Wrap module.name to count its calls (and raise KeyboardInterrupt on call number fail_after + 1)."""
    original = getattr(module, name)

    def wrapped(*args, **kwargs):
        if fail_after is not None and counter[name] >= fail_after:
            raise KeyboardInterrupt
        counter[name] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


def results_of(document: dict) -> dict:
    return {key: document[key] for key in ("scores", "perplexity", "attention")}


def test_interrupted_run_resumes_skips_done_work_and_ends_with_the_same_results(tiny, tmp_path, monkeypatch):
    ckpt, model, tokenizer, weights = tiny
    config = harness.EvalConfig(**TINY_RUN)

    def run(directory):
        return harness.run_eval(model, str(ckpt), tokenizer, config, directory, hash_weights=weights,
                                progress=False, log=lambda message: None)

    reference = run(tmp_path / "a")
    scores = {(r["task"], r["method"], r["budget"]): r for r in reference["scores"]}
    assert set(scores) == {(t, m, b) for t in ("niah_single", "average") for m, b in config.configs}
    assert all(r["samples"] == 3 for k, r in scores.items() if k[0] != "average")
    assert [r["method"] for r in reference["perplexity"]] == ["dense", "hata", "quest"]
    assert [(r["method"], r["layers"]) for r in reference["attention"]] == [("hata", [1, 2]), ("quest", [1, 2])]
    assert json.loads((tmp_path / "a" / "results.json").read_text())["scores"] == reference["scores"]

    calls = collections.Counter()
    with monkeypatch.context() as patch:  # interrupted at the 4th generation: batch 2's first method
        counting(patch, harness, "generate_from", calls, fail_after=3)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "b")
    lines = (tmp_path / "b" / "records.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 3  # batch 1 (2 prompts) x 3 methods, written as each finished

    calls.clear()
    for module, name in ((harness, "prefill_prompts"), (harness, "generate_from"),
                         (harness.attention_metrics, "capture_attention_inputs"), (harness.perplexity, "sequence_nll")):
        counting(monkeypatch, module, name, calls)
    resumed = run(tmp_path / "b")
    assert calls == {"prefill_prompts": 1, "generate_from": 3, "capture_attention_inputs": 1, "sequence_nll": 3}
    assert results_of(resumed) == results_of(reference)
    by_key = lambda path: {harness.unit_key(r): {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
                           for r in map(json.loads, path.read_text().splitlines())}
    assert by_key(tmp_path / "b" / "records.jsonl") == by_key(tmp_path / "a" / "records.jsonl")

    calls.clear()
    assert results_of(run(tmp_path / "b")) == results_of(reference)
    assert sum(calls.values()) == 0  # everything was done

    # More samples and another budget extend the run: only the new units run.
    more = harness.EvalConfig(**{**TINY_RUN, "samples": 4, "methods": ("dense", "quest"), "perplexity_sequences": 0,
                                 "metric_prompts": 0})
    document = harness.run_eval(model, str(ckpt), tokenizer, more, tmp_path / "b", hash_weights=weights,
                                progress=False, log=lambda message: None)
    assert calls == {"prefill_prompts": 1, "generate_from": 2}
    assert {r["samples"] for r in document["scores"] if r["task"] != "average"} == {4}


def test_parts_run_separately_end_with_the_same_results(tiny, tmp_path, monkeypatch):
    """Tasks in one call, attention and perplexity in another (as on two machines, records merged
    by file): each call runs only its parts, and the results equal one call's."""
    ckpt, model, tokenizer, weights = tiny
    config = harness.EvalConfig(**TINY_RUN)

    def run(directory, parts=harness.PARTS):
        return harness.run_eval(model, str(ckpt), tokenizer, config, directory, hash_weights=weights,
                                progress=False, log=lambda message: None, parts=parts)

    reference = run(tmp_path / "a")
    calls = collections.Counter()
    for module, name in ((harness, "generate_from"), (harness.attention_metrics, "capture_attention_inputs"),
                         (harness.perplexity, "sequence_nll")):
        counting(monkeypatch, module, name, calls)
    only_tasks = run(tmp_path / "b", ("tasks",))
    assert set(calls) == {"generate_from"} and not only_tasks["perplexity"] and not only_tasks["attention"]
    calls.clear()
    run(tmp_path / "c", ("attention", "perplexity"))
    assert set(calls) == {"capture_attention_inputs", "sequence_nll"}
    with open(tmp_path / "b" / "records.jsonl", "a") as f:
        f.write((tmp_path / "c" / "records.jsonl").read_text())
    calls.clear()
    assert results_of(run(tmp_path / "b", ())) == results_of(run(tmp_path / "b")) == results_of(reference)
    assert sum(calls.values()) == 0
    with pytest.raises(ValueError, match="parts must be"):
        run(tmp_path / "d", ("tasks", "speed"))


def test_a_run_directory_refuses_other_settings_and_other_prompts(tiny, tmp_path):
    ckpt, model, _, _ = tiny
    config = harness.EvalConfig(**TINY_RUN)
    harness.open_run(tmp_path, model, str(ckpt), config)
    with pytest.raises(ValueError, match="other settings.*dense_layers"):
        harness.open_run(tmp_path, model, str(ckpt), harness.EvalConfig(**{**TINY_RUN, "dense_layers": 2}))
    harness.open_run(tmp_path, model, str(ckpt), config, {"hata_params_sha256": "abc"})  # hata joins the run
    with pytest.raises(ValueError, match=r"other settings.*hata_params_sha256.*\('abc', 'def'\)"):
        harness.open_run(tmp_path, model, str(ckpt), config, {"hata_params_sha256": "def"})
    records = harness.open_run(tmp_path, model, str(ckpt), config)
    records.add({"kind": "task", "task": "niah_single", "length": 160, "index": 0, "digest": "abc", "method": "dense",
                 "budget": None, "score": 1.0})
    with (tmp_path / "records.jsonl").open("a") as f:
        f.write('{"kind": "task", "task": "niah_si')  # a line cut short by a kill
    with pytest.warns(UserWarning, match="its last line was cut short"):
        records = harness.Records(tmp_path)
    assert records.done("task", "niah_single", 160, 0, "dense", None, "abc")
    assert not records.done("task", "niah_single", 160, 1, "dense", None, "abc")
    with pytest.raises(ValueError, match="other prompts"):
        records.done("task", "niah_single", 160, 0, "dense", None, "xyz")


def test_a_run_made_before_the_score_setting_is_a_key_norm_run(tiny, tmp_path):
    ckpt, model, _, _ = tiny
    config = harness.EvalConfig(**TINY_RUN)  # the default score, asymmetric
    harness.open_run(tmp_path, model, str(ckpt), config)
    key_norm = harness.EvalConfig(**{**TINY_RUN, "score": "key_norm"})
    with pytest.raises(ValueError, match=r"other settings.*'score': \('asymmetric', 'key_norm'\)"):
        harness.open_run(tmp_path, model, str(ckpt), key_norm)
    run_json = tmp_path / "run.json"  # a run made before the score setting: its HATA used key_norm
    document = json.loads(run_json.read_text())
    del document["settings"]["score"]
    run_json.write_text(json.dumps(document))
    harness.open_run(tmp_path, model, str(ckpt), key_norm)
    with pytest.raises(ValueError, match=r"other settings.*'score': \('key_norm', 'asymmetric'\)"):
        harness.open_run(tmp_path, model, str(ckpt), config)


def test_eval_config_errors():
    with pytest.raises(ValueError, match="unknown methods"):
        harness.EvalConfig(methods=("dense", "magic"))
    with pytest.raises(ValueError, match="unknown tasks"):
        harness.EvalConfig(tasks=("qa",))
    with pytest.raises(ValueError, match="budgets"):
        harness.EvalConfig(budgets=(0,))
    with pytest.raises(ValueError, match="sink"):
        harness.EvalConfig(budgets=(8,), sink=6, recent=6)
    with pytest.raises(ValueError, match="HataConfig.score must be one of"):
        harness.EvalConfig(score="dot")
    assert harness.EvalConfig(methods=("quest", "dense"), budgets=(8, 16)).configs == [
        ("quest", 8), ("quest", 16), ("dense", None)]
    for name in ("candidates", "loki_channels", "quest_page_size"):
        with pytest.raises(ValueError, match=f"EvalConfig.{name} must be an int >= 1"):
            harness.EvalConfig(**{name: 0})


def test_eval_config_sets_the_selectors_options():
    config = harness.EvalConfig(candidates=2, loki_channels=8, quest_page_size=32, rbit=64)
    assert config.plan(4, "loki", 16).selector.channels == 8
    assert config.plan(4, "quest", 16).selector.page_size == 32
    assert config.plan(4, "quest_authors", 16).selector.page_size == 32
    assert config.plan(4, "hata_rerank", 16).selector.candidates == 2
    assert config.plan(4, "simhash", 16).selector.rbit == 64
    defaults = harness.EvalConfig()
    assert defaults.plan(4, "loki", 16).selector.channels == 32
    assert defaults.plan(4, "quest", 16).selector.page_size == 16


def test_report_table_and_plots(tmp_path):
    config = harness.EvalConfig(**{**TINY_RUN, "budgets": (8, 16), "tasks": ("niah_single", "frequent_words")})
    rng = np.random.default_rng(SESSION_SEED)
    records = []
    for method, budget in config.configs:
        for task in config.tasks:
            for index in range(config.samples):
                records.append({"kind": "task", "task": task, "length": 160, "index": index, "method": method,
                                "budget": budget, "score": float(rng.integers(0, 2))})
        records.append({"kind": "perplexity", "length": 160, "index": 0, "method": method, "budget": budget,
                        "nll": float(rng.uniform(100, 200)), "tokens": 80})
        for task in config.tasks if method != "dense" else ():  # summarize refuses a configuration missing units
            records.append({"kind": "attention", "task": task, "length": 160, "index": 0, "method": method,
                            "budget": budget, "layers": [1, 2], "mass": rng.uniform(0, 1, 2).tolist(),
                            "error": rng.uniform(0, 1, 2).tolist()})
    document = harness.summarize(records, config, {"name": "tiny"})
    average = {(r["method"], r["budget"]): r["score"] for r in document["scores"] if r["task"] == "average"}
    for method, budget in config.configs:
        mine = [r["score"] for r in records if r["kind"] == "task" and (r["method"], r["budget"]) == (method, budget)]
        assert average[method, budget] == pytest.approx(100 * np.mean(mine))
    for row in document["scores"]:  # the interval holds the mean and lies within [0, 100]
        low, high = row["ci95"]
        assert 0 <= low <= row["score"] <= high <= 100
    table = report.format_table(document)
    ci = next(r["ci95"] for r in document["scores"] if (r["task"], r["method"]) == ("average", "dense"))
    assert "avg 95% CI" in table and f"[{ci[0]:.1f}, {ci[1]:.1f}]" in table
    for text in ("niah-1", "fwe", "avg", "dense", "hata", "quest", "8 (1/20)", "16 (1/10)", "perplexity",
                 "mass recall", "output error", "layers (1..2)"):
        assert text in table, text
    dense_ppl = next(r["perplexity"] for r in document["perplexity"] if r["method"] == "dense")
    assert f"{dense_ppl:.3f}" in table
    written = report.write_report(document, tmp_path)
    assert [p.name for p in written] == ["scores_160.png", "attention_160.png"]
    assert all(p.stat().st_size > 10_000 for p in written)


def test_bootstrap_ci_against_a_plain_resampling():
    """Known cases: constant scores give a zero-width interval; one task of n Bernoulli prompts
    gives about the binomial interval; the average's interval is narrower than a single task's."""
    rng = np.random.default_rng(SESSION_SEED)
    assert harness.bootstrap_ci([np.ones(7)]) == [100.0, 100.0]
    values = (rng.random(400) < 0.3).astype(np.float64)
    low, high = harness.bootstrap_ci([values])
    p, half = values.mean(), 1.96 * np.sqrt(values.mean() * (1 - values.mean()) / values.size)
    assert abs(low - 100 * (p - half)) < 1.0 and abs(high - 100 * (p + half)) < 1.0
    tasks = [(rng.random(50) < 0.5).astype(np.float64) for _ in range(4)]
    one = harness.bootstrap_ci(tasks[:1])
    four = harness.bootstrap_ci(tasks)
    assert four[1] - four[0] < one[1] - one[0]
    assert four[0] <= 100 * np.mean([t.mean() for t in tasks]) <= four[1]


# ------------------------------------------------------------------------------------- CLI

def test_cli_parses_eval_and_demo_arguments():
    parser = cli.build_parser()
    args = parser.parse_args(["eval", "--methods", "dense,hata,quest", "--budgets", "128,256", "--tasks",
                              "niah_single,common_words", "--lengths", "4096", "--out", "x", "--no-progress"])
    assert args.methods == ("dense", "hata", "quest") and args.budgets == (128, 256) and args.lengths == (4096,)
    assert args.tasks == ("niah_single", "common_words") and args.samples == 20 and args.dense_layers == 2
    options = parser.parse_args(["eval", "--out", "x", "--loki-channels", "8", "--quest-page-size", "32"])
    assert options.loki_channels == 8 and options.quest_page_size == 32
    defaults = parser.parse_args(["eval", "--out", "x"])
    assert defaults.loki_channels == 32 and defaults.quest_page_size == 16
    assert defaults.methods is None and defaults.budgets == (128, 256, 512) and defaults.tasks == tuple(tasks.TASKS)
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--out", "x", "--budgets", "128,abc"])
    demo = parser.parse_args(["demo"])
    assert not demo.synthetic and demo.context is None and demo.out is None


def test_cli_eval_end_to_end(tiny, tmp_path, capsys):
    ckpt, _, _, weights = tiny
    out = tmp_path / "run"
    args = ["eval", "--model", str(ckpt), "--methods", "dense,hata,quest", "--budgets", "8", "--tasks", "niah_single",
            "--lengths", "160", "--samples", "3", "--batch", "2", "--out", str(out), "--hash-weights", str(weights),
            "--rbit", str(RBIT), "--dense-layers", "1", "--perplexity-sequences", "1", "--metric-prompts", "1",
            "--metric-queries", "4", "--no-progress"]
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    assert "context 160: score" in captured.out and "perplexity" in captured.out and "mass recall" in captured.out
    assert "wrote" in captured.err
    for name in ("run.json", "records.jsonl", "results.json", "scores_160.png", "attention_160.png"):
        assert (out / name).stat().st_size > 0, name
    assert cli.main(args) == 0  # resumed: all done, same table
    assert capsys.readouterr().out == captured.out
    assert json.loads((out / "run.json").read_text())["settings"]["quest_page_size"] == 16
    assert cli.main(args + ["--quest-page-size", "8"]) == 2  # another page size is another run
    assert "'quest_page_size': (16, 8)" in capsys.readouterr().err
    elsewhere = [str(tmp_path / "empty") if a == str(out) else a for a in args]
    assert cli.main(elsewhere + ["--parts", ""]) == 0  # only summarizes: nothing run, nothing recorded
    assert not (tmp_path / "empty" / "records.jsonl").exists()

    assert cli.main(args[:4] + ["dense,magic"] + args[5:]) == 2
    assert "unknown methods ['magic']" in capsys.readouterr().err
    assert cli.main(args[:4] + ["dense,hashattention"] + args[5:]) == 2
    assert "needs --hashattention" in capsys.readouterr().err


def test_demo_runs_a_small_smollm2_evaluation(monkeypatch):
    seen = {}

    def fake_evaluate(args, *, out, keep=True, **fields):
        seen.update(fields, model=args.model, keep=keep, out=out)
        return 0

    monkeypatch.setattr(eval_cli, "evaluate", fake_evaluate)
    assert cli.main(["demo"]) == 0
    assert seen["model"] == "smollm2" and not seen["keep"]
    assert {"dense", "hata"} <= set(seen["methods"]) and len(seen["methods"]) >= 3
    assert seen["lengths"] == eval_cli.DEMO["lengths"] and seen["budgets"] == eval_cli.DEMO["budgets"]
    assert cli.main(["demo", "--context", "1024", "--budgets", "32", "64", "--out", "d"]) == 0
    assert seen["lengths"] == (1024,) and seen["budgets"] == (32, 64) and seen["out"] == "d" and seen["keep"]
