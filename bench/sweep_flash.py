"""Sweep the flash-decode kernels' launch parameters on the GPU against cuDNN and XLA.

    python -m bench.sweep_flash --out $OUT/sweep_flash.json

Llama-3.1-8B attention shapes (32 q heads, 8 KV heads, D=128, bf16); medians per bench.timing.
"""
from __future__ import annotations

import argparse
import itertools
import sys

import jax
import jax.numpy as jnp

import hata_jax as hj
from bench.timing import environment, floor_bandwidth_gbps, median_us, write_json
from pallas_kernels import flash_decode as fd

HQ, HKV, D = 32, 8, 128


def sweep_dense(rows, key, contexts, batches):
    for n, b in itertools.product(contexts, batches):
        ks = jax.random.split(key, 6)
        k = jax.random.normal(ks[0], (b, HKV, n, D), jnp.bfloat16)
        v = jax.random.normal(ks[1], (b, HKV, n, D), jnp.bfloat16)
        lengths = jnp.full((b,), n, jnp.int32)
        qs = [jax.random.normal(kk, (b, HQ, D), jnp.bfloat16) for kk in ks[2:6]]
        shape = {"kernel": "dense", "batch": b, "seq": n}
        nbytes = 2 * k.size * 2

        def rec(name, fn, sets, **extra):
            try:
                t = median_us(fn, sets, reps=15)["median_us"]
            except Exception as err:
                rows.append({**shape, "name": name, "error": str(err)[:300], **extra})
                print(f"  {name} {extra} failed: {str(err)[:200]}", flush=True)
                return
            rows.append({**shape, "name": name, "median_us": t, "gbps": nbytes / t / 1e3, **extra})
            print(f"  dense b={b} n={n} {name:<8} {extra} {t:9.1f} us {nbytes / t / 1e3:7.0f} GB/s", flush=True)

        sets = [(q, k, v, lengths) for q in qs]
        rec("xla", lambda q, k, v, l: hj.dense_decode_attention(q, k, v, l, impl="reference"), sets)
        kt, vt = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
        rec("cudnn", lambda q, k, v, l: jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=l,
                                                                     implementation="cudnn"),
            [(q[:, None], kt, vt, lengths) for q in qs])
        del kt, vt
        default = fd.dense_tuning(b, HKV, n, D, jnp.bfloat16)
        rec("pallas", lambda q, k, v, l: hj.dense_decode_attention(q, k, v, l, impl="pallas"), sets,
            tuning=str(default))
        variants = [(bk, st, w, 1) for bk, st, w in itertools.product((64, 128), (2, 3, 4), (4, 8))]
        variants += [(default.block_k, default.num_stages, 4, mult) for mult in (0.25, 0.5, 2)]
        for block_k, stages, warps, split_mult in variants:
            t = fd.Tuning(block_k=block_k, splits=max(1, int(default.splits * split_mult)), num_warps=warps,
                          num_stages=stages)
            rec("pallas", lambda q, k, v, l, t=t: fd.dense_decode_attention(q, k, v, l, scale=D ** -0.5,
                                                                            return_lse=False, tuning=t),
                sets, tuning=str(t))


def sweep_sparse(rows, key, budget=2048, n=131072, batches=(1, 8)):
    for b in batches:
        ks = jax.random.split(key, 10)
        k = jax.random.normal(ks[0], (b, HKV, n, D), jnp.bfloat16)
        v = jax.random.normal(ks[1], (b, HKV, n, D), jnp.bfloat16)
        qs = [jax.random.normal(kk, (b, HQ, D), jnp.bfloat16) for kk in ks[2:6]]
        idxs = [jax.random.randint(kk, (b, HKV, budget), 0, n, jnp.int32) for kk in ks[6:10]]
        count = jnp.full((b, HKV), budget, jnp.int32)
        nbytes = b * HKV * budget * (2 * D * 2 + 4)
        sets = list(zip(qs, idxs))
        default = fd.sparse_tuning(b, HKV, budget, D, jnp.bfloat16)
        variants = [None] + [fd.Tuning(block_k=bk, splits=sp, num_warps=w, num_stages=st)
                             for bk, sp, w, st in itertools.product((32, 64), (1, 4, 16, 32, 64), (4,), (1, 2))]
        for t in variants:
            try:
                call = lambda q, i, t=t: fd.sparse_decode_attention(q, k, v, i, count, scale=D ** -0.5,
                                                                    return_lse=False, tuning=t)
                med = median_us(call, sets, reps=15)["median_us"]
            except Exception as err:
                rows.append({"kernel": "sparse", "batch": b, "tuning": str(t), "error": str(err)[:300]})
                continue
            rows.append({"kernel": "sparse", "batch": b, "budget": budget, "tuning": str(t or default),
                         "median_us": med, "gbps": nbytes / med / 1e3})
            print(f"  sparse b={b} {str(t or default):<70} {med:8.1f} us {nbytes / med / 1e3:7.0f} GB/s", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    rows: list = []
    bandwidth = floor_bandwidth_gbps()
    print(f"bandwidth {bandwidth}", flush=True)
    key = jax.random.PRNGKey(0)
    for part in (lambda: sweep_sparse(rows, key), lambda: sweep_dense(rows, key, (32768, 131072), (1, 8))):
        part()
        write_json(args.out, {"environment": environment(), **bandwidth, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
