"""Registers and spills of the encode kernels (`hash_encode_step` with 4 query planes and prefill
`hash_encode`) at the Llama-3.1-8B shape (8 KV heads, G = 4, D = 128, rbit 128, bf16 inputs, a
float32 w split inside the kernels), at 4 and 8 warps, on the CPU: each Pallas kernel is lowered to
Triton IR here, then compiled for sm_90a with pip's Triton (whose wheel carries ptxas) in another
environment. XLA's own Triton is another version, so the counts are indicative.

    python bench/results/issue13_encode_split/encode_registers.py DIR TRITON_PYTHON
    (TRITON_PYTHON: a Python with `pip install triton`, here 3.5.0; no GPU needed)
"""
import functools
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
from jax._src.pallas.triton import lowering

from pallas_kernels import hash_encode

COUNT = r'''
import pathlib, re, subprocess, sys, os, triton
from triton.backends.compiler import GPUTarget
ptxas = pathlib.Path(triton.__file__).parent / "backends/nvidia/bin/ptxas"
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.ttir")):
    for warps in (4, 8):
        options = {"num_warps": warps, "num_stages": 1}
        kernel = triton.compile(str(path), target=GPUTarget("cuda", 90, 32), options=options)
        ptx = path.with_suffix(f".w{warps}.ptx")
        ptx.write_text(kernel.asm["ptx"])
        report = subprocess.run([str(ptxas), "-v", "--gpu-name", "sm_90a", str(ptx), "-o", os.devnull],
                                capture_output=True, text=True).stderr
        used, spill = re.search(r"Used (\d+) registers", report), re.search(r"(\d+) bytes spill stores", report)
        print(f"{path.stem:<20} warps {warps}  registers {used.group(1)}  spill stores {spill.group(1)} B")
'''

out, triton_python = pathlib.Path(sys.argv[1]), sys.argv[2]
out.mkdir(parents=True, exist_ok=True)
lower = lowering.lower_jaxpr_to_triton_module
modules = []


def keep(*args, **kwargs):
    modules.append(lower(*args, **kwargs))
    return modules[-1]


lowering.lower_jaxpr_to_triton_module = keep
w = jax.ShapeDtypeStruct((8, 128, 128), jnp.float32)
jax.jit(functools.partial(hash_encode.encode_step, query_planes=4)).trace(
    jax.ShapeDtypeStruct((1, 32, 128), jnp.bfloat16), jax.ShapeDtypeStruct((1, 8, 128), jnp.bfloat16), w
).lower(lowering_platforms=("cuda",))
jax.jit(functools.partial(hash_encode.encode, head_axis=1)).trace(
    jax.ShapeDtypeStruct((1, 8, 4096, 128), jnp.bfloat16), w
).lower(lowering_platforms=("cuda",))
lowering.lower_jaxpr_to_triton_module = lower
for module in modules:
    text = module.module.operation.get_asm(enable_debug_info=False)
    name = re.search(r"tt\.func public @(\w+)", text).group(1)
    (out / f"{name}.ttir").write_text(text)
subprocess.run([triton_python, "-c", COUNT, str(out)], check=True, env={"TRITON_DEFAULT_FP_FUSION": "1", "PATH": ""})
