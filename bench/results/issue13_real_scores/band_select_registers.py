"""Registers and spills of each launch of main's band select (`hamming_topk`, Llama-3.1-8B shape:
1 x 8 KV heads x 131072, G = 4, rbit 128, budget 2048) with band slots of a quarter and a half of
a chunk (`BandConfig.slots_divisor` 4 and 2), on the CPU: lower each Pallas kernel to Triton IR
here, then compile it for sm_90a with pip's Triton (whose wheel carries ptxas) in another
environment. XLA's own Triton is another version, so the counts are indicative.

    python bench/results/issue13_real_scores/band_select_registers.py DIR TRITON_PYTHON
    (TRITON_PYTHON: a Python with `pip install triton`, e.g. 3.9.0; no GPU needed)
"""
import dataclasses
import functools
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
from jax._src.pallas.triton import lowering

from pallas_kernels import band_select, hamming_topk

COUNT = r'''
import pathlib, re, subprocess, sys, os, triton
from triton.backends.compiler import GPUTarget
ptxas = pathlib.Path(triton.__file__).parent / "backends/nvidia/bin/ptxas-blackwell"  # reads Triton's PTX version
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.ttir")):
    kernel = triton.compile(str(path), target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 1})
    path.with_suffix(".ptx").write_text(kernel.asm["ptx"])
    report = subprocess.run([str(ptxas), "-v", "--gpu-name", "sm_90a", str(path.with_suffix(".ptx")), "-o",
                             os.devnull], capture_output=True, text=True).stderr
    used, spill = re.search(r"Used (\d+) registers", report), re.search(r"(\d+) bytes spill stores", report)
    print(f"{path.stem:<40} registers {used.group(1)}  spill stores {spill.group(1)} B")
'''

out, triton_python = pathlib.Path(sys.argv[1]), sys.argv[2]
out.mkdir(parents=True, exist_ok=True)
q = jax.ShapeDtypeStruct((1, 32, 4), jnp.uint32)
k = jax.ShapeDtypeStruct((1, 8, 131072, 4), jnp.uint32)
norms = jax.ShapeDtypeStruct((1, 8, 131072), jnp.float32)
lengths = jax.ShapeDtypeStruct((1,), jnp.int32)
lower = lowering.lower_jaxpr_to_triton_module
for divisor in (4, 2):
    modules = []

    def keep(*args, **kwargs):
        modules.append(lower(*args, **kwargs))
        return modules[-1]

    lowering.lower_jaxpr_to_triton_module = keep
    config = dataclasses.replace(band_select.BandConfig(), slots_divisor=divisor)
    jax.jit(functools.partial(hamming_topk.hamming_topk_with_path, budget=2048, config=config)).trace(
        q, k, norms, lengths).lower(lowering_platforms=("cuda",))
    lowering.lower_jaxpr_to_triton_module = lower
    for module in modules:  # every launch runs 4 warps in the parallel design
        text = module.module.operation.get_asm(enable_debug_info=False)
        name = re.search(r"tt\.func public @(\w+)", text).group(1)
        (out / f"slots_divisor{divisor}__{name}.ttir").write_text(text)
subprocess.run([triton_python, "-c", COUNT, str(out)], check=True, env={"TRITON_DEFAULT_FP_FUSION": "1", "PATH": ""})
