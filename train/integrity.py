"""What saved arrays prove about themselves: a content digest per array, and finiteness.

Every array written with a checkpoint (a training run's state, the shipped projections, a
HashAttention run) is recorded in the checkpoint's metadata as `{name: digest}`, where `name` is
the array's path in the saved tree ("layers/layer_05", "current/opt_state/0/trace") and `digest`
the sha256 of its dtype, shape and bytes (:func:`array_digest`). Loading recomputes the digests
(:func:`verify_digests`), so a flipped byte, a truncated file or another run's file is refused
with the array's name, never returned. Non-finite values are refused at save and at load
(:func:`check_finite`), naming the array.

    digests = tree_digests(state)                     # {name: sha256 hex}, saved with the arrays
    verify_digests(restored, digests, "checkpoint runs/x/checkpoints/300")
    content_digest({2: w2, 3: w3})                    # one digest of a whole set of arrays
"""
from __future__ import annotations

import hashlib
import json

import jax
import numpy as np

from hata_jax import checks


def _key_name(key) -> str:
    for attr in ("key", "idx", "name"):  # DictKey, SequenceKey / FlattenedIndexKey, GetAttrKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def flat_arrays(tree) -> dict[str, np.ndarray]:
    """{"a/b/c": numpy array} of the leaves of a pytree (dicts, lists, tuples, namedtuples)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(_key_name(k) for k in path): np.asarray(leaf) for path, leaf in leaves}


def array_digest(array) -> str:
    """sha256 hex of an array's dtype, shape and C-order bytes (equal arrays of equal dtype match)."""
    array = np.ascontiguousarray(np.asarray(array))
    digest = hashlib.sha256(f"{array.dtype.str}{list(array.shape)}".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def tree_digests(tree) -> dict[str, str]:
    """{name: :func:`array_digest`} of every leaf of `tree` (names as :func:`flat_arrays`)."""
    return {name: array_digest(a) for name, a in sorted(flat_arrays(tree).items())}


def content_digest(tree) -> str:
    """One sha256 hex of a whole pytree of arrays: its names and their :func:`array_digest`."""
    return hashlib.sha256(json.dumps(tree_digests(tree), sort_keys=True).encode()).hexdigest()


def check_finite(tree, what: str) -> None:
    """Raise a ValueError naming the first floating-point array of `tree` that holds NaN or inf.

    `what` names the whole (e.g. "checkpoint step 300 in runs/x"); the message adds the array's
    name, how many of its values are non-finite, and the first one's index.
    """
    for name, array in flat_arrays(tree).items():
        checks.check_finite(array, f"{what}: array {name}")


def verify_digests(tree, digests: dict, what: str) -> None:
    """Raise a ValueError unless every array of `tree` matches its entry in `digests` and every
    entry has its array; the message names `what` and the first mismatching array."""
    arrays = flat_arrays(tree)
    missing = sorted(set(digests) - set(arrays))
    if missing:
        raise ValueError(f"{what} is corrupt: arrays {missing} are recorded in its digests but missing from its state")
    unrecorded = sorted(set(arrays) - set(digests))
    if unrecorded:
        raise ValueError(f"{what} is corrupt: arrays {unrecorded} are in its state but have no recorded digest")
    for name, array in sorted(arrays.items()):
        if array_digest(array) != digests[name]:
            raise ValueError(f"{what} is corrupt: array {name} does not match its recorded sha256 digest (its "
                             "bytes changed after it was written)")
