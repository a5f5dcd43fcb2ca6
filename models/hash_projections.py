"""The layers' hash projections: one `W float32[Hkv, D, rbit]` per layer (the `w` of the
:mod:`hata_jax` functions; `hash_weights` is the per-layer collection), random, read from an .npz,
or filled in around the trained ones for a plan.
"""
from __future__ import annotations

import pathlib
import warnings
import zipfile
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from hata_jax import checks
from hata_jax.models.config import LlamaConfig
from hata_jax.models.plan import AttentionPlan, layer_span


def random_projections(config: LlamaConfig, rbit: int, seed: int = 0, layers=None) -> dict[int, np.ndarray]:
    """Untrained Gaussian projections (SimHash): {layer: float32[Hkv, D, rbit]}."""
    rng = np.random.default_rng(seed)
    layers = range(config.num_layers) if layers is None else layers
    return {i: rng.standard_normal((config.num_kv_heads, config.head_dim, rbit), dtype=np.float32) for i in layers}


def load_hash_weights(path: str | pathlib.Path) -> dict[int, np.ndarray]:
    """Hash projections from an .npz file, or the single .npz inside a directory.

    Format: one array per layer named `layer_<i>` (`i` from 0), float[Hkv, D, rbit]; layers
    without an entry (e.g. the dense first layers) are filled by :func:`hash_weights_for`.
    A file that is not a readable .npz (a torn or flipped byte fails the zip's CRC-32) and an
    array holding NaN or inf are refused with a ValueError naming the file and the layer.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.npz"))
        if len(files) != 1:
            raise ValueError(f"--hash-weights {path}: expected exactly one .npz file in the directory, found "
                             f"{[f.name for f in files]}")
        path = files[0]
    if not path.is_file():
        raise ValueError(f"hash weights file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            bad = [k for k in data.files if not (k.startswith("layer_") and k[6:].isdigit())]
            if bad:
                raise ValueError(f"{path}: unexpected arrays {bad}; expected names layer_<i>")
            weights = {int(k[6:]): np.asarray(data[k], np.float32) for k in data.files}
    except (OSError, EOFError, zipfile.BadZipFile, ValueError) as err:
        if str(path) in str(err):
            raise
        raise ValueError(f"hash weights {path} is not a readable .npz of projections ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from None
    for layer, w in sorted(weights.items()):
        checks.check_finite(w, f"hash weights {path}: layer {layer}")
    return weights


def hash_weights_for(config: LlamaConfig, plan: AttentionPlan,
                     given: Mapping[int, np.ndarray] | np.ndarray | None = None, *,
                     seed: int = 0) -> list[jnp.ndarray]:
    """One projection per layer, float32[Hkv, D, rbit] each, for :func:`hata_jax.models.generate`.

    Args:
      given: {layer: [Hkv, D, rbit]}, or an array [num_layers, Hkv, D, rbit], or None. Layers
        missing from it get random Gaussian projections; if a "hata" layer is among them a
        warning says its selection is untrained.
    """
    rbit = plan.hata.rbit
    if given is None:
        given = {}
    elif not isinstance(given, Mapping):
        given = np.asarray(given)
        if given.ndim != 4 or given.shape[0] != config.num_layers:
            raise ValueError(f"hash weights array must have shape [num_layers={config.num_layers}, Hkv, D, rbit], "
                             f"got {given.shape}")
        given = dict(enumerate(given))
    expected = (config.num_kv_heads, config.head_dim, rbit)
    for layer, w in given.items():
        if not 0 <= layer < config.num_layers:
            raise ValueError(f"hash weights for layer {layer}, but the model has {config.num_layers} layers")
        if tuple(np.shape(w)) != expected:
            raise ValueError(f"hash weights of layer {layer} have shape {tuple(np.shape(w))}, expected "
                             f"[Hkv, D, rbit] = {list(expected)}")
        checks.check_finite(np.asarray(w), f"hash weights of layer {layer}")
    missing = [i for i in range(config.num_layers) if i not in given]
    untrained = sorted(set(missing) & set(plan.hashed_layers))
    if untrained:
        warnings.warn(f"HATA layers {layer_span(untrained)} use RANDOM, UNTRAINED hash projections (SimHash): "
                      "token selection is worse than with trained weights (pass --hash-weights)", stacklevel=2)
    filled = {**random_projections(config, rbit, seed, missing), **given}
    return [jnp.asarray(filled[i], jnp.float32) for i in range(config.num_layers)]
