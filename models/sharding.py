"""Tensor-parallel decoding of the Llama models over one mesh axis (`jax.sharding`).

    mesh = make_mesh()                          # every device of every process, one axis "model"
    model = shard_model(model, mesh)            # or init_model(config, mesh) for random weights
    plan = AttentionPlan.uniform(n, "hata", hata).on_mesh(mesh)
    result = generate(model, prompts, plan=plan)

The same code runs on one device, several local devices and several hosts: after
`jax.distributed.initialize(...)` on every process, `jax.devices()` lists every process's devices
and `make_mesh()` spans them all (every process then runs the same program on the same prompts).

Attention: each device holds and attends with its own KV heads and their query heads
(:mod:`hata_jax.sharding`: caches, codes, norms and hash projections split on the KV heads,
selection without communication). The plan's mesh makes the model's decode and prefill attention
run inside those `shard_map` wrappers; :func:`hata_jax.models.generate` then makes its caches and places
its hash projections in that layout.

Parameters (Megatron-style; n = the axis size):
- q_proj, k_proj, v_proj: column-split by heads (kernel [hidden, H*D] -> P(None, axis), bias
  P(axis)): device i computes the q, k, v of exactly the heads its attention shard holds;
- o_proj: row-split (kernel [Hq*D, hidden] -> P(axis, None)): each device multiplies its heads'
  outputs and XLA sums the partial products (one all-reduce of [B, hidden] per layer); its bias
  is replicated;
- gate_proj, up_proj: column-split by features; down_proj row-split (the layer's second
  all-reduce); biases as for q/o;
- lm_head [hidden, vocab]: column-split by vocabulary (each device reads 1/n of the table; the
  logits are gathered for sampling);
- embed_tokens [vocab, hidden]: replicated when the LM head is separate (a step reads only B rows,
  and the lookup then needs no communication); vocabulary-split when tied, since it is then the
  LM head;
- norms (and anything else): replicated.
A feature or vocabulary size the axis size does not divide is replicated instead (correct, only
not split); an indivisible KV head count is an error (attention cannot be split).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from hata_jax import sharding as head_sharding
from hata_jax.models.config import LlamaConfig
from hata_jax.models.llama import LlamaForCausalLM

# Parameter (module, variable) -> how its dimension that the axis splits is laid out:
# "columns" splits the last axis of a kernel / the bias, "rows" the first axis of a kernel.
COLUMN_SPLIT = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head"}
ROW_SPLIT = {"o_proj", "down_proj"}


def make_mesh(devices=None, axis: str = "model") -> Mesh:
    """A one-axis mesh over `devices` (default: `jax.devices()`, every process's) with Auto axis
    type (XLA places the tensor-parallel matmuls' reductions)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (axis,), axis_types=(AxisType.Auto,))


def check_config(config: LlamaConfig, mesh: Mesh, axis: str = "model") -> int:
    """Raise unless the model's heads split over `axis` and the axis is of Auto type (the model's
    code leaves the placement of the matmuls' reductions to XLA); returns the axis size."""
    n = head_sharding.check_head_split(mesh, axis, config.num_kv_heads, config.num_heads)
    kind = dict(zip(mesh.axis_names, mesh.axis_types))[axis]
    if kind != AxisType.Auto:
        raise ValueError(f"mesh axis {axis!r} has type {kind}: tensor-parallel Llama needs an Auto axis (make the mesh "
                         f"with models.sharding.make_mesh, or jax.make_mesh(..., axis_types=(AxisType.Auto, ...)))")
    return n


def param_spec(path: tuple, shape: tuple[int, ...], n: int, axis: str, tied: bool) -> P:
    """The PartitionSpec of the parameter at `path` (module names, then the variable's name) of
    `shape` over an axis of size n (see the module docstring)."""
    names = [str(p) for p in path]
    module, variable = (names[-2], names[-1]) if len(names) >= 2 else ("", names[-1])
    if module == "embed_tokens":
        return P(axis, None) if tied and shape[0] % n == 0 else P()
    if module in COLUMN_SPLIT:
        return P(*(None,) * (len(shape) - 1), axis) if shape[-1] % n == 0 else P()
    if module in ROW_SPLIT and variable == "kernel":
        return P(axis, None) if shape[0] % n == 0 else P()
    return P()


def _path_names(path) -> tuple:
    """A pytree key path of an nnx.State as names: ('layers', 0, 'self_attn', 'q_proj', 'kernel')."""
    names = []
    for key in path:
        name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", None)))
        if name != "value":  # the Variable's own field
            names.append(name)
    return tuple(names)


def partition_specs(state, config: LlamaConfig, mesh: Mesh, axis: str = "model"):
    """PartitionSpecs of an nnx.State of a :class:`LlamaForCausalLM` (arrays or shape structs),
    the same tree with a P per parameter."""
    n = check_config(config, mesh, axis)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: param_spec(_path_names(path), tuple(x.shape), n, axis, config.tie_word_embeddings), state)


def param_shardings(state, config: LlamaConfig, mesh: Mesh, axis: str = "model"):
    """:func:`partition_specs` as NamedShardings on `mesh`."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), partition_specs(state, config, mesh, axis),
                        is_leaf=lambda x: isinstance(x, P))


def shard_model(model: LlamaForCausalLM, mesh: Mesh, axis: str = "model") -> LlamaForCausalLM:
    """Place `model`'s parameters in the tensor-parallel layout (in place; returns the model)."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, param_shardings(state, model.config, mesh, axis)))
    return model


def replicate_model(model: LlamaForCausalLM, mesh: Mesh) -> LlamaForCausalLM:
    """Place `model`'s parameters whole on every device of `mesh` (in place; returns the model):
    the layout of sequence-sharded decoding (`AttentionPlan.on_mesh(..., split="positions")`),
    across processes too (every process passes the same weights)."""
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    nnx.update(model, jax.device_put(nnx.state(model), NamedSharding(mesh, P())))
    return model


def init_model(config: LlamaConfig, mesh: Mesh, axis: str = "model", *, dtype=jnp.bfloat16,
               seed: int = 0) -> LlamaForCausalLM:
    """A model with random weights (the initialisers of :class:`LlamaForCausalLM`) made on the
    devices directly in the tensor-parallel layout: no device ever holds the whole model."""
    def build():
        return LlamaForCausalLM(config, dtype=dtype, rngs=nnx.Rngs(seed))

    graphdef, abstract = nnx.split(nnx.eval_shape(build))
    state = jax.jit(lambda: nnx.state(build()), out_shardings=param_shardings(abstract, config, mesh, axis))()
    return nnx.merge(graphdef, state)


def shard_hash_weights(hash_weights, mesh: Mesh, axis: str = "model") -> list[jax.Array]:
    """One float32[Hkv, D, rbit] projection per layer, each split on its KV heads."""
    return [head_sharding.shard_projection(jnp.asarray(w, jnp.float32), mesh, axis) for w in hash_weights]
