"""End-to-end decode benchmark: the jitted decode step of a Llama-3.1-8B-shaped model (and of
SmolLM2-135M's shapes), dense versus HATA versus exact top-k, with an attention-only sweep.

    python -m bench.decode --out $OUT/decode.json [--small] [--contexts ...] [--batches ...]
    python -m bench.decode --report bench/results/decode_h100.json   # markdown tables + PNG plots

Models: built from a :class:`hata_jax.models.LlamaConfig` with random weights made on the device (bf16,
initialisers of :class:`hata_jax.models.LlamaForCausalLM`, no checkpoint; Llama-3.1-8B: 32 layers, hidden
4096, 32/8 heads, D=128, intermediate 14336, vocab 128256, 16.1 GB). One model's weights serve
every context and batch.

Caches: for a context N and batch B every layer holds N random tokens per sequence (capacity N):
k, v ~ N(0, 1) in bf16; codes = `hata_jax.encode(k, w)` with the layer's random Gaussian
projection w and norms = `hata_jax.key_norms(k)` (the codes are those of the keys, as after a
prefill). Each method starts at `lengths = N - slack` and appends one token per step, so its steps
attend to N - slack + 1 ... N tokens (slack = the most steps a method runs, 62 by default; the
capacity N never overflows).

Methods, each a whole decode step (32 layers, projections, MLP, LM head, greedy token):
- `dense`: the model's own decode step (`hata_jax.models.generation.ModelSteps.decode`, cache donated) with
  every layer dense: our Pallas split-K dense kernel on a GPU.
- `hata`: the same step with HATA (budget 2048, rbit 128, layers 0-1 dense).
- `exact`: exact top-k selection (the oracle): each HATA layer scores every cached token by its
  softmax probability summed over the group's query heads, selects with `hata_jax.select_topk`
  and attends with `hata_jax.sparse_decode_attention`; layers 0-1 dense. (A step built from the
  model's layers, :func:`bench.decode_steps.decode_with`, since the model's plan knows only dense
  and HATA.)
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")` in every layer over a
  token-major cache `[B, S, Hkv, D]` (XLA's implementation where there is no GPU). By default
  it runs only where cuDNN beat our dense kernel in the attention-only sweep of that config
  (`--cudnn-step`); "best dense" is the faster of `dense` and `cudnn`.

Compilation: every program a job times (its steps, in-jit loops and sweep ops) is compiled ahead
of time, side by side in COMPILE_THREADS background threads, while the job's caches are built;
the timing starts once all are compiled (`compile_s` in the rows: the step's own compile time).
The layers of a step share one trace and lowering of their attention
(`hata_jax.models.llama.decode_attention` is jitted).

Timing: per step, wall time of one call until its token is ready (`block_until_ready`),
as a synchronous decode loop runs them, after `--warmup` calls; median and p10/p90 over `--reps` steps;
tokens/s = batch / median. Then `--reps` more steps in groups of PIPELINE dispatched back to back
(host dispatch overlapping the device, as in `bench.timing.median_us`): `pipelined_ms` per step.
On the most important configs
(`--extras-configs`) the product steps also run `--loop-steps` steps inside one jit
(`lax.fori_loop`), which removes the per-step host dispatch and sync: `loop_ms` per step (the
difference to `median_ms` is the launch and dispatch overhead between steps).

Attention-only sweep (per layer, same caches): `dense` (`dense_decode_attention`), `cudnn`,
`hata` (`encode_step` + `hamming_topk` + `sparse_decode_attention`) and `exact` (softmax mass +
`select_topk` + `sparse_decode_attention`), timed with `bench.timing.median_us` over distinct
layers' caches (enough to overflow the L2). A step's attention share = (layers x that method's
per-layer time, dense layers counted at the dense time) / step time; the cache append and the new
key's encoding are not in it.

Bytes per step: the weights read (all parameters but the untied embedding table, of which a
step reads B rows) plus, per layer and sequence, K and V of the attended tokens (dense, cudnn), or
codes + norms of every token and K/V rows of the `budget` selected ones (hata), or K of every
token and the selected K/V rows (exact). The floor divides them by the bandwidth measured in the
same run (`bench.timing.floor_bandwidth_gbps`).

Budget (:func:`ordered_jobs`): jobs run from the most to the least important: the core jobs (sweep,
dense, HATA, cuDNN) of 128K batch 1, 32K batch 8, 4K batch 1 (the goals,
:func:`bench.decode_report.goals`) and 32K batch 1, then the extras (exact top-k, in-jit loops) of
the goal configs, then the other core jobs, SmolLM2's interleaved after Llama's 11 first. The memory
need is computed before each job (skipped with the reason when it exceeds `--memory-gb`, e.g. Llama
128K batch 4), caches are freed between jobs, and a job that would overrun `--time-budget`
(estimated from the phases of the jobs already run, per model) is skipped with the reason. Each
result is written to the JSON as soon as it completes (atomically), so a timeout keeps them. Its
largest jobs (Llama 32K batch 8, 64K batch 4, 256K batch 1) hold ~55 GB (16.1 GB of weights, 35.7 GB
of caches).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import hata_jax as hj
from bench.decode_bytes import attention_bytes, cache_bytes, param_bytes, step_bytes, weight_bytes, weight_read_bytes
from bench.decode_report import METHODS, report_markdown, report_plots, summary
from bench.decode_steps import (
    PRODUCT_METHODS,
    check_no_overflow,
    compile_step,
    dpa_attention,
    dpa_implementation,
    exact_topk_attention,
    free,
    hata_attention,
    random_hata_cache,
    random_token_major_cache,
    step_function,
    surviving,
    with_length,
)
from bench.timing import environment, floor_bandwidth_gbps, many_calls, median_us, write_json
from hata_jax import HataConfig
from hata_jax.models import AttentionPlan, LlamaForCausalLM, generation
from hata_jax.models.presets import FULL_MODELS, LLAMA_8B, SMALL_MODELS  # noqa: F401 (bench.profile_step imports LLAMA_8B from here)

GB = 1e9
PIPELINE = 5  # steps dispatched back to back per timed group (host dispatch overlapping the device)
COMPILE_THREADS = 6  # a job's programs compile side by side (XLA's compiler releases the GIL)


# (context, batch) from the most to the least important; others follow by (batch, context).
PRIORITY = ((131072, 1), (32768, 8), (4096, 1), (32768, 1), (8192, 1), (65536, 1), (262144, 1), (32768, 4),
            (8192, 16), (8192, 8), (8192, 4), (65536, 4))
# Core jobs of the first CORE_FIRST configs come before the extras (see `ordered_jobs`).
CORE_FIRST = 4
# A model's jobs start at this place in the merged order (ties: Llama first): SmolLM2's first job
# follows Llama's 128K b1, 32K b8, 4K b1, 32K b1, their extras, 8K b1, 64K b1, 256K b1, 32K b4.
MODEL_OFFSET = {"llama": 0, "smollm2": 10}


@dataclasses.dataclass(frozen=True)
class Settings:
    models: tuple[str, ...] = ("llama", "smollm2")
    contexts: tuple[int, ...] = (4096, 8192, 32768, 65536, 131072, 262144)
    batches: tuple[int, ...] = (1, 4, 8, 16)
    methods: tuple[str, ...] = METHODS
    budget: int = 2048
    rbit: int = 128
    score: str = HataConfig.score
    dense_layers: int = 2
    dtype: str = "bfloat16"
    warmup: int = 2
    reps: int = 30
    loop_steps: int = 8
    loop_reps: int = 3
    extras_configs: int = 3
    cudnn_step: str = "auto"
    time_budget_s: float = 520.0
    memory_gb: float | None = None
    small: bool = False

    @property
    def slack(self) -> int:
        """Steps one method runs on a cache (its lengths start `slack` below the capacity)."""
        return max(self.warmup + self.reps + self.reps // PIPELINE * PIPELINE, self.loop_steps * (1 + self.loop_reps))

    @property
    def hata(self) -> HataConfig:
        return HataConfig(rbit=self.rbit, budget=self.budget, score=self.score)


SMALL = dict(contexts=(160, 256), batches=(1, 2), budget=32, warmup=1, reps=5, loop_steps=2, loop_reps=1,
             extras_configs=1, dtype="bfloat16")


# ----------------------------------------------------------------------------- the benchmark

class DecodeBench:
    def __init__(self, settings: Settings, out: str, bandwidth: dict, env: dict, memory_limit: float,
                 started: float):
        self.s, self.out, self.bandwidth, self.env = settings, out, bandwidth, env
        self.memory_limit = memory_limit
        self.configs = SMALL_MODELS if settings.small else FULL_MODELS
        self.dtype = jnp.dtype(settings.dtype)
        self.rows: list[dict] = []
        self.built: dict[str, tuple] = {}
        self.cost: dict[tuple[str, str], float] = {}  # (model, phase) -> seconds it took last time
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=COMPILE_THREADS)
        self.sweeps: dict[tuple, dict] = {}  # (model, context, batch) -> {method: attention us per layer}
        self.deadline = started + settings.time_budget_s
        self.key = jax.random.PRNGKey(20261122)

    def _next_key(self):
        self.key, sub = jax.random.split(self.key)
        return sub

    # -- bookkeeping
    def record(self, row: dict) -> dict:
        self.rows.append(row)
        self.save(complete=False)
        return row

    def save(self, complete: bool) -> None:
        payload = {"environment": self.env, "bandwidth": self.bandwidth, "settings": dataclasses.asdict(self.s),
                   "memory_limit_gb": self.memory_limit / GB, "models": self.model_info(), "complete": complete,
                   "rows": self.rows}
        write_json(self.out, payload)

    def model_info(self) -> dict:
        return {name: {**dataclasses.asdict(self.configs[name]), "param_bytes": self.weight_bytes(name)}
                for name in self.s.models}

    def skip(self, base: dict, reason: str, method: str | None = None) -> None:
        print(f"  skip {base['model']} context {base['context']} batch {base['batch']}"
              f"{' ' + method if method else ''}: {reason}", flush=True)
        self.record({"kind": "skip", **base, "method": method, "reason": reason})

    def error(self, base: dict, what: str, err: Exception) -> None:
        message = f"{type(err).__name__}: {str(err)[:1500]}"
        print(f"!! {base['model']} context {base['context']} batch {base['batch']} {what}: {message[:300]}", flush=True)
        self.record({"kind": "error", **base, "method": what, "error": message})

    def estimate(self, model: str, phase: str) -> float:
        """Seconds `phase` ("core:prepare", "extras:step:exact", ...) took last time for `model`; a
        phase not run yet is guessed as the slowest one of its group ("core:step", "extras:loop", ...)
        for the model, then for any model, or 0."""
        if (model, phase) in self.cost:
            return self.cost[(model, phase)]
        group = phase.rsplit(":", 1)[0] if phase.count(":") > 1 else phase
        for anyone in (False, True):
            seen = [t for (m, p), t in self.cost.items() if (anyone or m == model)
                    and (p == group or p.startswith(group + ":"))]
            if seen:
                return max(seen)
        return 0.0

    def over_budget(self, base: dict, phases: list[str], method: str | None = None) -> bool:
        left = self.deadline - time.perf_counter()
        estimate = sum(self.estimate(base["model"], p) for p in phases)
        if estimate > left:
            self.skip(base, f"time budget: {left:.0f} s left, estimated {estimate:.0f} s", method)
            return True
        return False

    def timed(self, model: str, phase: str, fn, *args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.cost[(model, phase)] = time.perf_counter() - start

    # -- models
    def weight_bytes(self, name: str) -> int:
        return weight_bytes(self.configs[name], self.dtype.itemsize)

    def model(self, name: str):
        """(ModelSteps, hash_weights, weights_read) of a model with random weights, built once."""
        if name not in self.built:
            config = self.configs[name]
            model = nnx.jit(lambda: LlamaForCausalLM(config, dtype=self.dtype, rngs=nnx.Rngs(7)))()
            steps = generation.ModelSteps(model)
            w = jax.random.normal(self._next_key(), (config.num_layers, config.num_kv_heads, config.head_dim,
                                                     self.s.rbit), jnp.float32)
            total = param_bytes(steps.state_leaves)
            self.built[name] = (steps, list(w), weight_read_bytes(config, total, self.dtype.itemsize))
            print(f"built {name}: {total / GB:.2f} GB of random {self.dtype.name} weights", flush=True)
        return self.built[name]

    # -- one job
    def run_job(self, job: Job) -> None:
        """A core job: build the caches, the attention sweep, the dense and HATA steps, then the
        cuDNN step on its own caches. An extras job: the exact top-k step and the in-jit loops.

        Every program a job times is compiled ahead of time in background threads (:meth:`compile`)
        while its caches are built; the timing starts once all are compiled, so no compilation
        runs next to a timed call."""
        s, config = self.s, self.configs[job.model]
        base = {"model": job.model, "context": job.context, "batch": job.batch}
        item = self.dtype.itemsize
        weights = sum(self.weight_bytes(m) for m in s.models)
        head_major = cache_bytes(config, job.batch, job.context, s.rbit, item, token_major=False)
        layer_kv = 2 * job.batch * config.num_kv_heads * job.context * config.head_dim * item
        sweep = max(2 * layer_kv, 250e6)  # the cuDNN sweep's token-major copies of a few layers
        need = weights + head_major + sweep + 1e9
        if "cudnn" in s.methods and not job.extras:
            need = max(need, weights + cache_bytes(config, job.batch, job.context, s.rbit, item, True) + 1e9)
        what = "extras" if job.extras else None
        if need > self.memory_limit:
            self.skip(base, f"memory: needs {need / GB:.1f} GB (weights {weights / GB:.1f} GB, caches "
                            f"{head_major / GB:.1f} GB), limit {self.memory_limit / GB:.1f} GB", what)
            return
        if job.context - s.slack < 1 or s.budget > job.context:
            self.skip(base, f"context {job.context} is too short for budget {s.budget} and {s.slack} steps", what)
            return
        methods = [m for m in (("exact",) if job.extras else ("dense", "hata")) if m in s.methods]
        loops = [m for m in PRODUCT_METHODS if m in s.methods and s.loop_steps > 0] if job.extras else []
        cudnn = "cudnn" in s.methods and not job.extras and s.cudnn_step != "never"
        phases = ["prepare"] + ([] if job.extras else ["sweep"]) + [f"step:{m}" for m in methods] + [
            f"loop:{m}" for m in loops] + (["step:cudnn"] if cudnn else [])
        kind = "extras" if job.extras else "core"
        if self.over_budget(base, [f"{kind}:{p}" for p in phases], what):
            return
        print(f"== {job.model} context {job.context} batch {job.batch}{' (extras)' if job.extras else ''}", flush=True)
        _, hash_weights, weights_read = self.model(job.model)
        plan = AttentionPlan.uniform(config.num_layers, "hata", s.hata, dense_layers=s.dense_layers)
        shape = (job.batch, config.num_kv_heads, job.context, config.head_dim)
        make = functools.partial(random_hata_cache, shape=shape, dtype=self.dtype)
        avals = [jax.eval_shape(make, self.key, w, job.context) for w in hash_weights]
        token_major_shape = (job.batch, job.context) + shape[1:2] + shape[3:]
        token_major = functools.partial(random_token_major_cache, shape=token_major_shape, dtype=self.dtype)
        programs = {m: self.compile(job.model, m, plan, avals, job.batch) for m in methods}
        programs.update({f"loop:{m}": self.compile(job.model, m, plan, avals, job.batch, s.loop_steps) for m in loops})
        if cudnn:  # compiled whether or not the sweep will ask for it: the threads are idle otherwise
            programs["cudnn"] = self.compile(job.model, "cudnn", plan, [jax.eval_shape(token_major, self.key, 0)]
                                             * config.num_layers, job.batch)

        def build():
            return jax.block_until_ready([make(self._next_key(), w, job.context) for w in hash_weights])

        start = time.perf_counter()
        caches = build()
        sweep_programs = {} if job.extras else self.sweep_programs(config, caches, hash_weights)
        compiled = self.wait(base, programs | sweep_programs)
        self.cost[(job.model, f"{kind}:prepare")] = time.perf_counter() - start
        key = (job.model, job.context, job.batch)
        if not job.extras:
            self.sweeps[key] = self.timed(job.model, f"{kind}:sweep", self.attention_sweep, base, config, compiled)
        sweep_us = self.sweeps.get(key, {})
        for method in methods + [f"loop:{m}" for m in loops]:
            if method not in compiled:
                continue
            caches = with_length(caches, job.context - s.slack)
            if method.startswith("loop:"):
                caches = self.timed(job.model, f"{kind}:{method}", self.loop_method, base, method, compiled[method],
                                    caches)
            else:
                caches = self.timed(job.model, f"{kind}:step:{method}", self.step_method, base, method,
                                    compiled[method], caches, sweep_us, weights_read)
            if caches is None:  # a failed call may have consumed the donated caches
                caches = build()
        free(caches)
        if "cudnn" in compiled:
            self.timed(job.model, f"{kind}:step:cudnn", self.cudnn_step, base, config, token_major, compiled["cudnn"],
                       sweep_us, weights_read)

    def compile(self, model_name: str, method: str, plan, avals, batch: int, loop_steps: int = 0):
        """A future of (the compiled step of `method`, seconds it took), compiled in a background thread."""
        steps, hash_weights, _ = self.model(model_name)
        step = step_function(steps, method, plan)

        def work():
            program, phases = compile_step(step, steps.state_leaves, avals, hash_weights, batch, loop_steps)
            return program, sum(phases.values())

        return self.pool.submit(work)

    def wait(self, base: dict, futures: dict) -> dict:
        """{name: (program, compile seconds)} of the futures that compiled; the others are recorded as errors."""
        done = {}
        for name, future in futures.items():
            try:
                done[name] = future.result()
            except Exception as err:
                self.error(base, f"compile {name}", err)
        return done

    def sweep_programs(self, config, caches, hash_weights) -> dict:
        """{"attention:<method>": future of (compiled program, seconds)} for the attention sweep: each
        method's op applied to a few layers' caches (enough to overflow the L2), with its argument sets."""
        s = self.s
        impl = hj.default_impl()
        batch, context = caches[0].batch, caches[0].capacity
        layer_bytes = attention_bytes(config, "dense", batch, context, s.hata, self.dtype.itemsize)
        first = min(s.dense_layers, config.num_layers - 1)
        sets = int(np.clip(np.ceil(200e6 / layer_bytes), 2, 16))
        layers = [first + i % (config.num_layers - first) for i in range(sets)]
        qs = [jax.random.normal(self._next_key(), (batch, config.num_heads, config.head_dim), self.dtype)
              for _ in layers]
        k_new = jax.random.normal(self._next_key(), (batch, config.num_kv_heads, config.head_dim), self.dtype)
        lengths = caches[first].lengths
        ops = {
            "dense": (lambda q, c: hj.dense_decode_attention(q, c.k, c.v, c.lengths, impl=impl),
                      lambda: [(q, caches[i]) for q, i in zip(qs, layers)]),
            "hata": (lambda q, c, w: hata_attention(q, k_new, c, w, s.hata, impl),
                     lambda: [(q, caches[i], hash_weights[i]) for q, i in zip(qs, layers)]),
            "exact": (lambda q, c: exact_topk_attention(q, c, s.budget, impl),
                      lambda: [(q, caches[i]) for q, i in zip(qs, layers)]),
            "cudnn": (lambda q, k, v: dpa_attention(q, k, v, lengths),
                      lambda: [(q, jnp.swapaxes(caches[i].k, 1, 2), jnp.swapaxes(caches[i].v, 1, 2))
                               for q, i in zip(qs, layers)]),
        }

        def work(fn, arg_sets):
            start = time.perf_counter()
            program = many_calls(fn, arg_sets)
            return program, time.perf_counter() - start, fn, arg_sets

        return {f"attention:{m}": self.pool.submit(work, fn, sets_of()) for m, (fn, sets_of) in ops.items()
                if m in s.methods}

    def attention_sweep(self, base, config, compiled) -> dict:
        """Per-layer attention-only medians (us) of each method, from its compiled sweep program."""
        s, batch, context = self.s, base["batch"], base["context"]
        out = {}
        for method in METHODS:
            if f"attention:{method}" not in compiled:
                continue
            program, compile_s, fn, arg_sets = compiled[f"attention:{method}"]
            try:
                timing = median_us(fn, arg_sets, compiled=program)
            except Exception as err:
                self.error(base, f"attention {method}", err)
                continue
            finally:
                if method == "cudnn":
                    free([a[1:] for a in arg_sets])  # the token-major copies
            nbytes = attention_bytes(config, method, batch, context, s.hata, self.dtype.itemsize)
            floor_us = nbytes / (self.bandwidth["floor_gbps"] * 1e3)
            row = self.record({"kind": "attention", **base, "method": method, "length": context,
                               "implementation": dpa_implementation() if method == "cudnn" else hj.default_impl(),
                               **timing, "bytes": nbytes, "floor_us": floor_us,
                               "of_floor": timing["median_us"] / floor_us, "compile_s": compile_s})
            out[method] = row["median_us"]
            print(f"  attention {method:<6} {row['median_us']:>9.1f} us/layer  ({row['of_floor']:.2f}x floor)",
                  flush=True)
        return out

    def time_steps(self, step, tokens, caches, model_name: str):
        """Wall time (s) of each of `warmup + reps` steps, each waited for, then per-step times of
        groups of PIPELINE steps dispatched back to back: ([times], [pipelined], tokens, caches)."""
        steps, hash_weights, _ = self.model(model_name)
        key = jax.random.PRNGKey(0)
        times, pipelined = [], []
        for _ in range(self.s.warmup + self.s.reps):
            start = time.perf_counter()
            tokens, caches, key = step(steps.state_leaves, tokens, caches, hash_weights, key)
            tokens.block_until_ready()
            times.append(time.perf_counter() - start)
        for _ in range(self.s.reps // PIPELINE):
            start = time.perf_counter()
            for _ in range(PIPELINE):
                tokens, caches, key = step(steps.state_leaves, tokens, caches, hash_weights, key)
            tokens.block_until_ready()
            pipelined.append((time.perf_counter() - start) / PIPELINE)
        return times, pipelined, tokens, caches

    def time_loop(self, program, tokens, caches, model_name: str):
        """Per-step time (s) of `loop_steps` steps inside one jit, `1 + loop_reps` times (the first warms up)."""
        steps, hash_weights, _ = self.model(model_name)
        key = jax.random.PRNGKey(0)
        times = []
        for _ in range(1 + self.s.loop_reps):
            start = time.perf_counter()
            tokens, caches, key = program(steps.state_leaves, tokens, caches, hash_weights, key)
            tokens.block_until_ready()
            times.append((time.perf_counter() - start) / self.s.loop_steps)
        return times, tokens, caches

    def step_method(self, base, method, compiled, caches, sweep_us, weights_read):
        """Time one method's compiled decode step on `caches`; returns the caches, or None when a
        failed call consumed them (they are donated)."""
        step, compile_s = compiled
        try:
            times, pipelined, _, caches = self.time_steps(step, self.tokens(base), caches, base["model"])
        except Exception as err:
            self.error(base, f"step {method}", err)
            return surviving(caches)
        implementation = dpa_implementation() if method == "cudnn" else hj.default_impl()
        self.step_row(base, method, implementation, times, pipelined, sweep_us, weights_read, compile_s)
        check_no_overflow(caches)
        return caches

    def loop_method(self, base, method, compiled, caches):
        """Time `loop_steps` steps of a product method inside one jit and add them to its step row."""
        s, name = self.s, method.split(":")[1]
        row = next((r for r in self.rows if r["kind"] == "step" and r["method"] == name
                    and all(r[k] == v for k, v in base.items())), None)
        if row is None:
            self.skip(base, "no per-step time to compare the in-jit loop with", method)
            return caches
        program, compile_s = compiled
        try:
            times, _, caches = self.time_loop(program, self.tokens(base), caches, base["model"])
        except Exception as err:
            self.error(base, f"loop {name}", err)
            return surviving(caches)
        per_step = statistics.median(times[1:] or times)
        row.update(loop_ms=1e3 * per_step, loop_steps=s.loop_steps, loop_tokens_per_s=base["batch"] / per_step,
                   loop_compile_s=compile_s)
        self.save(complete=False)
        print(f"  loop {name:<6} {row['loop_ms']:>8.2f} ms/step with {s.loop_steps} steps in one jit, "
              f"{row['median_ms']:.2f} ms/step one call each (compiled in {compile_s:.1f} s)", flush=True)
        check_no_overflow(caches)
        return caches

    def tokens(self, base):
        return jax.random.randint(self._next_key(), (base["batch"],), 0, self.configs[base["model"]].vocab_size,
                                  jnp.int32)

    def cudnn_step(self, base, config, token_major, compiled, sweep_us, weights_read):
        """The cuDNN step on its own token-major caches, if `--cudnn-step` asks for it (see Settings)."""
        s = self.s
        if s.cudnn_step == "auto":
            if "cudnn" not in sweep_us or "dense" not in sweep_us:
                self.skip(base, "cudnn: no attention-only time to compare", "cudnn")
                return
            if sweep_us["cudnn"] >= sweep_us["dense"]:
                self.skip(base, f"cudnn attention ({sweep_us['cudnn']:.1f} us/layer) is not faster than our dense "
                                f"kernel ({sweep_us['dense']:.1f} us/layer) in the sweep", "cudnn")
                return
        caches = jax.block_until_ready([token_major(self._next_key(), base["context"] - s.slack)
                                        for _ in range(config.num_layers)])
        free(self.step_method(base, "cudnn", compiled, caches, sweep_us, weights_read))

    def step_row(self, base, method, implementation, times, pipelined, sweep_us, weights_read, compile_s) -> dict:
        s, config = self.s, self.configs[base["model"]]
        batch, context = base["batch"], base["context"]
        timed = times[s.warmup:]
        median = statistics.median(timed)
        nbytes = step_bytes(config, method, batch, context, s.hata, self.dtype.itemsize, weights_read, s.dense_layers)
        floor_ms = nbytes / (self.bandwidth["floor_gbps"] * 1e6)
        row = {"kind": "step", **base, "method": method, "implementation": implementation,
               "lengths": [context - s.slack + s.warmup + 1, context - s.slack + s.warmup + s.reps],
               "median_ms": 1e3 * median, "p10_ms": 1e3 * float(np.percentile(timed, 10)),
               "p90_ms": 1e3 * float(np.percentile(timed, 90)), "steps": len(timed), "compile_s": compile_s,
               "tokens_per_s": batch / median, "bytes": nbytes, "floor_ms": floor_ms,
               "of_floor": 1e3 * median / floor_ms}
        if pipelined:
            row.update(pipelined_ms=1e3 * statistics.median(pipelined), pipelined_steps=len(pipelined) * PIPELINE)
        dense_layers = config.num_layers if method in ("dense", "cudnn") else min(s.dense_layers, config.num_layers)
        dense_kind = "cudnn" if method == "cudnn" else "dense"
        if dense_kind in sweep_us and method in sweep_us:
            attention_us = dense_layers * sweep_us[dense_kind] + (config.num_layers - dense_layers) * sweep_us[method]
            row.update(attention_ms=attention_us / 1e3, attention_share=attention_us / 1e3 / row["median_ms"])
        self.record(row)
        share = f"{row['attention_share']:.0%}" if "attention_share" in row else "-"
        pipe = f", back to back {row['pipelined_ms']:.2f} ms" if pipelined else ""
        print(f"  step {method:<6} {row['median_ms']:>8.2f} ms  {row['tokens_per_s']:>8.1f} tok/s  "
              f"attention {share}  {row['of_floor']:.2f}x floor  (compiled in {compile_s:.1f} s{pipe})", flush=True)
        return row


@dataclasses.dataclass(frozen=True)
class Job:
    """A config's core job (sweep, dense, HATA and cuDNN steps) or its extras (exact top-k step, in-jit loops)."""

    model: str
    context: int
    batch: int
    extras: bool = False


def ordered_jobs(settings: Settings) -> list[Job]:
    """The jobs from the most to the least important. Per model: the core jobs of its first
    `CORE_FIRST` configs in PRIORITY order, then the extras of its first `extras_configs`, then
    the other core jobs; the models' lists are merged by place, each model's shifted by MODEL_OFFSET."""
    rank = {config: i for i, config in enumerate(PRIORITY)}
    grid = sorted(((c, b) for c in settings.contexts for b in settings.batches),
                  key=lambda cb: (rank.get(cb, len(PRIORITY)), cb[1], cb[0]))
    placed = []
    for m, name in enumerate(settings.models):
        core = [Job(name, c, b) for c, b in grid]
        extras = [Job(name, c, b, extras=True) for c, b in grid[:settings.extras_configs]]
        for place, job in enumerate(core[:CORE_FIRST] + extras + core[CORE_FIRST:]):
            placed.append(((place + MODEL_OFFSET[name], m), job))
    return [job for _, job in sorted(placed, key=lambda p: p[0])]


def memory_limit_bytes(settings: Settings) -> float:
    if settings.memory_gb is not None:
        return settings.memory_gb * GB
    stats = jax.devices()[0].memory_stats() or {}
    return 0.97 * stats["bytes_limit"] if "bytes_limit" in stats else 75 * GB


# ----------------------------------------------------------------------------- command line

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="results JSON (written after every result)")
    parser.add_argument("--report", metavar="JSON", help="print markdown tables of a results JSON and write PNG "
                                                         "plots next to it (no benchmark run)")
    parser.add_argument("--plots", metavar="DIR", help="with --report: folder for the plots (default: the JSON's)")
    parser.add_argument("--small", action="store_true", help="tiny models and contexts (CPU smoke run)")
    parser.add_argument("--models", nargs="+", choices=sorted(FULL_MODELS))
    parser.add_argument("--contexts", nargs="+", type=int)
    parser.add_argument("--batches", nargs="+", type=int)
    parser.add_argument("--methods", nargs="+", choices=METHODS)
    parser.add_argument("--score", choices=["asymmetric", "key_norm"], help="HATA's score (default asymmetric)")
    parser.add_argument("--reps", type=int, help="timed steps per method (default 30)")
    parser.add_argument("--loop-steps", type=int, help="steps inside one jit for the loop variant (0: none; default 8)")
    parser.add_argument("--extras-configs", type=int,
                        help="how many of each model's most important configs also time the exact top-k step and "
                             "the in-jit loop (default 3)")
    parser.add_argument("--cudnn-step", choices=["auto", "always", "never"],
                        help="time the cuDNN decode step always, never, or (auto, default) where cuDNN attention "
                             "beat our dense kernel in the sweep")
    parser.add_argument("--time-budget", type=float, dest="time_budget_s",
                        help="seconds for the whole run; later configs are skipped (default 520)")
    parser.add_argument("--memory-gb", type=float, help="device memory to plan for (default: 97%% of the allocator's)")
    args = parser.parse_args(argv)
    if bool(args.out) == bool(args.report):
        parser.error("give exactly one of --out (run the benchmark) and --report (tables and plots of a JSON)")
    fields = {f.name for f in dataclasses.fields(Settings)}
    given = {k: v for k, v in vars(args).items() if v is not None and k in fields}
    for name in ("models", "contexts", "batches", "methods"):
        if name in given:
            given[name] = tuple(given[name])
    settings = Settings(**{**(SMALL if args.small else {}), **given})
    return args, settings


def main(argv=None) -> int:
    args, settings = parse_args(argv)
    if args.report:
        with open(args.report) as f:
            data = json.load(f)
        print(report_markdown(data))
        for path in report_plots(data, args.plots or os.path.dirname(os.path.abspath(args.report))):
            print(f"wrote {path}", file=sys.stderr)
        return 0
    started = time.perf_counter()
    # Let the allocator take most of the GPU (the default pool is 75%); read when the backend starts.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    env = environment()
    print(env, flush=True)
    bandwidth = floor_bandwidth_gbps(1 << (20 if settings.small else 30))
    print(f"bandwidth: {bandwidth}", flush=True)
    bench = DecodeBench(settings, args.out, bandwidth, env, memory_limit_bytes(settings), started)
    print(f"memory limit {bench.memory_limit / GB:.1f} GB, time budget {settings.time_budget_s:.0f} s, "
          f"{settings.slack} steps per method", flush=True)
    for job in ordered_jobs(settings):
        try:
            bench.run_job(job)
        except Exception as err:  # keep the other configs' numbers; the error goes into the JSON
            bench.error({"model": job.model, "context": job.context, "batch": job.batch},
                        "extras" if job.extras else "config", err)
    bench.save(complete=True)
    print(summary(bench.rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
