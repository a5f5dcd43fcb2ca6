"""Which decode attention each layer runs, and the layers' hash projections.

Kinds: "dense"; "hata", the fast HATA path (:func:`hata_jax.hata_decode_attention`); "sparse",
the plan's token selector (:mod:`hata_jax.selectors`) followed by sparse attention over the
tokens it keeps (:func:`models.selector_cache.selector_decode_attention`).

Every layer keeps one :class:`hata_jax.HataCache` (codes and key norms included), whatever its
attention kind, so the kinds can change without touching the cache; a "sparse" layer keeps its
selector's per-token state next to it (:class:`models.selector_cache.SelectorCache`). A layer's
hash projection `W [Hkv, D, rbit]` encodes its keys in every layer; only "hata" layers use the
codes to select.
"""
from __future__ import annotations

import dataclasses
import pathlib
import warnings
import zipfile
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from hata_jax import HataConfig, checks
from hata_jax import sharding as head_sharding
from hata_jax.dispatch import check_impl
from hata_jax.selectors import SELECTORS, Selector, make_selector
from models.config import LlamaConfig

ATTENTION_KINDS = ("dense", "hata", "sparse")
# What `AttentionPlan.for_method` takes: "dense", "hata" (the fast path) or a selector's name.
METHODS = ("dense", "hata", *sorted(set(SELECTORS) - {"hata"}))


@dataclasses.dataclass(frozen=True)
class AttentionPlan:
    """Static per-layer attention choice (hashable: a jit static argument).

    Attributes:
      layers: one of ATTENTION_KINDS per layer.
      hata: settings of the "hata" and "sparse" layers: budget, sink, recent (and for "hata" the
        score; its `rbit` is the cache's code width in every layer).
      impl: "auto", "pallas" or "reference" for the hata_jax ops.
      selector: the token selector of the "sparse" layers (a frozen, hashable
        :class:`hata_jax.selectors.Selector`); needed when a layer is "sparse".
      mesh, mesh_axis: with a `jax.sharding.Mesh`, decode and prefill attention run head-sharded
        over its axis `mesh_axis` (:mod:`hata_jax.sharding`, :mod:`models.sharding`); None: one
        device. A plan with a mesh has "dense" and "hata" layers only.
    """

    layers: tuple[str, ...]
    hata: HataConfig = HataConfig()
    impl: str = "auto"
    selector: Selector | None = None
    mesh: Mesh | None = None
    mesh_axis: str = "model"

    def __post_init__(self):
        bad = sorted(set(self.layers) - set(ATTENTION_KINDS))
        if bad:
            raise ValueError(f"unknown attention kinds {bad}; supported: {ATTENTION_KINDS}")
        if not isinstance(self.hata, HataConfig):
            raise ValueError(f"AttentionPlan.hata must be a HataConfig, got {type(self.hata).__name__}")
        check_impl(self.impl)
        if self.selector is not None and not isinstance(self.selector, Selector):
            raise ValueError(f"AttentionPlan.selector must be a hata_jax.selectors.Selector or None, got "
                             f"{type(self.selector).__name__}")
        if "sparse" in self.layers and self.selector is None:
            raise ValueError(f"attention kind 'sparse' (layers {self.sparse_layers}) needs a selector: pass "
                             f"AttentionPlan(..., selector=make_selector(name)) with a name in {sorted(SELECTORS)}")
        if self.mesh is not None:
            head_sharding.axis_size(self.mesh, self.mesh_axis)
            if self.sparse_layers:
                raise ValueError(f"a plan with a mesh runs 'dense' and 'hata' layers only, not 'sparse' (layers "
                                 f"{self.sparse_layers}): the selectors run on one device")

    @classmethod
    def uniform(cls, num_layers: int, attention: str, hata: HataConfig = HataConfig(),
                impl: str = "auto") -> "AttentionPlan":
        """"dense" everywhere, or "hata" with the first `hata.dense_layers` layers dense."""
        if attention not in ("dense", "hata"):
            raise ValueError(f"attention must be 'dense' or 'hata', got {attention!r} (selectors: "
                             "AttentionPlan.for_method)")
        return cls.for_method(num_layers, attention, hata, impl)

    @classmethod
    def for_method(cls, num_layers: int, method: str, hata: HataConfig = HataConfig(),
                   impl: str = "auto") -> "AttentionPlan":
        """The plan of one method of METHODS: "dense" everywhere; "hata", the fast HATA path;
        any other selector name, kind "sparse" with `make_selector(method)` (`rbit=hata.rbit` for
        the selectors that take it: simhash). Except for "dense", the first `hata.dense_layers`
        layers stay dense."""
        if method not in METHODS:
            raise ValueError(f"unknown attention method {method!r}; supported: {METHODS}")
        kind = {"dense": "dense", "hata": "hata"}.get(method, "sparse")
        kinds = tuple(kind if i >= hata.dense_layers else "dense" for i in range(num_layers))
        selector = None
        if kind == "sparse":
            takes_rbit = any(f.name == "rbit" for f in dataclasses.fields(SELECTORS[method]))
            selector = make_selector(method, **({"rbit": hata.rbit} if takes_rbit else {}))
        return cls(layers=kinds, hata=hata, impl=impl, selector=selector)

    def on_mesh(self, mesh: Mesh | None, axis: str = "model") -> "AttentionPlan":
        """The same plan with its attention head-sharded over `axis` of `mesh` (None: one device)."""
        return dataclasses.replace(self, mesh=mesh, mesh_axis=axis)

    def with_budget(self, budget: int) -> "AttentionPlan":
        return dataclasses.replace(self, hata=dataclasses.replace(self.hata, budget=budget))

    def as_dense(self) -> "AttentionPlan":
        """The same plan with every layer dense (the short-context step of :func:`models.generate`;
        the selector stays, so the dense step keeps the "sparse" layers' selector states current)."""
        return dataclasses.replace(self, layers=("dense",) * len(self.layers))

    @property
    def hashed_layers(self) -> list[int]:
        """The "hata" layers."""
        return [i for i, kind in enumerate(self.layers) if kind == "hata"]

    @property
    def sparse_layers(self) -> list[int]:
        """The "sparse" layers (the plan's selector)."""
        return [i for i, kind in enumerate(self.layers) if kind == "sparse"]

    @property
    def selecting_layers(self) -> list[int]:
        """The layers that attend to a selection of the context ("hata" or "sparse")."""
        return [i for i, kind in enumerate(self.layers) if kind != "dense"]


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
    """One projection per layer, float32[Hkv, D, rbit] each, for :func:`models.generate`.

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


def layer_span(layers: list[int]) -> str:
    """"2..29" for a contiguous run of layers, else the list."""
    contiguous = len(layers) > 1 and layers == list(range(layers[0], layers[-1] + 1))
    return f"{layers[0]}..{layers[-1]}" if contiguous else str(layers)
