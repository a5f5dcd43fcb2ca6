"""HashAttention's learned codes at inference: sign codes of per-head MLPs (trained by
:mod:`hata_jax.train.hashattention_objective`)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from hata_jax.hashing import pack_bits
from hata_jax.selectors.base import Selector, token_rows, write_token
from hata_jax.selectors.hashing import group_sum, sign_code_dot, signs
from hata_jax.selectors.mlp import mlp_apply


def _check_mlp(mlp, heads: int, head_dim: int, bits: int, name: str) -> None:
    """mlp: {"w<i>": [heads, in, out], "b<i>": [heads, out]}, head_dim in, `bits` out."""
    depth = len(mlp) // 2 if isinstance(mlp, dict) else 0
    expected = f"{{'w<i>': [{heads}, in, out], 'b<i>': [{heads}, out]}} from head_dim {head_dim} to {bits} outputs"
    if depth == 0 or set(mlp) != {f"{p}{i}" for i in range(depth) for p in "wb"}:
        raise ValueError(f"{name} must be an MLP dict {expected}, got {type(mlp).__name__} "
                         f"{sorted(mlp) if isinstance(mlp, dict) else ''}")
    width = head_dim
    for i in range(depth):
        w, bias = mlp[f"w{i}"], mlp[f"b{i}"]
        if jnp.ndim(w) != 3 or tuple(w.shape[:2]) != (heads, width) or tuple(jnp.shape(bias)) != (heads, w.shape[2]):
            raise ValueError(f"{name}['w{i}'] must have shape [{heads}, {width}, out] and {name}['b{i}'] "
                             f"[{heads}, out] ({expected}), got {tuple(jnp.shape(w))} and {tuple(jnp.shape(bias))}")
        width = w.shape[2]
    if width != bits:
        raise ValueError(f"{name} must output {bits} bits per head (the selector's `bits`), got {width}")


def mlp_signs(mlp: dict, x: jax.Array) -> jax.Array:
    """The +-1 code of per-head MLP outputs: x [..., heads, D] -> float32[..., heads, bits], +1
    where the output is > 0 (the bit HashAttention's codes store)."""
    return jnp.where(mlp_apply(mlp, x.astype(jnp.float32)) > 0, 1.0, -1.0)


@dataclasses.dataclass(frozen=True)
class HashAttentionSelector(Selector):
    """HashAttention: `score(t) = sum_{i in group} <sign f_i(q), sign g(k_t)>` (+-1 codes, bit = x > 0),
    f_i the query MLP of query head i, g the key MLP of the KV head.

    Options: bits (default 32), the code width (a multiple of 32). Params: the layer's dict of
    :class:`hata_jax.train.hashattention_objective.HashAttentionSelector` (`{"query": mlp over Hq heads, "key": mlp
    over Hkv heads, "threshold": [Hq]}`; the threshold is a training-only offset and is not used).
    State: {"codes": uint32[B, Hkv, S, bits/32]} key codes (zero past lengths). Extra memory:
    `kv_heads * bits / 8` bytes per token (one code per KV head, not per query head).
    """

    bits: int = 32

    name = "hashattention"

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits <= 0 or self.bits % 32:
            raise ValueError(f"HashAttentionSelector.bits must be a positive multiple of 32, got {self.bits!r}")

    def extra_bytes_per_token(self, kv_heads: int, head_dim: int) -> int:
        return kv_heads * self.bits // 8

    def check_params(self, params, kv_heads, head_dim, q_heads=None):
        if not isinstance(params, dict) or not {"query", "key"} <= set(params):
            raise ValueError(f"params must be the HashAttention dict {{'query': mlp, 'key': mlp, 'threshold': [Hq]}}, "
                             f"got {type(params).__name__}")
        _check_mlp(params["key"], kv_heads, head_dim, self.bits, "params['key']")
        if q_heads is not None:
            _check_mlp(params["query"], q_heads, head_dim, self.bits, "params['query']")

    def _key_codes(self, params, k):
        """k: [B, Hkv, S, D] (or [B, Hkv, D]) -> packed codes of the key MLP, uint32[..., bits/32]."""
        x = jnp.moveaxis(k, 1, -2)  # heads next to the features
        return jnp.moveaxis(pack_bits(mlp_signs(params["key"], x) > 0), -2, 1)

    def _init_state(self, params, k, lengths):
        valid = token_rows(lengths, k.shape[2])
        return {"codes": jnp.where(valid[..., None], self._key_codes(params, k), jnp.uint32(0))}

    def _append_state(self, params, state, k_new, positions):
        return {"codes": write_token(state["codes"], self._key_codes(params, k_new), positions)}

    def _token_scores(self, params, state, q, k, q_positions):
        q_signs = mlp_signs(params["query"], q)  # [B, T, Hq, bits]
        return sign_code_dot(group_sum(q_signs, k.shape[1]), state["codes"])


# Above every code score (integers of magnitude <= G * bits): the rank of a forced token.
FORCED = 1e30


@dataclasses.dataclass(frozen=True)
class HashAttentionAuthorsSelector(HashAttentionSelector):
    """HashAttention as its authors run it (xAlg-ai/HashAttention-1.0,
    `LlamaAttention_heavy_hitter.compute_mask_multi`): per query head (keys repeated over the
    group, `repeat_kv`), the first `sink` and the last `recent` positions the query sees are kept,
    and the rest of the budget goes to the best `<sign f_i(q), sign g(k_t)>` of the other tokens.

    Budget: tokens per query head, forced ones included (the same statement as every method; the
    union read per KV head is up to G times that, see :mod:`hata_jax.selectors.base`). Ties between
    equal code scores (at most `bits + 1` distinct values): the earlier position.

    Options: bits as :class:`HashAttentionSelector`; sink, recent (default 128 each, the authors'
    `init_budget` and `recent_budget`). Params, state and extra memory as
    :class:`HashAttentionSelector`.

    Deviations from the original:
    - the authors' top-k (`heavy_budget`, 0.25 of the context in their README) comes *beside* the
      256 forced tokens, at 32K-token contexts; here the budget includes them, and each of sink and
      recent is cut to `budget // 4` so that at least half the budget is chosen by the codes (at
      budget 512 this is exactly 128 + 128 + 256; at 256: 64 + 64 + 128);
    - one key MLP per KV head, shared by the group's query heads (the authors train one key MLP
      per query head on the repeated keys): the codes our trainer makes, 1/G of their code bytes;
    - ties: the authors sort with `torch.sort(descending=True)`, whose order among equal scores
      is unspecified;
    - layers: the plan's dense first layers stay dense (the authors select in every layer) and the
      prefill is dense (theirs: any step of more than 128 tokens).
    """

    sink: int = 128
    recent: int = 128

    name = "hashattention_authors"
    per_query_head = True
    params_of = "hashattention"

    def __post_init__(self):
        super().__post_init__()
        for field in ("sink", "recent"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"HashAttentionAuthorsSelector.{field} must be an int >= 0, got {value!r}")

    def forced(self, budget: int) -> tuple[int, int]:
        """(sink, recent) kept at `budget` tokens per query head: each at most `budget // 4`."""
        return min(self.sink, budget // 4), min(self.recent, budget // 4)

    def _token_scores(self, params, state, q, k, q_positions):
        b, t, hq, _ = q.shape
        hkv = k.shape[1]
        q_signs = mlp_signs(params["query"], q).reshape(b, t, hkv, hq // hkv, self.bits)
        dot = jnp.einsum("bthgr,bhsr->bhgts", q_signs, signs(state["codes"]))
        return dot.reshape(b, hq, t, k.shape[2])

    def selection_scores(self, params, state, q, k, q_positions, *, budget):
        scores = self.token_scores(params, state, q, k, q_positions)
        sink, recent = self.forced(int(budget))
        pos = jnp.arange(k.shape[2])
        at = q_positions.astype(jnp.int32)[:, None, :, None]
        forced = (pos < sink) | ((pos > at - recent) & (pos <= at))
        return jnp.where(forced, jnp.float32(FORCED), scores)
