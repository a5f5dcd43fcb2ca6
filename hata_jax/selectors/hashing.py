"""HATA (learned projection) and SimHash (random Gaussian projection): one code, two params.

Both keep the HATA cache's metadata: packed sign codes of the keys and their norms, made by
:func:`hata_jax.encode` and :func:`hata_jax.key_norms`, and score with HATA's "key_norm" score or
the "asymmetric" one (:class:`hata_jax.HataConfig`), bit for bit the value
:func:`hata_jax.hamming_scores` gives, so the ranking equals :func:`hata_jax.hamming_topk`'s with
the same projection.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from hata_jax.config import QUERY_PLANES, HataConfig, check_rbit
from hata_jax.hashing import check_projection, encode, key_norms, summed_query_planes, unpack_bits
from hata_jax.selectors.base import Selector, token_rows, write_token
from hata_jax.selectors.exact import group_softmax


def signs(codes: jax.Array) -> jax.Array:
    """uint32[..., W] packed codes -> float32[..., 32 W] of +-1 (bit set -> +1)."""
    return jnp.where(unpack_bits(codes), 1.0, -1.0)


def group_sum(x: jax.Array, kv_heads: int) -> jax.Array:
    """x: [B, T, Hq, r] -> [B, T, Hkv, r], summed over each KV head's G = Hq / Hkv query heads."""
    b, t, hq, r = x.shape
    return x.reshape(b, t, kv_heads, hq // kv_heads, r).sum(axis=3)


def sign_code_dot(q_signs: jax.Array, k_codes: jax.Array) -> jax.Array:
    """`sum_{i in group} b(q_i) . b(k_t)` for +-1 codes b.

    Args:
      q_signs: float32[B, T, Hkv, r], the group's +-1 query codes summed (integers in [-G, G]).
      k_codes: uint32[B, Hkv, S, r / 32] packed key codes.

    Returns:
      float32[B, Hkv, T, S], integers (= G r - 2 * summed Hamming distance), exact at any matmul
      precision: the operands are small integers.
    """
    return jnp.einsum("bthr,bhsr->bhts", q_signs, signs(k_codes))


def plane_values(q, w, planes: int) -> tuple[jax.Array, jax.Array]:
    """The "asymmetric" score's query for many queries: q float[B, T, Hq, D] -> (the quantized
    summed projection float32[B, T, Hkv, r] of odd integers, its scale float32[B, T, Hkv])."""
    codes, scale = summed_query_planes(q, w, planes)  # [B, T, Hkv, P, W]
    weights = jnp.float32(2.0) ** jnp.arange(planes, dtype=jnp.float32)
    return jnp.einsum("bthpr,p->bthr", signs(codes), weights), scale


@dataclasses.dataclass(frozen=True)
class HataSelector(Selector):
    """HATA: keys as codes `sign(k @ W[h]) > 0` packed LSB-first (b(k): their +-1 form), scored
    against the query with `score`.

    Options: rbit (default 128), the code bits; score: "asymmetric" (the default, as
    :class:`hata_jax.HataConfig`'s: `||k_t|| * v . b(k_t) / rbit`, v the group's summed query
    projection quantized to :data:`hata_jax.config.QUERY_PLANES` sign planes) or "key_norm"
    (the paper's `||k_t|| * sum_{i in group} (1 - 2 hamming(code(q_i), code(k_t)) / rbit)`);
    params: W float32[Hkv, D, rbit], the layer's trained projection. State: {"codes":
    uint32[B, Hkv, S, rbit/32], "norms": float32[B, Hkv, S]} (zero past lengths). Extra memory:
    `kv_heads * (rbit / 8 + 4)` bytes per token (code + fp32 norm).
    """

    rbit: int = 128
    score: str = HataConfig.score

    name = "hata"

    def __post_init__(self):
        if isinstance(self.rbit, bool) or not isinstance(self.rbit, int):
            raise ValueError(f"{type(self).__name__}.rbit must be an int, got {self.rbit!r}")
        check_rbit(self.rbit, f"{type(self).__name__}.rbit")
        if self.score not in ("key_norm", "asymmetric"):
            raise ValueError(f"{type(self).__name__}.score must be 'key_norm' or 'asymmetric', got {self.score!r}")

    def extra_bytes_per_token(self, kv_heads: int, head_dim: int) -> int:
        return kv_heads * (self.rbit // 8 + 4)

    def check_params(self, params, kv_heads, head_dim, q_heads=None):
        layout = f"[kv_heads, head_dim, rbit] = {(kv_heads, head_dim, self.rbit)}"
        if params is None or jnp.ndim(params) != 3 or tuple(params.shape) != (kv_heads, head_dim, self.rbit):
            raise ValueError(f"params (the {self.name} projection W) must have shape {layout}, "
                             f"got {getattr(params, 'shape', type(params).__name__)}")
        check_projection(params, head_dim, "params")

    def _init_state(self, params, k, lengths):
        valid = token_rows(lengths, k.shape[2])
        codes = encode(k, params, head_axis=1, impl="reference")
        return {"codes": jnp.where(valid[..., None], codes, jnp.uint32(0)),
                "norms": jnp.where(valid, key_norms(k), 0.0)}

    def _append_state(self, params, state, k_new, positions):
        codes = encode(k_new, params, head_axis=1, impl="reference")
        return {"codes": write_token(state["codes"], codes, positions),
                "norms": write_token(state["norms"], key_norms(k_new), positions)}

    def _token_scores(self, params, state, q, k, q_positions):
        norms = state["norms"][:, :, None, :]
        if self.score == "asymmetric":
            values, scale = plane_values(q, params, QUERY_PLANES)
            dot = sign_code_dot(values, state["codes"])  # integers, exact
            # The same three products as hata_jax.hamming_scores: bit-identical scores.
            return norms * (dot * (jnp.swapaxes(scale, 1, 2)[..., None] * jnp.float32(1.0 / self.rbit)))
        q_codes = encode(q, params, impl="reference")  # [B, T, Hq, W]
        dot = sign_code_dot(group_sum(signs(q_codes), k.shape[1]), state["codes"])
        # The same two products as hata_jax.hamming_scores: bit-identical scores.
        return norms * (dot * jnp.float32(1.0 / self.rbit))


@dataclasses.dataclass(frozen=True)
class SimHashSelector(HataSelector):
    """SimHash / LSH: HATA's code and score with an untrained random Gaussian projection.

    Options, state and extra memory as :class:`HataSelector`; params: W float32[Hkv, D, rbit]
    from :meth:`init_params` (entries N(0, 1)).
    """

    name = "simhash"

    def init_params(self, key: jax.Array, kv_heads: int, head_dim: int) -> jax.Array:
        """A random projection float32[kv_heads, head_dim, rbit], entries N(0, 1)."""
        return jax.random.normal(key, (kv_heads, head_dim, self.rbit), jnp.float32)


@dataclasses.dataclass(frozen=True)
class HataRerankSelector(HataSelector):
    """Two-stage HATA: HATA's scores pick `candidates * budget` candidates per (query, KV head)
    among the visible tokens (ties: the earlier position), then the exact scores of the candidates
    pick the final `budget`: `sum_{i in group} softmax(q_i . k_t / sqrt(D))`, the softmax of each
    query head over the candidates only (what a kernel computes from the gathered candidate keys).

    Options: rbit as :class:`HataSelector`; candidates (default 4), the factor c >= 1 (c = 1
    selects what HATA selects). Params (HATA's projection W), state and extra memory as
    :class:`HataSelector`; each step also reads the keys of `c * budget` candidates per KV head.
    """

    candidates: int = 4

    name = "hata_rerank"
    params_of = "hata"

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.candidates, bool) or not isinstance(self.candidates, int) or self.candidates < 1:
            raise ValueError(f"HataRerankSelector.candidates must be an int >= 1, got {self.candidates!r}")

    def exact_keys(self, length: int, budget: int) -> int:
        return min(self.candidates * budget, length)  # the candidates'

    def selection_scores(self, params, state, q, k, q_positions, *, budget):
        """The exact group score of each candidate, -1 for every other token (float32[B, Hkv, T, S])."""
        hamming = self.token_scores(params, state, q, k, q_positions)
        s = k.shape[2]
        visible = jnp.arange(s) <= q_positions.astype(jnp.int32)[:, None, :, None]
        _, idx = lax.top_k(jnp.where(visible, hamming, -jnp.inf), min(self.candidates * int(budget), s))
        candidate = jnp.put_along_axis(jnp.zeros(hamming.shape, bool), idx, True, axis=-1, inplace=False) & visible
        return jnp.where(candidate, group_softmax(q, k, candidate), -1.0)
