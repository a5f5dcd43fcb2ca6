"""HATA's static settings."""
from __future__ import annotations

import dataclasses

import numpy as np

from pallas_kernels.backend import SCORES, check_sink_recent

# Sign planes of the "asymmetric" score's query: its projection is quantized to the 2**4 odd
# levels -15..15 times a scale. On SmolLM2's held-out text 4 planes keep 0.9102 of the attention
# mass at 1/16 against 0.9111 unquantized (3 planes: 0.9075; the "key_norm" score: 0.8908).
QUERY_PLANES = 4


@dataclasses.dataclass(frozen=True)
class HataConfig:
    """Static settings of HATA decode attention (hashable, so usable as a jit static arg).

    Which layers decode with HATA is the caller's choice, made where it calls
    :func:`hata_jax.hata_decode_attention` or a dense attention (in :mod:`hata_jax.models`, the
    :class:`~hata_jax.models.AttentionPlan`'s `layers`).

    Attributes:
      rbit: hash bits per code, a multiple of 32 (codes are `rbit // 32` uint32 words).
      budget: tokens selected per (sequence, KV head) at each decode step.
      sink: first positions always selected (count against `budget`).
      recent: last positions always selected (count against `budget`).
      score: `"asymmetric"` (the default): the keys keep their sign codes but the query is not
        hashed: the group's summed projection `sum_i q_i W`, quantized to :data:`QUERY_PLANES`
        sign planes, is dotted with each key's +-1 code, `||k|| * (sum_i q_i W) . b(k) / rbit`
        (:func:`hata_jax.query_planes`). Same cache, same bytes read; it keeps the magnitude of
        each query coordinate that the query's sign code drops (SmolLM2, 2K, 1/16: task average
        53.2 against 44.1, dense 55.4; BENCHMARKS.md, "Asymmetric score"). `"key_norm"`: the
        paper's `||k|| * sum_i (1 - 2 hamming_i / rbit)` over the query heads' sign codes;
        `"hamming"`: the summed Hamming distance (smaller is better).
      candidates: 1 for plain HATA; c > 1 for two-stage HATA: the codes pick `c * budget`
        tokens (at most the cache capacity), their exact scores the `budget`
        (:func:`hata_jax.rerank.rerank_candidates`; it reads the candidates' keys).
    """

    rbit: int = 128
    budget: int = 2048
    sink: int = 0
    recent: int = 0
    score: str = "asymmetric"
    candidates: int = 1

    def __post_init__(self):
        for name in ("rbit", "budget", "sink", "recent", "candidates"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise ValueError(f"HataConfig.{name} must be an int, got {value!r}")
            object.__setattr__(self, name, int(value))  # numpy integers as Python ints: one hash, one repr
        check_rbit(self.rbit, "HataConfig.rbit")
        if self.budget <= 0:
            raise ValueError(f"HataConfig.budget must be > 0, got {self.budget}")
        if self.candidates < 1:
            raise ValueError(f"HataConfig.candidates must be >= 1, got {self.candidates}")
        try:
            check_sink_recent(self.budget, self.sink, self.recent)
        except ValueError as err:
            raise ValueError(f"HataConfig.{err}") from None
        check_score(self.score, "HataConfig.score")

    @property
    def query_planes(self) -> int:
        """The query planes `encode_step` makes: :data:`QUERY_PLANES` for the "asymmetric" score, else 0
        (the query heads' sign codes)."""
        return QUERY_PLANES if self.score == "asymmetric" else 0

    def require_one_stage(self, op: str) -> None:
        """Raise for two-stage HATA (candidates > 1) in an op that runs plain HATA only."""
        if self.candidates != 1:
            raise ValueError(f"{op} runs one-stage HATA only: HataConfig.candidates must be 1, got "
                             f"{self.candidates} (two-stage HATA runs in hata_decode_attention)")

    def candidate_budget(self, capacity: int) -> int:
        """Tokens the codes pick per row in a cache of `capacity` positions: `candidates * budget`,
        at most `capacity`."""
        return min(self.candidates * self.budget, capacity)


def check_rbit(rbit: int, name: str = "rbit") -> None:
    if rbit <= 0 or rbit % 32:
        raise ValueError(f"{name} must be a positive multiple of 32, got {rbit}")


def check_score(score: str, name: str = "score") -> None:
    if score not in SCORES:
        raise ValueError(f"{name} must be one of {SCORES}, got {score!r}")
