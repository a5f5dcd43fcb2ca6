"""HATA decoding with the HATA layers' K/V cache in host memory (:mod:`hata_jax.offload`), on one GPU.

    python -m bench.offload --out $OUT/offload.json [--small]

Model: Llama-3.1-8B shapes (32 layers, hidden 4096, 32/8 heads, D=128, bf16, 16.1 GB), random
weights made on the device (as :mod:`bench.decode`), random Gaussian hash projections, HATA budget
2048, rbit 128, layers 0-1 dense with on-device caches, layers 2-31 offloaded
(:class:`hata_jax.models.offload.OffloadDecoder`), batch 2. `--small`: a 4-layer model and short contexts
(CPU smoke run).

Parts, in this order, each row written to the JSON as soon as it is measured:
1. `transfer`: host -> device bandwidth of `jax.device_put` from pageable numpy memory (one
   1 GiB array; and one layer's step payload, 16 MiB at batch 2, gathered from random positions
   and copied in blocks by the workers, for each `copy_chunks`), and the host gather alone.
2. `offload` at a context whose K/V cache does not fit on the GPU together with the weights
   (default 256K, batch 2: 64 GiB of K/V + 16.1 GB of weights > 80 GB; the kernels take contexts
   up to 256K, so a larger batch rather than 512K at batch 1): the dense layers' caches are
   made on the device; each offloaded layer is filled 64K tokens at a time (random normal K/V
   made on the device, codes and norms computed there, one device -> host copy into the host cache:
   the host never holds a second copy). Decode steps from `context - slack` tokens: median wall
   time per step (token read back), tokens/s, bytes moved per step (counted by the caches and
   computed by :func:`hata_jax.offload.step_transfer_bytes`), the bandwidth that implies, and the
   host's time per step waiting for the selections and gathering/copying. Then the same steps
   with each `copy_chunks` of `--chunks`.
3. `fits` (default 64K, batch 2): the on-device HATA decode step (`hata_jax.models.generation.ModelSteps`,
   one jit, as :mod:`bench.decode`'s "hata") and the offloaded step from the same cache contents
   (the offloaded caches are copied from the device caches before the on-device steps run); both
   greedy from the same token: `tokens_equal_prefix` counts the leading steps whose tokens agree.
   The run sets `--xla_allow_excess_precision=false` (unless `--excess-precision`): with XLA's
   default, bf16 values inside a fusion may keep float32 precision, so the one-jit on-device step and
   the per-layer offloaded pieces round differently and their tokens part after a few steps (on the
   CPU, the flag makes them equal token for token).
4. `probe` (a subprocess, so that an XLA CHECK failure cannot end this run): JAX memory kinds on
   this device: `device_put` to `pinned_host` and back (bandwidths), and inside `jit` a row gather
   from a `pinned_host` array under `compute_on("device_host")` and a donated in-place append.

Budget: `--time-budget` (default 200 s) skips the parts that no longer fit, saying so.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import hata_jax as hj
from bench.decode_steps import free, random_hata_cache
from bench.timing import environment, write_json
from hata_jax import HataCache, HataConfig, offload
from hata_jax.models import AttentionPlan, LlamaForCausalLM, generation
from hata_jax.models.offload import OffloadDecoder
from hata_jax.models.presets import LLAMA_8B, SMALL_MODELS
from hata_jax.offload import OffloadedCache, step_transfer_bytes

GB = 1e9
FILL_CHUNK = 65536  # tokens per device -> host copy while filling a host cache


@dataclasses.dataclass(frozen=True)
class Settings:
    big_context: int = 262144
    fit_context: int = 65536
    batch: int = 2
    budget: int = 2048
    rbit: int = 128
    dense_layers: int = 2
    warmup: int = 2
    reps: int = 20
    chunks: tuple[int, ...] = (1, 2, 8)
    chunk_reps: int = 5
    time_budget_s: float = 200.0
    small: bool = False

    @property
    def hata(self) -> HataConfig:
        return HataConfig(rbit=self.rbit, budget=self.budget)

    @property
    def slack(self) -> int:
        """Steps run on one set of caches (their lengths start this far below the capacity)."""
        return self.warmup + self.reps + len(self.chunks) * (1 + self.chunk_reps) + 2


SMALL = dict(big_context=2048, fit_context=512, batch=2, budget=32, warmup=1, reps=4, chunks=(1, 2), chunk_reps=2)


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


@functools.partial(jax.jit, static_argnames=("shape",))
def random_tokens(key, w, *, shape):
    """Random normal keys and values kv [B, Hkv, T, 2, D] in bf16, the keys' codes under `w` and norms."""
    kv = jax.random.normal(key, shape, jnp.bfloat16)
    return kv, hj.encode(kv[:, :, :, 0], w, head_axis=1), hj.key_norms(kv[:, :, :, 0])


class OffloadBench:
    def __init__(self, settings: Settings, out: str, started: float):
        self.s, self.out, self.started = settings, out, started
        self.config = SMALL_MODELS["llama"] if settings.small else LLAMA_8B
        self.rows: list[dict] = []
        self.env = {**environment(), "host_cpus": os.cpu_count(), "host_memory_available_bytes":
                    host_memory_available(), "gather_threads": offload.GATHER_THREADS,
                    "copy_chunks_default": offload.COPY_CHUNKS, "xla_flags": os.environ.get("XLA_FLAGS", "")}
        self.device = jax.devices()[0]
        self.key = jax.random.PRNGKey(20261122)
        self.model = self.steps = self.decoder = None

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

    # -- 1. transfers
    def transfers(self) -> None:
        s, c = self.s, self.config
        big = np.ones((64 << 20) if s.small else (1 << 30), np.uint8)
        jax.device_put(big).block_until_ready()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            jax.device_put(big).block_until_ready()
            times.append(time.perf_counter() - start)
        one = big.nbytes / min(times) / GB
        del big
        cache = OffloadedCache.init(s.batch, c.num_kv_heads, 8 * s.budget, c.head_dim, rbit=s.rbit)
        cache.kv[...] = 1
        idx = jnp.asarray(np.random.default_rng(0).integers(0, cache.capacity, (s.batch, c.num_kv_heads, s.budget)),
                          jnp.int32)
        kv_new = jnp.ones((s.batch, c.num_kv_heads, 2, c.head_dim), jnp.bfloat16)
        payload = step_transfer_bytes(s.batch, c.num_kv_heads, s.budget, c.head_dim, jnp.bfloat16)["host_to_device"]

        def layer_step():
            cache.lengths[:] = 0
            jax.block_until_ready(cache.append_and_gather(idx, kv_new))

        gathered = {}
        for chunks in sorted({*s.chunks, offload.COPY_CHUNKS}):
            cache.copy_chunks = chunks
            layer_step()
            start = time.perf_counter()
            for _ in range(10):
                layer_step()
            gathered[chunks] = (time.perf_counter() - start) / 10
        rows = cache.kv.reshape(-1, *cache.kv.shape[2:])
        flat = np.asarray(idx).reshape(len(rows), -1)
        start = time.perf_counter()
        for _ in range(10):
            for pair in range(len(rows)):
                np.take(rows[pair], flat[pair], axis=0, mode="clip")
        gather_only = (time.perf_counter() - start) / 10
        self.record({"kind": "transfer", "h2d_one_array_gbps": one, "h2d_one_array_bytes": int((64 << 20) if s.small
                                                                                                 else (1 << 30)),
                     "layer_payload_bytes": payload,
                     "layer_gather_and_copy_ms": {str(k): 1e3 * v for k, v in gathered.items()},
                     "layer_gather_and_copy_gbps": {str(k): payload / v / GB for k, v in gathered.items()},
                     "layer_gather_only_ms_one_thread": 1e3 * gather_only})

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
        cache = OffloadedCache.init(b, hkv, s, d, rbit=self.s.rbit)
        for start in range(0, s, FILL_CHUNK):
            tokens = min(FILL_CHUNK, s - start)
            cache.write(*random_tokens(self._next_key(), self.hash_weights[layer], shape=(b, hkv, tokens, 2, d)), start)
        cache.set_lengths(np.full(b, s - self.s.slack))
        return cache

    def time_offloaded(self, caches, tokens, steps: int):
        """(wall seconds of each step, the tokens of each step, the caches' stats summed over the steps)."""
        hata = [c for c in caches if isinstance(c, OffloadedCache)]
        before = [dataclasses.replace(c.stats) for c in hata]
        times, out = [], []
        for _ in range(steps):
            start = time.perf_counter()
            tokens = self.decoder.step(tokens, caches)
            tokens.block_until_ready()
            times.append(time.perf_counter() - start)
            out.append(np.asarray(tokens).tolist())
        total = {f.name: sum(getattr(c.stats, f.name) - getattr(b, f.name) for c, b in zip(hata, before))
                 for f in dataclasses.fields(offload.TransferStats)}
        return times, out, tokens, total

    def step_row(self, part: str, context: int, times, total: dict, extra: dict) -> dict:
        s, c = self.s, self.config
        steps = len(times)
        median = statistics.median(times)
        expected = step_transfer_bytes(s.batch, c.num_kv_heads, s.budget, c.head_dim, jnp.bfloat16)
        layers = len(self.plan.hashed_layers)
        h2d = total["host_to_device_bytes"] / steps
        return self.record({
            "kind": "offload_step", "part": part, "context": context, "batch": s.batch, "budget": s.budget,
            "offloaded_layers": layers, "steps": steps, "median_ms": 1e3 * median,
            "p10_ms": 1e3 * float(np.percentile(times, 10)), "p90_ms": 1e3 * float(np.percentile(times, 90)),
            "tokens_per_s": s.batch / median, "h2d_bytes_per_step": h2d,
            "d2h_bytes_per_step": total["device_to_host_bytes"] / steps,
            "expected_h2d_bytes_per_step": layers * expected["host_to_device"],
            "expected_d2h_bytes_per_step": layers * expected["device_to_host"],
            "implied_h2d_gbps": h2d / median / GB,
            "host_wait_ms_per_step": 1e3 * total["wait_seconds"] / steps,
            "host_gather_copy_ms_per_step": 1e3 * total["gather_seconds"] / steps, **extra})

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
        fill = time.perf_counter() - start
        print(f"  filled the caches in {fill:.1f} s", flush=True)
        tokens = jax.random.randint(self._next_key(), (s.batch,), 0, c.vocab_size, jnp.int32)
        times, _, tokens, _ = self.time_offloaded(caches, tokens, s.warmup)
        first = times[0]
        times, _, tokens, total = self.time_offloaded(caches, tokens, s.reps)
        self.step_row("offload", context, times, total, {**info, "fill_s": fill, "first_call_s": first,
                                                          "copy_chunks": offload.COPY_CHUNKS})
        for chunks in s.chunks:
            if self.left() < 30:
                self.skip("offload chunks", f"time budget: {self.left():.0f} s left")
                break
            for cache in caches:
                if isinstance(cache, OffloadedCache):
                    cache.copy_chunks = chunks
            _, _, tokens, _ = self.time_offloaded(caches, tokens, 1)
            times, _, tokens, total = self.time_offloaded(caches, tokens, s.chunk_reps)
            self.step_row("offload chunks", context, times, total, {"copy_chunks": chunks})
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
            host[i] = OffloadedCache.init(*self.shape(context), rbit=s.rbit)
            host[i].write(jnp.stack([device[i].k, device[i].v], axis=3), device[i].codes, device[i].norms)
            host[i].set_lengths(np.full(s.batch, length))
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
        warm, host_tokens, tokens, _ = self.time_offloaded(caches, t0, s.warmup)
        times, timed_tokens, _, total = self.time_offloaded(caches, tokens, s.reps)
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

    # -- 4. memory kinds, in a subprocess
    def probe(self) -> None:
        env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
        command = [sys.executable, "-m", "bench.offload", "--probe"] + (["--small"] if self.s.small else [])
        timeout = max(10.0, min(90.0, self.left()))
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env,
                                  cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        except subprocess.TimeoutExpired:
            self.record({"kind": "probe", "error": f"timed out after {timeout:.0f} s"})
            return
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        result = json.loads(lines[-1]) if lines else {}
        self.record({"kind": "probe", "returncode": done.returncode, **result,
                     **({} if done.returncode == 0 else {"stderr_tail": done.stderr[-2000:]})})

    def run(self) -> None:
        print(self.env, flush=True)
        self.transfers()
        self.build()
        self.big()
        if self.left() > (10 if self.s.small else 60):
            self.fits()
        else:
            self.skip("fits", f"time budget: {self.left():.0f} s left")
        if self.left() > 15:
            self.probe()
        else:
            self.skip("probe", f"time budget: {self.left():.0f} s left")
        self.save(complete=True)


def probe_memory_kinds(small: bool) -> dict:
    """What JAX memory kinds do on this device (see the module docstring, part 4)."""
    from jax.experimental.compute_on import compute_on

    dev = jax.devices()[0]
    host = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
    on_device = jax.sharding.SingleDeviceSharding(dev, memory_kind="device")
    kv_heads, tokens, budget, head_dim = (2, 4096, 64, 64) if small else (8, 65536, 2048, 128)
    rng = np.random.default_rng(0)
    kv = rng.standard_normal((kv_heads, tokens, 2, head_dim), np.float32).astype(jnp.bfloat16)
    idx = rng.integers(0, tokens, (kv_heads, budget)).astype(np.int32)
    out: dict = {"memories": [str(m) for m in dev.addressable_memories()], "probe_bytes": kv.nbytes}

    def timed(name, fn, reps=5):
        try:
            result = jax.block_until_ready(fn())
            start = time.perf_counter()
            for _ in range(reps):
                jax.block_until_ready(fn())
            out[f"{name}_ms"] = 1e3 * (time.perf_counter() - start) / reps
            return result
        except Exception as err:  # report what fails, keep probing the rest
            out[f"{name}_error"] = f"{type(err).__name__}: {str(err)[:600]}"
            return None

    pinned = timed("numpy_to_pinned_host", lambda: jax.device_put(kv, host))
    if pinned is None:
        return out
    out["pinned_to_device_gbps"] = None
    if timed("pinned_host_to_device", lambda: jax.device_put(pinned, on_device)) is not None:
        out["pinned_to_device_gbps"] = kv.nbytes / out["pinned_host_to_device_ms"] / 1e6
    if timed("numpy_to_device", lambda: jax.device_put(kv, on_device)) is not None:
        out["numpy_to_device_gbps"] = kv.nbytes / out["numpy_to_device_ms"] / 1e6

    @jax.jit
    def gather(kv_host, positions):
        positions = jax.device_put(positions, host)
        with compute_on("device_host"):
            rows = jnp.take_along_axis(kv_host, positions[:, :, None, None], axis=1, mode="clip")
        return jax.device_put(rows, on_device)

    rows = timed("jit_host_gather", lambda: gather(pinned, jnp.asarray(idx)))
    if rows is not None:
        out["jit_host_gather_exact"] = bool(np.array_equal(np.asarray(rows), np.take_along_axis(
            kv, idx[:, :, None, None], axis=1)))
        out["jit_host_gather_rows_bytes"] = int(rows.nbytes)

    @functools.partial(jax.jit, donate_argnums=0, out_shardings=host)
    def append(kv_host, row, position):
        row, position = jax.device_put(row, host), jax.device_put(position, host)
        with compute_on("device_host"):
            return kv_host.at[:, position].set(row)

    row = jnp.ones((kv_heads, 2, head_dim), jnp.bfloat16)
    state = {"kv": jax.device_put(kv, host)}

    def append_once():
        state["kv"] = append(state["kv"], row, jnp.int32(3))
        return state["kv"]

    if timed("jit_host_append", append_once) is not None:
        out["jit_host_append_exact"] = bool(np.all(np.asarray(state["kv"][:, 3]) == 1))
    return out


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="results JSON (written after every result)")
    parser.add_argument("--small", action="store_true", help="tiny model and contexts (CPU smoke run)")
    parser.add_argument("--probe", action="store_true", help="only probe memory kinds; print JSON (used internally)")
    parser.add_argument("--big-context", type=int, dest="big_context")
    parser.add_argument("--fit-context", type=int, dest="fit_context")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--reps", type=int)
    parser.add_argument("--chunks", type=int, nargs="+", help="copy_chunks values to time after the default")
    parser.add_argument("--time-budget", type=float, dest="time_budget_s")
    parser.add_argument("--excess-precision", action="store_true",
                        help="leave XLA's excess precision for bf16 on (its default; the on-device and offloaded "
                             "steps then fuse differently and their greedy tokens may part after a few steps)")
    args = parser.parse_args(argv)
    if not args.probe and not args.out:
        parser.error("--out is required")
    fields = {f.name for f in dataclasses.fields(Settings)}
    given = {k: v for k, v in vars(args).items() if v is not None and k in fields}
    if "chunks" in given:
        given["chunks"] = tuple(given["chunks"])
    return args, Settings(**{**(SMALL if args.small else {}), **given})


def main(argv=None) -> int:
    args, settings = parse_args(argv)
    if not args.excess_precision:  # read when the backend starts, which has not happened yet
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_allow_excess_precision=false").strip()
    if args.probe:
        print(json.dumps(probe_memory_kinds(settings.small)), flush=True)
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
