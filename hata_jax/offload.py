"""HATA decoding with the K/V cache in host memory: only the selected rows cross PCIe.

An :class:`OffloadedCache` keeps one layer's keys and values in host RAM, a numpy array
`kv [B, Hkv, S_max, 2, D]` (a token's key and value side by side: one contiguous `2 * D * itemsize`
byte row per token and KV head), and its hash codes, key norms and lengths on the device
(:class:`DeviceCodes`: 20 bytes per token and KV head at rbit 128, 4% of the K/V bytes at D=128 bf16).
One layer's decode step (:func:`offload_decode_attention`) is three parts:

1. device, jittable (:func:`select_rows`): hash the queries and the new key, append the key's code
   and norm, score every cached token and select `budget` per (sequence, KV head): HATA's selection,
   the same ops as :func:`hata_jax.hata_decode_attention`;
2. host (:meth:`OffloadedCache.append_and_gather`): read back the selected positions and the new
   token's key and value, write the token into host memory, then gather the selected rows on a
   thread pool: the (sequence, KV head) pairs are split into `copy_chunks` blocks, each gathered and
   `jax.device_put` by one worker as soon as it is ready, so the copies of early blocks overlap the
   gathers of later ones;
3. device, jittable (:func:`attend_rows`): sparse attention over the moved rows, the kernel of
   :func:`hata_jax.sparse_decode_attention` with identity indices, which visits the rows in the order
   the on-device step gathers them: the output equals :func:`hata_jax.hata_decode_attention`'s.

Bytes per layer step (:func:`step_transfer_bytes`): host -> device `B * Hkv * budget * 2 * D * itemsize`
(the selected rows, the whole fixed-size buffer: shapes stay static); device -> host
`B * Hkv * (budget * 4 + 2 * D * itemsize)` (indices and the new token); independent of the context.
The host waits for each layer's selection (a layer's selection needs its query, which needs the
previous layer's output): one device -> host synchronisation per offloaded layer and step.
Measured: BENCHMARKS.md, "KV cache offloaded to host memory".

The gathers and copies run outside `jit` (numpy buffers and `jax.device_put`): a gather inside
`jit` from a `pinned_host` array with device indices does not trace on jax 0.10, and `bench/offload.py`
probes the in-jit variant on the GPU.

Tunables: :data:`GATHER_THREADS` = min(32, CPUs) workers (numpy's take releases the GIL, so the
gathers of a step run in parallel); :data:`COPY_CHUNKS` blocks per step by default (one
`device_put` each: more blocks overlap more gathering with copying, each costs host time). The
gather uses `np.take(..., mode="clip")` into the block; the indices are valid by construction.

Capacity: the host keeps each sequence's length (it writes every token), so overflow is always
detected at once: :meth:`OffloadedCache.check_room` raises a ValueError before a step would write
past `S_max` (the rule of :class:`hata_jax.HataCache` with concrete lengths); nothing is dropped silently.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np

from hata_jax import checks
from hata_jax.attention import sparse_decode_attention
from hata_jax.config import HataConfig, check_rbit
from hata_jax.hashing import check_projection, encode, encode_step, key_norms
from hata_jax.selection import check_selection_args, hamming_topk

GATHER_THREADS = min(32, os.cpu_count() or 1)
COPY_CHUNKS = 4


@functools.lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    """The workers shared by every OffloadedCache (numpy's take and copies release the GIL)."""
    return ThreadPoolExecutor(max_workers=GATHER_THREADS, thread_name_prefix="hata-offload")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["codes", "norms", "lengths"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class DeviceCodes:
    """The device half of an :class:`OffloadedCache` (a pytree, updated functionally).

    Attributes:
      codes: uint32[B, Hkv, S_max, rbit // 32] key hash codes.
      norms: float32[B, Hkv, S_max] key norms.
      lengths: int32[B] valid tokens per sequence.
    """

    codes: jax.Array
    norms: jax.Array
    lengths: jax.Array

    @property
    def capacity(self) -> int:
        return self.codes.shape[2]

    def append(self, k_codes: jax.Array, k_norms: jax.Array) -> DeviceCodes:
        """Write one token's code uint32[B, Hkv, W] and norm float32[B, Hkv] at `lengths[b]`; a full
        sequence's write is dropped and its length stays (the host raises before that happens)."""
        rows = jnp.arange(self.codes.shape[0])

        def put(buf, val):
            return buf.at[rows, :, self.lengths].set(val.astype(buf.dtype), mode="drop")

        return DeviceCodes(put(self.codes, k_codes), put(self.norms, k_norms),
                           jnp.minimum(self.lengths + 1, self.capacity))


@functools.partial(jax.jit, donate_argnames=("device_codes",))
def _put_tokens(device_codes: DeviceCodes, codes, norms, start) -> DeviceCodes:
    """codes [B, Hkv, T, W] and norms [B, Hkv, T] written at token positions [start, start + T)."""
    put = functools.partial(jax.lax.dynamic_update_slice_in_dim, start_index=start, axis=2)
    return DeviceCodes(put(device_codes.codes, codes), put(device_codes.norms, norms), device_codes.lengths)


@dataclasses.dataclass
class TransferStats:
    """What an OffloadedCache's decode steps moved, and where their host time went.

    Attributes:
      steps: decode steps (calls of :meth:`OffloadedCache.append_and_gather`).
      host_to_device_bytes, device_to_host_bytes: bytes of the arrays those steps moved.
      wait_seconds: host time spent waiting for the device's selection (and reading it back).
      gather_seconds: host time spent writing new tokens, gathering and issuing the copies.
    """

    steps: int = 0
    host_to_device_bytes: int = 0
    device_to_host_bytes: int = 0
    wait_seconds: float = 0.0
    gather_seconds: float = 0.0


def step_transfer_bytes(batch: int, kv_heads: int, budget: int, head_dim: int, dtype) -> dict[str, int]:
    """Bytes one layer's decode step moves: {"host_to_device": the selected K/V rows,
    "device_to_host": the selected positions (int32) and the new token's key and value}."""
    row = 2 * head_dim * jnp.dtype(dtype).itemsize
    return {"host_to_device": batch * kv_heads * budget * row,
            "device_to_host": batch * kv_heads * (budget * 4 + row)}


class OffloadedCache:
    """One attention layer's decode cache with the K/V rows in host memory (mutable).

    Attributes:
      kv: host numpy array [B, Hkv, S_max, 2, D] (`[..., 0, :]` keys, `[..., 1, :]` values, post-RoPE).
      codes: the :class:`DeviceCodes` on `device`; a step replaces it with :func:`select_rows`'s
        result and must then call :meth:`append_and_gather` (the two halves go in pairs).
      lengths: host int32[B], equal to `codes.lengths` between steps.
      device: where the codes live and the gathered rows go; None: the default device, with the
        arrays left uncommitted (as `jnp` creates them), so that jitted steps that mix them with
        other uncommitted arrays compile once.
      stats: :class:`TransferStats` of the decode steps (prefill and writes are not counted).
      copy_chunks: a step splits the (sequence, KV head) pairs into this many blocks (at most
        B * Hkv), each gathered and copied to the device by one worker (default COPY_CHUNKS).
    """

    def __init__(self, kv: np.ndarray, codes: DeviceCodes, device):
        self.kv, self.codes, self.device = kv, codes, device
        self.lengths = np.array(codes.lengths, np.int32)
        self.stats = TransferStats()
        self.copy_chunks = COPY_CHUNKS

    @classmethod
    def init(cls, batch: int, kv_heads: int, capacity: int, head_dim: int, *, rbit: int = 128,
             dtype=jnp.bfloat16, device=None) -> OffloadedCache:
        """An empty cache of `capacity` tokens per sequence (host pages are zero and allocated lazily);
        `device` as the attribute."""
        for name, value in (("batch", batch), ("kv_heads", kv_heads), ("capacity", capacity), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"OffloadedCache.init: {name} must be a positive int, got {value!r}")
        check_rbit(rbit)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"OffloadedCache.init: dtype must be a floating-point dtype, got {jnp.dtype(dtype)}")
        put = functools.partial(jax.device_put, device=device)
        codes = DeviceCodes(put(np.zeros((batch, kv_heads, capacity, rbit // 32), np.uint32)),
                            put(np.zeros((batch, kv_heads, capacity), np.float32)), put(np.zeros((batch,), np.int32)))
        return cls(np.zeros((batch, kv_heads, capacity, 2, head_dim), jnp.dtype(dtype)), codes, device)

    @property
    def batch(self) -> int:
        return self.kv.shape[0]

    @property
    def kv_heads(self) -> int:
        return self.kv.shape[1]

    @property
    def capacity(self) -> int:
        return self.kv.shape[2]

    @property
    def head_dim(self) -> int:
        return self.kv.shape[4]

    @property
    def rbit(self) -> int:
        return 32 * self.codes.codes.shape[3]

    @property
    def dtype(self) -> np.dtype:
        return self.kv.dtype

    def check_projection(self, w) -> None:
        """Raise a ValueError unless w is a float[Hkv, D, rbit] projection matching the cache."""
        kv_heads, _, rbit = check_projection(w, self.head_dim)
        if kv_heads != self.kv_heads or rbit != self.rbit:
            raise ValueError(f"w must have shape [{self.kv_heads}, {self.head_dim}, {self.rbit}] to match the cache, "
                             f"got {tuple(w.shape)}")

    def write(self, kv, codes, norms, start: int = 0) -> None:
        """Store tokens at positions [start, start + T) of every sequence (lengths unchanged).

        Args:
          kv: [B, Hkv, T, 2, D] keys (`[..., 0, :]`) and values, a device or host array; a device
            array is cast to the cache dtype on the device and copied to the host once.
          codes: uint32[B, Hkv, T, rbit // 32] the keys' codes; norms: float32[B, Hkv, T] their
            norms (device or host arrays; see :meth:`prefill`, which computes them).
        """
        checks.check_rank(kv, 5, "kv", "[batch, kv_heads, tokens, 2, head_dim]")
        checks.check_floating(kv, "kv")
        lead = (self.batch, self.kv_heads, kv.shape[2])
        t = lead[2]
        for name, x, shape, dtype in (("kv", kv, (*lead, 2, self.head_dim), None),
                                      ("codes", codes, (*lead, self.rbit // 32), jnp.uint32),
                                      ("norms", norms, lead, jnp.float32)):
            if tuple(x.shape) != shape:
                raise ValueError(f"{name} must have shape {list(shape)} to match the cache, got {tuple(x.shape)}")
            if dtype is not None:
                checks.check_dtype(x, [dtype], name)
        if (isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0
                or start + t > self.capacity):
            raise ValueError(f"write: tokens [{start}, {start} + {t}) do not fit the capacity {self.capacity}")
        put = functools.partial(jax.device_put, device=self.device)
        self.codes = _put_tokens(self.codes, put(codes), put(norms), int(start))
        if isinstance(kv, jax.Array):
            host = np.asarray(kv.astype(self.dtype))  # the one device -> host copy
        else:
            host = np.asarray(kv).astype(self.dtype, copy=False)

        def copy(bh):
            b, h = bh
            self.kv[b, h, start:start + t] = host[b, h]

        list(_pool().map(copy, np.ndindex(self.batch, self.kv_heads)))

    def set_lengths(self, lengths) -> None:
        """Set every sequence's token count, int[B] in [0, capacity] (host and device)."""
        lengths = np.asarray(lengths)
        checks.check_lengths(lengths, self.batch, self.capacity)
        self.lengths = lengths.astype(np.int32)
        self.codes = dataclasses.replace(self.codes, lengths=jax.device_put(self.lengths, self.device))

    def prefill(self, k, v, w, lengths, *, impl: str = "auto") -> None:
        """Write a prompt's keys and values at positions [0, T) and set `lengths`
        (:meth:`hata_jax.HataCache.prefill` for this cache).

        Args:
          k, v: [B, Hkv, T, D] post-RoPE keys and values (device or host arrays), T <= capacity.
          w: float[Hkv, D, rbit] the layer's projection.
          lengths: int[B] prompt lengths, each <= T.
        """
        layout = "[batch, kv_heads, tokens, head_dim]"
        for name, x in (("k", k), ("v", v)):
            checks.check_rank(x, 4, name, layout)
        if tuple(k.shape) != tuple(v.shape):
            raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
        if k.shape[2] > self.capacity:
            raise ValueError(f"prefill: the prompt has {k.shape[2]} tokens but the cache capacity is {self.capacity}")
        checks.check_lengths(np.asarray(lengths), self.batch, k.shape[2], "lengths (prefill)")
        self.check_projection(w)
        stack = jnp.stack if isinstance(k, jax.Array) and isinstance(v, jax.Array) else np.stack
        keys = jax.device_put(k, self.device)
        self.write(stack([k, v], axis=3), encode(keys, w, head_axis=1, impl=impl), key_norms(keys), 0)
        self.set_lengths(lengths)

    def check_room(self) -> None:
        """Raise a ValueError if a sequence already holds `capacity` tokens (call before a step)."""
        full = self.lengths >= self.capacity
        if full.any():
            raise ValueError(f"cache overflow: sequences {np.flatnonzero(full).tolist()} already hold "
                             f"capacity={self.capacity} tokens")

    def append_and_gather(self, idx: jax.Array, kv_new: jax.Array) -> list[jax.Array]:
        """The host part of a step, after :func:`select_rows`: write the new token at `lengths[b]`,
        then gather the selected rows and start their copies to the device.

        Args:
          idx: int32[B, Hkv, budget] positions in [0, capacity) (select_rows' output).
          kv_new: [B, Hkv, 2, D] the new token's key and value in the cache dtype.

        Returns:
          device arrays [pairs, budget, 2, D], the selected rows of consecutive (sequence, KV head)
          pairs in row-major order (:func:`attend_rows` takes them).
        """
        self.check_room()
        start = time.perf_counter()
        idx, kv_new = jax.device_get((idx, kv_new))
        waited = time.perf_counter()
        self.kv[np.arange(self.batch), :, self.lengths] = kv_new
        self.lengths = self.lengths + 1
        rows = self.kv.reshape(-1, *self.kv.shape[2:])  # [B * Hkv, S_max, 2, D], a view
        idx = idx.reshape(len(rows), -1)

        def gather(pairs):
            block = np.empty((len(pairs), idx.shape[1], *rows.shape[2:]), self.dtype)
            for out, pair in zip(block, pairs):
                np.take(rows[pair], idx[pair], axis=0, out=out, mode="clip")  # "clip": no bounds pass, no temporary
            return jax.device_put(block, self.device)

        pairs = np.array_split(np.arange(len(rows)), min(max(int(self.copy_chunks), 1), len(rows)))
        blocks = list(_pool().map(gather, pairs))
        self.stats.steps += 1
        self.stats.device_to_host_bytes += idx.nbytes + kv_new.nbytes
        self.stats.host_to_device_bytes += sum(block.nbytes for block in blocks)
        self.stats.wait_seconds += waited - start
        self.stats.gather_seconds += time.perf_counter() - waited
        return blocks


def select_rows(q, k_new, v_new, codes: DeviceCodes, w, config: HataConfig, *, dtype, impl: str = "auto"):
    """The device part of a step before the copies (jittable): hash, append the code, select.

    Args:
      q: float[B, Hq, D]; k_new, v_new: float[B, Hkv, D] the step's post-RoPE queries, key and value.
      codes: the cache's :class:`DeviceCodes`.
      w: float[Hkv, D, rbit] the layer's projection.
      dtype: the cache's K/V dtype (the new token is cast to it here, as HataCache does).

    Returns:
      (idx int32[B, Hkv, budget] selected positions, unused slots 0; count int32[B, Hkv] valid slots;
      kv_new [B, Hkv, 2, D] in `dtype`; the updated codes).
    """
    config.require_one_stage("the offloaded HATA step")  # the candidates' keys are on the host
    q_codes, k_codes, k_norms = encode_step(q, k_new, w, impl=impl)
    codes = codes.append(k_codes, k_norms)
    idx, count = hamming_topk(q_codes, codes.codes, codes.norms, codes.lengths, budget=config.budget,
                              score=config.score, sink=config.sink, recent=config.recent, impl=impl)
    return jnp.maximum(idx, 0), count, jnp.stack([k_new, v_new], axis=2).astype(dtype), codes


def attend_rows(q, blocks: Sequence[jax.Array], count, *, scale: float | None = None, impl: str = "auto"):
    """Sparse attention over moved rows (jittable).

    Args:
      q: float[B, Hq, D].
      blocks: arrays [pairs, budget, 2, D] that concatenate to [B * Hkv, budget, 2, D] (the selected
        rows of each (sequence, KV head), row-major: append_and_gather's output).
      count: int32[B, Hkv]: the first `count[b, h]` rows of (b, h) are attended.

    Returns:
      out [B, Hq, D] in q's dtype.
    """
    b, _, d = q.shape
    kv_heads = count.shape[1]
    rows = jnp.concatenate(blocks).reshape(b, kv_heads, -1, 2, d)
    slots = jnp.broadcast_to(jnp.arange(rows.shape[2], dtype=jnp.int32), rows.shape[:3])
    return sparse_decode_attention(q, rows[..., 0, :], rows[..., 1, :], slots, count, scale=scale, impl=impl)


_select_rows = jax.jit(select_rows, static_argnames=("config", "dtype", "impl"), donate_argnames=("codes",))
_attend_rows = jax.jit(attend_rows, static_argnames=("scale", "impl"))


def offload_decode_attention(q, k_new, v_new, cache: OffloadedCache, w, config: HataConfig, *,
                             scale: float | None = None, impl: str = "auto") -> jax.Array:
    """:func:`hata_jax.hata_decode_attention` on an :class:`OffloadedCache` (updated in place).

    Args:
      q: float[B, Hq, D] post-RoPE queries of the step.
      k_new, v_new: float[B, Hkv, D] the step's post-RoPE key and value (appended to the cache).
      w: float[Hkv, D, rbit] the layer's projection; config: static :class:`HataConfig`.

    Returns:
      out [B, Hq, D] in q's dtype, equal to hata_decode_attention's on the same cache contents.
    """
    if not isinstance(config, HataConfig):
        raise ValueError(f"config must be a HataConfig, got {type(config).__name__}")
    checks.check_query(q)
    checks.check_floating(q, "q")
    checks.check_dim(q, 0, cache.batch, "q", "batch size")
    checks.check_dim(q, 2, cache.head_dim, "q", "head_dim")
    checks.group_size(q.shape[1], cache.kv_heads, "q heads vs cache KV heads")
    if cache.rbit != config.rbit:
        raise ValueError(f"the cache holds {cache.rbit}-bit codes but config.rbit is {config.rbit}")
    cache.check_projection(w)
    check_selection_args(config.budget, cache.capacity, config.sink, config.recent)
    for name, x in (("k_new", k_new), ("v_new", v_new)):
        checks.check_floating(x, name)
        if tuple(jnp.shape(x)) != (cache.batch, cache.kv_heads, cache.head_dim):
            raise ValueError(f"{name} must have shape [batch, kv_heads, head_dim] = "
                             f"{[cache.batch, cache.kv_heads, cache.head_dim]}, got {tuple(jnp.shape(x))}")
    cache.check_room()
    idx, count, kv_new, cache.codes = _select_rows(q, k_new, v_new, cache.codes, w, config, dtype=cache.dtype,
                                                   impl=impl)
    return _attend_rows(q, cache.append_and_gather(idx, kv_new), count, scale=scale, impl=impl)
