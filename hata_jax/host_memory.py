"""Rows of a host numpy array to the device at the speed of the link: page-locked staging buffers.

`jax.device_put` of a pageable numpy array goes through a driver bounce buffer (8 GB/s on the H100
host of BENCHMARKS.md); a jax array in the `pinned_host` memory kind is copied by DMA (50 GB/s for
256 MB, 24 GB/s for 16 MB, same host). A :class:`PinnedStaging` keeps such arrays and writes them
through numpy views of their buffers, so the host gathers or copies rows straight into DMA-able
memory and the device copy starts at once: no second host copy, no Python loop per row.

The one rule of a staging buffer: it is rewritten only after the device copies made from it are
complete. The callers here ensure it by data dependence: a buffer is refilled for a step only after
the host has read back a result that needs the previous copy (the offloaded layer step reads the
next selection, which needs the previous layer's output, which needs its rows).

Where the backend has no `pinned_host` memory (or its buffers expose no pointer), the buffers are
plain numpy arrays and `jax.device_put` copies them as it copies any host array (`staging.pinned`
says which).

Tunables: :data:`GATHER_THREADS` workers (numpy's take and copies release the GIL); a gather task
moves at most :data:`TASK_ROWS` rows; a copy to the device moves at most :data:`CHUNK_ROWS` rows, so
the gather of chunk i + 1 overlaps the copy of chunk i; the last chunk of a transfer is rounded up
to a power of two of at least :data:`MIN_CHUNK_ROWS` rows (few shapes, little waste).
"""
from __future__ import annotations

import ctypes
import functools
import os
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np

GATHER_THREADS = min(8, os.cpu_count() or 1)
TASK_ROWS = 2048
CHUNK_ROWS = 8192
MIN_CHUNK_ROWS = 256


@functools.lru_cache(maxsize=1)
def pool() -> ThreadPoolExecutor:
    """The workers shared by every transfer (numpy's take and copies release the GIL)."""
    return ThreadPoolExecutor(max_workers=GATHER_THREADS, thread_name_prefix="hata-host")


def set_gather(threads: int | None = None, task_rows: int | None = None) -> None:
    """Set GATHER_THREADS (the pool is remade) and TASK_ROWS; None keeps a value."""
    global GATHER_THREADS, TASK_ROWS
    for name, value in (("threads", threads), ("task_rows", task_rows)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if threads is not None and threads != GATHER_THREADS:
        pool().shutdown()
        pool.cache_clear()
        GATHER_THREADS = threads
    if task_rows is not None:
        TASK_ROWS = task_rows


def _device(device) -> jax.Device:
    return jax.devices()[0] if device is None else device


@functools.lru_cache(maxsize=64)
def _zeros_on_host(shape: tuple, dtype: str, device: jax.Device):
    sharding = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


def _view(array: jax.Array) -> np.ndarray:
    """A writable numpy view of a host-resident jax array's buffer."""
    raw = (ctypes.c_uint8 * array.nbytes).from_address(array.unsafe_buffer_pointer())
    return np.ctypeslib.as_array(raw).view(array.dtype).reshape(array.shape)


@functools.lru_cache(maxsize=16)
def pinned_memory_works(device: jax.Device) -> bool:
    """Whether `device` has `pinned_host` memory whose buffers take writes through a view and copy
    them to the device (checked once per device with a small buffer)."""
    try:
        buffer = _zeros_on_host((4, 8), "float32", device)()
        view = _view(buffer)
        view[...] = np.arange(32, dtype=np.float32).reshape(4, 8)
        copied = np.asarray(jax.device_put(buffer, jax.sharding.SingleDeviceSharding(device, memory_kind="device")))
        return bool(np.array_equal(copied, view))
    except Exception:  # no such memory kind, or no buffer pointer on this backend
        return False


def chunk_sizes(rows: int, chunk_rows: int = CHUNK_ROWS) -> list[int]:
    """The row capacities of the copies that move `rows` rows: full chunks of `chunk_rows`, then the
    rest rounded up to a power of two (at least MIN_CHUNK_ROWS, at most `chunk_rows`)."""
    full, rest = divmod(rows, chunk_rows)
    sizes = [chunk_rows] * full
    if rest:
        sizes.append(min(chunk_rows, max(MIN_CHUNK_ROWS, 1 << (rest - 1).bit_length())))
    return sizes


class PinnedStaging:
    """Reusable host buffers of rows `row_shape` in `dtype`, page-locked where the backend allows.

    `buffer(rows, slot)` returns the slot-th buffer of `rows` rows as (jax array to copy from, numpy
    view to write into); buffers are made on first use and kept (slots let one transfer keep several
    copies of one size in flight).
    """

    def __init__(self, row_shape: tuple[int, ...], dtype, device=None):
        self.row_shape, self.dtype = tuple(row_shape), np.dtype(dtype)
        self.device = _device(device)
        self.pinned = pinned_memory_works(self.device)
        self._buffers: dict[tuple[int, int], tuple[jax.Array | None, np.ndarray]] = {}

    @property
    def nbytes(self) -> int:
        return sum(view.nbytes for _, view in self._buffers.values())

    def buffer(self, rows: int, slot: int = 0) -> tuple[jax.Array | None, np.ndarray]:
        key = (rows, slot)
        if key not in self._buffers:
            shape = (rows, *self.row_shape)
            if self.pinned:
                array = _zeros_on_host(shape, self.dtype.name, self.device)()
                self._buffers[key] = (array, _view(array))
            else:
                self._buffers[key] = (None, np.zeros(shape, self.dtype))
        return self._buffers[key]

    def reserve(self, rows: int, chunk_rows: int = CHUNK_ROWS) -> list[int]:
        """Make every buffer a :func:`gather_to_device` of up to `rows` rows may use, so no step
        allocates; returns the chunk sizes such transfers copy."""
        used = {(size, slot) for n in range(1, rows + 1) for slot, size in enumerate(chunk_sizes(n, chunk_rows))}
        for size, slot in sorted(used):
            self.buffer(size, slot)
        return sorted({size for size, _ in used})

    def to_device(self, rows: int, slot: int, device=None) -> jax.Array:
        """Start the copy of buffer (rows, slot) to `device` (None: the staging's device); returns
        the device array at once."""
        array, view = self._buffers[(rows, slot)]
        if array is None:
            return jax.device_put(view, device)
        target = jax.sharding.SingleDeviceSharding(self.device if device is None else device, memory_kind="device")
        return jax.device_put(array, target)


def _run(tasks) -> None:
    for future in [pool().submit(*task) for task in tasks]:
        future.result()


def _take(source, idx, out):
    np.take(source, idx, axis=0, out=out, mode="clip")  # "clip": no bounds pass, no temporary


def gather_to_device(source: np.ndarray, idx: np.ndarray, staging: PinnedStaging, *, device=None,
                     chunk_rows: int = CHUNK_ROWS) -> list[tuple[jax.Array, int]]:
    """Copy `source[idx]` to the device in chunks.

    Args:
      source: host array [N, *staging.row_shape].
      idx: int[M] row indices in [0, N) (checked by the caller; out-of-range rows are clipped).
      staging: where the rows are gathered before their copy.
      device: the target (None: the staging's device).

    Returns:
      [(chunk [capacity, *row_shape] on the device, rows filled)]: chunk i holds rows
      `idx[i * chunk_rows : ...]` first; its rows past `rows filled` are stale and must be ignored.
      Every copy has been started, none waited for.
    """
    out, start = [], 0
    for slot, size in enumerate(chunk_sizes(len(idx), chunk_rows)):
        filled = min(size, len(idx) - start)
        _, view = staging.buffer(size, slot)
        _run((_take, source, idx[start + a:start + min(a + TASK_ROWS, filled)], view[a:min(a + TASK_ROWS, filled)])
             for a in range(0, filled, TASK_ROWS))
        out.append((staging.to_device(size, slot, device), filled))
        start += filled
    return out


def _copy(dst, src):
    dst[...] = src


def copy_block_to_device(source: np.ndarray, start: int, tokens: int, staging: PinnedStaging, slot: int, *,
                         device=None) -> jax.Array:
    """Copy `source[:, start:start + tokens]` ([P, S, *row] on the host; rows past S read as zeros)
    to the device as [P, tokens, *row] through staging buffer `slot` of P * tokens rows."""
    pairs, capacity = source.shape[:2]
    _, view = staging.buffer(pairs * tokens, slot)
    view = view.reshape(pairs, tokens, *view.shape[1:])
    held = max(0, min(tokens, capacity - start))
    tasks = [(_copy, view[p, :held], source[p, start:start + held]) for p in range(pairs)]
    if held < tokens:
        view[:, held:] = 0
    _run(tasks)
    return staging.to_device(pairs * tokens, slot, device).reshape(pairs, tokens, *view.shape[2:])
