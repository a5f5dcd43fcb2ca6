"""Rows of a host numpy array to the device at the speed of the link: page-locked staging buffers.

`jax.device_put` of a pageable numpy array goes through a bounce buffer (2.5-8 GB/s on the H100
host of BENCHMARKS.md); a jax array in the `pinned_host` memory kind is copied by DMA (47-50 GB/s
for 256 MB, 24 GB/s for 16 MB, same host). A :class:`PinnedStaging` keeps such arrays and writes them
through numpy views of their buffers, so the host gathers or copies rows straight into DMA-able
memory and the device copy starts at once: no second host copy, no Python loop per row.

The one rule of a staging buffer: it is rewritten only after the device copies made from it are
complete. :meth:`PinnedStaging.buffer` enforces it: it waits for the last copy made from a buffer
before handing it out. On the offloaded decode step the wait is free: the host refills the landing
buffer only after reading back the next selection, which needs the previous layer's output, which
needs its copied rows; a stream of blocks (:func:`copy_block_to_device`) alternates two slots, so a
copy has a block's time to finish.

Where the backend has no `pinned_host` memory (or its buffers expose no pointer), and on the CPU
backend, the buffers are plain numpy arrays and each transfer copies one (`staging.pinned` says
which).

Tunables: :data:`GATHER_THREADS` workers (numpy's take and copies release the GIL; a gather is
split into one task per worker); a gather of at most `capacity` rows lands in one buffer of
:func:`landing_rows` rows, the smallest of `capacity / 2**k` (k < :data:`LANDING_SIZES`) that holds
it: one copy per gather, few shapes (each a compiled variant of the step that reads it), at most
twice the bytes that must cross (or those of the smallest size).

:func:`host_zeros` allocates the large host arrays rows are gathered from on transparent huge pages
where the kernel allows (`madvise`): a gather of random rows from tens of GiB then walks far fewer
page tables, and touching the pages first costs less.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import mmap
import os
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np

GATHER_THREADS = min(4, os.cpu_count() or 1)
LANDING_SIZES = 4


@functools.lru_cache(maxsize=1)
def pool() -> ThreadPoolExecutor:
    """The workers shared by every transfer (numpy's take and copies release the GIL)."""
    return ThreadPoolExecutor(max_workers=GATHER_THREADS, thread_name_prefix="hata-host")


def set_gather_threads(threads: int) -> None:
    """Set GATHER_THREADS (the worker pool is remade)."""
    global GATHER_THREADS
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    if threads != GATHER_THREADS:
        pool().shutdown()
        pool.cache_clear()
        GATHER_THREADS = threads


def host_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A zero host array, its pages allocated on first touch, on transparent huge pages where the
    kernel allows them (anonymous memory advised `MADV_HUGEPAGE`; else ordinary pages)."""
    if any(isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0 for n in shape):
        raise ValueError(f"host_zeros: shape must be non-negative ints, got {shape!r}")
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if nbytes == 0:
        return np.zeros(shape, dtype)
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):  # a kernel without transparent huge pages: ordinary pages
            memory.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(memory, dtype).reshape(shape)  # the array keeps the mapping alive


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
    them to the device (checked once per device with a small buffer). False on a CPU device: its
    memory is host memory (nothing to pin), and there a "copy" may alias the source buffer."""
    if device.platform == "cpu":
        return False
    try:
        buffer = _zeros_on_host((4, 8), "float32", device)()
        view = _view(buffer)
        view[...] = np.arange(32, dtype=np.float32).reshape(4, 8)
        copied = np.asarray(jax.device_put(buffer, jax.sharding.SingleDeviceSharding(device, memory_kind="device")))
        return bool(np.array_equal(copied, view))
    except Exception:  # no such memory kind, or no buffer pointer on this backend
        return False


def landing_sizes(capacity: int) -> list[int]:
    """The landing-buffer rows of gathers of up to `capacity` rows: `ceil(capacity / 2**k)`, k < LANDING_SIZES."""
    return sorted({-(-capacity // 2**k) for k in range(LANDING_SIZES)})


def landing_rows(rows: int, capacity: int) -> int:
    """The rows of the buffer a gather of `rows` (<= capacity) rows lands in: the smallest landing
    size that holds them."""
    if not 0 <= rows <= capacity:
        raise ValueError(f"rows must lie in [0, {capacity}], got {rows}")
    return min(size for size in landing_sizes(capacity) if size >= rows)


class PinnedStaging:
    """Reusable host buffers of rows `row_shape` in `dtype`, page-locked where the backend allows.

    `buffer(rows, slot)` returns the slot-th buffer of `rows` rows as (jax array to copy from, numpy
    view to write into) once the last copy made from it is complete; buffers are made on first use
    and kept (slots let a stream keep several copies of one size in flight).
    """

    def __init__(self, row_shape: tuple[int, ...], dtype, device=None):
        self.row_shape, self.dtype = tuple(row_shape), np.dtype(dtype)
        self.device = _device(device)
        self.pinned = pinned_memory_works(self.device)
        self._buffers: dict[tuple[int, int], tuple[jax.Array | None, np.ndarray]] = {}
        self._copies: dict[tuple[int, int], jax.Array] = {}  # the last copy made from each buffer

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
        copy = self._copies.pop(key, None)
        if copy is not None:
            copy.block_until_ready()
        return self._buffers[key]

    def reserve(self, capacity: int) -> list[int]:
        """Make every landing buffer of gathers of up to `capacity` rows (so no step allocates);
        returns their row counts."""
        sizes = landing_sizes(capacity)
        for size in sizes:
            self.buffer(size)
        return sizes

    def to_device(self, rows: int, slot: int, device=None) -> jax.Array:
        """Start the copy of buffer (rows, slot) to `device` (None: the staging's device); returns
        the device array at once."""
        array, view = self._buffers[(rows, slot)]
        if array is None:  # a copy the buffer does not back (the buffer may be refilled at once)
            return jax.device_put(view.copy(), self.device if device is None else device)
        copy = jax.device_put(array, jax.sharding.SingleDeviceSharding(self.device if device is None else device))
        self._copies[(rows, slot)] = copy
        return copy


def _run(tasks) -> None:
    for future in [pool().submit(*task) for task in tasks]:
        future.result()


def _take(source, idx, out):
    np.take(source, idx, axis=0, out=out, mode="clip")  # "clip": no bounds pass, no temporary


def gather_to_device(source: np.ndarray, idx: np.ndarray, staging: PinnedStaging, capacity: int, *,
                     device=None) -> jax.Array:
    """Copy `source[idx]` to the device through one landing buffer.

    Args:
      source: host array [N, *staging.row_shape].
      idx: int[M] row indices in [0, N), M <= capacity (checked by the caller; out-of-range rows
        are clipped).
      staging: where the rows are gathered before their copy.
      capacity: the most rows a gather of this kind moves (sets the landing sizes).
      device: the target (None: the staging's device).

    Returns:
      [landing_rows(M, capacity), *row_shape] on the device, its first M rows `source[idx]` (the
      rest stale, to be ignored); the copy has been started, not waited for.
    """
    rows = landing_rows(len(idx), capacity)
    _, view = staging.buffer(rows)
    parts = np.array_split(np.arange(len(idx)), min(GATHER_THREADS, max(len(idx), 1)))
    _run((_take, source, idx[part[0]:part[-1] + 1], view[part[0]:part[-1] + 1]) for part in parts if len(part))
    return staging.to_device(rows, 0, device)


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
