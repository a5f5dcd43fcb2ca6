"""Shared test setup: jax config and seeded random data.

Every test gets its own numpy Generator, seeded from the session seed and the test's id, so
data differs between tests and between runs. Set `HATA_TEST_SEED` to replay a run (the seed is
printed in the pytest header).

The tests' programs are small, so XLA's CPU compile time dominates the suite: `TEST_XLA_FLAGS`
compiles them with LLVM's cheaper optimization (about 40% less CPU time per compiled test, the
same results); the child processes of the multi-device tests get the same flags.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import os
import secrets
import zlib

TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()  # before jax starts

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from hata_jax.models import generation, llama, smollm2  # noqa: E402

try:
    import fcntl
except ImportError:  # not on Windows: no lock there
    fcntl = None

jax.config.update("jax_enable_x64", False)

SESSION_SEED = int(os.environ.get("HATA_TEST_SEED", secrets.randbits(32)))


def _one_download_at_a_time(download):
    """`smollm2.download_gguf` behind a lock file in the cache folder, looking in the cache again once
    it holds the lock. Under pytest-xdist two workers may both find no GGUF; without the lock both
    would download it and write the same partial file; with it the second waits for the first and
    then finds the GGUF in the cache."""

    @functools.wraps(download)
    def locked(log=print):
        folder = smollm2.cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / (smollm2.GGUF_NAME + ".lock"), "w") as lock, contextlib.ExitStack() as stack:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)
                stack.callback(fcntl.flock, lock, fcntl.LOCK_UN)
            cached = folder / smollm2.GGUF_NAME
            return cached if cached.is_file() else download(log)

    return locked


smollm2.download_gguf = _one_download_at_a_time(smollm2.download_gguf)


def pytest_report_header(config):
    return f"hata-jax test seed: HATA_TEST_SEED={SESSION_SEED}"


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A Generator unique to this test (and parametrization) and to this run's seed."""
    return np.random.default_rng([SESSION_SEED, zlib.crc32(request.node.nodeid.encode())])


@pytest.fixture
def randn(rng):
    """randn(*shape, dtype=jnp.float32): standard normal data as a jax array of `dtype`."""

    def make(*shape, dtype=jnp.float32, scale: float = 1.0):
        return jnp.asarray(scale * rng.standard_normal(shape, dtype=np.float32), dtype=dtype)

    return make


@pytest.fixture
def ragged_lengths(rng):
    """ragged_lengths(batch, low, high): int32[batch] in [low, high], distinct when the range allows."""

    def make(batch: int, low: int, high: int):
        span = np.arange(low, high + 1)
        values = rng.choice(span, size=batch, replace=batch > span.size)
        return jnp.asarray(values, jnp.int32)

    return make


@pytest.fixture
def fresh_traces(monkeypatch) -> collections.Counter:
    """generation.TRACES counting from zero, with the caches of the generation steps emptied first
    (the jitted prefill/decode/start steps and the per-layer decode attention, whose traces resolve
    the selection kernels): the traces a test counts are its own, whichever tests ran before it.
    Only these caches: `jax.clear_caches()` would make every later test recompile what it shares."""
    generation._step_functions.cache_clear()
    generation._start.clear_cache()
    llama.decode_attention.clear_cache()
    monkeypatch.setattr(generation, "TRACES", collections.Counter())
    return generation.TRACES


def _sharding_module(session):
    for item in session.items:
        module = getattr(item, "module", None)
        if module is not None and module.__name__ == "test_sharding":
            return module
    return None


def pytest_collection_finish(session):
    """Start test_sharding's child processes now, if its tests are selected: they run beside the
    rest of the suite, on the core the pytest process leaves idle.

    Not in a pytest-xdist worker: every worker collects every test, but only the one that is sent
    test_sharding.py (`--dist loadfile`) runs its tests, and its fixtures start the children then
    (`start_children` starts them once per process)."""
    if hasattr(session.config, "workerinput"):
        return
    module = _sharding_module(session)
    if module is not None:
        module.start_children()


def pytest_sessionfinish(session):
    module = _sharding_module(session)
    if module is not None:
        module.stop_children()
