"""One entry point for every checkpoint kind: `load_model("smollm2" | HF dir | file.gguf)`."""
from __future__ import annotations

import pathlib

import jax.numpy as jnp

from hata_jax.models.gguf_loader import load_gguf
from hata_jax.models.hf_loader import load_hf_checkpoint
from hata_jax.models.llama import LlamaForCausalLM
from hata_jax.models.smollm2 import smollm2_gguf
from hata_jax.models.tensors import model_from_tensors
from hata_jax.models.tokenizer import Tokenizer

EMBEDDED = "smollm2"


def resolve_model_path(spec: str, log=print) -> pathlib.Path:
    """"smollm2" -> the embedded GGUF (fetched if needed); anything else is a path."""
    if spec == EMBEDDED:
        return smollm2_gguf(log=log)
    path = pathlib.Path(spec).expanduser()
    if not path.exists():
        raise ValueError(f"--model {spec!r}: no such file or directory (use '{EMBEDDED}', a HF checkpoint "
                         "directory or a .gguf file)")
    return path


def load_model(spec: str | pathlib.Path, *, dtype=jnp.float32, log=print) -> tuple[LlamaForCausalLM, Tokenizer]:
    """(model, tokenizer) from "smollm2", a HF checkpoint directory or a .gguf file."""
    path = resolve_model_path(str(spec), log=log)
    if path.is_dir():
        config, tensors = load_hf_checkpoint(path)
        tokenizer = Tokenizer.from_hf_dir(path)
    else:
        config, tensors, reader = load_gguf(path)
        tokenizer = Tokenizer.from_gguf(reader)
    return model_from_tensors(config, tensors, dtype=dtype, source=str(path)), tokenizer
