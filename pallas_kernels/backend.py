"""The one place that knows which Pallas backend we target and how to talk to it.

Every kernel in this package runs on the Pallas **Triton** backend. Since jax 0.9, a
`pallas_call` without Triton compiler params is lowered with Mosaic GPU, which lacks the
popcount, argmax and row gathers these kernels need, so every call goes through
:func:`triton_call`, which always passes `pltriton.CompilerParams`.

Version notes (checked on jax 0.10.2 on the CPU and 0.11.2 on the H100):
- `lax.population_count` lowers in interpret mode but not in a Triton kernel on the GPU
  ("failed to legalize operation 'math.ctpop'"): use :func:`popcount32`.
- `pl.dot` is gone in jax 0.11.2 (AttributeError): use :func:`dot`.
- `elementwise_inline_asm` with an unsigned result type fails Triton's verifier on the GPU:
  :func:`popcount32` passes and returns int32 and bitcasts.
- Interpret mode accepts primitives the GPU compiler rejects (sort, top_k, popcount): the
  tests also cross-lower every kernel for CUDA with :func:`lower_for_cuda`, which also runs
  the MLIR verifier on each Triton module (the check XLA runs when it parses it on the GPU).
"""
from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax._src.pallas.triton import lowering as _triton_lowering
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

# What every kernel takes: input dtypes and head dims (each kernel raises a ValueError otherwise).
SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
# What a quantized K/V cache may hold (with float scales; see flash_decode.CacheSpec).
QUANTIZED_DTYPES = (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2))
SUPPORTED_HEAD_DIMS = (64, 128)
MAX_SEQ = 262144  # cache capacity per sequence
MAX_BUDGET = 8192  # selected tokens per (sequence, KV head)
MAX_GROUP = 8  # query heads per KV head
SCORES = ("key_norm", "hamming", "asymmetric")  # HATA's selection scores (see hata_jax.hamming_scores)
MAX_QUERY_PLANES = MAX_GROUP  # sign planes of an "asymmetric" query (rows of the scoring's query tile)
UNUSED = -1  # index-buffer slot that holds no position


def check_sink_recent(budget: int, sink: int, recent: int) -> None:
    """sink and recent positions are forced into the `budget` selected ones: both >= 0, sum <= budget."""
    if sink < 0 or recent < 0 or sink + recent > budget:
        raise ValueError(f"sink ({sink}) and recent ({recent}) must be >= 0 and sum to at most budget ({budget})")


def on_gpu() -> bool:
    """True when the default JAX backend is a CUDA/ROCm GPU."""
    return jax.default_backend() == "gpu"


def triton_call(
    kernel: Callable[..., None],
    *,
    out_shape: Any,
    grid: tuple[int, ...],
    in_specs: Any,
    out_specs: Any,
    num_warps: int,
    num_stages: int,
    interpret: bool,
    name: str,
    scratch_shapes: Any = (),
    input_output_aliases: dict[int, int] | None = None,
) -> Callable[..., Any]:
    """`pl.pallas_call` pinned to the Triton backend (see the module docstring).

    A `pallas_call` run eagerly traces and compiles its kernel at every call, so each public
    wrapper that calls this is jitted (an eager call then compiles once per shape)."""
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=scratch_shapes,
        input_output_aliases=input_output_aliases or {},
        interpret=interpret,
        name=name,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
    )


def block_barrier(interpret: bool) -> None:
    """Make this program's global stores visible to all its threads (a no-op when interpreted,
    where a program runs sequentially)."""
    if not interpret:
        pltriton.debug_barrier()


def last_to_arrive(arrivals_ref, programs: int, *, interpret: bool):
    """Count this program's arrival on `arrivals_ref` (int32[1], zeroed before the launch, shared
    by `programs` programs) and say whether it is the last of them to arrive.

    After a block barrier (every thread's stores issued), one atomic add, acquire-release at GPU
    scope: the last program to arrive sees every other program's stores made before its arrival
    (the pattern of CUTLASS's generic barrier). When interpreted, programs run in grid order, so
    the last in that order is the last to arrive.
    """
    block_barrier(interpret)
    return pltriton.atomic_add(arrivals_ref, (jnp.int32(0),), jnp.int32(1)) == programs - 1


def _popcount32_swar(x: jax.Array) -> jax.Array:
    """Population count of uint32 lanes with shifts, masks and one multiply (exact)."""
    x = x - ((x >> 1) & jnp.uint32(0x55555555))
    x = (x & jnp.uint32(0x33333333)) + ((x >> 2) & jnp.uint32(0x33333333))
    x = (x + (x >> 4)) & jnp.uint32(0x0F0F0F0F)
    return (x * jnp.uint32(0x01010101)) >> 24


def _popcount32_ptx(x: jax.Array) -> jax.Array:
    """Population count with the PTX `popc.b32` instruction (one instruction per lane)."""
    [out] = pltriton.elementwise_inline_asm(
        "popc.b32 $0, $1;",
        args=[lax.bitcast_convert_type(x, jnp.int32)],
        constraints="=r,r",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.int32)],
    )
    return lax.bitcast_convert_type(out, jnp.uint32)


def popcount32(x: jax.Array, *, interpret: bool) -> jax.Array:
    """Population count of uint32 lanes inside a kernel: PTX `popc` on the GPU, SWAR when interpreted."""
    return _popcount32_swar(x) if interpret else _popcount32_ptx(x)


def dot(a: jax.Array, b: jax.Array, *, trans_b: bool = False, precision=None) -> jax.Array:
    """`a @ b` (or `a @ b.T`) inside a Triton kernel, accumulated in float32.

    precision=`lax.Precision.HIGHEST` keeps float32 operands in IEEE fp32 (Triton's default
    for an fp32 dot is tf32); 16-bit operands always multiply exactly.
    """
    contract = ((1,), (1,)) if trans_b else ((1,), (0,))
    return lax.dot_general(a, b, (contract, ((), ())), precision=precision, preferred_element_type=jnp.float32)


@contextlib.contextmanager
def _verified_triton_modules():
    """Run the MLIR verifier on every Triton module lowered inside the block."""
    lower = _triton_lowering.lower_jaxpr_to_triton_module

    def lower_and_verify(*args, **kwargs):
        result = lower(*args, **kwargs)
        result.module.operation.verify()  # raises with the offending op on failure
        return result

    _triton_lowering.lower_jaxpr_to_triton_module = lower_and_verify
    try:
        yield
    finally:
        _triton_lowering.lower_jaxpr_to_triton_module = lower


def lower_for_cuda(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> str:
    """Lower `fn(*args, **kwargs)` for CUDA on any machine; returns the StableHLO text.

    Pallas Triton kernels are lowered to Triton IR inside this call and each module is run
    through the MLIR verifier, so an op the Triton lowering or Triton's verifier rejects fails
    here even on a CPU-only machine. (Failures later in Triton's own compiler, such as an op
    with no PTX legalization, still need the GPU.)
    """
    traced = jax.jit(functools.partial(fn, **kwargs)).trace(*args)
    with _verified_triton_modules():
        return traced.lower(lowering_platforms=("cuda",)).as_text()


def lowered_ops(text: str) -> list[str]:
    """Op names of a lowered StableHLO module (:func:`lower_for_cuda`'s text), one per line (custom
    calls' payloads are one-line attributes), closing braces left out."""
    return re.findall(r"^\s*(?:%\S+ = )?([a-z_]+(?:\.[a-z_]+)?)", text, flags=re.MULTILINE)
