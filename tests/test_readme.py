"""The README's Python example runs as written and prints what it says."""
import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(capsys):
    [block] = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    scope: dict = {}
    exec(compile(block, str(README), "exec"), scope)
    out, cache = scope["out"], scope["cache"]
    assert out.shape == (2, 32, 128)
    assert np.isfinite(np.asarray(out, np.float32)).all()
    np.testing.assert_array_equal(np.asarray(cache.lengths), [3001, 1235])
    assert "(2, 32, 128) [3001 1235]" in capsys.readouterr().out
