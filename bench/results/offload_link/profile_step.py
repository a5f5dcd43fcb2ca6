"""Where an offloaded HATA step's time goes (issue 18): Llama-3.1-8B shapes, batch 2, every piece of
OffloadDecoder.step wrapped with a host timer, and the GPU's kernel time per step from a profiler
trace (the top kernels by time). Writes $OUT/profile_step_<context>.json.

    python bench/results/offload_link/profile_step.py [context]
"""
import collections
import glob
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

from bench import offload as bench_offload
from hata_jax import host_memory
from hata_jax import offload as offload_mod

context = int(sys.argv[1]) if len(sys.argv) > 1 else 65536
spent = collections.defaultdict(float)
calls = collections.Counter()


def timed(name, fn):
    def run(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[name] += time.perf_counter() - start
            calls[name] += 1
    return run


def kernel_ms(trace_dir: str, steps: int) -> dict:
    [path] = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    data = jax.profiler.ProfileData.from_file(path)
    totals = collections.Counter()
    for plane in data.planes:
        if plane.name.startswith("/device:GPU"):
            for line in plane.lines:
                if "stream" in line.name.lower():
                    for event in line.events:
                        totals[event.name] += event.duration_ns / 1e6 / steps
    top = dict(sorted(totals.items(), key=lambda kv: -kv[1])[:30])
    return {"total_ms_per_step": sum(totals.values()), "top_ms_per_step": top}


small = context < 8192  # a CPU smoke run: the small model, budget 32
settings = bench_offload.Settings(big_context=context, warmup=3, reps=10, rows=(1,), dense_steps=0, small=small,
                                  budget=32 if small else 2048)
out_dir = os.environ.get("OUT", "/tmp")
b = bench_offload.OffloadBench(settings, os.path.join(out_dir, "unused.json"), time.perf_counter())
b.link_gbps = 47.0
b.build()
p = b.decoder._pieces
pieces = {name: getattr(p, name) for name in ("embed", "head", "dense_layer", "hata_select", "hata_finish",
                                              "hata_finish_select")}
b.decoder._pieces = p.__class__(**{**{f: getattr(p, f) for f in p.__dataclass_fields__},
                                   **{n: timed(n, f) for n, f in pieces.items()}})
c = b.config
dense = b.device_caches(context, range(settings.dense_layers))
caches = [dense[i] if i in dense else b.filled_offloaded_cache(i, context) for i in range(c.num_layers)]
caches[settings.dense_layers].prepare(settings.budget)
for name in ("append_and_gather", "append_new_token"):
    setattr(offload_mod.OffloadedCache, name, timed(name, getattr(offload_mod.OffloadedCache, name)))
jax.device_get = timed("device_get", jax.device_get)
host_memory.gather_to_device = timed("gather_to_device", host_memory.gather_to_device)
tokens = jnp.zeros((settings.batch,), jnp.int32)
tokens = b.compile_landings(caches, tokens)
for _ in range(3):
    tokens = b.decoder.step(tokens, caches)
tokens.block_until_ready()
spent.clear()
calls.clear()
steps = 10
start = time.perf_counter()
for _ in range(steps):
    tokens = b.decoder.step(tokens, caches)
    tokens.block_until_ready()
total = time.perf_counter() - start
rows = {name: {"ms_per_step": 1e3 * t / steps, "calls_per_step": calls[name] / steps} for name, t in spent.items()}
with tempfile.TemporaryDirectory() as folder:
    with jax.profiler.trace(folder):
        for _ in range(3):
            tokens = b.decoder.step(tokens, caches)
            tokens.block_until_ready()
    device = kernel_ms(folder, 3)
result = {"device": jax.devices()[0].device_kind, "context": context, "step_ms": 1e3 * total / steps, "pieces": rows,
          "gpu": device}
print(json.dumps(result, indent=1))
with open(os.path.join(out_dir, f"profile_step_{context}.json"), "w") as f:
    json.dump(result, f, indent=1)
