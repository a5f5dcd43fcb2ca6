"""HATA's selection and per-layer decode attention on the kernels' path, against dense.

    python -m bench.hata_layer --out $OUT/hata_layer.json [--small] [--parts select layer]

- `select`: score + select on random codes (8 KV heads, G = 4, rbit 128, k = 2048): 8 rows x
  131072 (batch 1) and 64 rows x 32768 (batch 8). `hamming_topk` carrying its state from call
  to call (a decode step's steady state), with a fresh state every call (no hint), and
  `lax.top_k` on the reference scores.
- `layer`: one Llama-3.1-8B layer's decode attention (32 query heads, 8 KV heads, D = 128,
  bf16, budget 2048): `hata_decode_attention` (its two launches: encode + append + score +
  select, then sparse attention + combine; the cache and its selection state threaded from
  step to step and donated, as in a decode loop) against our dense kernel and cuDNN on the same
  context, for every (context, batch) given.

Timing (`threaded_us`): one jitted program applies the step to `n` inputs in turn, threading
the carry (cache, state) through them; groups of program calls are dispatched back to back
and timed to completion, so the per-step wall time includes every launch gap, as in the decode
step's own jit. Medians over groups; device time (the kernels alone) from a profiler trace of
the same program. Byte floors use the copy bandwidth measured in the same run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import hata_jax as hj
from bench.profile import kernel_times_us
from bench.timing import environment, floor_bandwidth_gbps, write_json
from pallas_kernels import flash_decode, topk_select

Q_HEADS, KV_HEADS, HEAD_DIM, RBIT, BUDGET = 32, 8, 128, 128, 2048
LAYER_CONFIGS = ((4096, 1), (16384, 1), (32768, 1), (65536, 1), (131072, 1), (262144, 1),
                 (4096, 8), (16384, 8), (32768, 8))
SELECT_CONFIGS = ((1, 131072), (8, 32768))  # (batch, seq): 8 and 64 rows


def threaded_us(step, carry, xs, consts=(), *, reps: int = 15, calls_per_group: int = 4,
                profile: bool = True) -> dict:
    """Per-step wall time of `step(carry, x, *consts) -> (out, carry)` over `xs` in one program
    (see the module docstring); `carry` is donated and threaded from call to call, `consts`
    (e.g. a cache only read) are passed to every call."""

    def program(carry, xs, consts):
        outs = []
        for x in xs:
            out, carry = step(carry, x, *consts)
            outs.append(out)
        return outs, carry

    prog = jax.jit(program, donate_argnums=0)
    t0 = time.perf_counter()
    outs, carry = prog(carry, xs, consts)
    jax.block_until_ready(outs)
    compile_s = time.perf_counter() - t0
    for _ in range(2):
        outs, carry = prog(carry, xs, consts)
    jax.block_until_ready(outs)
    per_step = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(calls_per_group):
            outs, carry = prog(carry, xs, consts)
        jax.block_until_ready(outs)
        per_step.append((time.perf_counter() - t0) * 1e6 / (calls_per_group * len(xs)))
    result = {"median_us": statistics.median(per_step), "p10_us": float(np.percentile(per_step, 10)),
              "p90_us": float(np.percentile(per_step, 90)), "compile_s": compile_s, "steps_per_program": len(xs)}
    if profile and jax.default_backend() == "gpu":
        box = [carry]

        def run():
            outs, box[0] = prog(box[0], xs, consts)
            return outs

        kernels = kernel_times_us(run, calls=3)
        kernels.pop("lines_seen", None)
        result["device_us"] = kernels.pop("total") / len(xs)
        result["kernels_us"] = {k: round(v / len(xs), 2) for k, v in list(kernels.items())[:12]}
    return result


class Bench:
    def __init__(self, bandwidth_gbps: float, small: bool):
        self.bw, self.small = bandwidth_gbps, small
        self.rows: list[dict] = []
        self.key = jax.random.PRNGKey(1234)

    def next_key(self):
        self.key, sub = jax.random.split(self.key)
        return sub

    def normal(self, shape, dtype=jnp.bfloat16):
        return jax.random.normal(self.next_key(), shape, dtype)

    def record(self, group, name, shape, timing, nbytes=None, **extra):
        row = {"group": group, "name": name, **shape, **timing, **extra}
        if nbytes:
            row["bytes"] = nbytes
            row["floor_us"] = nbytes / (self.bw * 1e3)
            row["of_floor"] = timing["median_us"] / row["floor_us"]
        self.rows.append(row)
        dev = f" (device {timing['device_us']:.1f})" if "device_us" in timing else ""
        print(f"  {group:<7} {name:<34} {str(shape):<44} {timing['median_us']:>9.1f} us{dev}", flush=True)
        return timing["median_us"]

    def select(self):
        g, words = Q_HEADS // KV_HEADS, RBIT // 32
        for batch, seq in ((1, 2048), (2, 1024)) if self.small else SELECT_CONFIGS:
            budget = 64 if self.small else BUDGET
            shape = {"rows": batch * KV_HEADS, "seq": seq, "k": budget}
            code_bytes = batch * KV_HEADS * seq * (4 * words + 4)
            n_sets = int(np.clip(np.ceil(120e6 / code_bytes), 2, 8))
            lengths = jnp.full((batch,), seq, jnp.int32)
            sets = [(jax.random.bits(self.next_key(), (batch, Q_HEADS, words), jnp.uint32),
                     jax.random.bits(self.next_key(), (batch, KV_HEADS, seq, words), jnp.uint32),
                     jnp.abs(jax.random.normal(self.next_key(), (batch, KV_HEADS, seq), jnp.float32)) + 0.1)
                    for _ in range(n_sets)]

            def carried(state, x, lengths):
                idx, count, state = hj.hamming_topk(*x, lengths, budget=budget, state=state, impl="pallas")
                return idx, state

            def fresh(dummy, x, lengths):
                return hj.hamming_topk(*x, lengths, budget=budget, impl="pallas")[0], dummy

            def reference(dummy, x, lengths):
                return hj.hamming_topk(*x, lengths, budget=budget, impl="reference")[0], dummy

            state = topk_select.init_state(batch, KV_HEADS)
            self.record("select", "hamming_topk, state carried", shape,
                        threaded_us(carried, state, sets, (lengths,)), code_bytes)
            self.record("select", "hamming_topk, fresh state", shape,
                        threaded_us(fresh, jnp.zeros(()), sets, (lengths,)), code_bytes)
            self.record("select", "xla scores + lax.top_k", shape,
                        threaded_us(reference, jnp.zeros(()), sets, (lengths,)), code_bytes)

    def layer(self, configs):
        item = 2
        for context, batch in configs:
            budget = 64 if self.small else BUDGET
            hq, hkv, d = (8, 2, 64) if self.small else (Q_HEADS, KV_HEADS, HEAD_DIM)
            capacity = min(context + 1024, topk_select.MAX_SEQ)
            start = capacity - 1024
            shape = {"batch": batch, "context": context, "budget": budget}
            cfg = hj.HataConfig(rbit=RBIT, budget=budget)
            w = jax.random.normal(self.next_key(), (hkv, d, RBIT), jnp.float32)
            k = self.normal((batch, hkv, capacity, d))
            v = self.normal((batch, hkv, capacity, d))
            cache = hj.HataCache.init(batch, hkv, capacity, d, rbit=RBIT, dtype=jnp.bfloat16)
            cache = cache.prefill(k, v, w, jnp.full((batch,), start, jnp.int32))
            del k, v
            steps = [(self.normal((batch, hq, d)), self.normal((batch, hkv, d)), self.normal((batch, hkv, d)))
                     for _ in range(8)]

            def hata(cache, x, w):
                return hj.hata_decode_attention(*x, cache, w, cfg, impl="pallas")

            def dense(tickets, x, k, v, lengths):
                return _dense(x[0], k, v, lengths, tickets)

            kv_bytes = 2 * batch * hkv * context * d * item
            sel_bytes = batch * hkv * (context * (4 * RBIT // 32 + 4) + budget * (2 * d * item + 4))
            lengths = jnp.full((batch,), context, jnp.int32)
            t_dense = self.record("layer", "dense (ours)", shape, threaded_us(
                dense, jnp.zeros((batch, hkv, 1), jnp.int32), steps, (cache.k, cache.v, lengths)), kv_bytes)
            dense_device = self.rows[-1].get("device_us")
            times = {"ours": t_dense}
            if jax.default_backend() == "gpu":
                kt = jnp.swapaxes(cache.k, 1, 2)
                vt = jnp.swapaxes(cache.v, 1, 2)

                def cudnn(carry, x, kt, vt, lengths):
                    out = jax.nn.dot_product_attention(x[0][:, None], kt, vt, key_value_seq_lengths=lengths,
                                                       implementation="cudnn")
                    return out, carry

                try:
                    times["cudnn"] = self.record("layer", "cudnn", shape, threaded_us(
                        cudnn, jnp.zeros(()), steps, (kt, vt, lengths)), kv_bytes)
                except Exception as err:  # record why the baseline is missing, keep going
                    print(f"  cudnn failed: {str(err)[:200]}")
                del kt, vt
            t_hata = self.record("layer", "hata (2 launches)", shape, threaded_us(hata, cache, steps, (w,)), sel_bytes)
            best = min(times, key=times.get)
            self.rows[-1].update(best_dense=best, best_dense_us=times[best], speedup_vs_best_dense=times[best] / t_hata)
            if dense_device and "device_us" in self.rows[-1]:
                self.rows[-1]["device_speedup_vs_ours"] = dense_device / self.rows[-1]["device_us"]
            print(f"    -> HATA {times[best] / t_hata:.2f}x the best dense ({best})", flush=True)


def _dense(q, k, v, lengths, tickets):
    """Our dense kernel with its tickets threaded (as a dense layer of the model does)."""
    return flash_decode.dense_decode_attention(q, k, v, lengths, scale=q.shape[-1] ** -0.5, return_lse=False,
                                               tickets=tickets, return_tickets=True,
                                               interpret=jax.default_backend() != "gpu")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke run)")
    parser.add_argument("--parts", nargs="*", default=["select", "layer"])
    parser.add_argument("--configs", nargs="*", default=None, help="context:batch pairs for the layer part")
    args = parser.parse_args(argv)
    env = environment()
    print(env, flush=True)
    bandwidth = floor_bandwidth_gbps(1 << (24 if args.small else 30))
    print(f"bandwidth: {bandwidth}", flush=True)
    bench = Bench(bandwidth["floor_gbps"], args.small)
    configs = [tuple(int(x) for x in c.split(":")) for c in args.configs] if args.configs else (
        ((1024, 1), (2048, 2)) if args.small else LAYER_CONFIGS)
    for part in args.parts:
        try:
            bench.select() if part == "select" else bench.layer(configs)
        except Exception as err:  # keep the other parts' numbers; the error goes into the JSON
            bench.rows.append({"group": part, "error": f"{type(err).__name__}: {str(err)[:1500]}"})
            print(f"!! {part} failed: {type(err).__name__}: {str(err)[:1500]}", flush=True)
        write_json(args.out, {"environment": env, **bandwidth, "rows": bench.rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
