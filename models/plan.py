"""Which decode attention each layer runs.

Kinds: "dense"; "hata", the fast HATA path (:func:`hata_jax.hata_decode_attention`); "sparse",
the plan's token selector (:mod:`hata_jax.selectors`) followed by sparse attention over the
tokens it keeps (:func:`hata_jax.models.selector_cache.selector_decode_attention`).

Every layer keeps one :class:`hata_jax.HataCache` (codes and key norms included), whatever its
attention kind, so the kinds can change without touching the cache; a "sparse" layer keeps its
selector's per-token state next to it (:class:`hata_jax.models.selector_cache.SelectorCache`). A layer's
hash projection `W [Hkv, D, rbit]` (:mod:`hata_jax.models.hash_projections`) encodes its keys in
every layer; only "hata" layers use the codes to select.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from jax.sharding import Mesh

from hata_jax import HataConfig
from hata_jax import sharding as head_sharding
from hata_jax.dispatch import check_impl
from hata_jax.selectors import SELECTORS, Selector, make_selector

ATTENTION_KINDS = ("dense", "hata", "sparse")
MESH_SPLITS = ("heads", "positions")  # what a plan with a mesh splits over its axis
# The first layers that `AttentionPlan.uniform` and `for_method` keep dense by default (HATA's paper: 2).
DENSE_LAYERS = 2
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
      mesh, mesh_axis, mesh_split: with a `jax.sharding.Mesh`, decode and prefill attention run
        split over its axis `mesh_axis`: `mesh_split` "heads" splits the KV heads (with the
        weights tensor-parallel: :mod:`hata_jax.sharding`, :mod:`hata_jax.models.sharding`),
        "positions" splits every sequence's cache along its positions (weights replicated:
        :mod:`hata_jax.sequence_sharding`); None: one device. A plan with a mesh has "dense" and
        "hata" layers only.
    """

    layers: tuple[str, ...]
    hata: HataConfig = HataConfig()
    impl: str = "auto"
    selector: Selector | None = None
    mesh: Mesh | None = None
    mesh_axis: str = "model"
    mesh_split: str = "heads"

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
        if self.hata.candidates != 1 and self.sparse_layers:
            raise ValueError(f"HataConfig.candidates ({self.hata.candidates}) applies to 'hata' layers; the 'sparse' "
                             f"layers {self.sparse_layers} select with their selector (two-stage: hata_rerank)")
        if self.mesh_split not in MESH_SPLITS:
            raise ValueError(f"AttentionPlan.mesh_split must be one of {MESH_SPLITS}, got {self.mesh_split!r}")
        if self.mesh is not None:
            head_sharding.axis_size(self.mesh, self.mesh_axis)
            if self.mesh_split == "positions":
                self.hata.require_one_stage("a plan split over the positions")
            if self.sparse_layers:
                raise ValueError(f"a plan with a mesh runs 'dense' and 'hata' layers only, not 'sparse' (layers "
                                 f"{self.sparse_layers}): the selectors run on one device")

    @classmethod
    def uniform(cls, num_layers: int, attention: str, hata: HataConfig = HataConfig(),
                impl: str = "auto", *, dense_layers: int = DENSE_LAYERS) -> AttentionPlan:
        """"dense" everywhere, or "hata" with the first `dense_layers` layers dense."""
        if attention not in ("dense", "hata"):
            raise ValueError(f"attention must be 'dense' or 'hata', got {attention!r} (selectors: "
                             "AttentionPlan.for_method)")
        return cls.for_method(num_layers, attention, hata, impl, dense_layers=dense_layers)

    @classmethod
    def for_method(cls, num_layers: int, method: str, hata: HataConfig = HataConfig(),
                   impl: str = "auto", *, dense_layers: int = DENSE_LAYERS,
                   selector_options: dict | None = None) -> AttentionPlan:
        """The plan of one method of METHODS: "dense" everywhere; "hata", the fast HATA path;
        any other selector name, kind "sparse" with `make_selector(method, ...)`: `rbit=hata.rbit`
        and `score=hata.score` for the selectors that take them (simhash, hata_rerank), and of
        `selector_options` (selector field -> value, e.g. `{"candidates": 4, "channels": 16,
        "page_size": 8}`) the fields this selector has; the others are ignored, so one dict can
        serve every method of a run. Except for "dense", the first `dense_layers` layers stay dense."""
        if method not in METHODS:
            raise ValueError(f"unknown attention method {method!r}; supported: {METHODS}")
        if isinstance(dense_layers, bool) or not isinstance(dense_layers, (int, np.integer)) or dense_layers < 0:
            raise ValueError(f"dense_layers must be an int >= 0, got {dense_layers!r}")
        if selector_options is not None and not isinstance(selector_options, dict):
            raise ValueError(f"selector_options must be a dict of selector fields, got "
                             f"{type(selector_options).__name__}")
        kind = {"dense": "dense", "hata": "hata"}.get(method, "sparse")
        kinds = tuple(kind if i >= dense_layers else "dense" for i in range(num_layers))
        selector = None
        if kind == "sparse":
            fields = {f.name for f in dataclasses.fields(SELECTORS[method])}
            given = {"rbit": hata.rbit, "score": hata.score, **(selector_options or {})}
            selector = make_selector(method, **{name: value for name, value in given.items() if name in fields})
        return cls(layers=kinds, hata=hata, impl=impl, selector=selector)

    def on_mesh(self, mesh: Mesh | None, axis: str = "model", split: str = "heads") -> AttentionPlan:
        """The same plan with its attention split over `axis` of `mesh` (None: one device): the
        KV heads (`split="heads"`) or the positions (`split="positions"`)."""
        return dataclasses.replace(self, mesh=mesh, mesh_axis=axis, mesh_split=split)

    def with_budget(self, budget: int) -> AttentionPlan:
        return dataclasses.replace(self, hata=dataclasses.replace(self.hata, budget=budget))

    def as_dense(self) -> AttentionPlan:
        """The same plan with every layer dense (the short-context step of :func:`hata_jax.models.generate`;
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


def layer_span(layers: list[int]) -> str:
    """"2..29" for a contiguous run of layers, else the list."""
    contiguous = len(layers) > 1 and layers == list(range(layers[0], layers[-1] + 1))
    return f"{layers[0]}..{layers[-1]}" if contiguous else str(layers)
