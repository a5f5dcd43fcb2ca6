"""Text for collecting q/k samples, cut into fixed-length token sequences: a named corpus of text
this machine already has (no download), or the user's files.

Named corpora (:data:`NAMED`, `--corpus NAME` in `hata-jax train` and `hata-jax recall`):

- `stdlib` (the default): the Python standard library's `.py` sources (code and docstrings);
  `$HATA_JAX_STDLIB` points at another copy.
- `docs`: the prose the installed Debian and Python packages ship under `/usr/share/doc`
  (`$HATA_JAX_DOCS` points elsewhere): README*, NEWS*, `*.txt`, `*.md`, `*.rst`, gzipped or not,
  no `copyright` files, UTF-8 only, at least :data:`MIN_DOC_CHARS` characters, one file per
  distinct text. Its content depends on the machine's packages, so runs that must see the same
  text on two machines point both at one copy.
- `mixed`: `docs` and `stdlib` together (their files shuffled into one order).

Each named corpus is split by file: a file belongs to the held-out split when
`crc32(path relative to its root) % HELDOUT_EVERY == 0` (:func:`is_heldout`), so training text
and the held-out text the recall metrics use never share a file. Within a split the files are
sorted, shuffled with the seed, and their tokens concatenated (at most `seq_len` tokens from any
one file, so a few huge files do not fill every sequence) and cut into sequences of `seq_len`
tokens.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import pathlib
import sys
import sysconfig
import zlib
from collections.abc import Iterator

import numpy as np

HELDOUT_EVERY = 5  # one file in five is held out
SPLITS = ("train", "heldout")
NAMED = ("stdlib", "docs", "mixed")
DOC_NAMES = ("README*", "NEWS*", "*.txt", "*.md", "*.rst")  # each also gzipped (name + ".gz")
MIN_DOC_CHARS = 1000


@dataclasses.dataclass(frozen=True)
class Corpus:
    """An ordered list of text files and a name for the metadata.

    Attributes:
      name: "python-stdlib/<split>", "docs/<split>", "mixed/<split>" or "files".
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


def is_heldout(relative_path: str) -> bool:
    """Whether a file of a named corpus (its path relative to the corpus root) is held out."""
    return zlib.crc32(relative_path.encode()) % HELDOUT_EVERY == 0


def _split(root: pathlib.Path, files, split: str) -> list[pathlib.Path]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return [f for f in files if is_heldout(f.relative_to(root).as_posix()) == (split == "heldout")]


def stdlib_corpus(split: str) -> Corpus:
    """The standard library's `.py` files of one split ("train" or "heldout"), sorted."""
    root = stdlib_root()
    files = [path for path in sorted(root.rglob("*.py"))
             if not {"site-packages", "__pycache__"} & set(path.relative_to(root).parts)]
    files = _split(root, files, split)
    if not files:
        raise ValueError(f"no Python sources found under the standard library at {root}")
    return Corpus(name=f"python-stdlib/{split}", root=root, files=tuple(files))


def docs_root() -> pathlib.Path:
    """`$HATA_JAX_DOCS`, else `/usr/share/doc`."""
    override = os.environ.get("HATA_JAX_DOCS")
    root = pathlib.Path(override or "/usr/share/doc").expanduser()
    if not root.is_dir():
        raise ValueError(f"{'HATA_JAX_DOCS=' + repr(override) if override else str(root)} is not a directory "
                         "(expected package documentation such as /usr/share/doc)")
    return root


def _is_doc(path: pathlib.Path) -> bool:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return path.name != "copyright" and any(pathlib.PurePath(name).match(pattern) for pattern in DOC_NAMES)


def docs_corpus(split: str) -> Corpus:
    """The package documentation's prose files of one split ("train" or "heldout"), sorted.

    A text found under several paths (packages ship identical READMEs) is kept once, at its first
    path in sorted order, so the two splits never share a text either.
    """
    root = docs_root()
    files, seen = [], set()
    for path in sorted(root.rglob("*")):
        if not path.is_file() or not _is_doc(path):
            continue
        text = read_text(path)
        if text is None or len(text.strip()) < MIN_DOC_CHARS:
            continue
        digest = sha256_text(text)
        if digest not in seen:
            seen.add(digest)
            files.append(path)
    files = _split(root, files, split)
    if not files:
        raise ValueError(f"no documentation files ({', '.join(DOC_NAMES)}) of {MIN_DOC_CHARS}+ characters found "
                         f"under {root}; set HATA_JAX_DOCS to a directory that holds some")
    return Corpus(name=f"docs/{split}", root=root, files=tuple(files))


def mixed_corpus(split: str) -> Corpus:
    """`docs` and `stdlib` of one split together; paths are reported relative to their common root."""
    docs, stdlib = docs_corpus(split), stdlib_corpus(split)
    return Corpus(name=f"mixed/{split}", root=pathlib.Path(*_common_parts([docs.root, stdlib.root])),
                  files=docs.files + stdlib.files)


def named_corpus(name: str, split: str) -> Corpus:
    """A named corpus (:data:`NAMED`) of one split."""
    makers = {"stdlib": stdlib_corpus, "docs": docs_corpus, "mixed": mixed_corpus}
    if name not in makers:
        raise ValueError(f"unknown corpus {name!r}; the named corpora are {', '.join(NAMED)}")
    return makers[name](split)


def corpus_from_args(values: list[str] | None, split: str) -> Corpus:
    """`--corpus`: nothing (stdlib), one corpus name (:data:`NAMED`), or files and directories."""
    if not values:
        return stdlib_corpus(split)
    if len(values) == 1 and values[0] in NAMED:
        if pathlib.Path(values[0]).exists():
            raise ValueError(f"--corpus {values[0]}: both a corpus name and a path here; write ./{values[0]} "
                             "for the path")
        return named_corpus(values[0], split)
    return file_corpus(values)


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
            raise ValueError(f"--corpus {spec}: no such file or directory (nor a corpus name: "
                             f"{', '.join(NAMED)})")
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
    """The file's text (decompressed when its name ends in `.gz`), or None when it is not UTF-8
    (binary files are skipped)."""
    try:
        if path.suffix == ".gz":
            return gzip.decompress(path.read_bytes()).decode("utf-8")
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError, EOFError):
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
    named = corpus.name != "files"
    return {
        "name": corpus.name,
        "root": str(corpus.root),
        "python": sys.version.split()[0] if corpus.name.startswith(("python-stdlib", "mixed")) else None,
        "heldout_rule": f"crc32(relative path) % {HELDOUT_EVERY} == 0" if named else None,
        "seed": seed,
        "seq_len": seq_len,
        "sequences": count,
        "files": files_used,
    }
