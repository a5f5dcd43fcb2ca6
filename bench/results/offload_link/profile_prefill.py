import cProfile, pstats, time, os, sys, json, glob, tempfile, collections, io
import numpy as np, jax, jax.numpy as jnp
from bench import offload as bo
t = int(sys.argv[1]); chunk = int(sys.argv[2])
s = bo.Settings(prefill_tokens=t, prefill_chunk=chunk, small=t < 1024)
b = bo.OffloadBench(s, "/tmp/x.json", time.perf_counter()); b.build()
tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(0), (1, t), 0, b.config.vocab_size, jnp.int32))
out = {}
b.decoder.prefill(tokens, np.array([t]), t + 8, chunk=chunk)
st = time.perf_counter(); b.decoder.prefill(tokens, np.array([t]), t + 8, chunk=chunk); out["chunked_s"] = time.perf_counter() - st
pr = cProfile.Profile()
with tempfile.TemporaryDirectory() as folder:
    with jax.profiler.trace(folder):
        pr.enable(); st = time.perf_counter(); b.decoder.prefill(tokens, np.array([t]), t + 8, chunk=chunk); pr.disable()
        out["traced_s"] = time.perf_counter() - st
    [path] = glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True)
    data = jax.profiler.ProfileData.from_file(path)
tot = collections.Counter(); cnt = collections.Counter()
for plane in data.planes:
    if plane.name.startswith("/device:GPU"):
        for line in plane.lines:
            if "stream" in line.name.lower():
                for e in line.events: tot[e.name] += e.duration_ns / 1e6; cnt[e.name] += 1
out["gpu_total_ms"] = sum(tot.values())
out["top"] = {k: [round(v, 2), cnt[k]] for k, v in sorted(tot.items(), key=lambda kv: -kv[1])[:25]}
f = io.StringIO(); pstats.Stats(pr, stream=f).sort_stats("tottime").print_stats(20); out["host"] = f.getvalue()[-6000:]
print(json.dumps({k: v for k, v in out.items() if k != "host"}, indent=1)); print(out["host"])
json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "profile_prefill.json"), "w"), indent=1)
