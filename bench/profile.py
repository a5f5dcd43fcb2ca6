"""Per-kernel device times of an op, from a JAX profiler trace.

`median_us` in bench.timing is wall time per op (launch gaps included, as in a decode step);
this module reports what the GPU itself spent in each kernel, so a slow op can be split into
slow kernels versus launch overhead.

    python -m bench.profile --out $OUT/profile.json   # the HATA decode-attention ops at 128K
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from bench.timing import environment, write_json


def device_kernel_us(fn: Callable[..., Any], args: tuple, *, calls: int = 5) -> dict:
    """{kernel name: mean device microseconds per call}, plus "total", for jitted `fn(*args)`."""
    f = jax.jit(fn)
    jax.block_until_ready(f(*args))
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder):
            for _ in range(calls):
                jax.block_until_ready(f(*args))
        [path] = glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True)
        data = jax.profiler.ProfileData.from_file(path)
    totals: collections.Counter = collections.Counter()
    lines_seen = set()
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            lines_seen.add(line.name)
            if "stream" not in line.name.lower():  # kernels live on the stream lines
                continue
            for event in line.events:
                totals[event.name] += event.duration_ns / 1e3 / calls
    out = dict(sorted(totals.items(), key=lambda kv: -kv[1]))
    out["total"] = sum(totals.values())
    out["lines_seen"] = sorted(lines_seen)
    return out


def main(argv=None) -> int:
    import hata_jax as hj

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--seq", type=int, default=131072)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args(argv)
    b, hq, hkv, d, rbit, budget, n = args.batch, 32, 8, 128, 128, 2048, args.seq
    keys = jax.random.split(jax.random.PRNGKey(0), 8)
    q = jax.random.normal(keys[0], (b, hq, d), jnp.bfloat16)
    k = jax.random.normal(keys[1], (b, hkv, n, d), jnp.bfloat16)
    v = jax.random.normal(keys[2], (b, hkv, n, d), jnp.bfloat16)
    w = jax.random.normal(keys[3], (hkv, d, rbit), jnp.float32)
    codes = jax.random.bits(keys[4], (b, hkv, n, rbit // 32), jnp.uint32)
    norms = jnp.abs(jax.random.normal(keys[5], (b, hkv, n), jnp.float32))
    lengths = jnp.full((b,), n, jnp.int32)
    q_codes = jax.random.bits(keys[6], (b, hq, rbit // 32), jnp.uint32)
    scores = jax.random.normal(keys[7], (b, hkv, n), jnp.float32)
    idx, count = hj.hamming_topk(q_codes, codes, norms, lengths, budget=budget, impl="pallas")
    ops = {
        "encode_step": (lambda q, kn: hj.encode_step(q, kn, w, impl="pallas"), (q, k[:, :, 0])),
        "encode_prefill_32k": (lambda x: hj.encode(x, w, head_axis=1, impl="pallas"), (k[:, :, :32768],)),
        "hamming_scores": (lambda *a: hj.hamming_scores(*a, impl="pallas"), (q_codes, codes, norms, lengths)),
        "select_topk": (lambda s: hj.select_topk(s, budget, lengths, impl="pallas"), (scores,)),
        "lax.top_k": (lambda s: jax.lax.top_k(s, budget), (scores,)),
        "hamming_topk": (
            lambda *a: hj.hamming_topk(*a, budget=budget, impl="pallas"),
            (q_codes, codes, norms, lengths),
        ),
        "sparse_decode": (lambda q, i, c: hj.sparse_decode_attention(q, k, v, i, c, impl="pallas"), (q, idx, count)),
        "dense_decode": (lambda q: hj.dense_decode_attention(q, k, v, lengths, impl="pallas"), (q,)),
    }
    results = {}
    for name, (fn, fargs) in ops.items():
        try:
            results[name] = device_kernel_us(fn, fargs)
        except Exception as err:
            results[name] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
        shown = {kk: round(vv, 1) for kk, vv in list(results[name].items())[:8] if isinstance(vv, float)}
        print(f"{name:<20} {shown}", flush=True)
    write_json(args.out, {"environment": environment(), "batch": b, "seq": n, "device_us": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
