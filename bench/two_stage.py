"""Two-stage HATA on the GPU: one decode layer at Llama-3.1-8B shapes, plain HATA against
two-stage HATA (`HataConfig.candidates`) and dense attention, in one run.

    python -m bench.two_stage --out bench/results/two_stage_h100.json [--configs 131072:1 32768:8]
        [--candidates 1 2 4] [--budget 2048]

First checks that the Pallas two-stage step equals the reference on a small left-padded cache.
Wall: one jit applies the layer to `STEPS` steps' arguments with the cache threaded through and
donated (its lengths rewound after each step, so the context stays put), groups of calls back to
back, median per step. Device: the profiler's kernel time per step. Bytes per step (the floor's
numerator, read once at the measured read bandwidth): the codes and norms of the context, the
keys of the `c x budget` candidates (two-stage only), and K and V of the budget.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import hata_jax as hj
from bench.profile import device_kernel_us
from bench.timing import environment, read_bandwidth_gbps, write_json

Q_HEADS, KV_HEADS, HEAD_DIM, RBIT = 32, 8, 128, 128
STEPS = 8


def check_pallas_equals_reference(candidates: int) -> dict:
    rng = np.random.default_rng(candidates)
    b, hkv, g, s, d = 3, 2, 4, 3000, 128
    k, v = (jnp.asarray(rng.standard_normal((b, hkv, s, d)), jnp.bfloat16) for _ in range(2))
    w = jnp.asarray(rng.standard_normal((hkv, d, RBIT)), jnp.float32)
    cache = hj.HataCache.from_kv(k, v, w, [2999, 1800, 2500], starts=[0, 300, 7])
    q = jnp.asarray(2 * rng.standard_normal((b, hkv * g, d)), jnp.bfloat16)
    k_new, v_new = (jnp.asarray(rng.standard_normal((b, hkv, d)), jnp.bfloat16) for _ in range(2))
    config = hj.HataConfig(rbit=RBIT, budget=128, candidates=candidates, sink=4, recent=16)
    want, _ = hj.hata_decode_attention(q, k_new, v_new, cache, w, config, impl="reference")
    got, _ = jax.jit(lambda c: hj.hata_decode_attention(q, k_new, v_new, c, w, config, impl="pallas"))(cache)
    err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
    scale = float(jnp.max(jnp.abs(want.astype(jnp.float32))))
    return {"candidates": candidates, "max_abs_err": err, "max_abs_out": scale, "ok": err <= 2e-2 * scale}


def layer_program(config: hj.HataConfig | None, w):
    """The layer over STEPS steps (config None: dense), the cache threaded and its lengths rewound."""

    def program(carry, steps):
        cache, acc = carry
        for q, k_new, v_new in steps:
            if config is None:
                cache = cache.append(k_new, v_new, None)
                out = hj.dense_decode_attention(q, cache.k, cache.v, cache.lengths)
            else:
                out, cache = hj.hata_decode_attention(q, k_new, v_new, cache, w, config)
            cache = dataclasses.replace(cache, lengths=cache.lengths - 1)
            acc = acc + out[0, 0, 0].astype(jnp.float32)  # keep the output alive
        return cache, acc

    return jax.jit(program, donate_argnums=0)


def time_layer(program, carry, steps, reps: int = 15, group: int = 4) -> tuple[dict, object]:
    box = [carry]

    def run():
        box[0] = program(box[0], steps)
        return box[0]

    for _ in range(3):
        jax.block_until_ready(run())
    per_step = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(group):
            run()
        jax.block_until_ready(box[0])
        per_step.append((time.perf_counter() - t0) * 1e6 / (group * STEPS))
    kernels = device_kernel_us(lambda c: program(c, steps), (box[0],), calls=1)
    return {"wall_us": statistics.median(per_step), "device_us": kernels.pop("total") / STEPS,
            "kernels": {name: round(us / STEPS, 2) for name, us in list(kernels.items())[:10]
                        if name != "lines_seen"}}, box[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--configs", nargs="+", default=["131072:1", "32768:8"], help="context:batch")
    parser.add_argument("--candidates", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--budget", type=int, default=2048)
    args = parser.parse_args(argv)
    result = {"environment": environment(), "checks": [check_pallas_equals_reference(c) for c in args.candidates
                                                       if c > 1]}
    print(result["checks"], flush=True)
    read_gbps = read_bandwidth_gbps()
    result["read_gbps"] = read_gbps
    rows = []
    key = jax.random.PRNGKey(0)
    for item in args.configs:
        context, batch = map(int, item.split(":"))
        ks = jax.random.split(jax.random.fold_in(key, context * 10 + batch), 6)
        w = jax.random.normal(ks[0], (KV_HEADS, HEAD_DIM, RBIT), jnp.float32)
        shape = (batch, KV_HEADS, context + 1024, HEAD_DIM)
        cache = hj.HataCache.init(batch, KV_HEADS, context + 1024, HEAD_DIM, rbit=RBIT, dtype=jnp.bfloat16)
        cache = cache.prefill(jax.random.normal(ks[1], shape[:2] + (context, HEAD_DIM), jnp.bfloat16),
                              jax.random.normal(ks[2], shape[:2] + (context, HEAD_DIM), jnp.bfloat16), w,
                              jnp.full((batch,), context, jnp.int32))
        steps = [tuple(jax.random.normal(jax.random.fold_in(ks[3 + j], i), (batch, heads, HEAD_DIM), jnp.bfloat16)
                       for j, heads in enumerate((Q_HEADS, KV_HEADS, KV_HEADS))) for i in range(STEPS)]
        for candidates in [*args.candidates, None]:  # dense last: its appends leave the cache uncoded
            config = None if candidates is None else hj.HataConfig(rbit=RBIT, budget=args.budget,
                                                                     candidates=candidates)
            timing, (cache, _) = time_layer(layer_program(config, w), (cache, jnp.float32(0)), steps)
            token_bytes = 2 * HEAD_DIM * 2  # K and V, bf16
            if config is None:
                nbytes = batch * KV_HEADS * context * token_bytes
            else:
                picked = config.candidate_budget(context)
                nbytes = batch * KV_HEADS * (context * (RBIT // 8 + 4) + args.budget * token_bytes
                                             + (picked * HEAD_DIM * 2 if candidates > 1 else 0))
            row = {"context": context, "batch": batch, "method": "dense" if config is None else "hata",
                   "candidates": candidates, "budget": args.budget, "bytes": nbytes,
                   "floor_us": nbytes / (read_gbps * 1e3), **timing}
            print(row, flush=True)
            rows.append(row)
        del cache
    result["rows"] = rows
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
