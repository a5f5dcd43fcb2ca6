"""Several decode steps per host dispatch (`tokens_per_dispatch`): one jitted loop of the decode
step, the same tokens, streamed steps and short-context switch as one step per dispatch."""
from __future__ import annotations

import pytest
from test_models_llama import HF_CONFIGS, ragged_prompts, random_model
from test_models_short_context import hata_setup, stopless_checkpoint

from hata_jax.cli import main as cli
from hata_jax.models import Sampling, generate, generate_from, prefill_prompts
from hata_jax.models.generation import dispatch_sizes


def kept(tokens: list[list[int]], stops) -> list[int]:
    """Tokens each row keeps out of a run without stop ids when `stops` end the rows."""
    return [next((i for i, t in enumerate(row) if t in stops), len(row)) for row in tokens]


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(temperature=2.0, top_p=0.9)], ids=["greedy", "sampled"])
def test_chunks_give_the_tokens_of_single_steps(rng, sampling):
    """n = 3 and 4 steps per dispatch give n = 1's tokens and on_tokens calls: 10 decode steps (not
    a multiple of n), the first 5 dense (the switch to HATA, budget 6, falls inside a chunk of n),
    without stop ids, with one that ends rows at different steps, and with stops ending every row
    early (the chunk dispatched past the end is dropped)."""
    model, plan, weights = hata_setup(rng, "llama-gqa", budget=6)
    prefilled = prefill_prompts(model, ragged_prompts(rng, 97, [5, 11, 8]), capacity=32, hash_weights=weights)

    def run(n: int, stops=()):
        streamed = []
        result = generate_from(prefilled, plan, max_new_tokens=11, stop_ids=stops, sampling=sampling, seed=5,
                               on_tokens=streamed.append, dense_below=16, tokens_per_dispatch=n)
        return result, streamed

    free, _ = run(1)
    assert free.dense_steps == 5 and all(len(row) == 11 for row in free.tokens)  # steps over 12, ..., 16 tokens
    split = next(({t} for t in free.tokens[0][1:] if len(set(kept(free.tokens, {t}))) > 1), None)
    assert split is not None, free.tokens
    early = {free.tokens[row][row + 2] for row in range(3)}  # row r ends by its step r + 2
    for stops in ((), split, early):
        single, single_stream = run(1, stops)
        assert [len(row) for row in single.tokens] == kept(free.tokens, stops)
        for n in (3, 4):
            result, stream = run(n, stops)
            assert result.tokens == single.tokens and stream == single_stream, (n, stops)
            if not stops:
                assert result.dense_steps == 5


def test_dispatches_compile_two_sizes_per_step_function(rng, fresh_traces):
    """9 decode steps in chunks of 4: dispatches of 4, 4 and 1 steps, one trace of the loop and one
    of the single step, none on a second generation of the same shapes; the timings count the
    steps after the first dispatch of each size."""
    assert dispatch_sizes(10, 5, 4) == [(4, True), (1, True), (4, False), (1, False)]
    assert dispatch_sizes(9, 0, 4) == [(4, False)] * 2 + [(1, False)]
    assert dispatch_sizes(3, 3, 1) == [(1, True)] * 3
    model, _ = random_model(HF_CONFIGS["llama-gqa"], rng)
    first = generate(model, ragged_prompts(rng, 97, [4, 9]), max_new_tokens=10, tokens_per_dispatch=4)
    assert fresh_traces["decode_chunk"] == 1 and fresh_traces["decode"] == 1
    assert all(len(row) == 10 for row in first.tokens)
    assert first.decode_steps == 4 and first.decode_seconds > 0 and first.tokens_per_second > 0
    generate(model, ragged_prompts(rng, 97, [6, 3]), max_new_tokens=10, tokens_per_dispatch=4)
    assert fresh_traces["decode_chunk"] == 1 and fresh_traces["decode"] == 1


def test_bad_tokens_per_dispatch(rng):
    model, _ = random_model(HF_CONFIGS["qwen2-tied"], rng)
    for bad in (0, -2, 2.0, True, None):
        with pytest.raises(ValueError, match=f"tokens_per_dispatch must be a positive int, got {bad!r}"):
            generate(model, [[1, 2]], max_new_tokens=2, tokens_per_dispatch=bad)


def test_cli_tokens_per_dispatch(tmp_path, rng, capsys):
    args = ["generate", "--model", stopless_checkpoint(tmp_path / "ckpt", rng), "--prompt", "hello world", "--no-chat",
            "--max-new-tokens", "8"]  # all 8 tokens come
    assert cli.main(args) == 0
    single = capsys.readouterr()
    assert cli.main(args + ["--tokens-per-dispatch", "3"]) == 0
    chunked = capsys.readouterr()
    assert chunked.out == single.out
    # 7 decode steps: dispatches of 3, 3 and 1 steps; the tokens/s count the second dispatch's 3
    assert "8 new tokens" in chunked.err and "tokens/s over 3 steps (3 steps per dispatch)" in chunked.err
    assert "tokens/s over 6 steps" in single.err and "per dispatch" not in single.err
