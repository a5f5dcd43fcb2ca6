"""Where the chunked prefill into host memory spends its time (issue 18): Llama-3.1-8B shapes,
random weights, one prompt of T tokens in chunks of C; the second run timed, the third traced
(GPU kernel time by kernel) and profiled on the host (cProfile, by own time). Writes
$OUT/profile_prefill.json.

    python bench/results/offload_link/profile_prefill.py T C      # T < 1024: the small model (CPU)
"""
import collections
import cProfile
import glob
import io
import json
import os
import pstats
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench import offload as bench_offload

tokens_n, chunk = int(sys.argv[1]), int(sys.argv[2])
settings = bench_offload.Settings(prefill_tokens=tokens_n, prefill_chunk=chunk, small=tokens_n < 1024)
b = bench_offload.OffloadBench(settings, "/tmp/unused.json", time.perf_counter())
b.build()
tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(0), (1, tokens_n), 0, b.config.vocab_size, jnp.int32))
lengths = np.array([tokens_n])


def prefill():
    return b.decoder.prefill(tokens, lengths, tokens_n + 8, chunk=chunk)


out = {"device": jax.devices()[0].device_kind, "tokens": tokens_n, "chunk": chunk}
prefill()
start = time.perf_counter()
prefill()
out["chunked_s"] = time.perf_counter() - start
host = cProfile.Profile()
with tempfile.TemporaryDirectory() as folder:
    with jax.profiler.trace(folder):
        host.enable()
        start = time.perf_counter()
        prefill()
        host.disable()
        out["traced_s"] = time.perf_counter() - start
    [path] = glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True)
    data = jax.profiler.ProfileData.from_file(path)
total, calls = collections.Counter(), collections.Counter()
for plane in data.planes:
    if plane.name.startswith("/device:GPU"):
        for line in plane.lines:
            if "stream" in line.name.lower():
                for event in line.events:
                    total[event.name] += event.duration_ns / 1e6
                    calls[event.name] += 1
out["gpu_total_ms"] = sum(total.values())
out["top"] = {k: [round(v, 2), calls[k]] for k, v in sorted(total.items(), key=lambda kv: -kv[1])[:25]}
text = io.StringIO()
pstats.Stats(host, stream=text).sort_stats("tottime").print_stats(20)
out["host"] = text.getvalue()[-6000:]
print(json.dumps({k: v for k, v in out.items() if k != "host"}, indent=1))
print(out["host"])
with open(os.path.join(os.environ.get("OUT", "/tmp"), "profile_prefill.json"), "w") as f:
    json.dump(out, f, indent=1)
