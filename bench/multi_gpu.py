"""Multi-GPU decoding, head- or sequence-sharded: the model's decode step on 1 GPU versus on a mesh.

    python -m bench.multi_gpu --out $OUT/multi_gpu.json            # 2 GPUs (one host)
    python -m bench.multi_gpu --out $OUT/seq.json --split positions --cases 32,1,1048576 --devices 4 8
    python -m bench.multi_gpu --out /tmp/multi_gpu.json --small    # CPU smoke run, 4 virtual devices
    python -m bench.multi_gpu --report bench/results/multi_gpu_h200x2.json   # markdown table

Models: Llama-3.1-8B shapes (`hata_jax.models.presets.LLAMA_8B`: hidden 4096, 32 q / 8 KV heads, D=128,
intermediate 14336, vocab 128256, bf16) with random weights made on the devices, with all 32
layers or fewer (`--cases`). On one GPU the model is the plain single-device product path
(`mesh=None`); on n GPUs it is tensor-parallel over a one-axis mesh (`hata_jax.models.sharding.init_model`:
q/k/v/gate/up column-split, o/down row-split, LM head vocabulary-split) and its attention runs in
the head-sharded `shard_map` wrappers (`hata_jax.sharding`, the plan's mesh): each GPU holds the
K/V cache, codes and norms of 8/n KV heads and selects without communication; the two
all-reduces per layer of the row-split matmuls are the only communication. With `--split
positions` the weights are replicated and every layer's cache is split along the positions
(`hata_jax.sequence_sharding`, the plan's mesh with `split="positions"`): each GPU holds
`context / n` positions of every sequence and head, and per layer exchanges its local
candidates' keys (HATA) and its partial attention output (both methods).

Caches: every layer holds `context` random tokens per sequence (k, v ~ N(0, 1) in bf16, codes of
the keys under the layer's random projection, their norms; `bench.decode_steps.random_hata_cache`,
built on each device for its own heads, never whole on one device). Each method starts at
`context - slack` tokens and appends one per step.

Memory: Llama-3.1-8B holds 128 KiB of K/V per token (plus 4.5 KiB of codes and norms), so 128K
tokens x batch 8 is 143 GB of caches plus 16 GB of weights: more than one GPU holds (an H200
has ~140 GB). That case runs on 2 GPUs only (the 1-GPU row records the skip, with the sizes).
What is compared on 1 versus 2 GPUs, at 128K: (a) batch 8 with the first 16 layers of the model
(71 GB of caches, 9 GB of weights: fits one GPU; per-layer work and communication are those of
the full model), (b) the whole 32-layer model at batch 4. Each job checks the free memory of its
devices first and is skipped, with the reason, when it does not fit.

Methods: the model's own decode step (`hata_jax.models.generation.ModelSteps.decode`, greedy, caches
donated): `dense` (every layer dense) and `hata` (budget 2048, rbit 128, layers 0-1 dense).
Timing: wall time per step until its token is ready (`block_until_ready`, as `hata_jax.models.generate`
runs them), median and p10/p90 over `--reps` steps after `--warmup` calls (the first compiles:
`first_call_s`); then the same number of steps in groups of PIPELINE dispatched back to back
(`pipelined_ms`). Tokens/s = batch / median. Bytes per step: `bench.decode_bytes.step_bytes` (weights
read + the attention's reads) and per device that over n; `floor_ms` is the per-device bytes at
the bandwidth measured on device 0 in the same run.

Jobs run case by case (1 GPU, then n GPUs); a job that would overrun `--time-budget` (estimated
from the slowest job so far) is skipped with the reason. The JSON is rewritten after every result.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bench import decode, decode_bytes, decode_steps
from bench.timing import environment, floor_bandwidth_gbps, write_json
from hata_jax import HataConfig, sequence_sharding
from hata_jax import sharding as head_sharding
from hata_jax.models import AttentionPlan, LlamaConfig, LlamaForCausalLM, generation
from hata_jax.models import sharding as model_sharding
from hata_jax.models.plan import MESH_SPLITS
from hata_jax.models.presets import LLAMA_8B, SMALL_MODELS

GB = 1e9
METHODS = decode_steps.PRODUCT_METHODS  # ("dense", "hata")
AXIS = "model"
GOAL = 1.6  # 2 GPUs give at least 1.6x the single-GPU tokens/s at 128K, batch 8
SMALL_LLAMA = dataclasses.replace(SMALL_MODELS["llama"], num_kv_heads=4)  # 8 q / 4 KV heads: splits 4 ways


@dataclasses.dataclass(frozen=True)
class Settings:
    cases: tuple[tuple[int, int, int], ...] = ((32, 8, 131072), (16, 8, 131072), (32, 4, 131072))  # layers, batch, ctx
    devices: tuple[int, ...] = (1, 2)
    budget: int = 2048
    rbit: int = 128
    dense_layers: int = 2
    warmup: int = 2
    reps: int = 20
    time_budget_s: float = 420.0
    small: bool = False
    split: str = "heads"  # what a mesh splits: "heads" or "positions" (models.plan.MESH_SPLITS)

    @property
    def slack(self) -> int:
        """Steps one method runs on a cache (its lengths start `slack` below the capacity)."""
        return self.warmup + self.reps + self.pipelined_groups * decode.PIPELINE

    @property
    def pipelined_groups(self) -> int:
        return max(1, self.reps // decode.PIPELINE)

    @property
    def hata(self) -> HataConfig:
        return HataConfig(rbit=self.rbit, budget=self.budget)

    def config(self, layers: int) -> LlamaConfig:
        return dataclasses.replace(SMALL_LLAMA if self.small else LLAMA_8B, num_layers=layers)


SMALL = dict(cases=((4, 2, 256), (3, 3, 192)), devices=(1, 2, 4), budget=32, warmup=1, reps=4, time_budget_s=300.0)


def make_mesh(devices: int):
    """None for one device (the single-device product path), else a mesh over the first `devices`."""
    return None if devices == 1 else model_sharding.make_mesh(jax.devices()[:devices], AXIS)


def build_model(config: LlamaConfig, mesh, dtype, split: str) -> LlamaForCausalLM:
    """Random weights made on the device(s): tensor-parallel over `mesh` (split "heads"),
    replicated on it ("positions"), or on device 0."""
    if mesh is not None and split == "heads":
        return model_sharding.init_model(config, mesh, AXIS, dtype=dtype, seed=7)
    model = nnx.jit(lambda: LlamaForCausalLM(config, dtype=dtype, rngs=nnx.Rngs(7)))()
    return model if mesh is None else model_sharding.replicate_model(model, mesh)


def build_caches(key, hash_weights, config: LlamaConfig, batch: int, context: int, dtype, mesh, split: str):
    """One random full HataCache per layer (`bench.decode_steps.random_hata_cache`); with a mesh, each
    device makes its own KV heads' caches (split "heads") or its own positions of every head's
    ("positions"), from its own key, never the whole cache on one device."""
    keys = jax.random.split(key, config.num_layers)
    if mesh is None:
        shape = (batch, config.num_kv_heads, context, config.head_dim)
        return [decode_steps.random_hata_cache(k, w, context, shape=shape, dtype=dtype)
                for k, w in zip(keys, hash_weights)]
    n = mesh.shape[AXIS]
    if split == "positions":
        local = (batch, config.num_kv_heads, context // n, config.head_dim)
        w_spec, cache_specs = P(), sequence_sharding.cache_specs(AXIS)
    else:
        local = (batch, config.num_kv_heads // n, context, config.head_dim)
        w_spec, cache_specs = head_sharding.projection_spec(AXIS), head_sharding.cache_specs(AXIS)

    def one(key, w):
        key = jax.random.fold_in(key, lax.axis_index(AXIS))
        return decode_steps.random_hata_cache(key, w, context, shape=local, dtype=dtype)  # lengths: the global ones

    make = jax.jit(head_sharding.shard_map(one, mesh=mesh, in_specs=(P(), w_spec), out_specs=cache_specs))
    return [make(k, w) for k, w in zip(keys, hash_weights)]


def replicated(tree, mesh):
    """`tree` on every device of `mesh` (as the step returns its tokens, key and cache lengths: the
    first step then compiles for the layout of all later ones); unchanged without a mesh."""
    return tree if mesh is None else jax.device_put(tree, NamedSharding(mesh, P()))


def at_length(caches, length: int, mesh):
    """`bench.decode_steps.with_length`, the lengths replicated over `mesh`."""
    caches = decode_steps.with_length(caches, length)
    return [dataclasses.replace(c, lengths=replicated(c.lengths, mesh)) for c in caches]


def time_steps(step, state_leaves, tokens, caches, hash_weights, key, warmup: int, reps: int, groups: int):
    """(per-step wall seconds of `warmup + reps` steps each waited for, per-step seconds of
    `groups` groups of PIPELINE steps dispatched back to back, caches)."""
    times, pipelined = [], []
    for _ in range(warmup + reps):
        start = time.perf_counter()
        tokens, caches, key = step(state_leaves, tokens, caches, hash_weights, key)
        tokens.block_until_ready()
        times.append(time.perf_counter() - start)
    for _ in range(groups):
        start = time.perf_counter()
        for _ in range(decode.PIPELINE):
            tokens, caches, key = step(state_leaves, tokens, caches, hash_weights, key)
        tokens.block_until_ready()
        pipelined.append((time.perf_counter() - start) / decode.PIPELINE)
    return times, pipelined, caches


def device_free_bytes(devices) -> float | None:
    """The least free memory (allocator limit - in use) among `devices`; None where not reported (CPU)."""
    stats = [d.memory_stats() or {} for d in devices]
    if not all("bytes_limit" in s for s in stats):
        return None
    return min(s["bytes_limit"] - s.get("bytes_in_use", 0) for s in stats)


@dataclasses.dataclass(frozen=True)
class Job:
    layers: int
    batch: int
    context: int
    devices: int


def ordered_jobs(s: Settings) -> list[Job]:
    """Case by case (the most important first), each on every device count in `s.devices`."""
    return [Job(layers, batch, context, n) for layers, batch, context in s.cases for n in s.devices
            if n <= len(jax.devices())]


class MultiGpuBench:
    def __init__(self, s: Settings, out: str, env: dict, bandwidth: dict, started: float):
        self.s, self.out, self.env, self.bandwidth = s, out, env, bandwidth
        self.dtype = jnp.dtype("bfloat16")
        self.rows: list[dict] = []
        self.models: dict[tuple[int, int], tuple] = {}  # (layers, devices) -> (ModelSteps, hash weights, read bytes)
        self.deadline = started + s.time_budget_s
        self.slowest_job_s = 0.0
        self.key = jax.random.PRNGKey(20261123)

    def _next_key(self):
        self.key, sub = jax.random.split(self.key)
        return sub

    def record(self, row: dict) -> None:
        self.rows.append(row)
        self.save(complete=False)

    def save(self, complete: bool) -> None:
        payload = {"environment": self.env, "device_count": len(jax.devices()), "bandwidth": self.bandwidth,
                   "settings": dataclasses.asdict(self.s), "complete": complete, "rows": self.rows}
        write_json(self.out, payload)

    def skip(self, base: dict, reason: str) -> None:
        print(f"  skip {base}: {reason}", flush=True)
        self.record({"kind": "skip", **base, "reason": reason})

    def model(self, job: Job, mesh):
        """(ModelSteps, hash weights, weight bytes a step reads) of `job`'s model, built once."""
        key = (job.layers, job.devices)
        if key not in self.models:
            config = self.s.config(job.layers)
            steps = generation.ModelSteps(build_model(config, mesh, self.dtype, self.s.split))
            w = jax.random.normal(self._next_key(), (config.num_layers, config.num_kv_heads, config.head_dim,
                                                     self.s.rbit), jnp.float32)
            if mesh is None:
                weights = list(w)
            elif self.s.split == "positions":
                weights = list(replicated(w, mesh))
            else:
                weights = model_sharding.shard_hash_weights(list(w), mesh, AXIS)
            total = decode_bytes.param_bytes(steps.state_leaves)
            self.models[key] = (steps, weights, decode_bytes.weight_read_bytes(config, total, self.dtype.itemsize))
        return self.models[key]

    def release_models(self, later: list[Job]) -> None:
        """Free the models no later job uses."""
        for key in [k for k in self.models if not any((j.layers, j.devices) == k for j in later)]:
            steps, weights, _ = self.models.pop(key)
            decode_steps.free([steps.state_leaves, weights])

    def need_bytes(self, job: Job) -> float:
        """Per-device bytes the job adds: its caches (and its model, if not built yet) over n, plus 2 GB."""
        config, s = self.s.config(job.layers), self.s
        caches = decode_bytes.cache_bytes(config, job.batch, job.context, s.rbit, self.dtype.itemsize,
                                          token_major=False)
        weights = 0 if (job.layers, job.devices) in self.models else decode_bytes.param_bytes(
            nnx.state(nnx.eval_shape(lambda: LlamaForCausalLM(config, dtype=self.dtype, rngs=nnx.Rngs(0)))))
        if s.split == "positions":  # the weights replicated
            return caches / job.devices + weights + 2 * GB
        return (caches + weights) / job.devices + 2 * GB

    def run_job(self, job: Job, later: list[Job]) -> None:
        s = self.s
        base = dataclasses.asdict(job)
        config = s.config(job.layers)
        free = device_free_bytes(jax.devices()[:job.devices])
        need = self.need_bytes(job)
        if free is not None and need > free:
            cache_gb = decode_bytes.cache_bytes(config, job.batch, job.context, s.rbit, 2, False) / GB
            self.skip(base, f"memory: needs {need / GB:.1f} GB per device (caches {cache_gb:.1f} GB and "
                            f"the weights over {job.devices} device(s)), {free / GB:.1f} GB free")
            return
        left = self.deadline - time.perf_counter()
        if self.slowest_job_s > left:
            self.skip(base, f"time budget: {left:.0f} s left, the slowest job so far took {self.slowest_job_s:.0f} s")
            return
        started = time.perf_counter()
        print(f"== {job.layers} layers, batch {job.batch}, context {job.context}, {job.devices} device(s)", flush=True)
        mesh = make_mesh(job.devices)
        steps, hash_weights, weights_read = self.model(job, mesh)
        caches = jax.block_until_ready(build_caches(self._next_key(), hash_weights, config, job.batch, job.context,
                                                    self.dtype, mesh, s.split))
        memory = device_free_bytes(jax.devices()[:job.devices])
        plan = AttentionPlan.uniform(config.num_layers, "hata", s.hata, dense_layers=s.dense_layers)
        plan = plan.on_mesh(mesh, AXIS, split=s.split)
        for method in METHODS:
            caches = at_length(caches, job.context - s.slack, mesh)
            step = decode_steps.step_function(steps, method, plan)
            tokens, key = replicated((jax.random.randint(self._next_key(), (job.batch,), 0, config.vocab_size,
                                                         jnp.int32), jax.random.PRNGKey(0)), mesh)
            try:
                times, pipelined, caches = time_steps(step, steps.state_leaves, tokens, caches, hash_weights, key,
                                                      s.warmup, s.reps, s.pipelined_groups)
            except Exception as err:  # keep the other results; a failed call may have consumed the caches
                print(f"!! {base} {method}: {type(err).__name__}: {str(err)[:300]}", flush=True)
                self.record({"kind": "error", **base, "method": method, "error": f"{type(err).__name__}: {err}"[:1500]})
                caches = decode_steps.surviving(caches)
                if caches is None:
                    break
                continue
            decode_steps.check_no_overflow(caches)
            self.step_row(base, config, method, times, pipelined, weights_read, memory)
        decode_steps.free(caches)
        self.release_models(later)
        self.slowest_job_s = max(self.slowest_job_s, time.perf_counter() - started)

    def step_row(self, base, config, method, times, pipelined, weights_read, free_after_caches) -> None:
        s, n = self.s, base["devices"]
        timed = times[s.warmup:]
        median = statistics.median(timed)
        nbytes = decode_bytes.step_bytes(config, method, base["batch"], base["context"], s.hata, self.dtype.itemsize,
                                         weights_read, s.dense_layers)
        # Per device: everything over n, but replicated weights are read whole by every device.
        per_device = nbytes / n if s.split == "heads" else weights_read + (nbytes - weights_read) / n
        floor_ms = per_device / (self.bandwidth["floor_gbps"] * 1e6)
        row = {"kind": "step", **base, "method": method, "median_ms": 1e3 * median,
               "p10_ms": 1e3 * float(np.percentile(timed, 10)), "p90_ms": 1e3 * float(np.percentile(timed, 90)),
               "steps": len(timed), "first_call_s": times[0], "tokens_per_s": base["batch"] / median,
               "pipelined_ms": 1e3 * statistics.median(pipelined), "bytes": nbytes, "bytes_per_device": per_device,
               "floor_ms": floor_ms, "of_floor": 1e3 * median / floor_ms}
        if free_after_caches is not None:
            row["free_gb_after_caches"] = free_after_caches / GB
        self.record(row)
        print(f"  {method:<6} {row['median_ms']:8.2f} ms/step  {row['tokens_per_s']:8.1f} tok/s  back to back "
              f"{row['pipelined_ms']:.2f} ms  {row['of_floor']:.2f}x floor  (first call {times[0]:.1f} s)", flush=True)


# ----------------------------------------------------------------------------- results table

def speedups(rows: list[dict]) -> list[dict]:
    """Per (layers, batch, context, method): the 1-device row, each multi-device row and its tokens/s ratio."""
    steps = [r for r in rows if r["kind"] == "step"]
    out = []
    for r in steps:
        if r["devices"] == 1:
            continue
        one = next((o for o in steps if o["devices"] == 1 and all(o[k] == r[k] for k in
                                                                  ("layers", "batch", "context", "method"))), None)
        out.append({"row": r, "single": one,
                    "speedup": r["tokens_per_s"] / one["tokens_per_s"] if one else None})
    return out


def report_markdown(data: dict) -> str:
    env, s, rows = data["environment"], data["settings"], data["rows"]
    bw = data["bandwidth"]
    lines = [f"Split over the devices: {s.get('split', 'heads')}. "
             f"Device: {data.get('device_count', '?')} x {env['device']} ({env['backend']}), jax {env['jax']}, commit "
             f"{env['commit']}, {env['date']}. HATA budget {s['budget']}, rbit {s['rbit']}, layers < "
             f"{s['dense_layers']} dense; bf16; median of {s['reps']} steps after {s['warmup']} warm-up calls; "
             f"floors at {bw['floor_gbps']:.0f} GB/s per device."
             f"{'' if data.get('complete') else ' (INCOMPLETE run: the JSON was cut off.)'}", "",
             "| layers | batch | context | method | devices | ms/step (p10-p90) | tokens/s | back to back ms | "
             "GB/step per device | x floor | vs 1 device |",
             "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    pairs = speedups(rows)
    ratio = {id(x["row"]): x["speedup"] for x in pairs}
    steps = sorted((r for r in rows if r["kind"] == "step"),
                   key=lambda r: (-r["layers"], -r["batch"], r["context"], METHODS.index(r["method"]), r["devices"]))
    for r in steps:
        versus = "" if r["devices"] == 1 else "-" if ratio.get(id(r)) is None else f"{ratio[id(r)]:.2f}x"
        lines.append(f"| {r['layers']} | {r['batch']} | {r['context']} | {r['method']} | {r['devices']} | "
                     f"{r['median_ms']:.2f} ({r['p10_ms']:.2f}-{r['p90_ms']:.2f}) | {r['tokens_per_s']:.1f} | "
                     f"{r['pipelined_ms']:.2f} | {r['bytes_per_device'] / GB:.2f} | {r['of_floor']:.2f} | {versus} |")
    lines += ["", f"Tokens/s on n devices over 1 device (the issue's goal: >= {GOAL}x on 2 GPUs at 128K, batch 8):", ""]
    for x in pairs:
        r = x["row"]
        what = (f"{x['speedup']:.2f}x ({r['tokens_per_s']:.1f} vs {x['single']['tokens_per_s']:.1f} tokens/s)"
                if x["speedup"] else "no 1-device run to compare with (see below)")
        lines.append(f"- {r['layers']} layers, batch {r['batch']}, context {r['context']}, {r['method']}, "
                     f"{r['devices']} devices: {what}")
    other = [r for r in rows if r["kind"] in ("skip", "error")]
    if other:
        lines += ["", "Skipped or failed:", ""] + [
            f"- {r['layers']} layers, batch {r['batch']}, context {r['context']}, {r['devices']} device(s)"
            f"{' ' + r['method'] if r.get('method') else ''}: {r.get('reason') or r.get('error', '')[:300]}"
            for r in other]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="results JSON (written after every result)")
    parser.add_argument("--report", metavar="JSON", help="print the markdown table of a results JSON (no run)")
    parser.add_argument("--small", action="store_true", help="tiny shapes on 4 virtual CPU devices (smoke run)")
    parser.add_argument("--cases", nargs="+", metavar="LAYERS,BATCH,CONTEXT",
                        type=lambda text: tuple(int(x) for x in text.split(",")),
                        help="model cases (default 32,8,131072 16,8,131072 32,4,131072)")
    parser.add_argument("--devices", nargs="+", type=int, help="device counts (default 1 2)")
    parser.add_argument("--reps", type=int, help="timed steps per method (default 20)")
    parser.add_argument("--time-budget", type=float, dest="time_budget_s", help="seconds for the jobs (default 420)")
    parser.add_argument("--split", choices=MESH_SPLITS, help="what a mesh splits (default heads)")
    args = parser.parse_args(argv)
    if bool(args.out) == bool(args.report):
        parser.error("give exactly one of --out (run the benchmark) and --report (table of a JSON)")
    if args.cases and any(len(c) != 3 for c in args.cases):
        parser.error("--cases takes LAYERS,BATCH,CONTEXT triples")
    fields = {f.name for f in dataclasses.fields(Settings)}
    given = {k: v for k, v in vars(args).items() if v is not None and k in fields}
    for name in ("cases", "devices"):
        if name in given:
            given[name] = tuple(given[name])
    return args, Settings(**{**(SMALL if args.small else {}), **given})


def main(argv=None) -> int:
    args, settings = parse_args(argv)
    if args.report:
        with open(args.report) as f:
            print(report_markdown(json.load(f)))
        return 0
    started = time.perf_counter()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # never NVLink multicast (the device machines require it off)
    # Let the allocator take most of each GPU (the default pool is 75%); read when the backend starts.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    if settings.small:
        with contextlib.suppress(RuntimeError):  # virtual CPU devices: only before the backend starts
            jax.config.update("jax_num_cpu_devices", max(settings.devices))
    env = environment()
    print(env, f"{len(jax.devices())} devices", flush=True)
    bandwidth = floor_bandwidth_gbps(1 << (20 if settings.small else 30))
    print(f"bandwidth (device 0): {bandwidth}", flush=True)
    bench = MultiGpuBench(settings, args.out, env, bandwidth, started)
    jobs = ordered_jobs(settings)
    for i, job in enumerate(jobs):
        try:
            bench.run_job(job, jobs[i + 1:])
        except Exception as err:  # keep the other jobs' numbers; the error goes into the JSON
            print(f"!! {job}: {type(err).__name__}: {str(err)[:300]}", flush=True)
            bench.record({"kind": "error", **dataclasses.asdict(job), "error": f"{type(err).__name__}: {err}"[:1500]})
    bench.save(complete=True)
    print(report_markdown({"environment": env, "device_count": len(jax.devices()), "bandwidth": bandwidth,
                           "settings": dataclasses.asdict(settings), "complete": True, "rows": bench.rows}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
