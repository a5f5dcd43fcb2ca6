"""Orbax checkpoints of a whole (tiny) training run: loading for use, refusing another model,
unfinished runs and corrupt or missing files; hash weights for `generate`."""
from __future__ import annotations

import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from test_train_collect import tiny_model, tiny_training_inputs

from hata_jax.models import model_from_tensors
from hata_jax.train import checkpoint
from hata_jax.train.collect import CollectConfig
from hata_jax.train.hashattention_objective import HashAttentionObjective
from hata_jax.train.hata_objective import HataObjective
from hata_jax.train.projections import hash_weights_for_generate, shipped_weights
from hata_jax.train.run import train_model
from hata_jax.train.trainer import TrainConfig

COLLECT = CollectConfig(seq_len=30, sequences=2, queries=4)


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished HATA run (rbit 32, layers 1..2) of a tiny random Llama, and that model's tensors."""
    tmp = tmp_path_factory.mktemp("run")
    model, tensors, tokenizer, text = tiny_training_inputs(tmp)
    selector = HataObjective(rbit=32)
    train_model(model, "tiny", tokenizer, tmp / "out", corpus=text, selector=selector, collect_config=COLLECT,
                train_config=TrainConfig.for_selector(selector, steps=3, batch_keys=0), dense_layers=1,
                progress=False, log=lambda message: None)
    return tmp, model, tensors, tokenizer, text


def test_a_finished_run_loads_from_any_of_its_directories(trained_run, monkeypatch):
    tmp, model, tensors, _, _ = trained_run
    weights = checkpoint.load_projections(tmp / "out", model, 32)
    assert sorted(weights) == [1, 2] and all(w.shape == (2, 64, 32) and w.dtype == np.float32 for w in weights.values())
    step_dir = checkpoint.find_step_dir(tmp / "out")
    monkeypatch.chdir(tmp)
    for path in (tmp / "out" / "checkpoints", step_dir, "out"):  # relative paths too
        again = checkpoint.load_projections(path, model)
        for layer in weights:
            np.testing.assert_array_equal(again[layer], weights[layer])
    metadata = checkpoint.read_metadata(step_dir)
    assert metadata["complete"] and metadata["layers"] == [1, 2] and metadata["dense_layers"] == 1
    assert metadata["model"]["architecture"]["num_kv_heads"] == 2 and metadata["rbit"] == 32
    assert metadata["training"]["steps"] == 3 and metadata["collection"]["seq_len"] == 30
    assert metadata["corpus"]["name"] == "files" and metadata["corpus"]["files"]
    assert set(metadata["metrics"]["layer_02"]) >= {"loss_first_step", "loss_last_step", "train_mass_1_16_end",
                                                    "seconds"}
    # the same weights loaded in bfloat16 are the same model
    bf16 = model_from_tensors(model.config, tensors, dtype=jnp.bfloat16)
    assert sorted(checkpoint.load_projections(tmp / "out", bf16)) == [1, 2]


def test_another_model_is_refused(trained_run, rng):
    tmp, model, tensors, _, _ = trained_run
    other_arch, _ = tiny_model(rng, "llama-linear")
    differs = r"another model \(tiny\): the architecture differs \(vocab_size: 97 there, 61 here; .*num_heads: 6 there"
    with pytest.raises(ValueError, match=differs + r", 4 here"):
        checkpoint.load_projections(tmp / "out", other_arch)
    changed = dict(tensors)
    changed["model.layers.2.self_attn.k_proj.weight"] = tensors["model.layers.2.self_attn.k_proj.weight"] * 1.5
    with pytest.raises(ValueError, match="same architecture, but the q/k projection weights differ"):
        checkpoint.load_projections(tmp / "out", model_from_tensors(model.config, changed))
    with pytest.raises(ValueError, match="rbit 32 projections, but rbit 128 was asked for"):
        checkpoint.load_projections(tmp / "out", model, 128)
    with pytest.raises(ValueError, match="holds hata weights, not hashattention"):
        checkpoint.load_trained(tmp / "out", model, "hashattention")


def test_corrupt_or_missing_files_are_clear_errors(trained_run, tmp_path):
    tmp, model, _, _, _ = trained_run
    with pytest.raises(ValueError, match="no such file or directory"):
        checkpoint.load_projections(tmp_path / "nope", model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no hata-jax checkpoint in"):
        checkpoint.load_projections(tmp_path / "empty", model)
    step = checkpoint.find_step_dir(tmp / "out")
    broken = tmp_path / "broken"
    shutil.copytree(step, broken)
    (broken / "metadata" / "metadata").write_text("{not json")
    with pytest.raises(ValueError, match="is corrupt or incomplete: cannot read .*metadata"):
        checkpoint.load_projections(broken, model)
    shutil.rmtree(broken)
    shutil.copytree(step, broken)
    (broken / "metadata" / "metadata").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="is not a hata-jax/selector-checkpoint checkpoint"):
        checkpoint.load_projections(broken, model)
    shutil.rmtree(broken)
    shutil.copytree(step, broken)
    shutil.rmtree(broken / "state")
    with pytest.raises(ValueError, match="corrupt or incomplete: cannot read its state"):
        checkpoint.load_projections(broken, model)
    shutil.rmtree(broken)
    shutil.copytree(step, broken)
    for data in (broken / "state").rglob("*"):
        if data.is_file() and data.parent.name == "d":
            data.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt"):
        checkpoint.load_projections(broken, model)


def test_an_unfinished_run_is_refused_until_resumed(trained_run, tmp_path):
    tmp, model, _, tokenizer, text = trained_run
    selector = HashAttentionObjective(bits=8, hidden=16, top_k=4)
    config = TrainConfig.for_selector(selector, steps=4, batch_keys=0, save_every=2)

    def stop(layer, done):
        if (layer, done) == (2, 3):
            raise Stop

    kw = dict(corpus=text, selector=selector, collect_config=COLLECT, train_config=config, dense_layers=1,
              samples_dir=tmp / "out" / "samples", progress=False, log=lambda message: None)  # the HATA run's samples
    with pytest.raises(Stop):
        train_model(model, "tiny", tokenizer, tmp_path / "out", on_step=stop, **kw)
    with pytest.raises(ValueError, match=r"did not finish \(stopped in layer 2 at step 2\).*--resume"):
        checkpoint.load_trained(tmp_path / "out", model, "hashattention")
    with pytest.raises(ValueError, match="already holds a training run; pass --resume"):
        train_model(model, "tiny", tokenizer, tmp_path / "out", **kw)
    train_model(model, "tiny", tokenizer, tmp_path / "out", resume=True, **kw)
    params, metadata = checkpoint.load_trained(tmp_path / "out", model, "hashattention")
    assert sorted(params) == [1, 2] and params[2]["query"]["w2"].shape == (6, 16, 8)
    assert metadata["selector"]["config"] == {"bits": 8, "hidden": 16, "top_k": 4, "pos_weight": 20.0}


def test_hash_weights_for_generate(trained_run, tmp_path, rng):
    tmp, model, _, _, _ = trained_run
    messages = []
    weights = hash_weights_for_generate(str(tmp / "out"), "tiny", model, 32, log=messages.append)
    assert sorted(weights) == [1, 2] and "trained hash projections from" in messages[0]
    np.savez(tmp_path / "w.npz", layer_2=rng.standard_normal((2, 64, 32)).astype(np.float32))
    assert sorted(hash_weights_for_generate(str(tmp_path / "w.npz"), "tiny", model, 32)) == [2]
    assert hash_weights_for_generate(None, "tiny", model, 32) is None
    with pytest.raises(ValueError, match="rbit 32 projections, but rbit 64"):
        hash_weights_for_generate(str(tmp / "out"), "tiny", model, 64)


@pytest.mark.skipif(shipped_weights("smollm2") is None, reason="no shipped SmolLM2 weights in this checkout")
def test_shipped_smollm2_weights_describe_their_training():
    """(test_train_cli runs `generate --model smollm2 --attention hata`, which loads and checks them.)"""
    metadata = checkpoint.read_metadata(shipped_weights("smollm2"))
    assert metadata["complete"] and metadata["layers"] == list(range(2, 30)) and metadata["rbit"] == 128
    assert metadata["model"]["name"] == "smollm2" and metadata["model"]["architecture"]["num_kv_heads"] == 3
    assert metadata["collection"] == {"seq_len": 4096, "sequences": 8, "queries": 32, "seed": 0}
    assert metadata["training"]["steps"] == 300 and metadata["corpus"]["name"] == "python-stdlib/train"
    assert metadata["version"] == 2 and sorted(metadata["digests"]) == [f"layers/layer_{i:02d}" for i in range(2, 30)]
    state = checkpoint.read_state(shipped_weights("smollm2"))  # verified against those digests
    assert sorted(state["layers"]) == [f"layer_{i:02d}" for i in range(2, 30)]
