"""Each selector's per-layer params for a model: trained, random or calibrated.

    params = selector_params("hashattention", model, hashattention_dir="runs/smollm2-hashattention")
    result = generate_from(prefilled, AttentionPlan.for_method(n, "hashattention", hata), params, ...)

  hata           the trained projections W float32[Hkv, D, rbit]: `hash_weights` (a `hata-jax
                 train` run or an .npz, as `hata-jax generate --hash-weights`), default the ones
                 shipped with hata-jax (checked against the model's weights)
  simhash        random Gaussian projections (:func:`hata_jax.models.hash_projections.random_projections`, `seed`)
  hashattention  the MLPs of a finished `hata-jax train --selector hashattention` run
  loki           a PCA basis float32[Hkv, D, D] of each layer's post-RoPE keys over prefills of
                 the standard library's TRAIN split (never the held-out text), cached as
                 `$HATA_JAX_CACHE/loki/<model fingerprint>.npz` (default ~/.cache/hata-jax)
  others         None (dense, exact, quest, streaming)

Layers a method has no params for (the dense first layers of a trained run) get None.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from hata_jax.files import write_atomically
from hata_jax.models.hash_projections import load_hash_weights, random_projections
from hata_jax.models.identity import fingerprint
from hata_jax.models.llama import LlamaForCausalLM
from hata_jax.models.plan import METHODS
from hata_jax.models.smollm2 import cache_dir
from hata_jax.selectors import loki_basis, params_source
from hata_jax.train import corpus as corpus_lib
from hata_jax.train.checkpoint import load_projections, load_trained
from hata_jax.train.collect import make_capture
from hata_jax.train.integrity import check_finite, tree_digests, verify_digests
from hata_jax.train.projections import SHIPPED, is_npz, shipped_for


@dataclasses.dataclass(frozen=True)
class LokiCalibration:
    """Loki's calibration text: `sequences` prefills of `seq_len` tokens of the standard library's
    train split (files shuffled with `seed`); every key of every sequence enters the PCA."""

    sequences: int = 4
    seq_len: int = 1024
    seed: int = 0

    def __post_init__(self):
        for name in ("sequences", "seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"LokiCalibration.{name} must be a positive int, got {value!r}")

    def as_array(self) -> np.ndarray:
        return np.asarray([self.sequences, self.seq_len, self.seed], np.int64)


def selector_params(method: str, model: LlamaForCausalLM, *, rbit: int = 128, hash_weights=None,
                    hashattention_dir=None, loki_calibration: LokiCalibration = LokiCalibration(), tokenizer=None,
                    seed: int = 0) -> list:
    """The params of `method` (one of :data:`hata_jax.models.plan.METHODS`) for every layer of `model`.

    Args:
      rbit: code bits of hata and simhash.
      hash_weights: hata: a `hata-jax train` run / checkpoint directory or an .npz (arrays
        layer_<i>); default the projections shipped with hata-jax, if trained for this model.
      hashattention_dir: hashattention: the `hata-jax train --selector hashattention --out` directory.
      loki_calibration, tokenizer: loki: the calibration text and the model's tokenizer (only
        needed when the basis is not cached yet).
      seed: simhash's random projections.

    Returns:
      one entry per layer (None where the method has no params for the layer).

    Raises:
      ValueError for an unknown method, a missing file or directory, or weights trained for
      another model.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; supported: {METHODS}")
    num_layers = model.config.num_layers
    method = method if method in ("dense", "hata") else params_source(method)  # e.g. hata_rerank reads hata's
    if method == "hata":
        layers = _hata_projections(model, rbit, hash_weights)
    elif method == "simhash":
        layers = random_projections(model.config, rbit, seed)
    elif method == "hashattention":
        layers = _hashattention_params(model, hashattention_dir)
    elif method == "loki":
        layers = dict(enumerate(loki_bases(model, loki_calibration, tokenizer)))
    else:
        return [None] * num_layers
    return [jax.tree.map(jnp.asarray, layers[i]) if i in layers else None for i in range(num_layers)]


def _hata_projections(model, rbit: int, path) -> dict[int, np.ndarray]:
    if path is not None:
        path = pathlib.Path(path).expanduser()
        if not path.exists():
            raise ValueError(f"hata: hash_weights {path} does not exist")
        if is_npz(path):
            weights = load_hash_weights(path)
            bad = {i: w.shape for i, w in weights.items() if w.shape[-1] != rbit}
            if bad:
                raise ValueError(f"hata: {path} holds projections of shapes {bad}, not rbit {rbit}")
            return weights
        return load_projections(path, model, rbit)
    step_dir = shipped_for(model)
    if step_dir is not None:
        return load_projections(step_dir, model, rbit)
    raise ValueError(f"hata: no trained projections are shipped for this model (shipped: {sorted(SHIPPED)}, "
                     "trained for other weights); pass hash_weights= a `hata-jax train` run directory or an .npz")


def _hashattention_params(model, run_dir) -> dict[int, dict]:
    if run_dir is None:
        raise ValueError("hashattention needs hashattention_dir: the directory of a finished "
                         "`hata-jax train --selector hashattention --out DIR` run")
    path = pathlib.Path(run_dir).expanduser()
    if not path.is_dir():
        raise ValueError(f"hashattention: the run directory {path} does not exist")
    layers, _ = load_trained(path, model, "hashattention")
    return layers


def loki_cache_path(model) -> pathlib.Path:
    """Where the Loki bases of `model` are cached: `$HATA_JAX_CACHE/loki/<fingerprint>.npz`."""
    return cache_dir() / "loki" / f"{fingerprint(model)}.npz"


def loki_bases(model, calibration: LokiCalibration = LokiCalibration(), tokenizer=None) -> list[np.ndarray]:
    """Per layer, Loki's PCA basis float32[Hkv, D, D] of the post-RoPE keys of `calibration`'s
    prefills; read from :func:`loki_cache_path` when it holds this calibration, else computed
    (with `tokenizer`) and written there. A cached file that is unreadable (the zip's CRC-32
    catches flipped or missing bytes), lacks a layer or holds NaN or inf is refused with a
    ValueError naming it (delete it to recalibrate); a non-finite basis is never written."""
    path = loki_cache_path(model)
    if path.is_file():
        cached = _read_loki_cache(path, calibration, model.config.num_layers)
        if cached is not None:
            return cached
    if tokenizer is None:
        raise ValueError(f"loki: no calibrated basis for this model at {path}; pass tokenizer= (the model's) to "
                         "calibrate one on the standard library's train split")
    bases = _calibrate_loki(model, tokenizer, calibration)
    check_finite({f"layer_{i}": b for i, b in enumerate(bases)}, "loki: the calibrated bases")
    layers = {f"layer_{i}": np.asarray(b, np.float32) for i, b in enumerate(bases)}
    digests = np.asarray(json.dumps(tree_digests(layers)))
    write_atomically(path, lambda f: np.savez(f, calibration=calibration.as_array(), digests=digests, **layers))
    return bases


def _read_loki_cache(path: pathlib.Path, calibration: LokiCalibration, num_layers: int) -> list[np.ndarray] | None:
    """The cached bases at `path` if they are of `calibration` (else None: recalibrate), verified
    against the digests stored with them (a cache written before digests counts as stale); see
    :func:`loki_bases`."""
    what = f"loki: the cached calibration {path}"
    try:
        with np.load(path, allow_pickle=False) as data:
            if not np.array_equal(data["calibration"], calibration.as_array()) or "digests" not in data.files:
                return None
            layers = {f"layer_{i}": np.asarray(data[f"layer_{i}"]) for i in range(num_layers)}
            digests = json.loads(str(data["digests"]))
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as err:
        raise ValueError(f"{what} is corrupt ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}); delete it to recalibrate") from None
    try:
        verify_digests(layers, digests, what)
        check_finite(layers, f"{what} is corrupt")
    except ValueError as err:
        raise ValueError(f"{err}; delete it to recalibrate") from None
    return [layers[f"layer_{i}"] for i in range(num_layers)]


def _calibrate_loki(model, tokenizer, calibration: LokiCalibration) -> list[np.ndarray]:
    layers = list(range(model.config.num_layers))
    capture = make_capture(model, layers)
    corpus = corpus_lib.stdlib_corpus("train")
    keys: dict[int, list[np.ndarray]] = {i: [] for i in layers}
    for tokens in corpus_lib.token_sequences(corpus, tokenizer, calibration.seq_len, calibration.sequences,
                                             calibration.seed):
        out = capture(jnp.asarray(tokens[None]), jnp.zeros((1,), jnp.int32))
        for i in layers:
            keys[i].append(np.asarray(out[i][1]))  # [seq_len, Hkv, D]
    return [np.asarray(loki_basis(jnp.asarray(np.concatenate(keys[i]))), np.float32) for i in layers]
