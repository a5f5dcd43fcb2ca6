"""The README's Python examples run as written and print what they say."""
import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def run_block(fence: str) -> dict:
    """Execute the README's single code block opened by ```<fence>; returns its globals."""
    [block] = re.findall(rf"```{fence}\n(.*?)```", README.read_text(), flags=re.S)
    scope: dict = {}
    exec(compile(block, str(README), "exec"), scope)
    return scope


def test_api_example_runs(capsys):
    scope = run_block("python")
    out, cache = scope["out"], scope["cache"]
    assert out.shape == (2, 32, 128)
    assert np.isfinite(np.asarray(out, np.float32)).all()
    np.testing.assert_array_equal(np.asarray(cache.lengths), [3001, 1235])
    assert "(2, 32, 128) [3001 1235]" in capsys.readouterr().out


def test_bring_your_own_model_example_runs(capsys):
    scope = run_block("py")
    caches, x = scope["caches"], scope["x"]
    assert np.isfinite(np.asarray(x)).all()
    for cache in caches:
        np.testing.assert_array_equal(np.asarray(cache.lengths), [303, 203])
    assert "[303 203]" in capsys.readouterr().out


def test_sharding_example_runs(capsys):
    """The explicit-mesh example (a 1x1 mesh here): the cache keeps its batch-and-head layout."""
    scope = run_block("python3")
    assert np.isfinite(np.asarray(scope["out"])).all()
    np.testing.assert_array_equal(np.asarray(scope["cache"].lengths), [101, 61])
    assert "P('data', 'model', None, None) [101  61]" in capsys.readouterr().out


def test_sequence_sharding_example_runs(capsys):
    """The sequence-sharded example (a one-device mesh here; several devices: tests/test_sequence_sharding.py)."""
    scope = run_block("python title=sequence")
    assert np.isfinite(np.asarray(scope["out"])).all()
    np.testing.assert_array_equal(np.asarray(scope["cache"].lengths), [301, 171])
    assert "[301 171]" in capsys.readouterr().out


def _model_example(fence: str, budget: int) -> dict:
    """Run a "Bring your own model" example at `budget` (its own is 48)."""
    [block] = re.findall(rf"```{fence}\n(.*?)```", README.read_text(), flags=re.S)
    assert "budget=48" in block
    scope: dict = {}
    exec(compile(block.replace("budget=48", f"budget={budget}"), str(README), "exec"), scope)
    return scope


def _relative_error(scope) -> float:
    dense, hata = np.asarray(scope["logits"]), np.asarray(scope["hata_logits"])
    return float(np.linalg.norm(hata - dense) / np.linalg.norm(dense))


def test_left_padded_llama_example_equals_the_dense_model(capsys):
    """The patched pure-JAX model under an explicit mesh: its logits equal the unpatched model's at
    budget >= context, stay close at budget 48, and its K/V keep the model's layout."""
    scope = _model_example("python title=llama", 48)
    assert "P('data', None, 'model', None) [164 164]" in capsys.readouterr().out
    assert _relative_error(scope) < 0.3
    np.testing.assert_array_equal(np.argmax(scope["hata_logits"], -1), scope["tokens"])
    assert _relative_error(_model_example("python title=llama", 256)) < 1e-5


def test_paged_int8_example_equals_the_dense_model(capsys):
    """The patched paged int8 model: HATA writes and reads the pages in place; its logits equal
    the unpatched model's at budget >= context (up to the int8 rounding of a step's new token,
    which a last-bit difference in an activation can move) and stay close at budget 48."""
    scope = _model_example("python title=paged", 48)
    assert "[204  41 133] [ True  True  True]" in capsys.readouterr().out
    assert _relative_error(scope) < 0.3
    full = _model_example("python title=paged", 256)
    assert _relative_error(full) < 1e-4
    for name in ("k", "v", "k_scale", "v_scale"):
        for layer, (got, want) in enumerate(zip(getattr(full["patched"], name), getattr(full["cache"], name))):
            held = np.asarray(full["patched"].block_table)  # the sequences' pages
            assert np.asarray(got).dtype == np.asarray(want).dtype
            close = np.isclose(np.asarray(got, np.float32)[held], np.asarray(want, np.float32)[held], atol=1)
            assert close.mean() > 0.999, (name, layer)
