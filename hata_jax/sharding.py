"""Head-sharded decode attention: the kernel API split over one mesh axis with `shard_map`.

Decoding treats every KV head on its own: a KV head's cached keys, values, codes and norms, its
hash projection and the G query heads of its group are all its attention reads. Splitting the KV
heads (each with its query heads) over a mesh axis therefore needs no communication at all:
hashing, scoring, selection and attention run on each device for its own heads. Pallas calls
cannot be partitioned by XLA (it would gather a custom call's operands onto every device), so
each wrapper here runs the plain :mod:`hata_jax` function (or :class:`hata_jax.HataCache` method)
of its name without the `sharded_` prefix inside `shard_map`, on the local heads; it takes the
same arguments plus `mesh` and `axis`.

Layouts over mesh axis `axis` of size n (the KV head count must be a multiple of n; the query
heads follow: device i holds KV heads [i Hkv/n, (i+1) Hkv/n) and query heads [i Hq/n, (i+1) Hq/n),
which are exactly those KV heads' groups):

    q [B, Hq, D], k_new, v_new [B, Hkv, D], outputs [B, Hq, D]      P(None, axis)
    cache k, v [B, Hkv, S, D], codes [B, Hkv, S, W], norms [B, Hkv, S]  P(None, axis)
    cache lengths, overflow [B]                                       replicated, P()
    hash projection w [Hkv, D, rbit]                                  P(axis)

Other mesh axes replicate everything. `mesh=None` calls the plain function (one device), so a
caller passes its mesh through unconditionally. Works from one device to several hosts
(`jax.distributed.initialize`; the mesh spans every process's devices).

Inside `shard_map` the values are traced, so the checks of concrete lengths (a prefill's lengths
in range, an append past the capacity raising at once) do not run there; an overflow is flagged
in the cache as under `jit` (see :class:`hata_jax.HataCache`).
"""
from __future__ import annotations

import functools

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from hata_jax import attention, checks, explicit
from hata_jax import decode as hata_decode
from hata_jax.cache import HataCache, cache_layout
from hata_jax.config import HataConfig
from hata_jax.explicit import shard_map


def axis_size(mesh: Mesh, axis: str) -> int:
    """The number of devices along `axis` of `mesh` (a ValueError naming the axes if absent)."""
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if axis not in mesh.axis_names:
        raise ValueError(f"mesh axis {axis!r} is not in the mesh (axes {tuple(mesh.axis_names)})")
    return mesh.shape[axis]


def check_head_split(mesh: Mesh, axis: str, kv_heads: int, q_heads: int | None = None) -> int:
    """Raise unless `kv_heads` (and `q_heads`, a multiple of them) split evenly over `axis`; returns its size."""
    n = axis_size(mesh, axis)
    if kv_heads % n:
        raise ValueError(f"cannot split {kv_heads} KV heads over mesh axis {axis!r} of {n} devices: head-sharded "
                         f"decoding needs a KV head count that is a multiple of the axis size (use an axis of "
                         f"{', '.join(str(d) for d in range(1, kv_heads + 1) if kv_heads % d == 0)} devices)")
    if q_heads is not None:
        checks.group_size(q_heads, kv_heads, "head-sharded decoding: q heads vs KV heads")
    return n


def check_head_major(cache: HataCache) -> None:
    """The wrappers here split head-major float caches of one buffer per sequence only."""
    if cache.page_table is not None or cache.k_scale is not None or cache.ring:
        raise ValueError("hata_jax.sharding splits plain caches (no page table, scales or ring); run the plain ops "
                         "under jax.set_mesh with Explicit axes instead (see hata_jax.explicit)")
    if cache.seq_axis != 2:
        raise ValueError("hata_jax.sharding splits head-major caches ([batch, kv_heads, seq, head_dim]), got a "
                         "sequence-major one (seq_axis=1): run the plain ops under jax.set_mesh with Explicit axes "
                         "(the cache made with HataCache.init(out_sharding=...))")


def heads_spec(axis: str) -> P:
    """Arrays with the heads on axis 1: q, k_new, v_new, outputs, cache k/v/codes/norms."""
    return P(None, axis)


def projection_spec(axis: str) -> P:
    """A hash projection w [Hkv, D, rbit]."""
    return P(axis)


def cache_specs(axis: str) -> HataCache:
    """A head-major HataCache of PartitionSpecs: k, v, codes, norms split on the KV heads;
    lengths, starts, overflow, uncoded replicated."""
    return explicit.specs(cache_layout(), {"h": axis})


def _named(mesh: Mesh, specs):
    """A pytree of PartitionSpecs as NamedShardings on `mesh`."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, P))


def cache_shardings(mesh: Mesh, axis: str) -> HataCache:
    """:func:`cache_specs` as NamedShardings on `mesh`."""
    return _named(mesh, cache_specs(axis))


def init_cache(batch: int, kv_heads: int, capacity: int, head_dim: int, *, rbit: int = 128, dtype=None,
               mesh: Mesh | None, axis: str = "model") -> HataCache:
    """An empty :meth:`HataCache.init` cache made directly in its head-sharded layout (no device
    ever holds the whole cache); the plain one when `mesh` is None."""
    kwargs = {"rbit": rbit} | ({} if dtype is None else {"dtype": dtype})
    if mesh is None:
        return HataCache.init(batch, kv_heads, capacity, head_dim, **kwargs)
    check_head_split(mesh, axis, kv_heads)
    return HataCache.init(batch, kv_heads, capacity, head_dim, **kwargs,
                          out_sharding=NamedSharding(mesh, heads_spec(axis)))


def shard_cache(cache: HataCache, mesh: Mesh, axis: str = "model") -> HataCache:
    """`cache` placed in the head-sharded layout (a copy)."""
    check_head_split(mesh, axis, cache.kv_heads)
    return jax.device_put(cache, cache_shardings(mesh, axis))


def shard_projection(w: jax.Array, mesh: Mesh, axis: str = "model") -> jax.Array:
    """A hash projection w [Hkv, D, rbit] split on its KV heads."""
    check_head_split(mesh, axis, w.shape[0])
    return jax.device_put(w, NamedSharding(mesh, projection_spec(axis)))


@functools.lru_cache(maxsize=64)
def _over_heads(op: str, mesh: Mesh, axis: str, static: tuple):
    """The jitted `shard_map` of `_LOCAL[op]` with the keyword arguments `static` (cached: eager
    calls compile once). Arguments of any placement are first moved to the specs' layout (a no-op
    for arrays already there), on meshes of Auto and of Explicit axes alike."""
    fn, in_specs, out_specs = _LOCAL[op](axis, **dict(static))
    mapped = shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
    shardings = _named(mesh, in_specs)
    return jax.jit(lambda *args: mapped(*jax.device_put(args, shardings)))


def _hata_local(axis, *, config, scale, impl):
    def fn(q, k_new, v_new, cache, w):
        return hata_decode.hata_decode_attention(q, k_new, v_new, cache, w, config, scale=scale, impl=impl)

    heads = heads_spec(axis)
    return fn, (heads, heads, heads, cache_specs(axis), projection_spec(axis)), (heads, cache_specs(axis))


def _dense_local(axis, *, scale, return_lse, impl):
    def fn(q, k, v, lengths):
        return attention.dense_decode_attention(q, k, v, lengths, scale=scale, return_lse=return_lse, impl=impl)

    heads = heads_spec(axis)
    return fn, (heads, heads, heads, P()), (heads, heads) if return_lse else heads


def _append_local(axis, *, impl):
    def fn(cache, k_new, v_new, w):
        return cache.append(k_new, v_new, w, impl=impl)

    heads = heads_spec(axis)
    return fn, (cache_specs(axis), heads, heads, projection_spec(axis)), cache_specs(axis)


def _prefill_local(axis, *, impl):
    def fn(cache, k, v, w, lengths):
        return cache.prefill(k, v, w, lengths, impl=impl)

    heads = heads_spec(axis)
    return fn, (cache_specs(axis), heads, heads, projection_spec(axis), P()), cache_specs(axis)


_LOCAL = {"hata": _hata_local, "dense": _dense_local, "append": _append_local, "prefill": _prefill_local}


def sharded_hata_decode_attention(q: jax.Array, k_new: jax.Array, v_new: jax.Array, cache: HataCache, w: jax.Array,
                                  config: HataConfig, *, mesh: Mesh | None, axis: str = "model",
                                  scale: float | None = None, impl: str = "auto"):
    """:func:`hata_jax.hata_decode_attention` with the heads split over `axis` of `mesh`.

    Args:
      q: float[B, Hq, D]; k_new, v_new: float[B, Hkv, D]; cache: a HataCache; w: float[Hkv, D, rbit]
        (any placement: the arrays are laid out as the module docstring says).

    Returns:
      (out [B, Hq, D] split on its heads, the updated cache in the head-sharded layout).
    """
    if mesh is None:
        return hata_decode.hata_decode_attention(q, k_new, v_new, cache, w, config, scale=scale, impl=impl)
    checks.check_query(q)
    check_head_major(cache)
    check_head_split(mesh, axis, cache.kv_heads, q.shape[1])
    fn = _over_heads("hata", mesh, axis, (("config", config), ("scale", scale), ("impl", impl)))
    return fn(q, k_new, v_new, cache, w)


def sharded_dense_decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, *, mesh: Mesh | None,
                                   axis: str = "model", scale: float | None = None, return_lse: bool = False,
                                   impl: str = "auto"):
    """:func:`hata_jax.dense_decode_attention` with the heads split over `axis` of `mesh`.

    Args:
      q: float[B, Hq, D]; k, v: float[B, Hkv, S, D]; lengths: int[B].

    Returns:
      out [B, Hq, D] (and lse float32[B, Hq] if asked), split on the heads.
    """
    if mesh is None:
        return attention.dense_decode_attention(q, k, v, lengths, scale=scale, return_lse=return_lse, impl=impl)
    checks.check_query(q)
    checks.check_rank(k, 4, "k", "[batch, kv_heads, seq, head_dim]")
    check_head_split(mesh, axis, k.shape[1], q.shape[1])
    fn = _over_heads("dense", mesh, axis, (("scale", scale), ("return_lse", return_lse), ("impl", impl)))
    return fn(q, k, v, lengths)


def sharded_append(cache: HataCache, k_new: jax.Array, v_new: jax.Array, w: jax.Array, *, mesh: Mesh | None,
                   axis: str = "model", impl: str = "auto") -> HataCache:
    """:meth:`HataCache.append` (k_new, v_new: [B, Hkv, D]; w: [Hkv, D, rbit]) on the local heads."""
    if mesh is None:
        return cache.append(k_new, v_new, w, impl=impl)
    check_head_major(cache)
    check_head_split(mesh, axis, cache.kv_heads)
    return _over_heads("append", mesh, axis, (("impl", impl),))(cache, k_new, v_new, w)


def sharded_prefill(cache: HataCache, k: jax.Array, v: jax.Array, w: jax.Array, lengths: jax.Array, *,
                    mesh: Mesh | None, axis: str = "model", impl: str = "auto") -> HataCache:
    """:meth:`HataCache.prefill` (k, v: [B, Hkv, T, D]; w: [Hkv, D, rbit]; lengths: int[B]) on the local heads."""
    if mesh is None:
        return cache.prefill(k, v, w, lengths, impl=impl)
    check_head_major(cache)
    check_head_split(mesh, axis, cache.kv_heads)
    checks.check_rank(k, 4, "k", "[batch, kv_heads, tokens, head_dim]")
    checks.check_lengths(lengths, cache.batch, k.shape[2], "lengths (prefill)")
    return _over_heads("prefill", mesh, axis, (("impl", impl),))(cache, k, v, w, lengths)
