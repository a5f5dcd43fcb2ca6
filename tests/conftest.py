"""Shared test setup: jax config and seeded random data.

Every test gets its own numpy Generator, seeded from the session seed and the test's id, so
data differs between tests and between runs. Set `HATA_TEST_SEED` to replay a run (the seed is
printed in the pytest header).
"""
from __future__ import annotations

import collections
import os
import secrets
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hata_jax.models import generation, llama

jax.config.update("jax_enable_x64", False)

SESSION_SEED = int(os.environ.get("HATA_TEST_SEED", secrets.randbits(32)))


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
    rest of the suite, on the core the pytest process leaves idle."""
    module = _sharding_module(session)
    if module is not None:
        module.start_children()


def pytest_sessionfinish(session):
    module = _sharding_module(session)
    if module is not None:
        module.stop_children()
