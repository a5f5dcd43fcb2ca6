"""Where an offloaded HATA step's host time goes (issue 18): Llama-3.1-8B shapes, 64K x 2, every
piece of OffloadDecoder.step wrapped with a host timer. Writes $OUT/profile_step.json.

    python bench/results/offload_link/profile_step.py [context]
"""
import collections
import json
import os
import sys
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
offload_mod.OffloadedCache.append_and_gather = timed("append_and_gather", offload_mod.OffloadedCache.append_and_gather)
jax.device_get = timed("device_get", jax.device_get)
host_memory.gather_to_device = timed("gather_to_device", host_memory.gather_to_device)
offload_mod.OffloadedCache.append_new_token = timed("append_new_token", offload_mod.OffloadedCache.append_new_token)
tokens = jnp.zeros((settings.batch,), jnp.int32)
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
result = {"device": jax.devices()[0].device_kind, "context": context, "step_ms": 1e3 * total / steps, "pieces": rows}
print(json.dumps(result, indent=1))
with open(os.path.join(out_dir, f"profile_step_{context}.json"), "w") as f:
    json.dump(result, f, indent=1)
