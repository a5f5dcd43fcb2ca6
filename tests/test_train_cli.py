"""`hata-jax train`, `hata-jax recall` and the trained weights in `hata-jax generate`, end to end on
a tiny checkpoint (and the shipped SmolLM2 weights by default)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from test_models_llama import HF_CONFIGS, random_tensors
from test_models_loaders import write_hf_checkpoint
from test_train_collect import word_corpus

from hata_jax.cli import main as cli
from hata_jax.train import checkpoint
from hata_jax.train.projections import shipped_weights

TINY = ["--seq-len", "30", "--queries", "4", "--sequences", "2"]


def test_train_recall_generate_on_a_tiny_checkpoint(tmp_path, rng, capsys):
    cfg = HF_CONFIGS["llama-gqa"]
    write_hf_checkpoint(tmp_path / "ckpt", cfg, random_tensors(cfg, rng))
    model = str(tmp_path / "ckpt")
    train_text = str(word_corpus(tmp_path / "train_text", rng))
    heldout_text = str(word_corpus(tmp_path / "heldout_text", rng))
    out = str(tmp_path / "run")
    train = ["train", "--model", model, "--out", out, "--corpus", train_text, "--rbit", "32", "--dense-layers", "1",
             "--steps", "2", "--loss-decorrelation", "0.02", "--loss-sigma", "0.5", "--no-progress", *TINY]
    assert cli.main(train) == 0
    err = capsys.readouterr().err
    assert "collecting q/k samples: 2 sequences of 30 tokens" in err and f"--hash-weights {out}" in err
    assert "step/s" not in err  # --no-progress: no progress bars
    loss = checkpoint.read_metadata(checkpoint.find_step_dir(out))["selector"]["config"]["loss_config"]
    assert loss == {"sigma": 0.5, "eps": 0.01, "balance": 1.0, "decorrelation": 0.02}
    assert cli.main(train) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert cli.main(train + ["--resume"]) == 0  # finished: nothing left to do
    capsys.readouterr()

    recall = ["recall", "--model", model, "--hash-weights", out, "--json", str(tmp_path / "r.json"),
              "--plot", str(tmp_path / "r.png"), *TINY]
    assert cli.main(recall + ["--corpus", heldout_text]) == 0
    table = capsys.readouterr().out
    assert "exact top-k" in table and "HATA (trained)" in table and "HATA (random projections)" in table
    document = json.loads((tmp_path / "r.json").read_text())
    assert document["layers"] == [1, 2] and document["checkpoints"][out]["rbit"] == 32
    assert np.asarray(document["methods"]["exact top-k"]["per_layer"]).shape == (2, 5)
    assert (tmp_path / "r.png").stat().st_size > 0
    assert cli.main(recall + ["--corpus", train_text, "--seed", "0"]) == 2  # the training files, in training order
    assert "shares 2 files with the training text" in capsys.readouterr().err
    assert cli.main(["recall", "--model", model, "--corpus", heldout_text]) == 2
    assert "--hash-weights is required" in capsys.readouterr().err

    generate = ["generate", "--model", model, "--prompt", "hello world", "--no-chat", "--max-new-tokens", "2",
                "--attention", "hata", "--budget", "4", "--dense-layers", "1"]
    assert cli.main(generate + ["--rbit", "32", "--hash-weights", out]) == 0
    err = capsys.readouterr().err
    assert "trained hash projections from" in err and "UNTRAINED" not in err
    assert cli.main(generate + ["--rbit", "64", "--hash-weights", out]) == 2
    assert "rbit 32 projections, but rbit 64 was asked for" in capsys.readouterr().err


def test_train_loss_flags_are_checked(tmp_path, capsys):
    base = ["train", "--out", str(tmp_path / "run"), "--no-progress"]
    assert cli.main(base + ["--loss-decorrelation", "-1"]) == 2
    assert "--loss-decorrelation must be a finite float >= 0, got -1.0" in capsys.readouterr().err
    assert cli.main(base + ["--loss-sigma", "0"]) == 2
    assert "--loss-sigma must be a finite float > 0, got 0.0" in capsys.readouterr().err
    assert cli.main(base + ["--selector", "hashattention", "--loss-eps", "1", "--loss-balance", "2"]) == 2
    assert "--loss-eps, --loss-balance: for --selector hata only" in capsys.readouterr().err


@pytest.mark.skipif(shipped_weights("smollm2") is None, reason="no shipped SmolLM2 weights in this checkout")
def test_generate_smollm2_hata_uses_the_shipped_weights(capsys):
    args = ["generate", "--model", "smollm2", "--prompt", "What is the capital of France?", "--max-new-tokens", "3",
            "--attention", "hata", "--budget", "16"]
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert "trained hash projections shipped for smollm2 (layers 2..29, rbit 128)" in err
    assert "UNTRAINED" not in err
