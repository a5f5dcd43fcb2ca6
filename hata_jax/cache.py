"""The per-layer KV cache with hash codes and key norms, as a pytree."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from hata_jax import checks
from hata_jax.config import check_rbit
from hata_jax.hashing import check_projection, encode, key_norms


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["k", "v", "codes", "norms", "lengths", "overflow"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class HataCache:
    """One attention layer's decode cache (head-major), updated functionally.

    Attributes:
      k, v: [B, Hkv, S_max, D] post-RoPE keys and values.
      codes: uint32[B, Hkv, S_max, rbit // 32] key hash codes.
      norms: float32[B, Hkv, S_max] key norms.
      lengths: int32[B] valid tokens per sequence.
      overflow: bool[B], sticky: set when a write would have gone outside `[0, S_max)` or a
        written key is not finite (NaN or inf: the sequence's attention is NaN, as dense
        attention over that key would be, instead of the key silently never selected).

    Capacity overflow: a write never wraps around or overwrites a token. With concrete lengths
    (outside `jit`) a write past `S_max` or at a negative length raises a ValueError at once.
    Inside `jit` the write is dropped, `lengths` stays in `[0, S_max]` and `overflow[b]` is set;
    :func:`hata_decode_attention` then returns NaN for that sequence, and
    :meth:`raise_if_overflowed` (call it on the host, e.g. once per generation step or at the
    end) raises naming the sequences.
    """

    k: jax.Array
    v: jax.Array
    codes: jax.Array
    norms: jax.Array
    lengths: jax.Array
    overflow: jax.Array

    @classmethod
    def init(
        cls, batch: int, kv_heads: int, capacity: int, head_dim: int, *, rbit: int = 128, dtype=jnp.bfloat16
    ) -> HataCache:
        """An empty cache of `capacity` tokens per sequence."""
        for name, value in (("batch", batch), ("kv_heads", kv_heads), ("capacity", capacity), ("head_dim", head_dim)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"HataCache.init: {name} must be a positive int, got {value!r}")
        check_rbit(rbit)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"HataCache.init: dtype must be a floating-point dtype, got {jnp.dtype(dtype)}")
        shape = (batch, kv_heads, capacity, head_dim)
        return cls(  # separate buffers for k and v, so that the cache can be donated
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            codes=jnp.zeros((batch, kv_heads, capacity, rbit // 32), jnp.uint32),
            norms=jnp.zeros((batch, kv_heads, capacity), jnp.float32),
            lengths=jnp.zeros((batch,), jnp.int32),
            overflow=jnp.zeros((batch,), bool),
        )

    @property
    def batch(self) -> int:
        return self.k.shape[0]

    @property
    def kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.k.shape[3]

    @property
    def rbit(self) -> int:
        return 32 * self.codes.shape[3]

    def check_tokens(self, k, v, w, layout: str, token_axes: int) -> None:
        """k, v: `layout` matching the cache (any token count, the same for both); w: the
        cache's projection, unless None."""
        shape = (self.batch, self.kv_heads) + (None,) * token_axes + (self.head_dim,)
        for name, x in (("k", k), ("v", v)):
            checks.check_rank(x, len(shape), name, layout)
            checks.check_floating(x, name)
            if any(e is not None and e != g for e, g in zip(shape, x.shape)):
                raise ValueError(
                    f"{name} must have shape {layout} with B={self.batch}, Hkv={self.kv_heads}, "
                    f"D={self.head_dim}, got {tuple(x.shape)}"
                )
        if tuple(v.shape) != tuple(k.shape):
            raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
        if w is None:
            return
        kv_heads, _, rbit = check_projection(w, self.head_dim)
        if kv_heads != self.kv_heads or rbit != self.rbit:
            raise ValueError(
                f"w must have shape [{self.kv_heads}, {self.head_dim}, {self.rbit}] to match the cache, "
                f"got {tuple(w.shape)}"
            )

    def prefill(self, k: jax.Array, v: jax.Array, w: jax.Array, lengths: jax.Array, *, impl: str = "auto") -> HataCache:
        """Write a prompt's keys and values at positions [0, T) and set `lengths`.

        Args:
          k, v: [B, Hkv, T, D] post-RoPE keys and values, T <= capacity (padded rows past a
            sequence's length are stored but never attended).
          w: float[Hkv, D, rbit] the layer's projection.
          lengths: int[B] prompt lengths, each <= T.
        """
        k, v, w, lengths = self.check_prompt(k, v, w, lengths)
        t = k.shape[2]
        codes = encode(k, w, head_axis=1, impl=impl)
        put = functools.partial(jax.lax.dynamic_update_slice_in_dim, start_index=0, axis=2)
        norms = key_norms(k)
        return HataCache(
            k=put(self.k, k.astype(self.k.dtype)),
            v=put(self.v, v.astype(self.v.dtype)),
            codes=put(self.codes, codes),
            norms=put(self.norms, norms),
            lengths=jnp.clip(lengths, 0, t),
            overflow=(lengths > t) | (lengths < 0) | _nonfinite(norms, lengths),
        )

    def check_prompt(self, k, v, w, lengths):
        """:meth:`prefill`'s arguments as arrays (lengths int32), or a ValueError naming the bad one."""
        k, v, w = checks.as_array(k, "k"), checks.as_array(v, "v"), checks.as_array(w, "w")
        lengths = checks.as_array(lengths, "lengths (prefill)", "int")
        checks.check_finite(w, "w")
        self.check_tokens(k, v, w, "[batch, kv_heads, tokens, head_dim]", 1)
        t = k.shape[2]
        if t > self.capacity:
            raise ValueError(f"prefill: the prompt has {t} tokens but the cache capacity is {self.capacity}")
        checks.check_lengths(lengths, self.batch, t, "lengths (prefill)")
        return k, v, w, lengths.astype(jnp.int32)

    def append(self, k_new: jax.Array, v_new: jax.Array, w: jax.Array, *, impl: str = "auto") -> HataCache:
        """Write one new token per sequence at position `lengths[b]` and advance `lengths`.

        Args:
          k_new, v_new: [B, Hkv, D] post-RoPE key and value of the new token.
          w: float[Hkv, D, rbit] the layer's projection.
        """
        k_new, v_new, w = checks.as_array(k_new, "k"), checks.as_array(v_new, "v"), checks.as_array(w, "w")
        checks.check_finite(w, "w")
        self.check_tokens(k_new, v_new, w, "[batch, kv_heads, head_dim]", 0)
        return self.append_encoded(k_new, v_new, encode(k_new, w, head_axis=1, impl=impl), key_norms(k_new))

    def append_encoded(self, k_new, v_new, k_codes, k_norms) -> HataCache:
        """:meth:`append` with the new key's codes `uint32[B, Hkv, W]` and norms `float32[B, Hkv]` given."""
        self.check_tokens(k_new, v_new, None, "[batch, kv_heads, head_dim]", 0)
        for name, x, dtype, shape in (
            ("k_codes", k_codes, jnp.uint32, (self.batch, self.kv_heads, self.rbit // 32)),
            ("k_norms", k_norms, jnp.float32, (self.batch, self.kv_heads)),
        ):
            checks.check_dtype(x, [dtype], name)
            if tuple(jnp.shape(x)) != shape:
                raise ValueError(f"{name} must have shape {shape} to match the cache, got {tuple(jnp.shape(x))}")
        if checks.is_concrete(self.lengths):
            lengths = np.asarray(self.lengths)
            bad = (lengths >= self.capacity) | (lengths < 0)
            if bad.any():
                raise ValueError(
                    f"cache overflow: sequences {np.flatnonzero(bad).tolist()} hold lengths "
                    f"{lengths[bad].tolist()}, outside [0, capacity={self.capacity})"
                )
        rows = jnp.arange(self.batch)
        ok = (self.lengths >= 0) & (self.lengths < self.capacity)
        pos = jnp.where(ok, self.lengths, self.capacity)  # capacity: an out-of-bounds write, dropped

        def put(buf, val):
            return buf.at[rows, :, pos].set(val.astype(buf.dtype), mode="drop")

        return HataCache(
            k=put(self.k, k_new),
            v=put(self.v, v_new),
            codes=put(self.codes, k_codes),
            norms=put(self.norms, k_norms),
            lengths=jnp.where(ok, self.lengths + 1, jnp.clip(self.lengths, 0, self.capacity)),
            overflow=self.overflow | ~ok | jnp.any(~jnp.isfinite(k_norms), axis=1),
        )

    def raise_if_overflowed(self) -> None:
        """Host-side check: raise if any sequence ever overflowed (reads `overflow` from the device)."""
        flags = np.asarray(self.overflow)
        if flags.any():
            raise ValueError(
                f"cache overflow: sequences {np.flatnonzero(flags).tolist()} went past capacity={self.capacity} "
                "(or got a negative length or a non-finite key); their outputs since then are NaN"
            )


def _nonfinite(norms, lengths):
    """bool[B]: a valid token (position < lengths[b]) of sequence b has a non-finite key (norm)."""
    valid = jnp.arange(norms.shape[2])[None, None, :] < lengths[:, None, None]
    return jnp.any(valid & ~jnp.isfinite(norms), axis=(1, 2))
