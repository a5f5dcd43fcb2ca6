"""Loki (Singhania et al., NeurIPS 2024): approximate scores in the keys' top principal directions."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from hata_jax import checks
from hata_jax.selectors.base import Selector, token_rows, write_token


def loki_basis(keys: jax.Array) -> jax.Array:
    """Per-KV-head PCA basis of calibration keys.

    Args:
      keys: float[N, Hkv, D] post-RoPE keys (N >= 2 samples, e.g. every token of some prompts).

    Returns:
      float32[Hkv, D, D]: orthonormal columns, the eigenvectors of each head's key covariance
      by decreasing variance (sign fixed: each column's largest-magnitude entry is positive).

    Centered PCA: the mean key adds the same `q . mean` to every token's score for a query, so it
    never changes a ranking; centering spends the kept channels on the directions along which
    keys differ, instead of on the (often large) mean direction that an uncentered basis would
    put first. The scores themselves stay uncentered (`q P . k P`), so only the ranking uses it.
    """
    checks.check_rank(keys, 3, "keys", "[samples, kv_heads, head_dim]")
    checks.check_floating(keys, "keys")
    if keys.shape[0] < 2:
        raise ValueError(f"keys must hold at least 2 samples along axis 0, got shape {tuple(keys.shape)}")
    x = keys.astype(jnp.float32)
    x = x - jnp.mean(x, axis=0)
    cov = jnp.einsum("nhd,nhe->hde", x, x, precision=lax.Precision.HIGHEST) / x.shape[0]
    _, vectors = jnp.linalg.eigh(cov)  # ascending eigenvalues
    vectors = vectors[:, :, ::-1]
    peak = jnp.take_along_axis(vectors, jnp.argmax(jnp.abs(vectors), axis=1)[:, None, :], axis=1)
    return vectors * jnp.where(peak < 0, -1.0, 1.0)


@dataclasses.dataclass(frozen=True)
class LokiSelector(Selector):
    """Loki: `score(t) = sum_{i in group} (q_i P_c) . (k_t P_c)`, P_c the first `channels` columns
    of the KV head's PCA basis.

    Options: channels (default 32, at most head_dim). Params: the basis float32[Hkv, D, D] of
    :func:`loki_basis`. State: {"rotated": [B, Hkv, S, channels]} the rotated keys' first
    channels in the keys' dtype (zero past lengths). Extra memory: `kv_heads * channels * 2`
    bytes per token for a 16-bit key cache. (Loki itself stores the keys rotated in place of the
    keys, which costs nothing extra; this keeps the cache as it is and the channels beside it.)
    """

    channels: int = 32

    name = "loki"

    def __post_init__(self):
        if isinstance(self.channels, bool) or not isinstance(self.channels, int) or self.channels <= 0:
            raise ValueError(f"LokiSelector.channels must be a positive int, got {self.channels!r}")

    def extra_bytes_per_token(self, kv_heads: int, head_dim: int) -> int:
        return kv_heads * self.channels * 2

    def check_params(self, params, kv_heads, head_dim, q_heads=None):
        if self.channels > head_dim:
            raise ValueError(f"LokiSelector.channels ({self.channels}) must not exceed head_dim ({head_dim})")
        expected = (kv_heads, head_dim, head_dim)
        if params is None or jnp.ndim(params) != 3 or tuple(params.shape) != expected:
            raise ValueError(f"params (the Loki PCA basis) must have shape [kv_heads, head_dim, head_dim] = "
                             f"{expected}, got {getattr(params, 'shape', type(params).__name__)}")
        checks.check_floating(params, "params")

    def _rotate(self, params, x, spec: str):
        basis = params[:, :, : self.channels].astype(jnp.float32)
        return jnp.einsum(spec, x.astype(jnp.float32), basis, precision=lax.Precision.HIGHEST)

    def _init_state(self, params, k, lengths):
        rotated = self._rotate(params, k, "bhsd,hdc->bhsc")
        return {"rotated": jnp.where(token_rows(lengths, k.shape[2])[..., None], rotated, 0.0).astype(k.dtype)}

    def _append_state(self, params, state, k_new, positions):
        return {"rotated": write_token(state["rotated"], self._rotate(params, k_new, "bhd,hdc->bhc"), positions)}

    def _token_scores(self, params, state, q, k, q_positions):
        b, t, hq, d = q.shape
        hkv = k.shape[1]
        q_rot = self._rotate(params, q.reshape(b, t, hkv, hq // hkv, d), "bthgd,hdc->bthc")  # summed over the group
        return jnp.einsum("bthc,bhsc->bhts", q_rot, state["rotated"].astype(jnp.float32),
                          precision=lax.Precision.HIGHEST)
