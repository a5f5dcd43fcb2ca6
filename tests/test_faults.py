"""Fault injection, as a hostile or careless user would: flipped and truncated checkpoint files,
NaN weights and hyper-parameters, torn records, retrained weights under an old path, SIGINT in
training and in evaluation, and bad command-line values. Each case ends refused with a clear
one-line message, or recovered with the results of an uninterrupted run (README "What you can
rely on"). Everything runs on a tiny random Llama (3 layers, 2 KV heads, D 64)."""
from __future__ import annotations

import dataclasses
import importlib
import json
import math
import shutil
import signal

import jax.numpy as jnp
import numpy as np
import pytest
from test_models_llama import HF_CONFIGS, random_tensors
from test_models_loaders import write_hf_checkpoint
from test_train_collect import tiny_model, tiny_training_inputs

from hata_jax import checks
from hata_jax.cli import main as cli
from hata_jax.evaluation import harness
from hata_jax.models.config import LlamaConfig
from hata_jax.models.hash_projections import hash_weights_for, load_hash_weights
from hata_jax.models.load import load_model
from hata_jax.train import checkpoint
from hata_jax.train import projections as weights
from hata_jax.train.collect import CollectConfig
from hata_jax.train.hata_objective import HataObjective
from hata_jax.train.run import train_model
from hata_jax.train.trainer import TrainConfig

COLLECT = CollectConfig(seq_len=30, sequences=2, queries=4)
SELECTOR = HataObjective(rbit=32)
# 2 layers (1, 2) of 4 steps, saved every 2 steps: global steps 2, 4 (layer 1 done), 6, 8 (done).
TRAIN = TrainConfig.for_selector(SELECTOR, steps=4, batch_keys=0, save_every=2)


def quiet(message: str) -> None:
    pass


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(tmp dir, model, tokenizer, corpus, the finished reference run's directory)."""
    tmp = tmp_path_factory.mktemp("faults")
    model, _, tokenizer, text = tiny_training_inputs(tmp)
    train(model, tokenizer, text, tmp / "reference")
    return tmp, model, tokenizer, text, tmp / "reference"


def train(model, tokenizer, text, out, **kw):
    kw.setdefault("samples_dir", out.parent / "samples")  # one collection shared by every run
    return train_model(model, "tiny", tokenizer, out, corpus=text, selector=kw.pop("selector", SELECTOR),
                       collect_config=COLLECT, train_config=kw.pop("train_config", TRAIN), dense_layers=1,
                       progress=False, log=kw.pop("log", quiet), **kw)


def data_files(step_dir):
    """The orbax data files of a step's state, largest first."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    return sorted(files, key=lambda p: p.stat().st_size, reverse=True)


def flip(path, count: int = 16) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.fixture(autouse=True)
def sigint_raises_keyboard_interrupt():
    """These tests send real SIGINTs: make them raise KeyboardInterrupt even where the runner
    inherited SIGINT ignored (a job started in the background by a non-interactive shell)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def interrupt_at(layer_step):
    """An on_step that sends this process a real SIGINT at (layer, steps done)."""
    def on_step(layer, done):
        if (layer, done) == layer_step:
            signal.raise_signal(signal.SIGINT)
    return on_step


# ------------------------------------------------------------------------------ checkpoints

@pytest.mark.parametrize("damage", [flip, truncate])
def test_a_damaged_checkpoint_is_refused_in_one_line(setup, tmp_path, damage, capsys):
    tmp, model, _, _, reference = setup
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint.find_step_dir(reference), broken)
    damage(data_files(broken)[0])
    with pytest.raises(ValueError, match=r"checkpoint .*broken is corrupt") as err:
        checkpoint.load_projections(broken, model, 32)
    assert "\n" not in str(err.value) and len(str(err.value)) < 500
    if damage is flip:  # the bytes still decode: only the digest tells
        assert "does not match its recorded sha256 digest" in str(err.value)
    assert "absl" not in capsys.readouterr().err


@pytest.mark.parametrize("damage", [flip, truncate])
def test_resume_falls_back_to_the_newest_intact_checkpoint(setup, tmp_path, damage):
    tmp, model, tokenizer, text, reference = setup
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(model, tokenizer, text, out, on_step=interrupt_at((2, 3)))
    run_dir = out / "checkpoints"
    assert sorted(int(p.name) for p in run_dir.iterdir() if p.name.isdigit()) == [4, 6]
    damage(data_files(run_dir / "6")[0])
    messages = []
    train(model, tokenizer, text, out, resume=True, log=messages.append)
    assert any("checkpoint step 6" in m and "is corrupt" in m for m in messages)
    assert "resuming from checkpoint step 4, the newest intact one" in messages
    assert (tmp_path / "run" / "checkpoints.corrupt" / "6").is_dir()  # set aside, for inspection
    resumed, expected = (checkpoint.load_projections(d, model, 32) for d in (out, reference))
    for layer in expected:
        np.testing.assert_array_equal(resumed[layer], expected[layer])


def test_sigint_during_training_then_resume_gives_the_uninterrupted_weights(setup, tmp_path):
    tmp, model, tokenizer, text, reference = setup
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(model, tokenizer, text, out, on_step=interrupt_at((1, 3)))
    train(model, tokenizer, text, out, resume=True)
    resumed, expected = (checkpoint.load_projections(d, model, 32) for d in (out, reference))
    for layer in expected:
        np.testing.assert_array_equal(resumed[layer], expected[layer])


def test_nan_is_refused_at_save_and_at_load(setup, tmp_path, monkeypatch):
    tmp, model, _, _, reference = setup
    run = checkpoint.TrainingRun(tmp_path / "run")
    nan = {"layers": {"layer_02": np.full((2, 64, 32), np.nan, np.float32)}}
    with pytest.raises(ValueError, match=r"refusing to save checkpoint step 1 .*: array layers/layer_02 holds 4096 "
                                         r"non-finite values of 4096"):
        run.save(1, nan, {"format": checkpoint.FORMAT})
    assert run.latest_step() is None
    # A NaN written by something else (digests consistent with it) is refused at load.
    monkeypatch.setattr(checkpoint, "check_finite", lambda tree, what: None, raising=True)
    metadata = checkpoint.read_metadata(checkpoint.find_step_dir(reference))
    run.save(8, {"layers": {"layer_01": nan["layers"]["layer_02"], "layer_02": nan["layers"]["layer_02"]}}, metadata)
    run.close()
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"is corrupt: array layers/layer_01 holds 4096 non-finite values"):
        checkpoint.load_projections(tmp_path / "run", model, 32)


def test_training_stops_at_the_first_non_finite_loss(setup, tmp_path):
    tmp, model, tokenizer, text, _ = setup

    @dataclasses.dataclass(frozen=True)
    class Diverging(HataObjective):
        def loss(self, params, batch):
            loss, terms = super().loss(params, batch)
            return loss * jnp.nan, terms

    selector = Diverging(rbit=32)
    config = TrainConfig.for_selector(selector, steps=4, batch_keys=0, save_every=2)
    with pytest.raises(ValueError, match=r"training diverged in layer 1 at step 1 of 4 .*loss terms \{'loss': nan"):
        train(model, tokenizer, text, tmp_path / "run", selector=selector, train_config=config)
    assert checkpoint.TrainingRun(tmp_path / "run" / "checkpoints").latest_step() is None


@pytest.mark.parametrize("field, value, match", [
    ("learning_rate", math.nan, "learning_rate must be a finite float > 0, got nan"),
    ("learning_rate", -0.1, "learning_rate must be a finite float > 0"),
    ("learning_rate", math.inf, "learning_rate must be a finite float > 0"),
    ("momentum", 1.5, r"momentum must be a float in \[0, 1\), got 1.5"),
    ("weight_decay", math.nan, "weight_decay must be a finite float >= 0"),
    ("steps", 0, "steps must be an int >= 1, got 0"),
    ("seed", -1, "seed must be an int >= 0"),
])
def test_bad_hyper_parameters_are_refused(field, value, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{field: value})


# ----------------------------------------------------------------------- projections (npz)

def test_nan_or_damaged_npz_projections_are_refused(tmp_path, rng):
    good = rng.standard_normal((2, 64, 32)).astype(np.float32)
    bad = good.copy()
    bad[1, 5, 7] = np.nan
    np.savez(tmp_path / "nan.npz", layer_1=good, layer_2=bad)
    with pytest.raises(ValueError, match=r"nan.npz: layer 2 holds 1 non-finite values of 4096 \(first nan at index "
                                         r"\[1, 5, 7\]\)"):
        load_hash_weights(tmp_path / "nan.npz")
    config = LlamaConfig.from_hf(HF_CONFIGS["llama-gqa"])
    from hata_jax import HataConfig
    from hata_jax.models.plan import AttentionPlan

    plan = AttentionPlan.uniform(config.num_layers, "hata", HataConfig(rbit=32), dense_layers=1)
    with pytest.raises(ValueError, match="hash weights of layer 2 holds 1 non-finite"):
        hash_weights_for(config, plan, {2: bad})
    np.savez(tmp_path / "good.npz", layer_1=good)
    for damage in (flip, truncate):
        shutil.copy(tmp_path / "good.npz", tmp_path / "damaged.npz")
        damage(tmp_path / "damaged.npz")
        with pytest.raises(ValueError, match=r"damaged.npz is not a readable .npz of projections"):
            load_hash_weights(tmp_path / "damaged.npz")


def test_hash_weights_that_are_neither_a_checkpoint_nor_an_npz(setup, tmp_path):
    _, model, _, _, _ = setup
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(ValueError, match="notes.txt is a file, but neither an .npz of projections nor a checkpoint"):
        weights.hash_weights_for_generate(str(tmp_path / "notes.txt"), "tiny", model, 32)
    (tmp_path / "fake.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="fake.npz is not a readable .npz"):
        weights.hash_weights_for_generate(str(tmp_path / "fake.npz"), "tiny", model, 32)


def test_shipped_projections_are_found_by_fingerprint_not_by_name(setup, monkeypatch):
    tmp, model, _, _, reference = setup
    monkeypatch.setattr(weights, "SHIPPED", {"tinymodel": "x"})
    monkeypatch.setattr(weights, "shipped_weights", lambda name: checkpoint.find_step_dir(reference))
    messages = []
    got = weights.hash_weights_for_generate(None, "/any/path/model.gguf", model, 32, log=messages.append)
    assert sorted(got) == [1, 2] and "trained hash projections shipped for tiny (layers 1..2, rbit 32)" in messages
    assert weights.hash_weights_for_generate(None, "tinymodel", model, 64, log=messages.append) is None
    assert "the shipped tiny hash projections have rbit 32, not 64: not used" in messages[-1]
    other, _ = tiny_model(np.random.default_rng(1))
    assert weights.hash_weights_for_generate(None, "tinymodel", other, 32) is None  # same name, other weights


def test_array_coercion_helpers():
    assert checks.as_array([[1, 2], [3, 4]], "w").dtype == jnp.float32
    assert checks.as_array([3, 5], "lengths", "int").dtype == jnp.int32
    with pytest.raises(ValueError, match="w must be an array of floats, got list of dtype <U1"):
        checks.as_array(["a"], "w")
    with pytest.raises(ValueError, match="lengths must be an integer array, got dtype float"):
        checks.as_array([1.5], "lengths", "int")
    with pytest.raises(ValueError, match=r"scale must be a positive float or None \(1/sqrt\(D\)\), got str 'a'"):
        checks.check_scale("a")
    with pytest.raises(ValueError, match="scale must be a finite float > 0 or None"):
        checks.check_scale(float("nan"))
    with pytest.raises(ValueError, match=r"w holds 1 non-finite values of 3 \(first inf at index \[2\]\)"):
        checks.check_finite(jnp.array([1.0, 2.0, jnp.inf]), "w")


# --------------------------------------------------------------------------------- evaluation

EVAL = ["--methods", "dense,hata", "--budgets", "8", "--tasks", "niah_single", "--lengths", "160", "--samples", "3",
        "--batch", "2", "--rbit", "32", "--dense-layers", "1", "--perplexity-sequences", "1", "--metric-prompts", "0",
        "--no-progress"]


@pytest.fixture(scope="module")
def eval_model(tmp_path_factory):
    """(HF checkpoint dir of a tiny random Llama, an .npz of its hata projections rbit 32)."""
    rng = np.random.default_rng(0)
    directory = tmp_path_factory.mktemp("eval")
    cfg = HF_CONFIGS["llama-gqa"]
    write_hf_checkpoint(directory / "ckpt", cfg, random_tensors(cfg, rng))
    np.savez(directory / "w.npz", **{f"layer_{i}": rng.standard_normal((2, 64, 32)).astype(np.float32)
                                     for i in range(3)})
    return directory / "ckpt", directory / "w.npz"


def test_sigint_and_a_torn_record_during_eval_then_resume_give_the_same_results(eval_model, tmp_path, monkeypatch,
                                                                                capsys):
    ckpt, w = eval_model
    args = ["eval", "--model", str(ckpt), "--hash-weights", str(w), *EVAL]
    assert cli.main(args + ["--out", str(tmp_path / "a")]) == 0
    reference = json.loads((tmp_path / "a" / "results.json").read_text())

    calls = []
    original = harness.generate_from

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)
        return original(*a, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(harness, "generate_from", interrupted)
        assert cli.main(args + ["--out", str(tmp_path / "b")]) == 130
    assert "interrupted; the same command continues where it stopped" in capsys.readouterr().err
    records = tmp_path / "b" / "records.jsonl"
    assert len(records.read_text().splitlines()) == 4  # batch 1 x (dense, hata)
    # Summarizing now would average over 2 of 3 prompts: refused.
    assert cli.main(args + ["--out", str(tmp_path / "b"), "--parts", ""]) == 2
    err = capsys.readouterr().err
    assert ("refusing to summarize incomplete results: task (2 units missing: dense niah_single length 160: indices "
            "[2]; hata budget 8 niah_single length 160: indices [2]); run --parts tasks to compute them") in err
    # A crash in the middle of writing the last record.
    data = records.read_bytes()
    records.write_bytes(data[: len(data) - 40])
    with pytest.warns(UserWarning, match="its last line was cut short"):
        assert cli.main(args + ["--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "records.jsonl.torn").read_bytes().endswith(b"\n")
    resumed = json.loads((tmp_path / "b" / "results.json").read_text())
    for key in ("scores", "perplexity", "attention"):
        assert resumed[key] == reference[key]
    lines = records.read_text().splitlines()
    assert all(json.loads(line) for line in lines) and len(lines) == 3 * 2 + 2  # tasks + perplexity, none lost


@pytest.mark.parametrize("cut", [1, 10, 57, -2, -1])
def test_a_record_torn_at_any_byte_is_moved_aside_and_the_next_one_starts_a_new_line(tmp_path, cut):
    records = harness.Records(tmp_path)
    make = lambda i: {"kind": "task", "task": "t", "length": 8, "index": i, "digest": "d", "method": "dense",  # noqa: E731
                      "budget": None, "score": 1.0}
    records.add(make(0))
    records.add(make(1))
    data = (tmp_path / "records.jsonl").read_bytes()
    first = data.index(b"\n") + 1
    (tmp_path / "records.jsonl").write_bytes(data[: first + (cut % (len(data) - first))])
    with pytest.warns(UserWarning, match="moved it to .*records.jsonl.torn"):
        records = harness.Records(tmp_path)
    assert sorted(r["index"] for r in records.by_key.values()) == [0]
    records.add(make(2))
    assert [r["index"] for r in map(json.loads, (tmp_path / "records.jsonl").read_text().splitlines())] == [0, 2]
    (tmp_path / "records.jsonl").write_bytes(b'{"broken\n' + (tmp_path / "records.jsonl").read_bytes())
    with pytest.raises(ValueError, match=r"records.jsonl line 1 is not a record, and it is not the last line"):
        harness.Records(tmp_path)


def test_an_evaluation_identifies_its_projections_by_content(eval_model, tmp_path, monkeypatch, rng):
    ckpt, w = eval_model
    model, tokenizer = load_model(ckpt)
    config = harness.EvalConfig(methods=("dense", "hata"), budgets=(8,), tasks=("niah_single",), lengths=(160,),
                                samples=1, batch=1, perplexity_sequences=0, metric_prompts=0, dense_layers=1, rbit=32)
    retrained = tmp_path / "weights" / "w.npz"
    retrained.parent.mkdir()
    shutil.copy(w, retrained)

    def run(path):
        return harness.run_eval(model, str(ckpt), tokenizer, config, tmp_path / "out", hash_weights=path,
                                progress=False, log=quiet, parts=())

    run(retrained)
    monkeypatch.chdir(tmp_path)
    run("weights/w.npz")  # the same weights by another path: accepted
    run(w)  # a copy elsewhere: accepted
    np.savez(retrained, **{f"layer_{i}": rng.standard_normal((2, 64, 32)).astype(np.float32) for i in range(3)})
    with pytest.raises(ValueError, match=r"used other settings \(\{'hata_params_sha256'"):
        run(retrained)  # retrained into the same path: refused


# ------------------------------------------------------------------------------ command line

@pytest.mark.parametrize("argv, match", [
    (["generate", "--prompt", "hi", "--temperature", "nan"], r"temperature must be a finite float >= 0 .*got nan"),
    (["generate", "--prompt", "hi", "--mesh", "0"], "--mesh must be >= 1"),
    (["generate", "--prompt", "hi", "--num-processes", "2"], "--num-processes and --process-id need --coordinator"),
    (["generate", "--prompt", ""], "--prompt must not be empty"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["generate", "--prompt", "hi", "--tokens-per-dispatch", "0"], "--tokens-per-dispatch must be >= 1, got 0"),
    (["generate", "--prompt", "hi", "--offload"], "--offload needs --attention hata"),
    (["generate", "--prompt", "hi", "--attention", "hata", "--offload", "--temperature", "0.5"],
     r"--offload needs --temperature 0 \(greedy\)"),
    (["generate", "--prompt", "hi", "--rows", "4"], "--rows goes with --offload"),
    (["generate", "--prompt", "hi", "--prefill-chunk", "8"],
     r"--prefill-chunk goes with --offload or with --mesh N \(N > 1\) --mesh-split positions"),
    (["generate", "--prompt", "hi", "--mesh", "2", "--prefill-chunk", "8"],
     r"--prefill-chunk goes with --offload or with --mesh N \(N > 1\) --mesh-split positions"),
    (["generate", "--prompt", "hi", "--mesh", "2", "--mesh-split", "positions", "--prefill-chunk", "0"],
     "--prefill-chunk must be >= 1, got 0"),
    (["generate", "--prompt", "hi", "--attention", "hata", "--offload", "--prefill-chunk", "0"],
     "--prefill-chunk must be >= 1, got 0"),
    (["eval", "--out", ""], "--out must name a directory, got an empty string"),
    (["eval", "--out", "{file}"], "--out .*notes.txt: is a file, expected a directory"),
    (["eval", "--out", "{file}/sub"], r"--out .*notes.txt/sub: cannot write there \(Not a directory\)"),
    (["train", "--out", "{tmp}/run", "--lr", "nan"], "TrainConfig.learning_rate must be a finite float > 0, got nan"),
    (["train", "--out", "{tmp}/run", "--steps", "0"], "TrainConfig.steps must be an int >= 1, got 0"),
    (["demo", "--synthetic", "--context", "0"], "--context must be >= 1"),
    (["demo", "--context", "0"], "--context must be >= 1"),
])
def test_bad_command_line_values_are_refused_before_loading_anything(argv, match, tmp_path, capsys, monkeypatch):
    (tmp_path / "notes.txt").write_text("x")
    argv = [a.format(file=tmp_path / "notes.txt", tmp=tmp_path) for a in argv]
    if argv[0] != "demo":
        argv += ["--model", str(tmp_path / "no-such-model")]  # never reached
    for command in ("generate", "evaluate", "train"):  # each command imports load_model itself
        monkeypatch.setattr(f"hata_jax.cli.{command}.load_model", lambda *a, **k: pytest.fail("loaded a model"))
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert __import__("re").search(match, err), err


def test_generate_checks_cache_capacity_before_allocating(eval_model, tmp_path, capsys):
    ckpt, w = eval_model
    base = ["generate", "--model", str(ckpt), "--prompt", "w1 w2", "--no-chat"]
    assert cli.main(base + ["--max-new-tokens", "1000000000"]) == 2
    err = capsys.readouterr().err
    assert "a KV cache of 1000000128 tokens per sequence (prompt + max_new_tokens" in err and "GiB" in err
    (tmp_path / "notes.txt").write_text("x")
    assert cli.main(base + ["--attention", "hata", "--hash-weights", str(tmp_path / "notes.txt")]) == 2
    assert "neither an .npz of projections nor a checkpoint" in capsys.readouterr().err


def test_a_corrupt_checkpoint_on_the_command_line_is_one_line(setup, eval_model, tmp_path, capsys, monkeypatch):
    ckpt, _ = eval_model
    _, model, _, _, reference = setup
    broken = tmp_path / "broken"
    shutil.copytree(reference, broken)
    flip(data_files(checkpoint.find_step_dir(broken))[0])
    tokenizer = load_model(ckpt)[1]
    monkeypatch.setattr("hata_jax.cli.generate.load_model", lambda *a, **k: (model, tokenizer))  # the run's own model
    argv = ["generate", "--model", "tiny", "--prompt", "w1", "--no-chat", "--attention", "hata", "--rbit", "32",
            "--dense-layers", "1", "--budget", "4", "--max-new-tokens", "1", "--hash-weights", str(broken)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("hata-jax generate: error: checkpoint ") and "is corrupt: array layers/layer_0" in err[-1]
    assert not any("absl" in line or "Traceback" in line for line in err)


def test_loki_calibrations_carry_digests_and_refuse_damage(setup, tmp_path, monkeypatch, rng):
    sp = importlib.import_module("hata_jax.train.selector_params")
    _, model, _, _, _ = setup
    monkeypatch.setenv("HATA_JAX_CACHE", str(tmp_path))
    bases = [rng.standard_normal((2, 64, 64)).astype(np.float32) for _ in range(3)]
    monkeypatch.setattr(sp, "_calibrate_loki", lambda *a: bases)
    assert all(np.array_equal(a, b) for a, b in zip(sp.loki_bases(model, tokenizer=object()), bases))
    path = sp.loki_cache_path(model)
    monkeypatch.setattr(sp, "_calibrate_loki", lambda *a: pytest.fail("recalibrated"))
    assert all(np.array_equal(a, b) for a, b in zip(sp.loki_bases(model), bases))  # from the cache, verified
    with np.load(path) as data:
        arrays = dict(data)
    arrays["layer_1"] = arrays["layer_1"] * 2  # another basis under the old digests
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=r"cached calibration .* is corrupt: array layer_1 does not match its recorded "
                                         r"sha256 digest .*; delete it to recalibrate"):
        sp.loki_bases(model)
    truncate(path)
    with pytest.raises(ValueError, match=r"cached calibration .* is corrupt \(.*\); delete it to recalibrate"):
        sp.loki_bases(model)
    path.unlink()
    monkeypatch.setattr(sp, "_calibrate_loki", lambda *a: [b * np.nan for b in bases])
    with pytest.raises(ValueError, match="loki: the calibrated bases: array layer_0 holds 8192 non-finite"):
        sp.loki_bases(model, tokenizer=object())
    assert not path.exists()
