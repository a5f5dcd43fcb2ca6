"""Where `hata-jax generate` gets its hash projections: `--hash-weights PATH` (a `hata-jax train`
run, an orbax checkpoint step, or an .npz), else the weights shipped for the model, else none
(random projections, with a warning). The shipped weights are found by the model's weight
fingerprint (:func:`shipped_for`), not by its name: `--model smollm2` and `--model <the SmolLM2
GGUF>` get the same projections.

Shipped: `train/shipped/smollm2-rbit128/` (installed as `hata_jax/train/shipped/`), the final checkpoint
(`checkpoints/8400/`) of

    hata-jax train --model smollm2 --out runs/smollm2-hata

(HATA, rbit 128, layers 2..29, seed 0; see README "Train hash projections").
"""
from __future__ import annotations

import importlib.resources
import pathlib

from hata_jax.models.hash_projections import load_hash_weights
from hata_jax.models.identity import fingerprint
from hata_jax.train.checkpoint import load_projections, read_metadata

SHIPPED = {"smollm2": "smollm2-rbit128"}  # model spec -> directory under train/shipped/


def shipped_weights(model_name: str) -> pathlib.Path | None:
    """The shipped checkpoint directory for a model spec ("smollm2"), or None."""
    if model_name not in SHIPPED:
        return None
    path = pathlib.Path(str(importlib.resources.files("hata_jax.train") / "shipped" / SHIPPED[model_name]))
    return path if path.is_dir() else None


def shipped_for(model) -> pathlib.Path | None:
    """The shipped checkpoint trained for `model` (same q/k weight fingerprint), or None."""
    dirs = [d for d in map(shipped_weights, SHIPPED) if d is not None]
    mine = fingerprint(model) if dirs else None
    return next((d for d in dirs if read_metadata(d)["model"]["fingerprint"] == mine), None)


def is_npz(path: pathlib.Path) -> bool:
    return path.suffix == ".npz" or (path.is_dir() and any(path.glob("*.npz")))


def hash_weights_for_generate(path: str | None, model_name: str, model, rbit: int, log=print):
    """{layer: float32[Hkv, D, rbit]} for generation, or None (random projections).

    `path` (an .npz, or a directory holding one, or an orbax checkpoint of `hata-jax train`) wins;
    without it the weights shipped for `model` (:func:`shipped_for`; `model_name` is only how the
    user named it) are used when their rbit is `rbit`. Orbax checkpoints are checked against
    `model` (architecture and weights) and `rbit`, and verified (digests, finiteness).
    """
    if path is not None:
        path = pathlib.Path(path).expanduser()
        if is_npz(path):
            return load_hash_weights(path)
        weights = load_projections(path, model, rbit)
        log(f"trained hash projections from {path} (layers {min(weights)}..{max(weights)})")
        return weights
    shipped = shipped_for(model)
    if shipped is None:
        return None
    metadata = read_metadata(shipped)
    name = metadata["model"]["name"]
    if metadata["rbit"] != rbit:
        log(f"the shipped {name} hash projections have rbit {metadata['rbit']}, not {rbit}: not used")
        return None
    weights = load_projections(shipped, model, rbit)
    log(f"trained hash projections shipped for {name} (layers {min(weights)}..{max(weights)}, rbit {rbit})")
    return weights
