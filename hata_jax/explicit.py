"""The public ops under JAX's explicit sharding (`jax.set_mesh` with `AxisType.Explicit` axes).

Every op of :mod:`hata_jax` treats each (sequence, KV head) row on its own: hashing, scoring,
selection, attention and the cache writes of one row read nothing of another. So under an
explicit mesh an op runs, reference path and Pallas kernels alike, inside `shard_map` on the
local rows of each device: no communication, and no Pallas call ever partitioned by XLA.

The layout comes from the op's principal array (the cache's `k`, the keys, the codes or the
scores; the "lead"): whatever mesh axes split its batch axis and its head axis split those axes
of every other argument and of the outputs, and all other axes are replicated. Arguments laid
out otherwise are resharded to that layout first (a no-op when they already match), so a
batch-sharded cache takes replicated new tokens, and an axis split that the op cannot keep
(the sequence or head_dim axis of a cache) is gathered (communication on every call: avoid it).

Without a mesh, on a mesh of Auto axes (XLA partitions the jitted program; the Pallas calls run
replicated) and inside a `shard_map` over every axis (the arrays are local), the ops run as
they are: :func:`per_shard` calls `fn` directly.

Layout strings name the role of each axis of an array: `"b"` batch, `"h"` heads (KV heads, or
query heads, whose groups split with their KV heads), other letters any role the lead names
(e.g. the leading axes of :func:`hata_jax.encode`), `"."` an axis that is never split.
"""
from __future__ import annotations

import inspect

import jax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P


def shard_map(f, *, mesh, in_specs, out_specs):
    """`jax.shard_map` (or `jax.experimental.shard_map.shard_map` on a jax without it) with the
    replication check off (named `check_vma` or `check_rep` by version): Pallas calls have no
    replication rule, and outputs replicated over a mesh axis here (e.g. cache lengths split
    only on the batch) are equal on every device of that axis."""
    fn = getattr(jax, "shard_map", None)
    if fn is None:
        from jax.experimental.shard_map import shard_map as fn
    check = "check_vma" if "check_vma" in inspect.signature(fn).parameters else "check_rep"
    return fn(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **{check: False})


def explicit_mesh():
    """The context's abstract mesh if it has an Explicit axis (`jax.set_mesh`), else None (no
    mesh, Auto axes only, or inside a `shard_map` over every Explicit axis)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or AxisType.Explicit not in tuple(mesh.axis_types):
        return None
    return mesh


def _spec_entries(x, mesh) -> tuple:
    """The PartitionSpec entries of `x`'s type, one per axis (all None unless `x` is laid out
    on `mesh`'s explicit axes)."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    ndim = jax.numpy.ndim(x)
    if not isinstance(sharding, NamedSharding) or sharding.mesh.empty or sharding.mesh.axis_names != mesh.axis_names:
        return (None,) * ndim
    spec = tuple(sharding.spec)
    return spec + (None,) * (ndim - len(spec))


def _is_layout(x) -> bool:
    return isinstance(x, str)


def specs(layouts, roles: dict):
    """A pytree of layout strings as PartitionSpecs, each role split over `roles[role]` (mesh
    axes; a role absent from `roles` is not split)."""
    return jax.tree.map(lambda layout: P(*(roles.get(role) for role in layout)), layouts, is_leaf=_is_layout)


def roles_of(x, layout: str, mesh) -> dict:
    """{role: the mesh axes splitting that axis of `x`} ({} when `x` is not laid out on `mesh`)."""
    entries = _spec_entries(x, mesh)
    return {role: entry for role, entry in zip(layout, entries) if role != "." and entry is not None}


def per_shard(fn, args: tuple, layouts: tuple, out_layouts, *, lead: int = 0):
    """`fn(*args)`, on each device's local rows under an explicit mesh (see the module docstring).

    Args:
      fn: a function of `args` (arrays, or pytrees of arrays such as a HataCache) that treats
        every row of the roles the layouts name on its own.
      args: its positional arguments.
      layouts: one layout string per argument (a pytree of them for a pytree argument; None for
        an argument that is not an array, e.g. an optional argument left None, passed through unchanged).
      out_layouts: the layouts of `fn`'s outputs, a pytree of layout strings matching them.
      lead: the index of the argument whose layout the others follow.

    Returns:
      `fn(*args)`; under an explicit mesh the outputs are laid out as `out_layouts` with the
      lead's mesh axes.
    """
    mesh = explicit_mesh()
    if mesh is None:
        return fn(*args)
    lead_array = jax.tree.leaves(args[lead])[0]
    lead_layout = jax.tree.leaves(layouts[lead], is_leaf=_is_layout)[0]
    roles = roles_of(lead_array, lead_layout, mesh)
    static = {i for i, layout in enumerate(layouts) if layout is None}
    in_specs = tuple(specs(layout, roles) for i, layout in enumerate(layouts) if i not in static)
    arrays = [reshard(arg, spec) for arg, spec in zip((a for i, a in enumerate(args) if i not in static), in_specs)]

    def local(*local_arrays):
        it = iter(local_arrays)
        return fn(*(args[i] if i in static else next(it) for i in range(len(args))))

    return shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=specs(out_layouts, roles))(*arrays)


def reshard(tree, specs):
    """`jax.sharding.reshard` of each array leaf of `tree` to its PartitionSpec in `specs` (a
    pytree of the same structure)."""
    leaves, treedef = jax.tree.flatten(tree)
    spec_leaves = treedef.flatten_up_to(specs)
    return treedef.unflatten([jax.sharding.reshard(x, s) for x, s in zip(leaves, spec_leaves)])
