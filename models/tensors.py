"""Put HF-named tensors into a :class:`LlamaForCausalLM`, checking names and shapes.

Every loader (safetensors, GGUF) produces `{hf_name: numpy array}` in the HF layout
(`model.layers.{i}.self_attn.q_proj.weight` is `[out, in]`, split-half RoPE rows); this module
is the one place that maps those names onto the NNX parameters.
"""
from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from hata_jax.models.config import LlamaConfig
from hata_jax.models.llama import LlamaForCausalLM

# Tensors some checkpoints carry that the model recomputes or does not need.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_name(path: tuple) -> str:
    """NNX parameter path -> HF tensor name, e.g. ('layers', 0, 'mlp', 'up_proj', 'kernel') ->
    'model.layers.0.mlp.up_proj.weight'."""
    *module, leaf = (str(p) for p in path)
    leaf = "weight" if leaf in ("kernel", "embedding") else leaf
    prefix = [] if module[0] == "lm_head" else ["model"]
    return ".".join(prefix + module + [leaf])


def _abstract_model(config: LlamaConfig, dtype):
    """(graphdef, {hf_name: (nnx path, abstract Variable)}) of the model, built without allocating."""
    abstract = nnx.eval_shape(lambda: LlamaForCausalLM(config, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    return graphdef, {hf_name(path): (path, var) for path, var in nnx.to_flat_state(state)}


def _hf_shape(path: tuple, shape: tuple) -> tuple:
    return tuple(shape[::-1]) if path[-1] == "kernel" else tuple(shape)


def expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """{HF tensor name: shape in the HF layout} of every parameter the config implies."""
    _, wanted = _abstract_model(config, jnp.float32)
    return {name: _hf_shape(path, var.get_value().shape) for name, (path, var) in wanted.items()}


def model_from_tensors(config: LlamaConfig, tensors: Mapping[str, np.ndarray], *, dtype=jnp.float32,
                       source: str = "checkpoint") -> LlamaForCausalLM:
    """Build the model from HF-named tensors (no random init: the model is built abstractly).

    Raises:
      ValueError naming the tensors that are missing or unexpected, or whose shape does not
      match the config.
    """
    graphdef, wanted = _abstract_model(config, dtype)
    extra = [n for n in tensors if n not in wanted and not n.endswith(IGNORED_SUFFIXES)
             and not (n == "lm_head.weight" and config.tie_word_embeddings)]
    missing = [n for n in wanted if n not in tensors]
    if missing or extra:
        raise ValueError(f"{source} does not match the config ({config.model_type}, {config.num_layers} layers): "
                         f"missing tensors {_few(missing)}, unexpected tensors {_few(extra)}")
    leaves = []
    for name, (path, var) in wanted.items():
        array = np.asarray(tensors[name])
        expected = _hf_shape(path, var.get_value().shape)
        if array.shape != expected:
            raise ValueError(f"{source}: tensor {name} has shape {list(array.shape)}, but the config implies "
                             f"{list(expected)}")
        leaves.append((path, var.replace(jnp.asarray(array.T if path[-1] == "kernel" else array, dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def model_tensors(model: LlamaForCausalLM) -> dict[str, np.ndarray]:
    """The inverse of :func:`model_from_tensors`: {hf_name: float32 array in the HF layout}."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        array = np.asarray(var.get_value(), np.float32)
        out[hf_name(path)] = array.T if path[-1] == "kernel" else array
    return out


def _few(names: list[str], limit: int = 6) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return f"[{shown}{f', ... ({len(names)} in all)' if len(names) > limit else ''}]"
