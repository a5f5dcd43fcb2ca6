"""Decode-time q/k/v projections of one layer: separate products versus one product with the
three matrices concatenated inside the program versus one stored fused matrix.

At batch 1 XLA rewrites a small vector-matrix dot (Llama-3.1-8B's k and v projections,
4096 x 1024) into an elementwise multiply plus a reduction instead of a GEMM, which moves several
times the bytes of the weights; padding the batch to two rows keeps GEMMs, and one product with
the matrices concatenated in the program (what `hata_jax.models.llama.SelfAttention` does) is faster still:
XLA reads the concatenation straight into its GEMM, without a copy. This measures, per batch
size, the wall time per layer (`bench.timing.median_us` over distinct layers' weights, so the L2
cannot serve them) and which fusions XLA chose, against the bytes floor.

    python -m bench.projections --out $OUT/projections.json
"""
from __future__ import annotations

import argparse
import functools
import re
import sys

import jax
import jax.numpy as jnp

from bench.timing import environment, floor_bandwidth_gbps, many_calls, median_us, write_json

# (hidden, q projection outputs, k and v projection outputs)
SHAPES = {"llama": (4096, 4096, 1024), "smollm2": (576, 576, 192)}
PADDED_ROWS = (2, 4)


def separate(x, wq, wk, wv):
    return x @ wq, x @ wk, x @ wv


def padded(x, wq, wk, wv, *, rows: int):
    """Separate products on the batch padded with zero rows up to `rows` (GEMMs, not reductions)."""
    full = jnp.pad(x, ((0, rows - x.shape[0]), (0, 0)))
    return tuple((full @ w)[:x.shape[0]] for w in (wq, wk, wv))


def fused(x, wqkv):
    return x @ wqkv


def concatenated(x, wq, wk, wv):
    """One product with the matrices concatenated inside the program (as `hata_jax.models.llama`); were the
    concatenation not fused into the GEMM, it would copy 50 MB per Llama layer."""
    return x @ jnp.concatenate([wq, wk, wv], axis=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4, 8, 16])
    parser.add_argument("--small", action="store_true", help="small matrices (CPU smoke run)")
    args = parser.parse_args(argv)
    shapes = {"small": (256, 256, 64)} if args.small else SHAPES
    layers = 4 if args.small else 24
    key = jax.random.PRNGKey(0)
    bandwidth = floor_bandwidth_gbps(1 << (20 if args.small else 30))
    rows = []
    for model, (hidden, q_out, kv_out) in shapes.items():
        weights = [tuple(jax.random.normal(jax.random.fold_in(key, 3 * i + j), (hidden, n), jnp.bfloat16)
                         for j, n in enumerate((q_out, kv_out, kv_out))) for i in range(layers)]
        fused_weights = [(jnp.concatenate(w, axis=1),) for w in weights]
        nbytes = 2 * hidden * (q_out + 2 * kv_out)
        floor_us = nbytes / (bandwidth["floor_gbps"] * 1e3)
        for batch in args.batches:
            x = jax.random.normal(key, (batch, hidden), jnp.bfloat16)
            variants = [("separate", separate, [(x,) + w for w in weights])]
            if batch == 1:
                variants += [(f"separate, batch 1 padded to {rows}", functools.partial(padded, rows=rows),
                              [(x,) + w for w in weights]) for rows in PADDED_ROWS]
            variants.append(("fused", fused, [(x,) + w for w in fused_weights]))
            variants.append(("concatenated in the program", concatenated, [(x,) + w for w in weights]))
            for name, fn, arg_sets in variants:
                program = many_calls(fn, arg_sets)
                hlo = program.as_text()
                timing = median_us(fn, arg_sets, compiled=program)
                row = {"model": model, "hidden": hidden, "q_out": q_out, "kv_out": kv_out, "batch": batch,
                       "weights": name, **timing, "floor_us": floor_us, "of_floor": timing["median_us"] / floor_us,
                       "fusions": {kind: len(re.findall(rf"%{kind}[\w.]* = ", hlo)) / len(arg_sets)
                                   for kind in ("gemm_fusion", "input_reduce_fusion", "loop_multiply_fusion")}}
                rows.append(row)
                print(f"{model:<8} batch {batch:>3} {name:<30} {row['median_us']:8.1f} us per layer "
                      f"({row['of_floor']:.2f}x floor {floor_us:.1f} us)  fusions per layer {row['fusions']}",
                      flush=True)
    write_json(args.out, {"environment": environment(), "bandwidth": bandwidth, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
