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
