"""Where a whole decode step's time goes: per-kernel device time of the jitted, donated step.

`bench.decode` times the step of a Llama-3.1-8B-shaped model; this profiles the same step (the
model's own dense or HATA decode step, caches donated, run back to back as `models.generate`
would) under `jax.profiler` and groups the GPU kernels by what they do, so the gap between a step
and its bandwidth floor splits into slow kernels, kernels that should not be there (e.g. a copy
of a cache that donation should have updated in place) and idle time between launches.

    python -m bench.profile_step --out $OUT/profile_step.json [--context 131072] [--batch 1]
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
from flax import nnx

from bench.decode import LLAMA_8B, SMALL, SMALL_MODELS, Settings, compile_step, random_hata_cache, step_function
from bench.timing import environment, write_json
from hata_jax.models import AttentionPlan, LlamaForCausalLM, generation

# Kernel-name fragments -> group (first match wins; names are XLA/Triton kernel names).
GROUPS = (
    ("hata_select", "selection"),
    ("hata_hamming", "selection"),
    ("hata_encode", "encode"),
    ("hata_sparse", "sparse attention"),
    ("hata_dense", "dense attention"),
    ("hata_", "other hata kernels"),
    ("gemm", "matmul"),
    ("gemv", "matmul"),
    ("cublas", "matmul"),
    ("cutlass", "matmul"),
    ("sm90_xmma", "matmul"),
    ("nvjet", "matmul"),
    ("dynamic_update_slice", "cache write"),
    ("dynamic-update-slice", "cache write"),
    ("copy", "copy"),
    ("memcpy", "copy"),
    ("memset", "memset"),
    ("reduce", "reduction"),
    ("fusion", "other XLA fusions"),
)


def group_of(name: str) -> str:
    lowered = name.lower()
    return next((group for fragment, group in GROUPS if fragment in lowered), "other")


def kernel_times(trace_dir: str, steps: int) -> tuple[dict, dict, float, float]:
    """({kernel: device us per step}, {kernel: launches per step}, GPU span per step in us, kernel
    launches per step) from a trace."""
    [path] = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    data = jax.profiler.ProfileData.from_file(path)
    per_kernel: collections.Counter = collections.Counter()
    counts: collections.Counter = collections.Counter()
    starts, ends = [], []
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if "stream" not in line.name.lower():
                continue
            for event in line.events:
                per_kernel[event.name] += event.duration_ns / 1e3 / steps
                counts[event.name] += 1 / steps
                starts.append(event.start_ns)
                ends.append(event.start_ns + event.duration_ns)
    span = (max(ends) - min(starts)) / 1e3 / steps if starts else 0.0
    return dict(per_kernel), dict(counts), span, len(starts) / steps


def profile_method(
    steps_obj, method, plan, caches, hash_weights, n_steps: int, hlo_path: str | None = None
) -> tuple[dict, object]:
    tokens = jnp.zeros((caches[0].batch,), jnp.int32)
    key = jax.random.PRNGKey(0)
    step, compiling = compile_step(
        step_function(steps_obj, method, plan), steps_obj.state_leaves, caches, hash_weights, caches[0].batch
    )
    if hlo_path:  # the optimized HLO names every fusion the profile shows
        with open(hlo_path, "w") as f:
            f.write(step.as_text())
    for _ in range(3):  # compile and warm up
        tokens, caches, key = step(steps_obj.state_leaves, tokens, caches, hash_weights, key)
    tokens.block_until_ready()
    enqueue, ready = [], []
    for _ in range(10):  # unprofiled: how long the host takes to launch a step, and the step until its token
        start = time.perf_counter()
        tokens, caches, key = step(steps_obj.state_leaves, tokens, caches, hash_weights, key)
        enqueue.append(time.perf_counter() - start)
        tokens.block_until_ready()
        ready.append(time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        with jax.profiler.trace(folder):
            for _ in range(n_steps):
                tokens, caches, key = step(steps_obj.state_leaves, tokens, caches, hash_weights, key)
            tokens.block_until_ready()
        wall_ms = (time.perf_counter() - start) * 1e3 / n_steps
        per_kernel, counts, span_us, launches = kernel_times(folder, n_steps)
    groups: collections.Counter = collections.Counter()
    for name, us in per_kernel.items():
        groups[group_of(name)] += us
    busy = sum(per_kernel.values())
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:25]
    result = {
        **compiling,
        "enqueue_ms_median": statistics.median(enqueue) * 1e3,
        "step_ms_median": statistics.median(ready) * 1e3,
        "wall_ms_per_step_profiled": wall_ms,
        "gpu_busy_us_per_step": busy,
        "gpu_span_us_per_step": span_us,
        "idle_us_per_step": max(span_us - busy, 0.0),
        "kernels_per_step": launches,
        "groups_us": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
        "top_kernels_us": dict(top),
        "top_kernels_launches": {name: counts[name] for name, _ in top},
    }
    return result, caches


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--context", type=int, default=131072)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--methods", nargs="+", default=["dense", "hata"])
    parser.add_argument("--small", action="store_true", help="a tiny model (CPU smoke run)")
    parser.add_argument("--hlo", metavar="DIR", help="write each method's optimized HLO to DIR/<method>.hlo.txt")
    args = parser.parse_args(argv)
    settings = Settings(**SMALL, small=True) if args.small else Settings()
    config = SMALL_MODELS["llama"] if args.small else LLAMA_8B
    dtype = jnp.bfloat16
    model = nnx.jit(lambda: LlamaForCausalLM(config, dtype=dtype, rngs=nnx.Rngs(7)))()
    steps_obj = generation.ModelSteps(model)
    keys = jax.random.split(jax.random.PRNGKey(1), config.num_layers + 1)
    hash_weights = [
        jax.random.normal(keys[i], (config.num_kv_heads, config.head_dim, settings.rbit), jnp.float32)
        for i in range(config.num_layers)
    ]
    plan = AttentionPlan.uniform(config.num_layers, "hata", settings.hata)
    shape = (args.batch, config.num_kv_heads, args.context, config.head_dim)
    start_length = args.context - 2 * (args.steps + 13)
    results = {}
    if args.hlo:
        os.makedirs(args.hlo, exist_ok=True)
    for method in args.methods:
        caches = [
            random_hata_cache(jax.random.fold_in(keys[-1], i), w, start_length, shape=shape, dtype=dtype)
            for i, w in enumerate(hash_weights)
        ]
        hlo_path = os.path.join(args.hlo, f"{method}.hlo.txt") if args.hlo else None
        result, caches = profile_method(steps_obj, method, plan, caches, hash_weights, args.steps, hlo_path)
        results[method] = result
        print(
            f"== {method}: trace {result['trace_s']:.1f} s, lower {result['lower_s']:.1f} s, compile "
            f"{result['compile_s']:.1f} s; step {result['step_ms_median']:.2f} ms "
            f"(host enqueue {result['enqueue_ms_median']:.2f} ms), "
            f"GPU busy "
            f"{result['gpu_busy_us_per_step'] / 1e3:.2f} ms, span {result['gpu_span_us_per_step'] / 1e3:.2f} ms, "
            f"{result['kernels_per_step']:.0f} kernels",
            flush=True,
        )
        for group, us in result["groups_us"].items():
            print(f"   {group:<22} {us / 1e3:8.3f} ms", flush=True)
        for name, us in list(result["top_kernels_us"].items())[:12]:
            print(f"   {us:9.1f} us  {result['top_kernels_launches'][name]:5.0f} x  {name[:90]}", flush=True)
        del caches
    write_json(
        args.out,
        {
            "environment": environment(),
            "model": "llama-3.1-8b-shaped" if not args.small else "small",
            "context": args.context,
            "batch": args.batch,
            "steps": args.steps,
            "results": results,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
