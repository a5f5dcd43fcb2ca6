"""Collection of post-RoPE q/k samples from prefills of a tiny random Llama, and the corpora.

Other test_train files import :func:`tiny_model` and :func:`word_corpus`.
"""
from __future__ import annotations

import gzip
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from test_models_llama import HF_CONFIGS, random_model
from test_models_loaders import write_word_tokenizer

from hata_jax.models import Tokenizer
from hata_jax.train import collect, corpus


def tiny_model(rng, name: str = "llama-gqa"):
    """(model, HF-named tensors) of a random tiny Llama; "llama-gqa": 3 layers, 6 q heads, 2 KV heads, D 64."""
    model, tensors = random_model(HF_CONFIGS[name], rng)
    return model, tensors


def tiny_training_inputs(directory: pathlib.Path, seed: int = 0):
    """(model, HF-named tensors, word tokenizer, file corpus) for a tiny training run in `directory`."""
    rng = np.random.default_rng(seed)
    model, tensors = tiny_model(rng)
    tokenizer = word_tokenizer(directory / "tok")
    return model, tensors, tokenizer, corpus.file_corpus([word_corpus(directory / "text", rng)])


def word_tokenizer(directory: pathlib.Path, vocab_size: int = 97) -> Tokenizer:
    directory.mkdir(parents=True, exist_ok=True)
    write_word_tokenizer(directory, vocab_size)
    return Tokenizer.from_hf_dir(directory)


def word_corpus(directory: pathlib.Path, rng, files: int = 6, words: int = 40, vocab: int = 80) -> pathlib.Path:
    """Text files of random words the word tokenizer knows (w0 .. w<vocab-1>)."""
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        (directory / f"doc{i}.txt").write_text(" ".join(f"w{j}" for j in rng.integers(0, vocab, words)))
    return directory


def manual_qk(model, tokens):
    """Post-RoPE q, k of every layer, from the model's own modules, layer by layer."""
    t = tokens.shape[1]
    positions = jnp.arange(t)[None]
    lengths = jnp.array([t], jnp.int32)
    x = model.embed_tokens(tokens)
    out = []
    for layer in model.layers:
        q, k, _ = layer.self_attn.project_qkv(layer.input_layernorm(x), positions)
        out.append((np.asarray(q[0]), np.asarray(k[0])))
        x, _ = layer.prefill(x, lengths, None, None, "reference")
    return out


def test_capture_gives_the_post_rope_q_and_k(rng):
    model, _ = tiny_model(rng)
    tokens = jnp.asarray(rng.integers(0, 97, (1, 37)), jnp.int32)
    positions = np.array([18, 25, 36], np.int32)
    captured = collect.make_capture(model, [1, 2])(tokens, jnp.asarray(positions))
    expected = manual_qk(model, tokens)
    assert sorted(captured) == [1, 2]
    for layer in (1, 2):
        q, k = (np.asarray(a) for a in captured[layer])
        assert q.shape == (3, 6, 64) and k.shape == (37, 2, 64)
        np.testing.assert_allclose(q, expected[layer][0][positions], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(k, expected[layer][1], rtol=1e-5, atol=1e-5)


def test_raw_scores_are_causal_q_dot_k(rng):
    q = rng.standard_normal((2, 6, 8)).astype(np.float32)
    k = rng.standard_normal((9, 2, 8)).astype(np.float32)
    positions = np.array([4, 8])
    scores = np.asarray(collect.raw_scores(jnp.asarray(q), jnp.asarray(k), jnp.asarray(positions)))
    for j, i, t in np.ndindex(2, 6, 9):
        expected = q[j, i] @ k[t, i // 3] if t <= positions[j] else -np.inf
        np.testing.assert_allclose(scores[j, i, t], expected, rtol=1e-5, atol=1e-5)


class Stop(Exception):
    pass


def test_collect_is_deterministic_resumable_and_checked(tmp_path, rng):
    model, _ = tiny_model(rng)
    tokenizer = word_tokenizer(tmp_path / "tok")
    text = corpus.file_corpus([word_corpus(tmp_path / "text", rng)])
    config = collect.CollectConfig(seq_len=30, sequences=3, queries=4, seed=5)
    manifest = collect.collect(model, "tiny", tokenizer, text, config, [1, 2], tmp_path / "a")
    assert manifest["completed"] == 3 and manifest["shapes"] == {"q_heads": 6, "kv_heads": 2, "head_dim": 64}
    assert [f["path"] for f in manifest["corpus"]["files"]] == [p.name for p in text.shuffled(5).files][:3]
    samples = collect.load_layer(tmp_path / "a", 2)
    assert samples.q.shape == (3, 4, 6, 64) and samples.k.shape == (3, 30, 2, 64)
    assert np.all((samples.positions >= 15) & (samples.positions < 30))
    assert np.all(np.diff(samples.positions, axis=1) > 0)
    np.testing.assert_array_equal(samples.positions[1], collect.query_positions(config, 1))

    def stop_after_one(done, total):
        if done == 1:
            raise Stop

    with pytest.raises(Stop):
        collect.collect(model, "tiny", tokenizer, text, config, [1, 2], tmp_path / "b", progress=stop_after_one)
    assert collect.read_manifest(tmp_path / "b")["completed"] == 1
    with pytest.raises(ValueError, match="incomplete"):
        collect.load_layer(tmp_path / "b", 1)
    collect.collect(model, "tiny", tokenizer, text, config, [1, 2], tmp_path / "b")
    for layer in (1, 2):
        a, b = collect.load_layer(tmp_path / "a", layer), collect.load_layer(tmp_path / "b", layer)
        for name in collect.ARRAYS:
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    with pytest.raises(ValueError, match="different collection"):
        collect.collect(model, "tiny", tokenizer, text, collect.CollectConfig(seq_len=30, sequences=3, queries=4),
                        [1, 2], tmp_path / "b")
    other, _ = tiny_model(rng)
    with pytest.raises(ValueError, match="another model"):
        collect.collect(other, "tiny", tokenizer, text, config, [1, 2], tmp_path / "b")
    with pytest.raises(ValueError, match="too few tokens"):
        collect.collect(model, "tiny", tokenizer, text, collect.CollectConfig(seq_len=30, sequences=50, queries=4),
                        [1], tmp_path / "c")


def test_collect_config_checks():
    with pytest.raises(ValueError, match="queries must be a positive int"):
        collect.CollectConfig(queries=0)
    with pytest.raises(ValueError, match=r"do not fit in \[8, 16\)"):
        collect.CollectConfig(seq_len=16, queries=9)


def test_stdlib_corpus_splits_by_file():
    train, heldout = corpus.stdlib_corpus("train"), corpus.stdlib_corpus("heldout")
    assert train.files and heldout.files and not set(train.files) & set(heldout.files)
    assert len(heldout.files) < len(train.files)
    assert all(f.suffix == ".py" and "site-packages" not in f.parts for f in train.files + heldout.files)
    assert corpus.stdlib_corpus("train") == train
    assert train.shuffled(3).files == train.shuffled(3).files != train.shuffled(4).files
    with pytest.raises(ValueError, match="split must be one of"):
        corpus.stdlib_corpus("test")


def test_stdlib_corpus_reads_HATA_JAX_STDLIB(tmp_path, monkeypatch):
    """Another Python's standard library, so two machines see the same text."""
    names = [f"m{i}.py" for i in range(40)] + ["site-packages/x.py", "pkg/__pycache__/y.py"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(f'"""{name}"""\n')
    monkeypatch.setenv("HATA_JAX_STDLIB", str(tmp_path))
    train, heldout = corpus.stdlib_corpus("train"), corpus.stdlib_corpus("heldout")
    assert sorted(f.name for f in train.files + heldout.files) == sorted(names[:40])
    assert heldout.files and train.root == tmp_path
    monkeypatch.setenv("HATA_JAX_STDLIB", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="HATA_JAX_STDLIB"):
        corpus.stdlib_corpus("train")


def test_file_corpus(tmp_path, rng):
    word_corpus(tmp_path / "d", rng, files=3)
    (tmp_path / "d" / ".hidden").write_text("w1 w2")
    (tmp_path / "d" / "binary.bin").write_bytes(b"\xff\xfe\x00")
    (tmp_path / "single.txt").write_text("w3 w4")
    text = corpus.file_corpus([tmp_path / "d", tmp_path / "single.txt"])
    assert [f.name for f in text.files] == ["binary.bin", "doc0.txt", "doc1.txt", "doc2.txt", "single.txt"]
    assert corpus.read_text(tmp_path / "d" / "binary.bin") is None
    with pytest.raises(ValueError, match="no such file or directory"):
        corpus.file_corpus([tmp_path / "nope"])
    with pytest.raises(ValueError, match="holds no files"):
        (tmp_path / "empty").mkdir()
        corpus.file_corpus([tmp_path / "empty"])


def _docs_tree(root, files=40):
    """Package documentation: prose READMEs and gzipped NEWS, plus files the docs corpus skips."""
    for i in range(files):
        pkg = root / f"pkg{i}"
        pkg.mkdir(parents=True)
        (pkg / "README.md").write_text(f"Package {i}. " + "Some prose about this package. " * 40)
        (pkg / "NEWS.gz").write_bytes(gzip.compress(f"Release {i}: ".encode() + b"a change was made. " * 60))
        (pkg / "copyright").write_text("Copyright holders. " * 80)  # never read
        (pkg / "short.txt").write_text("too short")
        (pkg / "logo.png").write_bytes(b"\x89PNG" + bytes(2000))
    (root / "zdup").mkdir()
    (root / "zdup" / "README").write_text((root / "pkg0" / "README.md").read_text())  # the same text again
    (root / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 400)


def test_docs_corpus_splits_by_file(tmp_path, monkeypatch):
    _docs_tree(tmp_path)
    monkeypatch.setenv("HATA_JAX_DOCS", str(tmp_path))
    train, heldout = corpus.docs_corpus("train"), corpus.docs_corpus("heldout")
    assert train.files and heldout.files and not set(train.files) & set(heldout.files)
    assert corpus.docs_corpus("train") == train and corpus.docs_corpus("heldout") == heldout  # deterministic
    names = sorted(f.relative_to(tmp_path).as_posix() for f in train.files + heldout.files)
    assert names == sorted([f"pkg{i}/README.md" for i in range(40)] + [f"pkg{i}/NEWS.gz" for i in range(40)])
    assert all(corpus.is_heldout(f.relative_to(tmp_path).as_posix()) for f in heldout.files)
    assert corpus.read_text(tmp_path / "pkg3" / "NEWS.gz").startswith("Release 3: a change")
    assert train.name == "docs/train" and heldout.root == tmp_path
    with pytest.raises(ValueError, match="split must be one of"):
        corpus.docs_corpus("test")
    monkeypatch.setenv("HATA_JAX_DOCS", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="HATA_JAX_DOCS"):
        corpus.docs_corpus("train")
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("HATA_JAX_DOCS", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="no documentation files"):
        corpus.docs_corpus("train")


def test_named_corpora_and_corpus_argument(tmp_path, monkeypatch):
    _docs_tree(tmp_path / "doc")
    for i in range(40):
        (tmp_path / "lib" / f"m{i}.py").parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "lib" / f"m{i}.py").write_text(f'"""m{i}"""\n')
    monkeypatch.setenv("HATA_JAX_DOCS", str(tmp_path / "doc"))
    monkeypatch.setenv("HATA_JAX_STDLIB", str(tmp_path / "lib"))
    for split in corpus.SPLITS:
        mixed = corpus.named_corpus("mixed", split)
        assert mixed.files == corpus.docs_corpus(split).files + corpus.stdlib_corpus(split).files
        assert mixed.name == f"mixed/{split}" and mixed.root == tmp_path
    assert not set(corpus.named_corpus("mixed", "train").files) & set(corpus.named_corpus("mixed", "heldout").files)
    monkeypatch.chdir(tmp_path)
    assert corpus.corpus_from_args(None, "heldout") == corpus.stdlib_corpus("heldout")
    assert corpus.corpus_from_args(["docs"], "train") == corpus.docs_corpus("train")
    assert corpus.corpus_from_args(["doc"], "train").name == "files"  # a path
    with pytest.raises(ValueError, match=r"--corpus prose: no such file or directory \(nor a corpus name: stdlib"):
        corpus.corpus_from_args(["prose"], "train")
    with pytest.raises(ValueError, match="unknown corpus 'prose'"):
        corpus.named_corpus("prose", "train")
    (tmp_path / "mixed").mkdir()
    with pytest.raises(ValueError, match="--corpus mixed: both a corpus name and a path here; write ./mixed"):
        corpus.corpus_from_args(["mixed"], "train")
    assert corpus.corpus_from_args(["./mixed", "doc"], "train").name == "files"
