"""Files written whole or not at all."""
from __future__ import annotations

import os
import pathlib
import tempfile
from collections.abc import Callable
from typing import BinaryIO


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Write `path` through `write(f)` on a new temporary file beside it, then rename that file to
    `path`: a reader sees the previous file or the whole new one, never a part, and writers running
    at once (threads, processes) each write a file of their own. The parent folder is created;
    if `write` raises, the temporary file is removed and `path` is left as it was."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f"{path.name}.", suffix=".part", delete=False) as f:
        try:
            write(f)
        except BaseException:
            f.close()
            os.unlink(f.name)
            raise
    os.replace(f.name, path)
