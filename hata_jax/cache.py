"""The per-layer KV cache with hash codes and key norms, as a pytree."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hata_jax import checks, explicit
from hata_jax.config import check_rbit
from hata_jax.hashing import check_projection, encode, key_norms


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["k", "v", "codes", "norms", "lengths", "overflow", "uncoded"],
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
      uncoded: bool[B], sticky until the next prefill with a projection: a token of the sequence
        was written without its hash code (`w=None` in :meth:`prefill` or :meth:`append`, as a
        dense layer may do; its code is left zero, its norm is stored). The codes cannot select
        over such a sequence: :func:`hata_decode_attention` raises at once outside `jit` and
        returns NaN for it inside.

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
    uncoded: jax.Array

    @classmethod
    def init(
        cls,
        batch: int,
        kv_heads: int,
        capacity: int,
        head_dim: int,
        *,
        rbit: int = 128,
        dtype=jnp.bfloat16,
        out_sharding: NamedSharding | P | None = None,
    ) -> HataCache:
        """An empty cache of `capacity` tokens per sequence.

        Args:
          batch, kv_heads, capacity, head_dim: positive ints (Python or numpy integers).
          rbit: code bits, a positive multiple of 32.
          dtype: the floating-point dtype of k and v.
          out_sharding: None (default placement), or the layout of k and v `[B, Hkv, S, D]` as a
            `NamedSharding` (a mesh of Auto or Explicit axes) or a `PartitionSpec` (over the
            mesh of `jax.set_mesh`): only the batch and head axes may be split
            (e.g. `P("data")`, `P(None, "model")`, `P("data", "model")`); every other field
            follows them (codes and norms on both, lengths and overflow on the batch). The
            buffers are made in place on their devices, never whole on one.
        """
        dims = {"batch": batch, "kv_heads": kv_heads, "capacity": capacity, "head_dim": head_dim}
        batch, kv_heads, capacity, head_dim = (checks.as_int(v, f"HataCache.init: {n}", low=1) for n, v in dims.items())
        rbit = checks.as_int(rbit, "HataCache.init: rbit", low=1)
        check_rbit(rbit)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"HataCache.init: dtype must be a floating-point dtype, got {jnp.dtype(dtype)}")
        shape = (batch, kv_heads, capacity, head_dim)

        def make():
            return cls(  # separate buffers for k and v, so that the cache can be donated
                k=jnp.zeros(shape, dtype),
                v=jnp.zeros(shape, dtype),
                codes=jnp.zeros((batch, kv_heads, capacity, rbit // 32), jnp.uint32),
                norms=jnp.zeros((batch, kv_heads, capacity), jnp.float32),
                lengths=jnp.zeros((batch,), jnp.int32),
                overflow=jnp.zeros((batch,), bool),
                uncoded=jnp.zeros((batch,), bool),
            )

        if out_sharding is None:
            return make()
        shardings = layout_shardings(out_sharding, "HataCache.init: out_sharding")
        if isinstance(out_sharding, P):  # the types carry the layout (inside jit too)
            return jax.jit(lambda: explicit.reshard(make(), shardings))()
        return jax.jit(make, out_shardings=shardings)()

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

    def raise_if_uncoded(self) -> None:
        """Raise if a sequence holds a token written without its code (`uncoded`; values known on
        the host only: a no-op on tracers)."""
        if checks.is_concrete(self.uncoded) and np.asarray(self.uncoded).any():
            raise ValueError(
                f"sequences {np.flatnonzero(np.asarray(self.uncoded)).tolist()} of the cache hold tokens written "
                "without hash codes (w=None in prefill or append): HATA cannot select over them; pass the layer's "
                "projection w to prefill and append in every layer that HATA will decode"
            )

    def check_tokens(self, k, v, w, layout: str, token_axes: int) -> None:
        """k, v: `layout` matching the cache (any token count, the same for both); w: the
        cache's projection, unless None."""
        shape = (self.batch, self.kv_heads) + (None,) * token_axes + (self.head_dim,)
        for name, x in (("k", k), ("v", v)):
            checks.check_rank(x, len(shape), name, layout)
            checks.check_floating(x, name)
            if any(e is not None and e != g for e, g in zip(shape, x.shape)):
                seq_major = token_axes and x.shape[1] != self.kv_heads and x.shape[2] == self.kv_heads
                raise ValueError(
                    f"{name} must have shape {layout} with B={self.batch}, Hkv={self.kv_heads}, "
                    f"D={self.head_dim}, got {tuple(x.shape)}"
                    + (" " + checks.SEQ_MAJOR_HINT.format(name=name) if seq_major else "")
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

    def prefill(
        self, k: jax.Array, v: jax.Array, w: jax.Array | None, lengths: jax.Array, *, impl: str = "auto"
    ) -> HataCache:
        """Write a prompt's keys and values at positions [0, T) and set `lengths`.

        Args:
          k, v: [B, Hkv, T, D] post-RoPE keys and values, T <= capacity (padded rows past a
            sequence's length are stored but never attended).
          w: float[Hkv, D, rbit] the layer's projection, or None (a dense layer): the codes are
            left zero and every sequence with a token is marked `uncoded`.
          lengths: int[B] prompt lengths, each <= T.

        Under an explicit mesh the write runs on each device's rows of the cache (see
        :mod:`hata_jax.explicit`); k, v and w are resharded to the cache's layout.
        """
        k, v = checks.as_array(k, "k"), checks.as_array(v, "v")
        w = None if w is None else checks.as_array(w, "w")
        lengths = checks.as_array(lengths, "lengths (prefill)", "int")
        if w is not None:
            checks.check_finite(w, "w")
        self.check_tokens(k, v, w, "[batch, kv_heads, tokens, head_dim]", 1)
        t = k.shape[2]
        if t > self.capacity:
            raise ValueError(f"prefill: the prompt has {t} tokens but the cache capacity is {self.capacity}")
        checks.check_lengths(lengths, self.batch, t, "lengths (prefill)")
        return explicit.per_shard(functools.partial(_prefill, impl=impl), (self, k, v, w, lengths),
                                  (LAYOUT, "bh..", "bh..", None if w is None else "h..", "b"), LAYOUT)

    def append(self, k_new: jax.Array, v_new: jax.Array, w: jax.Array | None, *, impl: str = "auto") -> HataCache:
        """Write one new token per sequence at position `lengths[b]` and advance `lengths`.

        Args:
          k_new, v_new: [B, Hkv, D] post-RoPE key and value of the new token.
          w: float[Hkv, D, rbit] the layer's projection, or None (a dense layer): the token's
            code is left zero (its norm is stored) and every sequence is marked `uncoded`.
        """
        k_new, v_new = checks.as_array(k_new, "k"), checks.as_array(v_new, "v")
        w = None if w is None else checks.as_array(w, "w")
        if w is not None:
            checks.check_finite(w, "w")
        self.check_tokens(k_new, v_new, w, "[batch, kv_heads, head_dim]", 0)
        if w is None:
            codes = jnp.zeros((self.batch, self.kv_heads, self.rbit // 32), jnp.uint32)
            cache = dataclasses.replace(self, uncoded=jnp.ones_like(self.uncoded))
            return cache.append_encoded(k_new, v_new, codes, key_norms(k_new))
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
        return explicit.per_shard(_append, (self, k_new, v_new, k_codes, k_norms),
                                  (LAYOUT, "bh.", "bh.", "bh.", "bh"), LAYOUT)

    def raise_if_overflowed(self) -> None:
        """Host-side check: raise if any sequence ever overflowed (reads `overflow` from the device)."""
        flags = np.asarray(self.overflow)
        if flags.any():
            raise ValueError(
                f"cache overflow: sequences {np.flatnonzero(flags).tolist()} went past capacity={self.capacity} "
                "(or got a negative length or a non-finite key); their outputs since then are NaN"
            )


# The layout of a HataCache's fields (see :mod:`hata_jax.explicit`): batch and KV heads may be split.
LAYOUT = HataCache(k="bh..", v="bh..", codes="bh..", norms="bh.", lengths="b", overflow="b", uncoded="b")


def layout_shardings(out_sharding: NamedSharding | P, name: str) -> HataCache:
    """A HataCache of shardings: the fields laid out as `out_sharding`, the layout of k and v
    [B, Hkv, S, D] (only the batch and head axes split), says: NamedShardings on its mesh for a
    NamedSharding, PartitionSpecs (over the mesh of `jax.set_mesh`) for a PartitionSpec."""
    if isinstance(out_sharding, NamedSharding):
        spec = out_sharding.spec
    elif isinstance(out_sharding, P):
        spec = out_sharding
        if jax.sharding.get_abstract_mesh().empty:
            raise ValueError(f"{name} is a PartitionSpec but no mesh is set (jax.set_mesh); pass a NamedSharding")
    else:
        raise ValueError(f"{name} must be a NamedSharding, a PartitionSpec or None, got {type(out_sharding).__name__}")
    entries = tuple(spec) + (None,) * (4 - len(spec))
    if len(entries) != 4 or entries[2:] != (None, None):
        raise ValueError(f"{name} must split only the batch and head axes of [batch, kv_heads, seq, head_dim] "
                         f"(e.g. P('data', 'model')), got {spec}")
    specs = explicit.specs(LAYOUT, {role: axes for role, axes in zip("bh", entries) if axes is not None})
    if isinstance(out_sharding, P):
        return specs
    return jax.tree.map(lambda s: NamedSharding(out_sharding.mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def _prefill(cache: HataCache, k, v, w, lengths, *, impl: str) -> HataCache:
    """:meth:`HataCache.prefill` on checked arguments."""
    t = k.shape[2]
    lengths = lengths.astype(jnp.int32)
    if w is None:
        codes = jnp.zeros((*k.shape[:3], cache.rbit // 32), jnp.uint32)
    else:
        codes = encode(k, w, head_axis=1, impl=impl)
    put = functools.partial(jax.lax.dynamic_update_slice_in_dim, start_index=0, axis=2)
    norms = key_norms(k)
    return HataCache(
        k=put(cache.k, k.astype(cache.k.dtype)),
        v=put(cache.v, v.astype(cache.v.dtype)),
        codes=put(cache.codes, codes),
        norms=put(cache.norms, norms),
        lengths=jnp.clip(lengths, 0, t),
        overflow=(lengths > t) | (lengths < 0) | _nonfinite(norms, lengths),
        uncoded=jnp.full((cache.batch,), w is None) & (lengths > 0),
    )


def _append(cache: HataCache, k_new, v_new, k_codes, k_norms) -> HataCache:
    """:meth:`HataCache.append_encoded` on checked arguments."""
    rows = jnp.arange(cache.batch)
    ok = (cache.lengths >= 0) & (cache.lengths < cache.capacity)
    pos = jnp.where(ok, cache.lengths, cache.capacity)  # capacity: an out-of-bounds write, dropped

    def put(buf, val):
        return buf.at[rows, :, pos].set(val.astype(buf.dtype), mode="drop")

    return HataCache(
        k=put(cache.k, k_new),
        v=put(cache.v, v_new),
        codes=put(cache.codes, k_codes),
        norms=put(cache.norms, k_norms),
        lengths=jnp.where(ok, cache.lengths + 1, jnp.clip(cache.lengths, 0, cache.capacity)),
        overflow=cache.overflow | ~ok | jnp.any(~jnp.isfinite(k_norms), axis=1),
        uncoded=cache.uncoded,
    )


def _nonfinite(norms, lengths):
    """bool[B]: a valid token (position < lengths[b]) of sequence b has a non-finite key (norm)."""
    valid = jnp.arange(norms.shape[2])[None, None, :] < lengths[:, None, None]
    return jnp.any(valid & ~jnp.isfinite(norms), axis=(1, 2))
