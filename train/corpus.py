"""Text for collecting q/k samples: the Python standard library's own sources (no download), or
the user's files, cut into fixed-length token sequences.

The default corpus is split by file: a file belongs to the held-out split when
`crc32(relative path) % HELDOUT_EVERY == 0`, so training text and the held-out text the recall
metrics use never share a file. Within a split the files are sorted, shuffled with the seed, and
their tokens concatenated (at most `seq_len` tokens from any one file, so a few huge files do
not fill every sequence) and cut into sequences of `seq_len` tokens.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import sys
import sysconfig
import zlib
from collections.abc import Iterator

import numpy as np

HELDOUT_EVERY = 5  # one stdlib file in five is held out
SPLITS = ("train", "heldout")


@dataclasses.dataclass(frozen=True)
class Corpus:
    """An ordered list of text files and a name for the metadata.

    Attributes:
      name: "python-stdlib/train", "python-stdlib/heldout" or "files".
      root: the directory paths are reported relative to.
      files: the files, in a deterministic order.
    """

    name: str
    root: pathlib.Path
    files: tuple[pathlib.Path, ...]

    def shuffled(self, seed: int) -> Corpus:
        order = np.random.default_rng(seed).permutation(len(self.files))
        return dataclasses.replace(self, files=tuple(self.files[i] for i in order))


def stdlib_root() -> pathlib.Path:
    """This Python's standard library, or `$HATA_JAX_STDLIB` (a directory of another Python's
    standard library sources): the text differs between Python versions, so runs that must see
    the same prompts and held-out text on two machines point both at one copy."""
    override = os.environ.get("HATA_JAX_STDLIB")
    if override:
        root = pathlib.Path(override).expanduser()
        if not root.is_dir():
            raise ValueError(f"HATA_JAX_STDLIB={override!r} is not a directory (expected a Python standard library)")
        return root
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_corpus(split: str) -> Corpus:
    """The standard library's `.py` files of one split ("train" or "heldout"), sorted."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = stdlib_root()
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if "site-packages" in rel.parts or "__pycache__" in rel.parts:
            continue
        heldout = zlib.crc32(rel.as_posix().encode()) % HELDOUT_EVERY == 0
        if heldout == (split == "heldout"):
            files.append(path)
    if not files:
        raise ValueError(f"no Python sources found under the standard library at {root}")
    return Corpus(name=f"python-stdlib/{split}", root=root, files=tuple(files))


def file_corpus(paths) -> Corpus:
    """The user's text: files, and every file under directories (hidden ones skipped), sorted."""
    files = []
    for spec in paths:
        path = pathlib.Path(spec).expanduser()
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file()
                            and not any(part.startswith(".") for part in p.relative_to(path).parts))
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"--corpus {spec}: no such file or directory")
    if not files:
        raise ValueError(f"--corpus {list(map(str, paths))} holds no files")
    root = pathlib.Path(*_common_parts([f.resolve().parent for f in files]))
    return Corpus(name="files", root=root, files=tuple(f.resolve() for f in files))


def _common_parts(dirs: list[pathlib.Path]) -> tuple[str, ...]:
    parts = dirs[0].parts
    for d in dirs[1:]:
        n = 0
        while n < min(len(parts), len(d.parts)) and parts[n] == d.parts[n]:
            n += 1
        parts = parts[:n]
    return parts or ("/",)


def read_text(path: pathlib.Path) -> str | None:
    """The file's text, or None when it is not UTF-8 (binary files are skipped)."""
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def token_sequences(corpus: Corpus, tokenizer, seq_len: int, count: int, seed: int,
                    described: list | None = None) -> Iterator[np.ndarray]:
    """Yield `count` sequences int32[seq_len] of the corpus's tokens (files shuffled with `seed`).

    Each file contributes its first `seq_len` tokens at most. When `described` is a list, each
    file used is appended to it as {"path", "sha256", "tokens"} (the corpus description).

    Raises:
      ValueError if the corpus holds fewer than `count * seq_len` tokens.
    """
    buffer: list[int] = []
    made = 0
    if count <= 0:
        return
    for path in corpus.shuffled(seed).files:
        text = read_text(path)
        if not text or not text.strip():
            continue
        ids = tokenizer.encode(text + "\n\n", add_special_tokens=False)[:seq_len]
        if described is not None:
            described.append({"path": _relative(path, corpus.root), "sha256": sha256_text(text), "tokens": len(ids)})
        buffer += ids
        while len(buffer) >= seq_len:
            yield np.asarray(buffer[:seq_len], np.int32)
            buffer = buffer[seq_len:]
            made += 1
            if made == count:
                return
    raise ValueError(f"corpus {corpus.name} ({len(corpus.files)} files under {corpus.root}) has too few tokens for "
                     f"{count} sequences of {seq_len} tokens (made {made}); add text or lower the sequence count")


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _relative(path: pathlib.Path, root: pathlib.Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def describe(corpus: Corpus, files_used: list[dict], seq_len: int, count: int, seed: int) -> dict:
    """The corpus description stored in sample manifests and checkpoint metadata."""
    stdlib = corpus.name.startswith("python-stdlib")
    return {
        "name": corpus.name,
        "root": str(corpus.root),
        "python": sys.version.split()[0] if stdlib else None,
        "heldout_rule": f"crc32(relative path) % {HELDOUT_EVERY} == 0" if stdlib else None,
        "seed": seed,
        "seq_len": seq_len,
        "sequences": count,
        "files": files_used,
    }
