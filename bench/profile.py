"""Per-kernel device times of an op, from a JAX profiler trace.

`median_us` in bench.timing is wall time per op (launch gaps included, as in a decode step);
this module reports what the GPU itself spent in each kernel, so a slow op can be split into
slow kernels versus launch overhead.

    python -m bench.profile --out $OUT/profile.json   # the HATA decode-attention ops at 128K
    python -m bench.profile --layers --seq 131072 --budget 4096 --out $OUT/layers.json

`--layers`: one Llama-3.1-8B layer's whole decode attention per method, as `bench.selector_speed`
times it (`attention`): dense, hata (`encode_step` of the query and key for the config's score +
`hamming_topk` + `sparse_decode_attention`), loki and streaming (the selector's scores in XLA +
`select_topk` + `sparse_decode_attention`), with each op's wall time (`bench.timing.median_us`) beside
its kernels' device times, so a layer's time splits into kernels and the gaps between them.
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

import hata_jax as hj
from bench.decode_steps import hata_attention, random_hata_cache
from bench.selector_speed import random_selector_params
from bench.timing import environment, median_us, write_json
from hata_jax.models.plan import AttentionPlan
from hata_jax.models.selector_cache import selector_attention, with_selector_states


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


def layer_ops(b: int, n: int, budget: int) -> dict:
    """{name: (fn, args)}: one Llama-3.1-8B layer's decode attention (32 query heads, 8 KV heads, D = 128,
    rbit 128) per method over a full random cache of `n` tokens per sequence, batch `b`."""
    hq, hkv, d, rbit = 32, 8, 128, 128
    keys = jax.random.split(jax.random.PRNGKey(1), 6)
    w = jax.random.normal(keys[0], (hkv, d, rbit), jnp.float32)
    cache = random_hata_cache(keys[1], w, n, shape=(b, hkv, n, d), dtype=jnp.bfloat16)
    q = jax.random.normal(keys[2], (b, hq, d), jnp.bfloat16)
    k_new = jax.random.normal(keys[3], (b, hkv, d), jnp.bfloat16)
    hata = hj.HataConfig(rbit=rbit, budget=budget)
    ops = {
        "dense_layer": (lambda q, c: hj.dense_decode_attention(q, c.k, c.v, c.lengths, impl="pallas"), (q, cache)),
        # k_new and w are arguments, as in the model's step (closed over, XLA would fold their work into constants)
        "hata_layer": (lambda q, c, k_new, w: hata_attention(q, k_new, c, w, hata, "pallas"), (q, cache, k_new, w)),
    }
    for i, method in enumerate(("loki", "streaming")):
        plan = AttentionPlan.for_method(1, method, hata, "pallas", dense_layers=0)
        params = random_selector_params(plan, keys[4 + i], hq, hkv, d)
        [selector_cache] = with_selector_states([cache], plan, [params])
        ops[f"{method}_layer"] = (lambda q, c, plan=plan, params=params: selector_attention(q, c, plan, params),
                                  (q, selector_cache))
    return ops


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--seq", type=int, default=131072)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--layers", action="store_true", help="whole layers per method (see the module docstring)")
    args = parser.parse_args(argv)
    if args.layers:
        results = {}
        for name, (fn, fargs) in layer_ops(args.batch, args.seq, args.budget).items():
            results[name] = {"wall": median_us(fn, [fargs]), "device_us": device_kernel_us(fn, fargs)}
            kernels = {kk: round(vv, 1) for kk, vv in list(results[name]["device_us"].items())[:12]
                       if isinstance(vv, float)}
            print(f"{name:<16} wall {results[name]['wall']['median_us']:7.1f} us  device {kernels}", flush=True)
        write_json(args.out, {"environment": environment(), "batch": args.batch, "seq": args.seq,
                              "budget": args.budget, "layers": results})
        return 0
    b, hq, hkv, d, rbit, budget, n = args.batch, 32, 8, 128, 128, args.budget, args.seq
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
        "encode_step": (lambda q, kn, w: hj.encode_step(q, kn, w, impl="pallas"), (q, k[:, :, 0], w)),
        "encode_prefill_32k": (lambda x, w: hj.encode(x, w, head_axis=1, impl="pallas"), (k[:, :, :32768], w)),
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
