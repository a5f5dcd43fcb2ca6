"""The README's "bring your own model" example (the ```py block) runs as written."""
import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_bring_your_own_model_example_runs(capsys):
    [block] = re.findall(r"```py\n(.*?)```", README.read_text(), flags=re.S)
    scope: dict = {}
    exec(compile(block, str(README), "exec"), scope)
    caches, x = scope["caches"], scope["x"]
    assert np.isfinite(np.asarray(x)).all()
    for cache in caches:
        np.testing.assert_array_equal(np.asarray(cache.lengths), [303, 203])
    assert "[303 203]" in capsys.readouterr().out
