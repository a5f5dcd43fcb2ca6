"""HATA decoding with the K/V cache in host memory: only selected rows the GPU lacks cross the link.

An :class:`OffloadedCache` keeps one layer's keys and values in host RAM, a numpy array
`kv [B, Hkv, S_max, 2, D]` (a token's key and value side by side: one contiguous `2 * D * itemsize`
byte row per token and KV head), and on the device its hash codes, key norms and lengths
(:class:`DeviceCodes`: 20 bytes per token and KV head at rbit 128) and a :class:`RowCache`: the K/V
rows of the last steps' selections, `rows >= budget` per (sequence, KV head), sized by the user.
One layer's decode step (:func:`offload_decode_attention`) is three parts:

1. device, jittable (:func:`select_rows`): hash the queries and the new key, append the key's code
   and norm, select `budget` tokens per (sequence, KV head) (HATA's selection, the ops of
   :func:`hata_jax.hata_decode_attention`), and plan the fetch (:func:`plan_fetch`): each selected
   token the row cache holds keeps its slot; each other one takes the least recently used slot that
   no selected token holds, and is listed for the host (by position);
2. host (:meth:`OffloadedCache.append_and_gather`): read back the list (one device -> host
   synchronisation per layer and step), write the new token into host memory, gather the listed
   rows into a page-locked landing buffer (:mod:`hata_jax.host_memory`: worker threads, no Python
   loop per row) and start its copy (one per layer and step);
3. device, jittable (:func:`fill_and_attend`): write the landed rows into their slots, then run the
   sparse attention kernel over the row cache with the selection's slots, visiting the rows in the
   order the on-device step does: the output equals :func:`hata_jax.hata_decode_attention`'s.

Bytes per layer step: host -> device the rows not already resident, rounded up to a landing size
(:func:`hata_jax.host_memory.landing_rows`: at most twice them, or an eighth of the budget's rows);
device -> host the fetch list (int32 per selected slot) and the new token. `stats` counts both, and
the rows selected and fetched (the row cache's hit rate is `1 - rows_fetched / rows_selected`). With
`rows = budget` the cache holds the previous step's selection; more rows keep older selections too.

:func:`offload_dense_attention` is dense attention over the same cache (the baseline HATA is
measured against): every step it streams all K/V rows to the device in blocks through the same
staging buffers and merges the blocks' attention by log-sum-exp.

Capacity: the host keeps each sequence's length (it writes every token), so overflow is always
detected at once: :meth:`OffloadedCache.check_room` raises a ValueError before a step would write
past `S_max`; nothing is dropped silently.
"""
from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from hata_jax import checks, host_memory
from hata_jax.attention import combine, dense_decode_attention, sparse_decode_attention
from hata_jax.config import HataConfig, check_rbit
from hata_jax.hashing import check_projection, encode, encode_step, encode_step_for, key_norms
from hata_jax.selection import check_selection_args, hamming_topk

STREAM_TOKENS = 16384  # tokens per block of offload_dense_attention


@functools.partial(jax.tree_util.register_dataclass, data_fields=["codes", "norms", "lengths"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class DeviceCodes:
    """The device half of an :class:`OffloadedCache`'s index (a pytree, updated functionally).

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


@functools.partial(jax.tree_util.register_dataclass, data_fields=["k", "v", "positions", "used"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class RowCache:
    """K/V rows kept on the device between steps, per (sequence, KV head) (a pytree).

    Attributes:
      k, v: [B, Hkv, R, D] the rows held in each slot.
      positions: int32[B, Hkv, R] the token each slot holds, -1 for none.
      used: int32[B, Hkv, R] the sequence length at the step that last selected the slot (-1: never);
        the least recently used free slot is refilled first.
    """

    k: jax.Array
    v: jax.Array
    positions: jax.Array
    used: jax.Array

    @classmethod
    def empty(cls, batch: int, kv_heads: int, rows: int, head_dim: int, dtype, device=None) -> RowCache:
        put = functools.partial(jax.device_put, device=device)
        none = put(np.full((batch, kv_heads, rows), -1, np.int32))
        kv = put(np.zeros((batch, kv_heads, rows, head_dim), jnp.dtype(dtype)))
        return cls(kv, kv.copy(), none, none.copy())

    @property
    def rows(self) -> int:
        return self.positions.shape[2]


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["slots", "count", "host_rows", "fetch_count", "fill_slots"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class Fetch:
    """What one offloaded step reads, where it comes from and where it goes (a pytree).

    Attributes:
      slots: int32[B, Hkv, K] the row-cache slot of each selected token, in selection order (0 past
        `count`).
      count: int32[B, Hkv] valid slots.
      host_rows: int32[B * Hkv * K] the host rows to copy, `pair * S_max + position` with
        `pair = b * Hkv + h`, pair by pair and by position within a pair; the first `fetch_count`
        are valid.
      fetch_count: int32[] how many rows cross.
      fill_slots: int32[B * Hkv * K] the flat row-cache slot (`pair * R + slot`) each copied row
        goes to, in `host_rows` order; past `fetch_count` it is `B * Hkv * R` (out of range: the
        write is dropped).
    """

    slots: jax.Array
    count: jax.Array
    host_rows: jax.Array
    fetch_count: jax.Array
    fill_slots: jax.Array


def plan_fetch(idx, count, rows: RowCache, lengths, capacity: int) -> tuple[Fetch, RowCache]:
    """Match a selection against the row cache (jittable).

    Args:
      idx: int32[B, Hkv, K] selected positions in [0, capacity) (valid for the first `count`).
      count: int32[B, Hkv] valid selected slots, each <= R.
      rows: the layer's :class:`RowCache` (R >= K).
      lengths: int32[B] the sequences' lengths this step (the recency stamp of the slots used).
      capacity: the host cache's S_max.

    Returns:
      (the step's :class:`Fetch`, the row cache with `positions` and `used` updated; its k and v are
      written by :func:`fill_rows` once the rows arrive).
    """
    b, hkv, k = idx.shape
    r = rows.rows
    pairs = b * hkv
    valid = jnp.arange(k) < count[..., None]
    order = jnp.argsort(rows.positions, axis=-1)
    held = jnp.take_along_axis(rows.positions, order, axis=-1)
    # method 'sort': no loop (a 'scan' search is a while loop, which waits on the host each iteration on a GPU)
    at = jax.vmap(jax.vmap(functools.partial(jnp.searchsorted, method="sort")))(held, idx)
    at = jnp.minimum(at, r - 1)
    hit = valid & (jnp.take_along_axis(held, at, axis=-1) == idx)
    hit_slot = jnp.take_along_axis(order, at, axis=-1)
    bi, hi = jnp.arange(b)[:, None, None], jnp.arange(hkv)[None, :, None]
    claimed = jnp.zeros((b, hkv, r), bool).at[bi, hi, jnp.where(hit, hit_slot, r)].set(True, mode="drop")
    free = jnp.argsort(jnp.where(claimed, jnp.iinfo(jnp.int32).max, rows.used), axis=-1, stable=True)
    miss = valid & ~hit
    # a pair's misses are listed by position (the host's gather then reads its rows in address order)
    by_position = jnp.argsort(jnp.where(miss, idx, jnp.iinfo(jnp.int32).max), axis=-1)
    rank = jnp.zeros_like(idx).at[bi, hi, by_position].set(jnp.broadcast_to(jnp.arange(k, dtype=idx.dtype), idx.shape))
    miss_slot = jnp.take_along_axis(free, jnp.clip(rank, 0, r - 1), axis=-1)
    slots = jnp.where(hit, hit_slot, jnp.where(miss, miss_slot, 0)).astype(jnp.int32)
    positions = rows.positions.at[bi, hi, jnp.where(miss, miss_slot, r)].set(idx, mode="drop")
    used = rows.used.at[bi, hi, jnp.where(valid, slots, r)].set(
        jnp.broadcast_to(lengths[:, None, None], idx.shape).astype(jnp.int32), mode="drop")
    misses = jnp.sum(miss, axis=-1).reshape(pairs)
    offsets = jnp.cumsum(misses) - misses
    pair = jnp.arange(pairs, dtype=jnp.int32).reshape(b, hkv, 1)
    dest = jnp.where(miss, offsets.reshape(b, hkv, 1) + rank, pairs * k)  # pairs * k: out of range, dropped
    host_rows = jnp.zeros(pairs * k, jnp.int32).at[dest].set(pair * capacity + idx, mode="drop")
    fill = jnp.full(pairs * k, pairs * r, jnp.int32).at[dest].set(pair * r + miss_slot, mode="drop")
    fetch = Fetch(slots, count, host_rows, jnp.sum(misses).astype(jnp.int32), fill)
    return fetch, dataclasses.replace(rows, positions=positions, used=used)


def fill_rows(rows: RowCache, landing, fill_slots) -> RowCache:
    """Write landed rows [L, 2, D] (keys `[:, 0]`, values `[:, 1]`) into the flat row-cache slots
    `fill_slots[:L]` (out-of-range slots are dropped) (jittable)."""
    dest = fill_slots[:landing.shape[0]]
    b, hkv, r, d = rows.k.shape

    def put(buf, val):
        return buf.reshape(b * hkv * r, d).at[dest].set(val.astype(buf.dtype), mode="drop").reshape(buf.shape)

    return dataclasses.replace(rows, k=put(rows.k, landing[:, 0]), v=put(rows.v, landing[:, 1]))


@functools.partial(jax.jit, donate_argnames=("device_codes",))
def _put_tokens(device_codes: DeviceCodes, codes, norms, start) -> DeviceCodes:
    """codes [B, Hkv, T, W] and norms [B, Hkv, T] written at token positions [start, start + T)."""
    put = functools.partial(jax.lax.dynamic_update_slice_in_dim, start_index=start, axis=2)
    return DeviceCodes(put(device_codes.codes, codes), put(device_codes.norms, norms), device_codes.lengths)


@dataclasses.dataclass
class TransferStats:
    """What an OffloadedCache's decode steps moved, and where their host time went.

    Attributes:
      steps: decode steps (HATA steps and dense steps).
      rows_selected: selected (token, KV head) rows the HATA steps attended.
      rows_fetched: of those, the rows that crossed (not held by the row cache).
      host_to_device_bytes: bytes copied to the device (whole landing buffers and streamed blocks).
      device_to_host_bytes: bytes read back (fetch lists and new tokens).
      wait_seconds: host time spent waiting for the device's selection (and reading it back).
      gather_seconds: host time spent writing new tokens, gathering and starting the copies.
    """

    steps: int = 0
    rows_selected: int = 0
    rows_fetched: int = 0
    host_to_device_bytes: int = 0
    device_to_host_bytes: int = 0
    wait_seconds: float = 0.0
    gather_seconds: float = 0.0

    @property
    def hit_rate(self) -> float:
        """The fraction of selected rows the row cache already held."""
        return 1.0 - self.rows_fetched / self.rows_selected if self.rows_selected else 0.0


def step_transfer_bytes(batch: int, kv_heads: int, budget: int, head_dim: int, dtype) -> dict[str, int]:
    """Bytes one layer's HATA step moves when no selected row is resident: {"host_to_device": the
    selected K/V rows, "device_to_host": the fetch list (int32 per slot) and the new token}."""
    row = 2 * head_dim * jnp.dtype(dtype).itemsize
    return {"host_to_device": batch * kv_heads * budget * row,
            "device_to_host": batch * kv_heads * (budget * 4 + row)}


class OffloadedCache:
    """One attention layer's decode cache with the K/V rows in host memory (mutable).

    Attributes:
      kv: host numpy array [B, Hkv, S_max, 2, D] (`[..., 0, :]` keys, `[..., 1, :]` values, post-RoPE).
      codes: the :class:`DeviceCodes`; rows: the :class:`RowCache`. A step replaces both with
        :func:`select_rows`'s results and must then call :meth:`append_and_gather`.
      lengths: host int32[B], equal to `codes.lengths` between steps.
      device: where the codes and rows live (None: the default device).
      staging: the page-locked buffers the rows cross through (:class:`hata_jax.host_memory.PinnedStaging`);
        caches whose steps run one after another (a model's layers) may share one.
      stats: :class:`TransferStats` of the decode steps (prefill and writes are not counted).
    """

    def __init__(self, kv: np.ndarray, codes: DeviceCodes, rows: RowCache, device,
                 staging: host_memory.PinnedStaging | None = None):
        self.kv, self.codes, self.rows, self.device = kv, codes, rows, device
        self.lengths = np.array(codes.lengths, np.int32)
        self.stats = TransferStats()
        if staging is None:
            staging = host_memory.PinnedStaging(kv.shape[3:], kv.dtype, device)
        elif staging.row_shape != kv.shape[3:] or staging.dtype != kv.dtype:
            raise ValueError(f"staging holds rows {staging.row_shape} of {staging.dtype}, the cache "
                             f"{kv.shape[3:]} of {kv.dtype}")
        self.staging = staging

    @classmethod
    def init(cls, batch: int, kv_heads: int, capacity: int, head_dim: int, *, rbit: int = 128,
             dtype=jnp.bfloat16, rows: int = 0, device=None,
             staging: host_memory.PinnedStaging | None = None) -> OffloadedCache:
        """An empty cache of `capacity` tokens per sequence (host pages are zero and allocated lazily)
        with a row cache of `rows` slots per (sequence, KV head) (at least the budget of the steps
        that use it; 0: none until :meth:`resize_rows`); `device` and `staging` (None: its own) as
        the attributes."""
        for name, value in (("batch", batch), ("kv_heads", kv_heads), ("capacity", capacity), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"OffloadedCache.init: {name} must be a positive int, got {value!r}")
        check_rbit(rbit)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"OffloadedCache.init: dtype must be a floating-point dtype, got {jnp.dtype(dtype)}")
        if batch * kv_heads * capacity >= 2**31:
            raise ValueError(f"OffloadedCache.init: batch * kv_heads * capacity must be < 2**31 (int32 row "
                             f"numbers), got {batch * kv_heads * capacity}")
        _check_rows(rows, capacity)
        put = functools.partial(jax.device_put, device=device)
        codes = DeviceCodes(put(np.zeros((batch, kv_heads, capacity, rbit // 32), np.uint32)),
                            put(np.zeros((batch, kv_heads, capacity), np.float32)), put(np.zeros((batch,), np.int32)))
        return cls(host_memory.host_zeros((batch, kv_heads, capacity, 2, head_dim), jnp.dtype(dtype)), codes,
                   RowCache.empty(batch, kv_heads, rows, head_dim, dtype, device), device, staging)

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

    def resize_rows(self, rows: int) -> None:
        """Replace the row cache by an empty one of `rows` slots per (sequence, KV head)."""
        _check_rows(rows, self.capacity)
        self.rows = RowCache.empty(self.batch, self.kv_heads, rows, self.head_dim, self.dtype, self.device)

    def forget_rows(self) -> None:
        """Mark every row-cache slot empty (its buffers are kept)."""
        self.rows = dataclasses.replace(self.rows, positions=jnp.full_like(self.rows.positions, -1),
                                        used=jnp.full_like(self.rows.used, -1))

    def prepare(self, budget: int) -> None:
        """Make the landing buffers that steps of `budget` may need (shared staging: once)."""
        self.staging.reserve(self.batch * self.kv_heads * budget)

    def check_projection(self, w) -> None:
        """Raise a ValueError unless w is a float[Hkv, D, rbit] projection matching the cache."""
        kv_heads, _, rbit = check_projection(w, self.head_dim)
        if kv_heads != self.kv_heads or rbit != self.rbit:
            raise ValueError(f"w must have shape [{self.kv_heads}, {self.head_dim}, {self.rbit}] to match the cache, "
                             f"got {tuple(w.shape)}")

    def write(self, kv, codes, norms, start: int = 0) -> None:
        """Store tokens at positions [start, start + T) of every sequence (lengths unchanged; the
        row cache is emptied, since the rows it holds may be replaced).

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

        list(host_memory.pool().map(copy, np.ndindex(self.batch, self.kv_heads)))
        self.forget_rows()

    def set_lengths(self, lengths) -> None:
        """Set every sequence's token count, int[B] in [0, capacity] (host and device; the row
        cache is emptied, since positions past a shorter length will be rewritten)."""
        lengths = np.asarray(lengths)
        checks.check_lengths(lengths, self.batch, self.capacity)
        self.lengths = lengths.astype(np.int32)
        self.codes = dataclasses.replace(self.codes, lengths=jax.device_put(self.lengths, self.device))
        self.forget_rows()

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

    def append_new_token(self, kv_new: np.ndarray) -> None:
        """Write one token per sequence ([B, Hkv, 2, D] host array) at `lengths[b]`, then count it."""
        self.kv[np.arange(self.batch), :, self.lengths] = kv_new
        self.lengths = self.lengths + 1

    def append_and_gather(self, fetch: Fetch, kv_new: jax.Array) -> jax.Array:
        """The host part of a HATA step, after :func:`select_rows`: write the new token at
        `lengths[b]`, then gather the rows the fetch lists and start their copy to the device.

        Returns:
          the landing buffer [L, 2, D] on the device, its first `fetch.fetch_count` rows those of
          `fetch.host_rows` (:func:`fill_and_attend` takes it).
        """
        self.check_room()
        start = time.perf_counter()
        host_rows, fetched, count, kv_new = jax.device_get((fetch.host_rows, fetch.fetch_count, fetch.count, kv_new))
        waited = time.perf_counter()
        self.append_new_token(kv_new)
        fetched = int(fetched)
        source = self.kv.reshape(-1, *self.kv.shape[3:])  # [B * Hkv * S_max, 2, D], a view
        landing = host_memory.gather_to_device(source, host_rows[:fetched], self.staging, len(host_rows),
                                               device=self.device)
        self.stats.steps += 1
        self.stats.rows_selected += int(count.sum())
        self.stats.rows_fetched += fetched
        self.stats.device_to_host_bytes += host_rows.nbytes + kv_new.nbytes
        self.stats.host_to_device_bytes += landing.nbytes
        self.stats.wait_seconds += waited - start
        self.stats.gather_seconds += time.perf_counter() - waited
        return landing

    def fold_blocks(self, end: int, step, carry, block_tokens: int = STREAM_TOKENS):
        """Stream the token blocks starting at 0, block_tokens, ... below `end` to the device and fold
        them: `carry = step(carry, first, block)` with block [B, Hkv, block_tokens, 2, D] (rows past
        the capacity read as zeros); returns the last carry.

        Two staging buffers alternate: block i + 1 is copied into host staging while block i
        crosses (a buffer is refilled once its previous copy is complete:
        :meth:`hata_jax.host_memory.PinnedStaging.buffer`). Counted in `stats.host_to_device_bytes`.
        """
        if isinstance(block_tokens, bool) or not isinstance(block_tokens, int) or block_tokens < 1:
            raise ValueError(f"block_tokens must be a positive int, got {block_tokens!r}")
        source = self.kv.reshape(self.batch * self.kv_heads, *self.kv.shape[2:])  # a view
        for i, first in enumerate(range(0, end, block_tokens)):
            block = host_memory.copy_block_to_device(source, first, block_tokens, self.staging, i % 2,
                                                     device=self.device)
            self.stats.host_to_device_bytes += block.nbytes
            carry = step(carry, first, block.reshape(self.batch, self.kv_heads, *block.shape[1:]))
        return carry


def _check_rows(rows, capacity: int) -> None:
    if isinstance(rows, bool) or not isinstance(rows, (int, np.integer)) or not 0 <= rows <= capacity:
        raise ValueError(f"rows (row-cache slots per sequence and KV head) must be an int in [0, {capacity}] (the "
                         f"capacity), got {rows!r}")


def check_step(q, k_new, v_new, cache: OffloadedCache, w) -> None:
    """Raise a ValueError naming the first argument of an offloaded step that does not fit `cache`."""
    checks.check_query(q)
    checks.check_floating(q, "q")
    checks.check_dim(q, 0, cache.batch, "q", "batch size")
    checks.check_dim(q, 2, cache.head_dim, "q", "head_dim")
    checks.group_size(q.shape[1], cache.kv_heads, "q heads vs cache KV heads")
    cache.check_projection(w)
    for name, x in (("k_new", k_new), ("v_new", v_new)):
        checks.check_floating(x, name)
        if tuple(jnp.shape(x)) != (cache.batch, cache.kv_heads, cache.head_dim):
            raise ValueError(f"{name} must have shape [batch, kv_heads, head_dim] = "
                             f"{[cache.batch, cache.kv_heads, cache.head_dim]}, got {tuple(jnp.shape(x))}")


def select_rows(q, k_new, v_new, codes: DeviceCodes, rows: RowCache, w, config: HataConfig, *, dtype,
                impl: str = "auto"):
    """The device part of a step before the copies (jittable): hash, append the code, select, plan.

    Args:
      q: float[B, Hq, D]; k_new, v_new: float[B, Hkv, D] the step's post-RoPE queries, key and value.
      codes, rows: the cache's :class:`DeviceCodes` and :class:`RowCache` (R >= config.budget).
      w: float[Hkv, D, rbit] the layer's projection.
      dtype: the cache's K/V dtype (the new token is cast to it here, as HataCache does).

    Returns:
      (the :class:`Fetch`, kv_new [B, Hkv, 2, D] in `dtype`, the updated codes, the updated rows).
    """
    config.require_one_stage("the offloaded HATA step")  # the candidates' keys are on the host
    q_codes, q_scales, k_codes, k_norms = encode_step_for(config, q, k_new, w, impl=impl)
    codes = codes.append(k_codes, k_norms)
    idx, count = hamming_topk(q_codes, codes.codes, codes.norms, codes.lengths, budget=config.budget,
                              score=config.score, q_scales=q_scales, sink=config.sink, recent=config.recent,
                              impl=impl)
    fetch, rows = plan_fetch(jnp.maximum(idx, 0), count, rows, codes.lengths, codes.capacity)
    return fetch, jnp.stack([k_new, v_new], axis=2).astype(dtype), codes, rows


def fill_and_attend(q, rows: RowCache, fetch: Fetch, landing, *, scale: float | None = None, impl: str = "auto"):
    """Write the landed rows into the row cache, then sparse attention over it in selection order
    (jittable): q float[B, Hq, D] -> (out [B, Hq, D] in q's dtype, the filled rows)."""
    rows = fill_rows(rows, landing, fetch.fill_slots)
    return sparse_decode_attention(q, rows.k, rows.v, fetch.slots, fetch.count, scale=scale, impl=impl), rows


_select_rows = jax.jit(select_rows, static_argnames=("config", "dtype", "impl"), donate_argnames=("codes", "rows"))
_fill_and_attend = jax.jit(fill_and_attend, static_argnames=("scale", "impl"), donate_argnames=("rows",))


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
    check_step(q, k_new, v_new, cache, w)
    if cache.rbit != config.rbit:
        raise ValueError(f"the cache holds {cache.rbit}-bit codes but config.rbit is {config.rbit}")
    check_selection_args(config.budget, cache.capacity, config.sink, config.recent)
    if cache.rows.rows < config.budget:
        raise ValueError(f"the cache's row cache has {cache.rows.rows} slots per sequence and KV head, fewer than the "
                         f"budget {config.budget}: OffloadedCache.init(rows=...) or resize_rows")
    cache.check_room()
    fetch, kv_new, cache.codes, cache.rows = _select_rows(q, k_new, v_new, cache.codes, cache.rows, w, config,
                                                          dtype=cache.dtype, impl=impl)
    out, cache.rows = _fill_and_attend(q, cache.rows, fetch, cache.append_and_gather(fetch, kv_new), scale=scale,
                                       impl=impl)
    return out


@functools.partial(jax.jit, static_argnames=("scale", "impl"))
def _attend_block(q, block, lengths, out, lse, *, scale, impl):
    """Merge the attention over one streamed block [B, Hkv, T, 2, D] (rows [0, lengths[b])) into
    the running (out float32[B, Hq, D], lse float32[B, Hq])."""
    part, part_lse = dense_decode_attention(q, block[..., 0, :], block[..., 1, :], lengths, scale=scale,
                                            return_lse=True, impl=impl)
    return combine(jnp.stack([out, part.astype(jnp.float32)]), jnp.stack([lse, part_lse]))


@functools.partial(jax.jit, static_argnames=("dtype", "impl"))
def _append_code(q, k_new, v_new, codes: DeviceCodes, w, *, dtype, impl):
    _, k_codes, k_norms = encode_step(q, k_new, w, impl=impl)
    return codes.append(k_codes, k_norms), jnp.stack([k_new, v_new], axis=2).astype(dtype)


def offload_dense_attention(q, k_new, v_new, cache: OffloadedCache, w, *, scale: float | None = None,
                            block_tokens: int = STREAM_TOKENS, impl: str = "auto") -> jax.Array:
    """Dense attention over an :class:`OffloadedCache` (updated in place): the new token is appended
    (its code too, so HATA steps may follow), then every sequence's rows `[0, lengths[b])` stream to
    the device (:meth:`OffloadedCache.fold_blocks`) and the blocks' attention merges by log-sum-exp.

    Shapes as :func:`offload_decode_attention`; returns out [B, Hq, D] in q's dtype.
    """
    check_step(q, k_new, v_new, cache, w)
    cache.check_room()
    start = time.perf_counter()
    cache.codes, kv_new = _append_code(q, k_new, v_new, cache.codes, w, dtype=cache.dtype, impl=impl)
    kv_new = np.asarray(kv_new)
    waited = time.perf_counter()
    cache.append_new_token(kv_new)
    lengths = jnp.asarray(cache.lengths)
    b, hq, d = q.shape
    out, lse = jnp.zeros((b, hq, d), jnp.float32), jnp.full((b, hq), -jnp.inf, jnp.float32)
    def step(carry, first, block):
        return _attend_block(q, block, jnp.clip(lengths - first, 0, block.shape[2]), *carry, scale=scale, impl=impl)

    out, lse = cache.fold_blocks(int(cache.lengths.max()), step, (out, lse), block_tokens)
    cache.stats.steps += 1
    cache.stats.device_to_host_bytes += kv_new.nbytes
    cache.stats.wait_seconds += waited - start
    cache.stats.gather_seconds += time.perf_counter() - waited
    return out.astype(q.dtype)
