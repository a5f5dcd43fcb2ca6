"""HATA's loss weights, probed on a few layers: train one layer per variant on collected samples and
measure the share of exact attention mass kept at 1/16 of the context on held-out collections.

A variant is `random` (N(0, 1) projections from numpy seed 0, rbit 128), `tight` (the trainer's
N(0, 1) init with its rows orthonormalised, `W <- (W W^T)^(-1/2) W`, no training: what the
decorrelation term alone reaches when rbit >= head_dim) or `name=field=value,...` with
:class:`hata_jax.train.hata_objective.HataLoss` fields and `steps`, `lr` overriding the
trainer's defaults; every trained variant starts from the trainer's init of that layer and runs
the trainer's own step (:func:`hata_jax.train.trainer.make_step`), so a layer trained here equals
that layer of `hata-jax train` with the same settings.

    python -m bench.loss_probe --samples TRAIN_SAMPLES --heldout DOCS_SAMPLES STDLIB_SAMPLES \
        --layers 3 15 27 --variants random tight paper eta0.02=decorrelation=0.02 --out probe.json
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from hata_jax.train.collect import load_layer
from hata_jax.train.hata_objective import HataLoss, HataObjective
from hata_jax.train.trainer import TrainConfig, layer_data, make_optimizer, make_step, samples_mass

TRAIN_FIELDS = {"steps": ("steps", int), "lr": ("learning_rate", float)}


def parse_variant(text: str) -> tuple[str, dict | str]:
    """`random`, `tight`, `paper` or `name=field=value,...` -> (name, spec)."""
    if text in ("random", "tight"):
        return text, text
    if text == "paper":
        return text, {}
    name, sep, fields = text.partition("=")
    if not sep or not fields:
        raise ValueError(f"--variants: expected random, tight, paper or name=field=value,..., got {text!r}")
    spec = {}
    for item in fields.split(","):
        field, sep, value = item.partition("=")
        if not sep or (field not in TRAIN_FIELDS and field not in HataLoss.__dataclass_fields__):
            raise ValueError(f"--variants {text!r}: {item!r} is not field=value with a HataLoss field, steps or lr")
        spec[field] = TRAIN_FIELDS[field][1](value) if field in TRAIN_FIELDS else float(value)
    return name, spec


def init_weights(layer: int, samples) -> jax.Array:
    """The trainer's init of `layer` (seed 0)."""
    _, _, q_heads, head_dim = samples.q.shape
    init_key, _ = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(0), layer))
    return HataObjective().init(init_key, q_heads, samples.k.shape[2], head_dim)


def train_variant(layer: int, samples, spec: dict) -> tuple[HataObjective, jax.Array, dict]:
    loss = {k: v for k, v in spec.items() if k not in TRAIN_FIELDS}
    train = {TRAIN_FIELDS[k][0]: v for k, v in spec.items() if k in TRAIN_FIELDS}
    selector = HataObjective(loss_config=HataLoss(**loss))
    config = TrainConfig.for_selector(selector, **train)
    _, batch_key = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(config.seed), layer))
    w = init_weights(layer, samples)
    opt_state = make_optimizer(config).init(w)
    step = make_step(selector, config)
    data = layer_data(selector, samples)
    terms = {}
    for s in range(config.steps):
        w, opt_state, _, step_terms = step(w, opt_state, data, batch_key, s)
        if s in (0, config.steps - 1):
            terms["first" if s == 0 else "last"] = {k: float(v) for k, v in step_terms.items()}
    return selector, w, terms


def probe_layer(layer: int, train_dir, heldout: dict, variants: dict) -> dict:
    samples = load_layer(train_dir, layer)
    held = {name: load_layer(path, layer) for name, path in heldout.items()}
    row = {"exact": {name: samples_mass(s) for name, s in held.items()}}
    for name, spec in variants.items():
        start = time.perf_counter()
        selector, terms = HataObjective(), None
        if spec == "random":
            _, _, kv_heads, head_dim = samples.k.shape
            w = jnp.asarray(np.random.default_rng(0).standard_normal((kv_heads, head_dim, 128), dtype=np.float32))
        elif spec == "tight":
            w0 = np.asarray(init_weights(layer, samples), np.float64)
            values, vectors = np.linalg.eigh(np.einsum("hdr,her->hde", w0, w0))
            w = jnp.asarray(np.einsum("hde,he,hfe,hfr->hdr", vectors, values ** -0.5, vectors, w0), jnp.float32)
        else:
            selector, w, terms = train_variant(layer, samples, spec)
        gram = np.linalg.eigvalsh(np.einsum("hdr,her->hde", np.asarray(w), np.asarray(w)))
        row[name] = {**{set_name: samples_mass(s, selector, w) for set_name, s in held.items()},
                     "train": samples_mass(samples, selector, w),
                     "w_wt_eigenvalues": [float(gram.min()), float(np.median(gram)), float(gram.max())],
                     "seconds": time.perf_counter() - start, **({"loss_terms": terms} if terms else {})}
        print(layer, name, {k: round(v, 4) for k, v in row[name].items() if isinstance(v, float)}, flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", required=True, help="training collection (hata-jax train --samples)")
    p.add_argument("--heldout", nargs="+", required=True, help="held-out collections (hata-jax recall --samples)")
    p.add_argument("--layers", type=int, nargs="+", required=True)
    p.add_argument("--variants", nargs="+", required=True, help="random, tight, paper or name=field=value,...")
    p.add_argument("--out", required=True, help="JSON file")
    args = p.parse_args(argv)
    variants = dict(parse_variant(v) for v in args.variants)
    heldout = {pathlib.Path(path).name: path for path in args.heldout}
    result = {"layers": {layer: probe_layer(layer, args.samples, heldout, variants) for layer in args.layers},
              "variants": args.variants, "fraction": 1 / 16, "jax": jax.__version__}
    pathlib.Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
