"""Offloaded HATA decoding (K/V in host memory) against dense decoding of the same offloaded cache.

    python -m bench.offload --out $OUT/offload.json [--small]      # one GPU, Llama-3.1-8B shapes
    python -m bench.offload --hits --out hits.json                  # the real model's row-cache hits

Model: Llama-3.1-8B shapes (32 layers, hidden 4096, 32/8 heads, D=128, bf16, 16.1 GB), random weights
made on the device (as :mod:`bench.decode`), random Gaussian hash projections, HATA budget 2048,
rbit 128, layers 0-1 dense with on-device caches, layers 2-31 offloaded
(:class:`hata_jax.models.offload.OffloadDecoder`), batch 2. `--small`: a 4-layer model and short
contexts (CPU smoke run).

Parts, in this order, each row written to the JSON as soon as it is measured:
1. `link`: host -> device bandwidth of a 256 MB `pinned_host` array (the link's rate, used by the
   floors below) and of the same bytes from pageable numpy; one layer's step payload (batch x 8
   heads x 2048 rows of 512 B, random positions of a 256K-token host cache) through
   :func:`hata_jax.host_memory.gather_to_device` (gather into a pinned landing buffer + one copy)
   for 2 / 4 / 8 / 16 gather threads; the fastest is kept for the run; then the same gather from an
   8 GiB source on ordinary pages and on transparent huge pages (:func:`hata_jax.host_memory.host_zeros`,
   as the offloaded caches allocate theirs), with the time to allocate and touch each.
2. `offload` at a context whose K/V cache does not fit on the GPU together with the weights
   (default 256K, batch 2: 64 GiB of K/V + 16.1 GB of weights > 80 GB; the kernels take contexts up
   to 256K, so 512K x 1 is run as 256K x 2, the same bytes): the dense layers' caches are made on
   the device; each offloaded layer is filled 64K tokens at a time (random normal K/V made on the
   device, codes and norms computed there, one device -> host copy). Then, for each row-cache size
   of `--rows` (multiples of the budget): greedy HATA steps (median wall per step with the token
   read back, tokens/s, rows selected and fetched, bytes each way, host time waiting and
   gathering; one step per landing size first, so that no timed step compiles), and the same
   steps with the link removed (`gather_to_device` replaced by device arrays of the landing sizes:
   everything else of the step runs). Its floor: the rows that must
   cross / the pinned bandwidth of part 1 + the step without the link; `floor_all_selected_ms`
   counts every selected row. Then `--dense-steps` steps of dense attention over the same
   offloaded caches (every row streams to the device each step: the baseline).
3. `fits` (default 64K, batch 2): the on-device HATA decode step (`hata_jax.models.generation.ModelSteps`,
   one jit, as :mod:`bench.decode`'s "hata") and the offloaded step from the same cache contents;
   both greedy from the same token: `tokens_equal_prefix` counts the leading steps whose tokens
   agree. The run sets `--xla_allow_excess_precision=false` (unless `--excess-precision`): with XLA's
   default, bf16 values inside a fusion may keep float32 precision, so the one-jit on-device step
   and the per-layer offloaded pieces round differently and their tokens part after a few steps.
4. `prefill` (default 8K tokens, batch 1): the chunked prefill straight into host memory
   (`--prefill-chunk` tokens at a time) against the whole prefill, each timed on its second run:
   time, the first tokens, and the largest K/V difference of the offloaded layers.

`--hits` instead runs the real model (SmolLM2-135M-Instruct and its shipped projections, on whatever
device there is): a long prose prompt (the GPL-3 text Debian ships), greedy offloaded decoding at
budget 1/16 with row caches of 1, 2 and 4 budgets, and the hit rate of every offloaded layer; the
tokens are checked against on-device HATA.

Budget: `--time-budget` (default 480 s) skips the parts that no longer fit, saying so.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
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
from bench.decode_steps import free, random_hata_cache
from bench.timing import environment, write_json
from hata_jax import HataCache, HataConfig, host_memory, offload
from hata_jax.models import AttentionPlan, LlamaForCausalLM, generation
from hata_jax.models.offload import OffloadDecoder, generate_offloaded
from hata_jax.models.presets import LLAMA_8B, SMALL_MODELS
from hata_jax.offload import OffloadedCache, step_transfer_bytes

GB = 1e9
FILL_CHUNK = 65536  # tokens per device -> host copy while filling a host cache
PROSE = "/usr/share/common-licenses/GPL-3"


@dataclasses.dataclass(frozen=True)
class Settings:
    big_context: int = 262144
    fit_context: int = 65536
    batch: int = 2
    budget: int = 2048
    rbit: int = 128
    dense_layers: int = 2
    warmup: int = 3
    reps: int = 20
    rows: tuple[int, ...] = (1, 2)
    no_link_reps: int = 8
    dense_steps: int = 3
    prefill_tokens: int = 8192
    prefill_chunk: int = 2048
    time_budget_s: float = 480.0
    skip: tuple[str, ...] = ()
    small: bool = False

    @property
    def hata(self) -> HataConfig:
        return HataConfig(rbit=self.rbit, budget=self.budget)

    @property
    def slack(self) -> int:
        """Steps run on one set of caches (their lengths start this far below the capacity)."""
        return len(self.rows) * (self.warmup + self.reps + self.no_link_reps + 5) + self.dense_steps + 4


SMALL = dict(big_context=2048, fit_context=512, batch=2, budget=32, warmup=1, reps=4, no_link_reps=2, dense_steps=2,
             prefill_tokens=300, prefill_chunk=128)


def host_memory_available() -> float:
    """Bytes of host memory available (MemAvailable), or inf where /proc/meminfo is missing."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")


def transparent_hugepage() -> str | None:
    """The kernel's transparent huge page mode ("always [madvise] never": madvise), None if unknown."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().strip()
    except OSError:
        return None


@functools.partial(jax.jit, static_argnames=("shape",))
def random_tokens(key, w, *, shape):
    """Random normal keys and values kv [B, Hkv, T, 2, D] in bf16, the keys' codes under `w` and norms."""
    kv = jax.random.normal(key, shape, jnp.bfloat16)
    return kv, hj.encode(kv[:, :, :, 0], w, head_axis=1), hj.key_norms(kv[:, :, :, 0])


def median_ms(times) -> float:
    return 1e3 * statistics.median(times)


class OffloadBench:
    def __init__(self, settings: Settings, out: str, started: float):
        self.s, self.out, self.started = settings, out, started
        self.config = SMALL_MODELS["llama"] if settings.small else LLAMA_8B
        self.rows: list[dict] = []
        self.env = {**environment(), "host_cpus": os.cpu_count(), "host_memory_available_bytes":
                    host_memory_available(), "gather_threads": host_memory.GATHER_THREADS,
                    "landing_sizes": host_memory.LANDING_SIZES, "transparent_hugepage": transparent_hugepage(),
                    "pinned_staging": host_memory.pinned_memory_works(
                        jax.devices()[0]), "xla_flags": os.environ.get("XLA_FLAGS", "")}
        self.device = jax.devices()[0]
        self.key = jax.random.PRNGKey(20261122)
        self.model = self.decoder = None
        self.link_gbps = None

    def _next_key(self):
        self.key, sub = jax.random.split(self.key)
        return sub

    def left(self) -> float:
        return self.s.time_budget_s - (time.perf_counter() - self.started)

    def record(self, row: dict) -> dict:
        self.rows.append(row)
        print("  " + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        self.save(complete=False)
        return row

    def save(self, complete: bool) -> None:
        payload = {"environment": self.env, "settings": dataclasses.asdict(self.s),
                   "model": dataclasses.asdict(self.config), "complete": complete, "rows": self.rows}
        write_json(self.out, payload)

    def skip(self, part: str, reason: str) -> None:
        self.record({"kind": "skip", "part": part, "reason": reason})

    # -- 1. the link
    def link(self) -> None:
        s, c = self.s, self.config
        nbytes = (16 << 20) if s.small else (256 << 20)
        staging = host_memory.PinnedStaging((nbytes,), np.uint8)
        pinned_array, view = staging.buffer(1)
        view[...] = 1

        def best_gbps(copy) -> float:
            jax.block_until_ready(copy())
            times = []
            for _ in range(5):
                start = time.perf_counter()
                jax.block_until_ready(copy())
                times.append(time.perf_counter() - start)
            return nbytes / statistics.median(times) / GB

        pinned = best_gbps(lambda: staging.to_device(1, 0))
        pageable = best_gbps(lambda: jax.device_put(np.ones(nbytes, np.uint8)))
        self.link_gbps = pinned
        pairs, tokens = s.batch * c.num_kv_heads, (4096 if s.small else 262144)
        source = np.ones((pairs * tokens, 2, c.head_dim), jnp.bfloat16)
        idx = np.random.default_rng(0).integers(0, len(source), pairs * s.budget).astype(np.int32)
        idx.sort()  # a pair's rows are listed by position (plan_fetch)
        layer_staging = host_memory.PinnedStaging((2, c.head_dim), jnp.bfloat16)
        payload = len(idx) * 2 * c.head_dim * 2
        sweep = {}
        for threads in sorted({t for t in (2, 4, 8, 16) if t <= (os.cpu_count() or 1)}):
            host_memory.set_gather_threads(threads)
            times = []
            for _ in range(12):
                start = time.perf_counter()
                host_memory.gather_to_device(source, idx, layer_staging, len(idx)).block_until_ready()
                times.append(time.perf_counter() - start)
            sweep[threads] = median_ms(times[2:])
        best = min(sweep, key=sweep.get)
        host_memory.set_gather_threads(best)  # the rest of the run gathers this way
        self.env.update(gather_threads=best)
        del source
        pages = {}  # the same gather from a large source on ordinary pages and on huge pages (host_zeros)
        rows = (1 << 20) if s.small else (16 << 20)  # 8 GiB of 512 B rows
        for name, make in (("ordinary", lambda: np.ones((rows, 2, c.head_dim), jnp.bfloat16)),
                           ("huge", lambda: host_memory.host_zeros((rows, 2, c.head_dim), jnp.bfloat16))):
            start = time.perf_counter()
            big = make()
            big[...] = 1
            touched = time.perf_counter() - start
            idx = np.sort(np.random.default_rng(1).integers(0, rows, len(idx)).astype(np.int32))
            times = []
            for _ in range(12):
                start = time.perf_counter()
                host_memory.gather_to_device(big, idx, layer_staging, len(idx)).block_until_ready()
                times.append(time.perf_counter() - start)
            pages[name] = {"gather_and_copy_ms": median_ms(times[2:]), "allocate_and_touch_s": touched}
            del big
        self.record({"kind": "link", "pinned_to_device_gbps": pinned, "pageable_to_device_gbps": pageable,
                     "copy_bytes": nbytes, "layer_payload_bytes": payload,
                     "layer_gather_and_copy_ms": sweep[best], "layer_gather_and_copy_gbps": payload / sweep[best] / 1e6,
                     "gather_threads_ms": sweep, "pinned_staging": layer_staging.pinned,
                     "source_pages": {"source_bytes": rows * 2 * c.head_dim * 2, **pages}})

    # -- the model
    def build(self) -> None:
        c = self.config
        self.model = nnx.jit(lambda: LlamaForCausalLM(c, dtype=jnp.bfloat16, rngs=nnx.Rngs(7)))()
        keys = jax.random.split(self._next_key(), c.num_layers)
        self.hash_weights = [jax.random.normal(k, (c.num_kv_heads, c.head_dim, self.s.rbit), jnp.float32) for k in keys]
        self.plan = AttentionPlan.uniform(c.num_layers, "hata", self.s.hata, dense_layers=self.s.dense_layers)
        self.decoder = OffloadDecoder(self.model, self.plan, self.hash_weights)
        self.weight_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(self.model)))
        print(f"built the model: {self.weight_bytes / GB:.2f} GB of random bf16 weights", flush=True)

    def shape(self, context: int) -> tuple[int, int, int, int]:
        return (self.s.batch, self.config.num_kv_heads, context, self.config.head_dim)

    def kv_bytes(self, context: int) -> int:
        """K/V bytes of every layer's cache (bf16)."""
        b, hkv, s, d = self.shape(context)
        return self.config.num_layers * b * hkv * s * 2 * d * 2

    def device_caches(self, context: int, layers) -> dict[int, HataCache]:
        """Random on-device HataCaches (k, v ~ N(0, 1), their codes and norms), `context - slack` tokens."""
        return {i: random_hata_cache(self._next_key(), self.hash_weights[i], context - self.s.slack,
                                     shape=self.shape(context), dtype=jnp.bfloat16) for i in layers}

    def filled_offloaded_cache(self, layer: int, context: int) -> OffloadedCache:
        b, hkv, s, d = self.shape(context)
        cache = self.decoder.offloaded_cache(b, s, jnp.bfloat16)
        for start in range(0, s, FILL_CHUNK):
            tokens = min(FILL_CHUNK, s - start)
            cache.write(*random_tokens(self._next_key(), self.hash_weights[layer], shape=(b, hkv, tokens, 2, d)), start)
        cache.set_lengths(np.full(b, s - self.s.slack))
        return cache

    def time_steps(self, caches, tokens, steps: int, attention: str = "hata"):
        """(wall seconds of each step, the tokens of each step, the last tokens, the offloaded caches'
        stats summed over the steps)."""
        hata = [c for c in caches if isinstance(c, OffloadedCache)]
        before = [dataclasses.replace(c.stats) for c in hata]
        times, out = [], []
        for _ in range(steps):
            start = time.perf_counter()
            tokens = self.decoder.step(tokens, caches, attention=attention)
            tokens.block_until_ready()
            times.append(time.perf_counter() - start)
            out.append(np.asarray(tokens).tolist())
        total = {f.name: sum(getattr(c.stats, f.name) - getattr(b, f.name) for c, b in zip(hata, before))
                 for f in dataclasses.fields(offload.TransferStats)}
        return times, out, tokens, total

    def step_row(self, part: str, context: int, times, total: dict, extra: dict) -> dict:
        s = self.s
        steps = len(times)
        median = statistics.median(times)
        layers = len(self.plan.hashed_layers)
        h2d = total["host_to_device_bytes"] / steps
        return self.record({
            "kind": "offload_step", "part": part, "context": context, "batch": s.batch, "budget": s.budget,
            "offloaded_layers": layers, "steps": steps, "median_ms": 1e3 * median,
            "p10_ms": 1e3 * float(np.percentile(times, 10)), "p90_ms": 1e3 * float(np.percentile(times, 90)),
            "tokens_per_s": s.batch / median, "h2d_bytes_per_step": h2d,
            "d2h_bytes_per_step": total["device_to_host_bytes"] / steps,
            "rows_selected_per_step": total["rows_selected"] / steps,
            "rows_fetched_per_step": total["rows_fetched"] / steps,
            "hit_rate": 1 - total["rows_fetched"] / total["rows_selected"] if total["rows_selected"] else None,
            "implied_h2d_gbps": h2d / median / GB,
            "host_wait_ms_per_step": 1e3 * total["wait_seconds"] / steps,
            "host_gather_copy_ms_per_step": 1e3 * total["gather_seconds"] / steps, **extra})

    def no_link_times(self, caches, tokens, steps: int):
        """The steps with `gather_to_device` replaced by device arrays of the landing sizes."""
        zeros: dict[int, jax.Array] = {}
        original = host_memory.gather_to_device

        def no_link(source, idx, staging, capacity, *, device=None):
            size = host_memory.landing_rows(len(idx), capacity)
            if size not in zeros:
                zeros[size] = jnp.zeros((size, *staging.row_shape), staging.dtype)
            return zeros[size]

        host_memory.gather_to_device = no_link
        try:
            self.time_steps(caches, tokens, 1)
            return self.time_steps(caches, tokens, steps)
        finally:
            host_memory.gather_to_device = original

    def compile_landings(self, caches, tokens):
        """One step per landing size (the steps' programs are compiled per size), before timing."""
        original = host_memory.landing_rows
        for size in host_memory.landing_sizes(self.s.batch * self.config.num_kv_heads * self.s.budget):
            host_memory.landing_rows = lambda rows, capacity, size=size: max(size, original(rows, capacity))
            try:
                _, _, tokens, _ = self.time_steps(caches, tokens, 1)
            finally:
                host_memory.landing_rows = original
        return tokens

    # -- 2. a context that does not fit
    def big(self) -> None:
        s, c = self.s, self.config
        context = s.big_context
        hata_layers = self.plan.hashed_layers
        host_need = len(hata_layers) * self.kv_bytes(context) / c.num_layers
        available = host_memory_available()
        if host_need + 4e9 > available:
            self.skip("offload",
                      f"host memory: needs {host_need / GB:.1f} GB + 4 GB, {available / GB:.1f} GB available")
            return
        device_limit = (self.device.memory_stats() or {}).get("bytes_limit")
        info = {"kv_cache_bytes": self.kv_bytes(context), "weight_bytes": self.weight_bytes,
                "device_memory_bytes": device_limit, "host_kv_bytes": host_need}
        print(f"== offload: context {context}, K/V {info['kv_cache_bytes'] / GB:.1f} GB + weights "
              f"{self.weight_bytes / GB:.1f} GB, device {device_limit}", flush=True)
        start = time.perf_counter()
        dense = self.device_caches(context, [i for i in range(c.num_layers) if i not in hata_layers])
        caches = [dense[i] if i in dense else self.filled_offloaded_cache(i, context) for i in range(c.num_layers)]
        jax.block_until_ready([x.codes for x in caches if isinstance(x, OffloadedCache)])
        caches[hata_layers[0]].prepare(s.budget)  # the shared staging buffers
        fill = time.perf_counter() - start
        print(f"  filled the caches in {fill:.1f} s", flush=True)
        tokens = jax.random.randint(self._next_key(), (s.batch,), 0, c.vocab_size, jnp.int32)
        expected = step_transfer_bytes(s.batch, c.num_kv_heads, s.budget, c.head_dim, jnp.bfloat16)
        hata_step = None
        for multiple in s.rows:
            if self.left() < 40:
                self.skip("offload", f"rows {multiple} x budget: time budget, {self.left():.0f} s left")
                continue
            for cache in caches:
                if isinstance(cache, OffloadedCache):
                    cache.resize_rows(multiple * s.budget)
            start = time.perf_counter()
            tokens = self.compile_landings(caches, tokens)
            first = time.perf_counter() - start
            _, _, tokens, _ = self.time_steps(caches, tokens, s.warmup)
            times, _, tokens, total = self.time_steps(caches, tokens, s.reps)
            no_link, _, tokens, _ = self.no_link_times(caches, tokens, s.no_link_reps)
            fetched_bytes = total["rows_fetched"] / s.reps * 2 * c.head_dim * 2
            selected_bytes = total["rows_selected"] / s.reps * 2 * c.head_dim * 2
            link_ms = 1e3 / (self.link_gbps * GB)
            floor = fetched_bytes * link_ms + median_ms(no_link)
            row = self.step_row("offload", context, times, total, {
                **info, "rows": multiple * s.budget, "fill_s": fill, "compile_steps_s": first,
                "expected_h2d_bytes_per_step_no_hits": len(hata_layers) * expected["host_to_device"],
                "no_link_median_ms": median_ms(no_link), "link_gbps": self.link_gbps,
                "floor_ms": floor, "floor_all_selected_ms": selected_bytes * link_ms + median_ms(no_link),
                "over_floor": median_ms(times) / floor})
            hata_step = hata_step or row
        if s.dense_steps and self.left() > 30 and hata_step:
            _, _, tokens, _ = self.time_steps(caches, tokens, 1, attention="dense")
            times, _, tokens, total = self.time_steps(caches, tokens, s.dense_steps, attention="dense")
            self.step_row("dense", context, times, total, {
                "hata_over_dense_tokens_per_s": hata_step["tokens_per_s"] / (s.batch / statistics.median(times))})
        elif s.dense_steps:
            self.skip("dense", f"time budget: {self.left():.0f} s left")
        free([x for x in caches if isinstance(x, HataCache)])
        del caches
        gc.collect()

    # -- 3. a context that fits: offloaded vs on-device
    def fits(self) -> None:
        s, c = self.s, self.config
        context = s.fit_context
        print(f"== fits: context {context}", flush=True)
        length = context - s.slack
        device = self.device_caches(context, range(c.num_layers))
        host = {}
        for i in self.plan.hashed_layers:
            host[i] = self.decoder.offloaded_cache(s.batch, context, jnp.bfloat16)
            host[i].write(jnp.stack([device[i].k, device[i].v], axis=3), device[i].codes, device[i].norms)
            host[i].set_lengths(np.full(s.batch, length))
        host[self.plan.hashed_layers[0]].prepare(s.budget)
        t0 = jax.random.randint(self._next_key(), (s.batch,), 0, c.vocab_size, jnp.int32)

        steps = generation.ModelSteps(self.model)
        step = functools.partial(steps.decode, plan=self.plan, sampling=generation.Sampling())
        caches, key, tokens = [device[i] for i in range(c.num_layers)], jax.random.PRNGKey(0), t0
        times, device_tokens = [], []
        for _ in range(s.warmup + s.reps):
            start = time.perf_counter()
            tokens, caches, key = step(steps.state_leaves, tokens, caches, self.hash_weights, key)
            tokens.block_until_ready()
            times.append(time.perf_counter() - start)
            device_tokens.append(np.asarray(tokens).tolist())
        timed = times[s.warmup:]
        on_device = self.record({"kind": "device_step", "part": "fits", "context": context, "batch": s.batch,
                                 "budget": s.budget, "steps": len(timed), "median_ms": 1e3 * statistics.median(timed),
                                 "p10_ms": 1e3 * float(np.percentile(timed, 10)),
                                 "p90_ms": 1e3 * float(np.percentile(timed, 90)),
                                 "tokens_per_s": s.batch / statistics.median(timed), "first_call_s": times[0]})
        free([caches[i] for i in self.plan.hashed_layers])
        def at_length(cache):  # a lengths buffer per layer: each is donated
            return dataclasses.replace(cache, lengths=jnp.full((s.batch,), length, jnp.int32))

        caches = [host[i] if i in host else at_length(caches[i]) for i in range(c.num_layers)]
        warm, host_tokens, tokens, _ = self.time_steps(caches, t0, s.warmup)
        times, timed_tokens, _, total = self.time_steps(caches, tokens, s.reps)
        host_tokens += timed_tokens
        equal = next((n for n, (a, b) in enumerate(zip(device_tokens, host_tokens)) if a != b), len(host_tokens))
        row = self.step_row("fits", context, times, total,
                            {"first_call_s": warm[0], "device_median_ms": on_device["median_ms"],
                             "slowdown_vs_device": 1e3 * statistics.median(times) / on_device["median_ms"],
                             "tokens_equal_prefix": equal, "tokens_compared": len(host_tokens)})
        free([x for x in caches if isinstance(x, HataCache)])
        del caches, host
        gc.collect()
        print(f"  offloaded {row['median_ms']:.2f} ms vs on-device {on_device['median_ms']:.2f} ms; tokens equal for "
              f"the first {equal} of {len(host_tokens)} steps", flush=True)

    # -- 4. chunked prefill into host memory
    def prefill(self) -> None:
        s, c = self.s, self.config
        t = s.prefill_tokens
        print(f"== prefill: {t} tokens, chunks of {s.prefill_chunk}", flush=True)
        tokens = np.asarray(jax.random.randint(self._next_key(), (1, t), 0, c.vocab_size, jnp.int32))
        lengths = np.array([t])
        results = {}
        for name, chunk in (("whole", None), ("chunked", s.prefill_chunk)):
            _, warm = self.decoder.prefill(tokens, lengths, t + 8, chunk=chunk)  # compiles every piece
            free([x for x in warm if isinstance(x, HataCache)])
            del warm
            start = time.perf_counter()
            first, caches = self.decoder.prefill(tokens, lengths, t + 8, chunk=chunk)
            first = np.asarray(first)
            results[name] = (time.perf_counter() - start, first, [x for x in caches if isinstance(x, OffloadedCache)])
            free([x for x in caches if isinstance(x, HataCache)])
        diff = max(float(np.max(np.abs(a.kv[:, :, :t].astype(np.float32) - b.kv[:, :, :t].astype(np.float32))))
                   for a, b in zip(results["whole"][2], results["chunked"][2]))
        scale = max(float(np.max(np.abs(a.kv[:, :, :t].astype(np.float32)))) for a in results["whole"][2])
        self.record({"kind": "prefill", "tokens": t, "chunk": s.prefill_chunk, "whole_s": results["whole"][0],
                     "chunked_s": results["chunked"][0], "first_token_whole": results["whole"][1].tolist(),
                     "first_token_chunked": results["chunked"][1].tolist(),
                     "first_tokens_equal": results["whole"][1].tolist() == results["chunked"][1].tolist(),
                     "kv_max_abs_diff": diff, "kv_max_abs": scale})
        del results
        gc.collect()

    def run(self) -> None:
        print(self.env, flush=True)
        self.link()
        self.build()
        self.big()
        for part, need in ((self.fits, 10 if self.s.small else 60), (self.prefill, 10 if self.s.small else 40)):
            if part.__name__ in self.s.skip:
                self.skip(part.__name__, "--skip")
            elif self.left() > need:
                part()
            else:
                self.skip(part.__name__, f"time budget: {self.left():.0f} s left")
        self.save(complete=True)


def real_model_hits(out: str, *, context: int, new_tokens: int, rows: tuple[int, ...]) -> dict:
    """The row cache's hit rate on SmolLM2-135M-Instruct (shipped projections) decoding after a long
    prose prompt at budget context / 16, for row caches of `rows` budgets; tokens checked against
    on-device HATA (see the module docstring)."""
    # imported here: the model loaders and orbax are needed by this part only
    from hata_jax.models import generate
    from hata_jax.models.load import load_model
    from hata_jax.train.projections import hash_weights_for_generate

    model, tokenizer = load_model("smollm2", dtype=jnp.float32, log=lambda m: print(m, flush=True))
    config = model.config
    with open(PROSE, encoding="utf-8") as f:
        text = f.read()
    prompt = tokenizer.encode_prompt(text + "\n\nSummarise the license above in three sentences.", chat=True)
    prompt = prompt[-context:]
    budget = context // 16
    weights = hash_weights_for_generate(None, "smollm2", model, 128, lambda m: print(m, flush=True))
    plan = AttentionPlan.uniform(config.num_layers, "hata", HataConfig(rbit=128, budget=budget))
    start = time.perf_counter()
    want = generate(model, [prompt], max_new_tokens=new_tokens, plan=plan, hash_weights=weights, dense_below=0)
    result = {"environment": environment(), "model": "SmolLM2-135M-Instruct", "prompt_source": PROSE,
              "prompt_tokens": len(prompt), "budget": budget, "new_tokens": new_tokens,
              "on_device_s": time.perf_counter() - start, "runs": []}
    for multiple in rows:
        start = time.perf_counter()
        got, caches = generate_offloaded(model, [prompt], max_new_tokens=new_tokens, plan=plan, hash_weights=weights,
                                         rows=multiple * budget)
        offloaded = [c for c in caches if isinstance(c, OffloadedCache)]
        per_layer = [c.stats.hit_rate for c in offloaded]
        selected = sum(c.stats.rows_selected for c in offloaded)
        fetched = sum(c.stats.rows_fetched for c in offloaded)
        run = {"rows": multiple * budget, "tokens_equal_on_device": got.tokens == want.tokens,
               "steps": offloaded[0].stats.steps, "hit_rate": 1 - fetched / selected,
               "hit_rate_per_layer": per_layer, "seconds": time.perf_counter() - start,
               "text": tokenizer.decode(got.tokens[0])}
        result["runs"].append(run)
        print(json.dumps({k: v for k, v in run.items() if k != "hit_rate_per_layer"}), flush=True)
        write_json(out, result)
    return result


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="results JSON (written after every result)")
    parser.add_argument("--small", action="store_true", help="tiny model and contexts (CPU smoke run)")
    parser.add_argument("--hits", action="store_true", help="only the real model's row-cache hit rate")
    parser.add_argument("--hits-context", type=int, default=4096, help="--hits: prompt tokens (default 4096)")
    parser.add_argument("--hits-new-tokens", type=int, default=48, help="--hits: tokens decoded (default 48)")
    parser.add_argument("--big-context", type=int, dest="big_context")
    parser.add_argument("--fit-context", type=int, dest="fit_context")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--reps", type=int)
    parser.add_argument("--rows", type=int, nargs="+", help="row-cache sizes in budgets (default 1 2)")
    parser.add_argument("--dense-steps", type=int, dest="dense_steps")
    parser.add_argument("--prefill-tokens", type=int, dest="prefill_tokens")
    parser.add_argument("--prefill-chunk", type=int, dest="prefill_chunk")
    parser.add_argument("--time-budget", type=float, dest="time_budget_s")
    parser.add_argument("--skip", nargs="+", choices=("fits", "prefill"), default=(), help="parts not to run")
    parser.add_argument("--excess-precision", action="store_true",
                        help="leave XLA's excess precision for bf16 on (its default; the on-device and offloaded "
                             "steps then fuse differently and their greedy tokens may part after a few steps)")
    args = parser.parse_args(argv)
    fields = {f.name for f in dataclasses.fields(Settings)}
    given = {k: v for k, v in vars(args).items() if v is not None and k in fields}
    for name in ("rows", "skip"):
        if name in given:
            given[name] = tuple(given[name])
    return args, Settings(**{**(SMALL if args.small else {}), **given})


def main(argv=None) -> int:
    args, settings = parse_args(argv)
    if not args.excess_precision:  # read when the backend starts, which has not happened yet
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_allow_excess_precision=false").strip()
    if args.hits:
        real_model_hits(args.out, context=args.hits_context, new_tokens=args.hits_new_tokens, rows=(1, 2, 4))
        return 0
    bench = OffloadBench(settings, args.out, time.perf_counter())
    try:
        bench.run()
    except Exception as err:  # keep what was measured; the error goes into the JSON
        bench.record({"kind": "error", "error": f"{type(err).__name__}: {str(err)[:1500]}"})
        bench.save(complete=False)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
