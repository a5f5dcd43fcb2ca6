"""Which implementation of an op runs: the Pallas kernels or the pure-JAX references.

`impl="auto"` picks the Pallas kernels when the default backend is a GPU and the references
elsewhere; `impl="pallas"` forces the kernels (interpreted on a CPU); `impl="reference"` forces
the references. Nothing falls back silently: a kernel that cannot take a shape raises.

What ran is visible: every resolution is counted in :data:`TRACE_LOG` (at trace time, so once
per compilation) and logged on the `hata_jax` logger at INFO level.
"""
from __future__ import annotations

import collections
import dataclasses
import logging

from pallas_kernels.backend import on_gpu

IMPLS = ("auto", "pallas", "reference")
logger = logging.getLogger("hata_jax")

# (op name, path name) -> number of times it was traced.
TRACE_LOG: collections.Counter = collections.Counter()


@dataclasses.dataclass(frozen=True)
class Path:
    """A resolved implementation: `kind` is "pallas" or "reference"."""

    kind: str
    interpret: bool

    @property
    def name(self) -> str:
        return f"{self.kind}-interpret" if self.interpret else self.kind

    @property
    def pallas(self) -> bool:
        return self.kind == "pallas"


def check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def default_impl() -> str:
    """What `impl="auto"` resolves to on this machine: "pallas" or "reference"."""
    return "pallas" if on_gpu() else "reference"


def resolve(op: str, impl: str) -> Path:
    """Resolve `impl` for `op`, record it in TRACE_LOG and log it."""
    check_impl(impl)
    kind = default_impl() if impl == "auto" else impl
    path = Path(kind=kind, interpret=kind == "pallas" and not on_gpu())
    TRACE_LOG[(op, path.name)] += 1
    logger.info("hata_jax.%s -> %s", op, path.name)
    return path
