"""The per-layer KV cache with hash codes and key norms, as a pytree."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hata_jax import checks, explicit, kv_storage
from hata_jax.attention import head_major
from hata_jax.config import check_rbit
from hata_jax.hashing import check_projection, encode, key_norms


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["k", "v", "codes", "norms", "lengths", "starts", "overflow", "uncoded", "page_table", "k_scale",
                 "v_scale"],
    meta_fields=["seq_axis", "ring"],
)
@dataclasses.dataclass(frozen=True)
class HataCache:
    """One attention layer's decode cache, updated functionally.

    Attributes:
      k, v: post-RoPE keys and values, [B, Hkv, S_max, D] (`seq_axis` 2, head-major) or
        [B, S_max, Hkv, D] (`seq_axis` 1, sequence-major): the model's own buffers may be used
        as they are (see :meth:`from_kv`).
      codes: uint32[B, Hkv, S_max, rbit // 32] key hash codes and
      norms: float32[B, Hkv, S_max] key norms, both counted from each sequence's first token:
        entry j is the token at position `starts[b] + j` of k and v.
      lengths: int32[B], the end of each sequence in k and v: its tokens are at positions
        `[starts[b], lengths[b])`, and the next one is written at `lengths[b]`.
      starts: int32[B], the position of each sequence's first token (0 unless the cache is
        left-padded, as made by :meth:`from_kv`).
      overflow: bool[B], sticky: set when a write would have gone outside `[0, S_max)` or a
        written key is not finite (NaN or inf: the sequence's attention is NaN, as dense
        attention over that key would be, instead of the key silently never selected).
      uncoded: bool[B], sticky until the next prefill with a projection: a token of the sequence
        was written without its hash code (`w=None` in :meth:`prefill` or :meth:`append`, as a
        dense layer may do; its code is left zero, its norm is stored). The codes cannot select
        over such a sequence: :func:`hata_decode_attention` raises at once outside `jit` and
        returns NaN for it inside.
      page_table: None, or int32[B, pages_per_sequence]: k and v are page pools
        `[pages, Hkv, page_size, D]` (`seq_axis` 2) or `[pages, page_size, Hkv, D]` (`seq_axis` 1)
        shared by the batch, and sequence b's position p is row `p % page_size` of page
        `page_table[b, p // page_size]` (see :mod:`hata_jax.kv_storage`); S_max is then
        `pages_per_sequence x page_size`. The codes and norms stay one row per sequence.
      k_scale, v_scale: None (float k and v), or the float32 scales of quantized (int8 or fp8)
        k and v: one per row and KV head (k's shape without D; a new token is quantized by its
        absmax) or one per KV head ([Hkv], fixed).
      seq_axis: static, the sequence axis of k and v (2 or 1).
      ring: static, a ring buffer (one buffer per sequence; made by :meth:`from_kv`): position
        p is slot `p % S_max`, so a sequence's tokens `[starts[b], lengths[b])` (at most S_max
        of them) may run past the buffer's end into the slots before `starts[b]`, as in a
        model that writes every sequence at one cursor that wraps around. A write that would
        make a sequence hold more than S_max tokens overflows (never overwrites a token).

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
    starts: jax.Array
    overflow: jax.Array
    uncoded: jax.Array
    page_table: jax.Array | None = None
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None
    seq_axis: int = 2
    ring: bool = False

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
        seq_axis: int = 2,
        out_sharding: NamedSharding | P | None = None,
    ) -> HataCache:
        """An empty cache of `capacity` tokens per sequence.

        Args:
          batch, kv_heads, capacity, head_dim: positive ints (Python or numpy integers).
          rbit: code bits, a positive multiple of 32.
          dtype: the floating-point dtype of k and v.
          seq_axis: 2 for [B, Hkv, S, D] k and v, 1 for [B, S, Hkv, D].
          out_sharding: None (default placement), or the layout of k and v as a
            `NamedSharding` (a mesh of Auto or Explicit axes) or a `PartitionSpec` (over the
            mesh of `jax.set_mesh`): only the batch and head axes may be split
            (e.g. `P("data")`, `P(None, "model")`, `P("data", "model")` for a head-major cache,
            `P("data", None, "model")` for a sequence-major one); every other field follows
            them (codes and norms on both, lengths, starts and overflow on the batch). The
            buffers are made in place on their devices, never whole on one.
        """
        dims = {"batch": batch, "kv_heads": kv_heads, "capacity": capacity, "head_dim": head_dim}
        batch, kv_heads, capacity, head_dim = (checks.as_int(v, f"HataCache.init: {n}", low=1) for n, v in dims.items())
        rbit = checks.as_int(rbit, "HataCache.init: rbit", low=1)
        check_rbit(rbit)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"HataCache.init: dtype must be a floating-point dtype, got {jnp.dtype(dtype)}")
        seq_axis = checks.check_seq_axis(seq_axis)
        shape = (batch, kv_heads, capacity, head_dim) if seq_axis == 2 else (batch, capacity, kv_heads, head_dim)

        def make():
            return cls(  # separate buffers for k and v, so that the cache can be donated
                k=jnp.zeros(shape, dtype),
                v=jnp.zeros(shape, dtype),
                codes=jnp.zeros((batch, kv_heads, capacity, rbit // 32), jnp.uint32),
                norms=jnp.zeros((batch, kv_heads, capacity), jnp.float32),
                lengths=jnp.zeros((batch,), jnp.int32),
                starts=jnp.zeros((batch,), jnp.int32),
                overflow=jnp.zeros((batch,), bool),
                uncoded=jnp.zeros((batch,), bool),
                seq_axis=seq_axis,
            )

        if out_sharding is None:
            return make()
        shardings = layout_shardings(out_sharding, "HataCache.init: out_sharding", seq_axis)
        if isinstance(out_sharding, P):  # the types carry the layout (inside jit too)
            return jax.jit(lambda: explicit.reshard(make(), shardings))()
        return jax.jit(make, out_shardings=shardings)()

    @classmethod
    def from_kv(
        cls,
        k: jax.Array,
        v: jax.Array,
        w: jax.Array,
        lengths: jax.Array,
        *,
        starts: jax.Array | None = None,
        seq_axis: int = 2,
        page_table: jax.Array | None = None,
        k_scale: jax.Array | None = None,
        v_scale: jax.Array | None = None,
        ring: bool = False,
        impl: str = "auto",
    ) -> HataCache:
        """A cache over the model's own K/V storage, as it is (no copy of K or V): their keys'
        codes and norms are computed, and k and v (and the page table and scales) become the
        cache's.

        Args:
          k, v: the model's post-RoPE key and value storage (see :mod:`hata_jax.kv_storage`):
            float[B, Hkv, S, D] (`seq_axis` 2) or float[B, S, Hkv, D] (`seq_axis` 1); with
            `page_table`, page pools [pages, Hkv, page_size, D] / [pages, page_size, Hkv, D];
            with `k_scale` and `v_scale`, int8 or fp8 rows.
          w: float[Hkv, D, rbit] the layer's projection.
          lengths: int[B] in [0, capacity], the end of each sequence: the next token goes at
            `lengths[b]`.
          starts: int[B] in [0, lengths[b]], the position of each sequence's first token (a
            left-padded buffer: the padding before it is never attended nor selected); None: 0.
          seq_axis: the sequence axis of k and v, 2 or 1.
          page_table: int32[B, pages_per_sequence], or None (one buffer per sequence).
          k_scale, v_scale: float scales of quantized k and v (k's shape without D, or [Hkv]),
            or None.
          ring: the buffer is a ring (see :class:`HataCache`): starts in [0, S), lengths in
            [starts[b], starts[b] + S]; not with a page table.

        Returns:
          A :class:`HataCache` holding the storage as given, `lengths` and `starts` (None:
          zeros), and the codes and norms of the tokens `[starts[b], lengths[b])` (of their
          dequantized keys). Inside `jit`, lengths or starts out of range are clipped and the
          sequence's `overflow` flag is set; so is it for a held token on a page the table does
          not hold.
        """
        k, v, w = checks.as_array(k, "k", "number"), checks.as_array(v, "v", "number"), checks.as_array(w, "w")
        storage = kv_storage.storage_args(seq_axis, page_table, k_scale, v_scale)
        seq_axis, page_table, k_scale = storage["seq_axis"], storage["page_table"], storage["k_scale"]
        lengths = checks.as_array(lengths, "lengths", "int")
        checks.check_rank(lengths, 1, "lengths", "[batch]")
        batch = lengths.shape[0]
        shape = kv_storage.check_storage(k, v, batch=batch, batch_of="lengths", **storage)
        kv_heads, _, _ = check_projection(w, shape.head_dim)
        if kv_heads != shape.kv_heads:
            layout = kv_storage.storage_layout(page_table is not None, seq_axis)
            raise ValueError(f"k must be {layout} with {kv_heads} KV heads (those of w {tuple(w.shape)}), got shape "
                             f"{tuple(k.shape)}" + (f" (pass seq_axis={3 - seq_axis})"
                                                    if k.shape[seq_axis] == kv_heads else ""))
        checks.check_finite(w, "w")
        starts = jnp.zeros((batch,), jnp.int32) if starts is None else checks.as_array(starts, "starts", "int")
        if ring:
            if page_table is not None:
                raise ValueError("ring=True is a ring of one buffer per sequence: it does not go with a page_table")
            checks.check_ring(starts, lengths, batch, shape.capacity)
        else:
            checks.check_lengths(lengths, batch, shape.capacity)
            checks.check_starts(starts, lengths, batch, shape.capacity)
        if page_table is not None and checks.is_concrete(page_table):
            check_pages_held(np.asarray(page_table), np.asarray(starts), np.asarray(lengths), shape.page_size,
                             k.shape[0])
        layout = cache_layout(seq_axis, paged=page_table is not None,
                              scales_shape=None if k_scale is None else jnp.shape(k_scale), ring=bool(ring))
        layouts = (layout.k, layout.v, "h..", "b", "b", layout.page_table, layout.k_scale, layout.v_scale)
        return explicit.per_shard(functools.partial(_from_kv, seq_axis=seq_axis, ring=bool(ring), impl=impl),
                                  (k, v, w, lengths, starts, page_table, k_scale, v_scale), layouts, layout)

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    @property
    def kv_heads(self) -> int:
        return self.k.shape[3 - self.seq_axis]

    @property
    def capacity(self) -> int:
        """Positions a sequence can hold (pages_per_sequence x page_size for a paged cache)."""
        return self.storage_shape.capacity

    @property
    def storage_shape(self) -> kv_storage.KVShape:
        return kv_storage.shape_of(self.k, self.seq_axis, self.page_table)

    @property
    def storage(self) -> dict:
        """The keywords that describe k and v to the attention ops (:mod:`hata_jax.kv_storage`)."""
        return dict(seq_axis=self.seq_axis, page_table=self.page_table, k_scale=self.k_scale, v_scale=self.v_scale)

    @property
    def layout(self) -> HataCache:
        """The layout strings of the fields (:func:`cache_layout`)."""
        return cache_layout(self.seq_axis, paged=self.page_table is not None,
                            scales_shape=None if self.k_scale is None else jnp.shape(self.k_scale), ring=self.ring)

    @property
    def head_dim(self) -> int:
        return self.k.shape[3]

    @property
    def rbit(self) -> int:
        return 32 * self.codes.shape[3]

    def without_kv(self) -> HataCache:
        """The side-car alone: this cache without the model's storage (k, v, page_table, k_scale
        and v_scale set to None), to keep next to the model's own K/V in its cache pytree
        (codes and norms, 20 B per token and KV head at rbit 128, plus lengths, starts and flags
        per sequence). :meth:`with_kv` puts the storage back for a step; nothing but pytree
        operations works on a side-car."""
        return dataclasses.replace(self, k=None, v=None, page_table=None, k_scale=None, v_scale=None)

    def with_kv(self, k, v, *, page_table=None, k_scale=None, v_scale=None) -> HataCache:
        """This side-car (:meth:`without_kv`) over the model's K/V storage as it is now (the
        layout, paging and quantization it was made with; see :meth:`from_kv`)."""
        storage = kv_storage.storage_args(self.seq_axis, page_table, k_scale, v_scale)
        k, v = checks.as_array(k, "k", "number"), checks.as_array(v, "v", "number")
        shape = kv_storage.check_storage(k, v, batch=self.batch, batch_of="the side-car (lengths)", **storage)
        if (shape.kv_heads, shape.capacity) != tuple(self.codes.shape[1:3]):
            raise ValueError(f"k holds {shape.kv_heads} KV heads of {shape.capacity} positions "
                             f"({kv_storage.storage_layout(page_table is not None, self.seq_axis)}, shape "
                             f"{tuple(k.shape)}) but the side-car's codes {tuple(self.codes.shape)} are for "
                             f"{self.codes.shape[1]} of {self.codes.shape[2]}")
        return dataclasses.replace(self, k=k, v=v, **{n: x for n, x in storage.items() if n != "seq_axis"})

    def as_stored(self, k_new: jax.Array) -> jax.Array:
        """New keys k_new [B, Hkv, D] as a quantized cache will hold them (quantized by its
        scheme, then dequantized, float32), so that their codes are those :meth:`from_kv` would
        compute from the cache; k_new itself for a float cache."""
        if self.k_scale is None:
            return k_new
        fixed = self.k_scale[None, :] if self.k_scale.ndim == 1 else None
        stored, scale = kv_storage.quantize(k_new, self.k.dtype, fixed)
        return stored.astype(jnp.float32) * scale[..., None]

    def raise_if_uncoded(self) -> None:
        """Raise if a sequence holds a token written without its code (`uncoded`; values known on
        the host only: a no-op on tracers)."""
        if checks.is_concrete(self.uncoded) and np.asarray(self.uncoded).any():
            raise ValueError(
                f"sequences {np.flatnonzero(np.asarray(self.uncoded)).tolist()} of the cache hold tokens written "
                "without hash codes (w=None in prefill or append): HATA cannot select over them; pass the layer's "
                "projection w to prefill and append in every layer that HATA will decode"
            )

    def check_tokens(self, k, v, w, token_axes: int) -> None:
        """k, v: tokens matching the cache (the same shape for both): one per sequence
        [B, Hkv, D] (`token_axes` 0), or any number laid out as the cache (`token_axes` 1:
        [B, Hkv, T, D] or [B, T, Hkv, D] by `seq_axis`); w: the cache's projection, unless None."""
        shape = [self.batch, self.kv_heads, self.head_dim]
        if token_axes:
            shape.insert(self.seq_axis, None)
        layout = (checks.CACHE_LAYOUTS[self.seq_axis].replace("seq", "tokens") if token_axes
                  else "[batch, kv_heads, head_dim]")
        for name, x in (("k", k), ("v", v)):
            checks.check_rank(x, len(shape), name, layout)
            checks.check_floating(x, name)
            if any(e is not None and e != g for e, g in zip(shape, x.shape)):
                seq_major = (token_axes and self.seq_axis == 2 and x.shape[1] != self.kv_heads
                             and x.shape[2] == self.kv_heads)
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
        """Write a prompt's keys and values at positions [0, T) and set `lengths` (`starts` 0).

        Args:
          k, v: post-RoPE keys and values laid out as the cache, [B, Hkv, T, D] (`seq_axis` 2)
            or [B, T, Hkv, D] (`seq_axis` 1), T <= capacity (padded rows past a sequence's
            length are stored but never attended).
          w: float[Hkv, D, rbit] the layer's projection, or None (a dense layer): the codes are
            left zero and every sequence with a token is marked `uncoded`.
          lengths: int[B] prompt lengths, each <= T.

        Under an explicit mesh the write runs on each device's rows of the cache (see
        :mod:`hata_jax.explicit`); k, v and w are resharded to the cache's layout.
        """
        k, v, w, lengths = self.check_prompt(k, v, w, lengths)
        if self.page_table is not None and checks.is_concrete(self.page_table):
            check_pages_held(np.asarray(self.page_table), np.zeros(self.batch, int), np.asarray(lengths),
                             self.storage_shape.page_size, self.k.shape[0])
        layout, kv = self.layout, _kv_layout(self.seq_axis)
        return explicit.per_shard(functools.partial(_prefill, impl=impl), (self, k, v, w, lengths),
                                  (layout, kv, kv, None if w is None else "h..", "b"), layout)

    def check_prompt(self, k, v, w, lengths, prompt_tokens: int | None = None):
        """:meth:`prefill`'s arguments as arrays (lengths int32; w may be None), or a ValueError
        naming the bad one. `prompt_tokens`: the prompt's length T when k and v hold a chunk of it
        (lengths <= T <= capacity; k and v of any length); None: k's tokens."""
        k, v = checks.as_array(k, "k"), checks.as_array(v, "v")
        w = None if w is None else checks.as_array(w, "w")
        lengths = checks.as_array(lengths, "lengths (prefill)", "int")
        if w is not None:
            checks.check_finite(w, "w")
        self.check_tokens(k, v, w, 1)
        t = k.shape[self.seq_axis] if prompt_tokens is None else prompt_tokens
        if t > self.capacity:
            raise ValueError(f"prefill: the prompt has {t} tokens but the cache capacity is {self.capacity}")
        checks.check_lengths(lengths, self.batch, t, "lengths (prefill)")
        return k, v, w, lengths.astype(jnp.int32)

    def append(self, k_new: jax.Array, v_new: jax.Array, w: jax.Array | None, *, impl: str = "auto") -> HataCache:
        """Write one new token per sequence at position `lengths[b]` of k and v (its code and
        norm at `lengths[b] - starts[b]`) and advance `lengths`.

        Args:
          k_new, v_new: [B, Hkv, D] post-RoPE key and value of the new token.
          w: float[Hkv, D, rbit] the layer's projection, or None (a dense layer): the token's
            code is left zero (its norm is stored) and every sequence is marked `uncoded`.
        """
        k_new, v_new = checks.as_array(k_new, "k"), checks.as_array(v_new, "v")
        w = None if w is None else checks.as_array(w, "w")
        if w is not None:
            checks.check_finite(w, "w")
        self.check_tokens(k_new, v_new, w, 0)
        if w is None:
            codes = jnp.zeros((self.batch, self.kv_heads, self.rbit // 32), jnp.uint32)
            cache = dataclasses.replace(self, uncoded=jnp.ones_like(self.uncoded))
            return cache.append_encoded(k_new, v_new, codes, key_norms(k_new))
        return self.append_encoded(k_new, v_new, encode(k_new, w, head_axis=1, impl=impl), key_norms(k_new))

    def append_encoded(self, k_new, v_new, k_codes, k_norms) -> HataCache:
        """:meth:`append` with the new key's codes `uint32[B, Hkv, W]` and norms `float32[B, Hkv]` given."""
        self.check_tokens(k_new, v_new, None, 0)
        for name, x, dtype, shape in (
            ("k_codes", k_codes, jnp.uint32, (self.batch, self.kv_heads, self.rbit // 32)),
            ("k_norms", k_norms, jnp.float32, (self.batch, self.kv_heads)),
        ):
            checks.check_dtype(x, [dtype], name)
            if tuple(jnp.shape(x)) != shape:
                raise ValueError(f"{name} must have shape {shape} to match the cache, got {tuple(jnp.shape(x))}")
        if checks.is_concrete(self.lengths) and checks.is_concrete(self.starts):
            lengths = np.asarray(self.lengths)
            bad = (lengths - (np.asarray(self.starts) if self.ring else 0) >= self.capacity) | (lengths < 0)
            if bad.any():
                raise ValueError(
                    f"cache overflow: sequences {np.flatnonzero(bad).tolist()} hold lengths "
                    f"{lengths[bad].tolist()}, outside [0, capacity={self.capacity})"
                )
        if self.page_table is not None and checks.is_concrete(self.page_table) and checks.is_concrete(self.lengths):
            lengths = np.asarray(self.lengths)
            check_pages_held(np.asarray(self.page_table), lengths, lengths + 1, self.storage_shape.page_size,
                             self.k.shape[0])
        layout = self.layout
        return explicit.per_shard(_append, (self, k_new, v_new, k_codes, k_norms),
                                  (layout, "bh.", "bh.", "bh.", "bh"), layout)

    def raise_if_overflowed(self) -> None:
        """Host-side check: raise if any sequence ever overflowed (reads `overflow` from the device)."""
        flags = np.asarray(self.overflow)
        if flags.any():
            raise ValueError(
                f"cache overflow: sequences {np.flatnonzero(flags).tolist()} went past capacity={self.capacity} "
                "(or got a negative length or a non-finite key); their outputs since then are NaN"
            )


def _kv_layout(seq_axis: int) -> str:
    """The layout string of one-buffer-per-sequence k and v, or of tokens laid out as them (see
    :mod:`hata_jax.explicit`)."""
    return "bh.." if seq_axis == 2 else "b.h."


def cache_layout(seq_axis: int = 2, *, paged: bool = False, scales_shape: tuple | None = None,
                 ring: bool = False) -> HataCache:
    """The layout of a HataCache's fields (see :mod:`hata_jax.explicit`): batch and KV heads may be
    split (a page pool by KV heads only); `paged` and `scales_shape` (k_scale's shape, or None)
    as the cache's."""
    storage = kv_storage.layouts(seq_axis, paged, scales_shape)
    return HataCache(codes="bh..", norms="bh.", lengths="b", starts="b", overflow="b", uncoded="b",
                     seq_axis=seq_axis, ring=ring, **storage)


def check_pages_held(page_table, starts, ends, page_size: int, pages: int) -> None:
    """Raise a ValueError naming the sequences whose positions `[starts[b], ends[b])` (host
    arrays) lie on a page-table entry outside `[0, pages)` (a page the pool does not hold) or
    past the table."""
    bad = []
    for b, (first, end) in enumerate(zip(starts.tolist(), ends.tolist())):
        if end <= first:
            continue
        needed = np.arange(first // page_size, (end - 1) // page_size + 1)
        entries = page_table[b, needed[needed < page_table.shape[1]]]
        if needed[-1] >= page_table.shape[1] or not ((entries >= 0) & (entries < pages)).all():
            bad.append(b)
    if bad:
        raise ValueError(f"page_table: sequences {bad} hold or write positions on pages outside the pool "
                         f"[0, {pages}) (allocate their pages before writing: page p // {page_size} of position p)")


def layout_shardings(out_sharding: NamedSharding | P, name: str, seq_axis: int = 2) -> HataCache:
    """A HataCache of shardings: the fields laid out as `out_sharding`, the layout of k and v
    (`checks.CACHE_LAYOUTS[seq_axis]`; only the batch and head axes split), says: NamedShardings
    on its mesh for a NamedSharding, PartitionSpecs (over the mesh of `jax.set_mesh`) for a
    PartitionSpec."""
    if isinstance(out_sharding, NamedSharding):
        spec = out_sharding.spec
    elif isinstance(out_sharding, P):
        spec = out_sharding
        if jax.sharding.get_abstract_mesh().empty:
            raise ValueError(f"{name} is a PartitionSpec but no mesh is set (jax.set_mesh); pass a NamedSharding")
    else:
        raise ValueError(f"{name} must be a NamedSharding, a PartitionSpec or None, got {type(out_sharding).__name__}")
    entries = tuple(spec) + (None,) * (4 - len(spec))
    kv = _kv_layout(seq_axis)
    if len(entries) != 4 or any(axes is not None for role, axes in zip(kv, entries) if role == "."):
        example = "P('data', 'model')" if seq_axis == 2 else "P('data', None, 'model')"
        raise ValueError(f"{name} must split only the batch and head axes of {checks.CACHE_LAYOUTS[seq_axis]} "
                         f"(e.g. {example}), got {spec}")
    roles = {role: axes for role, axes in zip(kv, entries) if role != "." and axes is not None}
    specs = explicit.specs(cache_layout(seq_axis), roles)
    if isinstance(out_sharding, P):
        return specs
    return jax.tree.map(lambda s: NamedSharding(out_sharding.mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def tokens_encoded(k, w, rbit: int, seq_axis: int, impl: str):
    """The codes uint32[B, Hkv, T, rbit // 32] (zero for w None) and norms float32[B, Hkv, T]
    of keys k laid out as a cache of `seq_axis`."""
    if w is None:
        codes = jnp.zeros((*head_major(k, seq_axis).shape[:3], rbit // 32), jnp.uint32)
    elif seq_axis == 2:
        codes = encode(k, w, head_axis=1, impl=impl)
    else:
        codes = jnp.swapaxes(encode(k, w, head_axis=2, impl=impl), 1, 2)
    return codes, key_norms(head_major(k, seq_axis))


def _plain(cache: HataCache) -> bool:
    """One float buffer per sequence: written with slices, no quantization, no page table."""
    return cache.page_table is None and cache.k_scale is None


def _write_tokens(cache: HataCache, k, v, positions) -> tuple[dict, jax.Array]:
    """The storage fields with tokens k, v float[B, Hkv, T, D] (head-major) written at positions
    int[B, T] (quantized as the cache's scales say), and which were written (bool[B, Hkv, T]:
    a position outside [0, capacity) or on a page outside the pool is dropped)."""
    fields, where = {}, dict(seq_axis=cache.seq_axis, page_table=cache.page_table)
    for name, tokens in (("k", k), ("v", v)):
        buf, scale = getattr(cache, name), getattr(cache, f"{name}_scale")
        if scale is not None:
            fixed = scale[None, :, None] if scale.ndim == 1 else None
            tokens, row_scales = kv_storage.quantize(tokens, buf.dtype, fixed)
            fields[f"{name}_scale"] = (scale if fixed is not None
                                       else kv_storage.write_rows(scale, row_scales, positions, **where)[0])
        fields[name], written = kv_storage.write_rows(buf, tokens, positions, **where)
    return fields, written


def _prefill(cache: HataCache, k, v, w, lengths, *, impl: str) -> HataCache:
    """:meth:`HataCache.prefill` on checked arguments."""
    t = k.shape[cache.seq_axis]
    lengths = lengths.astype(jnp.int32)
    codes, norms = tokens_encoded(k, w, cache.rbit, cache.seq_axis, impl)
    put = functools.partial(jax.lax.dynamic_update_slice_in_dim, start_index=0)
    missed = jnp.zeros_like(cache.overflow)
    if _plain(cache):
        fields = dict(k=put(cache.k, k.astype(cache.k.dtype), axis=cache.seq_axis),
                      v=put(cache.v, v.astype(cache.v.dtype), axis=cache.seq_axis))
    else:  # only the prompt's tokens: a page past a sequence's end may belong to another
        j = jnp.arange(t)[None, :]
        positions = jnp.where(j < lengths[:, None], j, -1)
        fields, written = _write_tokens(cache, head_major(k, cache.seq_axis), head_major(v, cache.seq_axis),
                                        positions)
        missed = jnp.any((positions >= 0)[:, None, :] & ~written, axis=(1, 2))
    return dataclasses.replace(
        cache,
        **fields,
        codes=put(cache.codes, codes, axis=2),
        norms=put(cache.norms, norms, axis=2),
        lengths=jnp.clip(lengths, 0, t),
        starts=jnp.zeros_like(cache.starts),
        overflow=(lengths > t) | (lengths < 0) | _nonfinite(norms, lengths) | missed,
        uncoded=jnp.full((cache.batch,), w is None) & (lengths > 0),
    )


def _from_kv(k, v, w, lengths, starts, page_table, k_scale, v_scale, *, seq_axis: int, ring: bool,
             impl: str) -> HataCache:
    """:meth:`HataCache.from_kv` on checked arguments: the codes and norms of every position,
    counted from each sequence's start (`starts[b] + j` is entry `j`; modulo S in a ring)."""
    shape = kv_storage.shape_of(k, seq_axis, page_table)  # the local KV heads under shard_map
    capacity = shape.capacity
    if ring:
        bad = (starts < 0) | (starts >= capacity) | (lengths < starts) | (lengths > starts + capacity)
        starts = jnp.clip(starts, 0, capacity - 1).astype(jnp.int32)
        lengths = jnp.clip(lengths, starts, starts + capacity).astype(jnp.int32)
    else:
        bad = (lengths < 0) | (lengths > capacity) | (starts < 0) | (starts > lengths)
        lengths = jnp.clip(lengths, 0, capacity).astype(jnp.int32)
        starts = jnp.clip(starts, 0, lengths).astype(jnp.int32)
    j = jnp.arange(capacity)[None, :]
    held = (j < (lengths - starts)[:, None])[:, None, :]  # [B, 1, S]
    if page_table is None and k_scale is None and not ring:
        codes, norms = tokens_encoded(k, w, w.shape[2], seq_axis, impl)
        src = jnp.minimum(starts[:, None] + j, capacity - 1)[:, None, :]  # [B, 1, S]
        codes = jnp.take_along_axis(codes, src[..., None], axis=2)
        norms = jnp.take_along_axis(norms, src, axis=2)
    else:  # the held keys in order, dequantized (a transient float32 copy of them)
        positions = jnp.broadcast_to(((starts[:, None] + j) % capacity)[:, None, :],
                                     (lengths.shape[0], shape.kv_heads, capacity))
        keys, read = kv_storage.gather_rows(k, k_scale, positions, seq_axis=seq_axis, page_table=page_table)
        codes, norms = tokens_encoded(keys, w, w.shape[2], 2, impl)
        bad = bad | jnp.any(held & ~read, axis=(1, 2))
    codes = jnp.where(held[..., None], codes, 0)
    norms = jnp.where(held, norms, 0.0)
    return HataCache(k=k, v=v, codes=codes, norms=norms, lengths=lengths, starts=starts,
                     overflow=bad | _nonfinite(norms, lengths - starts), uncoded=jnp.zeros_like(bad),
                     page_table=page_table, k_scale=k_scale, v_scale=v_scale, seq_axis=seq_axis, ring=ring)


def _append(cache: HataCache, k_new, v_new, k_codes, k_norms) -> HataCache:
    """:meth:`HataCache.append_encoded` on checked arguments."""
    rows = jnp.arange(cache.batch)
    held_before = cache.lengths - (cache.starts if cache.ring else 0)
    in_range = (cache.lengths >= 0) & (held_before >= 0) & (held_before < cache.capacity)
    pos = cache.lengths % cache.capacity if cache.ring else cache.lengths
    pos = jnp.where(in_range, pos, -1)  # -1: an out-of-bounds write, dropped
    fields, written = _write_tokens(cache, k_new[:, :, None], v_new[:, :, None], pos[:, None])
    ok = in_range & jnp.all(written, axis=(1, 2))
    held = jnp.where(ok, cache.lengths - cache.starts, cache.capacity)  # the position in codes and norms

    def put_code(buf, val):
        return buf.at[rows, :, held].set(val, mode="drop")

    return dataclasses.replace(
        cache,
        **fields,
        codes=put_code(cache.codes, k_codes),
        norms=put_code(cache.norms, k_norms),
        lengths=jnp.where(ok, cache.lengths + 1, cache.lengths if cache.ring else jnp.clip(cache.lengths, 0,
                                                                                            cache.capacity)),
        overflow=cache.overflow | ~ok | jnp.any(~jnp.isfinite(k_norms), axis=1),
    )


def _nonfinite(norms, lengths):
    """bool[B]: a held token (position < lengths[b] of norms, counted from the sequence's start)
    of sequence b has a non-finite key (norm)."""
    valid = jnp.arange(norms.shape[2])[None, None, :] < lengths[:, None, None]
    return jnp.any(valid & ~jnp.isfinite(norms), axis=(1, 2))
