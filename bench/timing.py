"""Timing and environment helpers shared by the benchmarks.

Timing protocol (`median_us`): one jitted program applies the op to `n` distinct argument
sets (where the sets differ in their large arrays, caches cannot serve repeats). After warm-up,
groups of `calls_per_group` calls are dispatched back to back and the group is timed to
`block_until_ready` of its last call, so host dispatch overlaps device work as in a decode
loop; the per-op time is the group time over `calls_per_group * n`, and we report the median
over groups (plus the 10th/90th percentiles). Launch gaps between an op's kernels are inside
the measured time, as they are in a decode step. `bench.profile.device_kernel_us` gives the
device time of the kernels alone.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hata_jax.files import write_atomically


def compile_timed(jitted, *args, **kwargs) -> tuple[Any, dict]:
    """(`jitted` compiled ahead of time for `args` (arrays or ShapeDtypeStructs) and static
    `kwargs`, {"trace_s", "lower_s", "compile_s"}): the seconds of each phase."""
    start = time.perf_counter()
    traced = jitted.trace(*args, **kwargs)
    traced_at = time.perf_counter()
    lowered = traced.lower()
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    return compiled, {"trace_s": traced_at - start, "lower_s": lowered_at - traced_at,
                      "compile_s": time.perf_counter() - lowered_at}


def many_calls(fn: Callable[..., Any], arg_sets: Sequence[tuple]):
    """The compiled program that applies `fn` to every argument set (`fn` jitted once, so its
    trace and lowering are shared by the sets)."""
    one = jax.jit(fn)
    return jax.jit(lambda sets: [one(*s) for s in sets]).lower(arg_sets).compile()


def median_us(fn: Callable[..., Any], arg_sets: Sequence[tuple], *, reps: int = 25, warmup: int = 3,
              calls_per_group: int = 5, compiled=None) -> dict:
    """Median microseconds per call of `fn(*args)` over the argument sets (see the module
    docstring); `compiled`: `many_calls(fn, arg_sets)` made beforehand (e.g. in another thread)."""
    many = many_calls(fn, arg_sets) if compiled is None else compiled
    for _ in range(warmup):
        jax.block_until_ready(many(arg_sets))
    per_op = []
    for _ in range(reps):
        t0 = time.perf_counter()
        outs = [many(arg_sets) for _ in range(calls_per_group)]
        jax.block_until_ready(outs[-1])
        per_op.append((time.perf_counter() - t0) * 1e6 / (calls_per_group * len(arg_sets)))
        del outs
    return {
        "median_us": statistics.median(per_op),
        "p10_us": float(np.percentile(per_op, 10)),
        "p90_us": float(np.percentile(per_op, 90)),
        "reps": reps,
        "ops_per_rep": calls_per_group * len(arg_sets),
    }


def copy_bandwidth_gbps(nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    x = jax.random.bits(jax.random.PRNGKey(0), (nbytes // 4,), jnp.uint32)
    copy = jax.jit(lambda a: a ^ jnp.uint32(1))
    t = median_us(copy, [(x,)], reps=reps)["median_us"]
    return 2 * nbytes / (t * 1e-6) / 1e9


def read_bandwidth_gbps(nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Device read bandwidth in GB/s: a reduction over `nbytes` (reads only, like decode attention)."""
    x = jax.random.bits(jax.random.PRNGKey(1), (nbytes // 4,), jnp.uint32)
    total = jax.jit(lambda a: jnp.bitwise_xor.reduce(a))
    t = median_us(total, [(x,)], reps=reps)["median_us"]
    return nbytes / (t * 1e-6) / 1e9


def floor_bandwidth_gbps(nbytes: int = 1 << 30) -> dict:
    """Copy (read + write) and read-only bandwidth; byte floors use the larger, the stricter floor."""
    copy, read = copy_bandwidth_gbps(nbytes), read_bandwidth_gbps(nbytes)
    return {"copy_gbps": copy, "read_gbps": read, "floor_gbps": max(copy, read)}


def poison_device_memory(total_bytes: int = 4 << 30, chunk_bytes: int = 256 << 20) -> None:
    """Fill `total_bytes` of fresh device buffers with the byte 0x7F, then free them.

    JAX's allocator hands freed blocks to the next allocations, so outputs created right after
    this call start out as 0x7F7F7F7F words (float32 3.4e38, int32 2139062143: neither a valid
    value nor an index), and an element a kernel forgot to write shows up as a mismatch.
    Does nothing on a CPU (interpreted kernels write into fresh host arrays).
    """
    if jax.default_backend() == "cpu":
        return
    chunks = [jnp.full((chunk_bytes // 4,), 0x7F7F7F7F, jnp.uint32) for _ in range(total_bytes // chunk_bytes)]
    jax.block_until_ready(chunks)
    for c in chunks:
        c.delete()


def environment() -> dict:
    """Device, versions and commit for a results file (`HATA_COMMIT` wins over git: a copied tree
    may carry another checkout's .git)."""
    commit = os.environ.get("HATA_COMMIT", "")
    if not commit:
        with contextlib.suppress(OSError):
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True).stdout.strip()
    dev = jax.devices()[0]
    return {
        "device": getattr(dev, "device_kind", str(dev)),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "commit": commit or "unknown",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def write_json(path: str, payload: dict) -> None:
    """Write `payload` to `path` whole (a reader of a results file being rewritten sees the last
    complete version)."""
    write_atomically(path, lambda f: f.write(json.dumps(payload, indent=1, default=float).encode()))
