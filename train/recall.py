"""Recall of the selectors on held-out text: the share of exact attention mass inside the tokens
each one selects, for budgets from 1/64 to 1/4 of the context, per layer and averaged.

Methods: exact top-k (the oracle, an upper bound), HATA with the trained projections (with the
paper's "key_norm" score, and with the "asymmetric" one), HATA with
untrained random Gaussian projections of the same rbit (SimHash), HashAttention when its
checkpoint is given, and two-stage HATA (its top `factor x budget` tokens ranked again by their
exact scores, :func:`hata_jax.train.metrics.reranked_mass`) for the factors asked for. All select
per KV head with no forced sink or recent tokens (see :mod:`hata_jax.train.metrics`).
"""
from __future__ import annotations

import datetime
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

import hata_jax
from hata_jax.train.collect import load_layer, read_manifest
from hata_jax.train.metrics import FRACTIONS, captured_mass, exact_scores, probs_from_raw, reranked_mass
from hata_jax.train.trainer import jitted_scores

EXACT = "exact top-k"
TRAINED = "HATA (trained)"
TRAINED_ASYMMETRIC = "HATA (trained, asymmetric score)"
RANDOM = "HATA (random projections)"
HASHATTENTION = "HashAttention"
HIGHLIGHT = 1 / 16


def reranked_name(factor: int) -> str:
    return f"HATA + exact rerank of {factor}x"


def evaluate(samples_dir, layers: list[int], methods: dict, fractions=FRACTIONS, progress=None,
             rerank: tuple[int, ...] = ()) -> dict:
    """Mass kept per method, layer and budget fraction on a held-out collection.

    Args:
      samples_dir: a :mod:`hata_jax.train.collect` collection of held-out text holding `layers`.
      methods: {name: (selector, {layer: params})}; the exact top-k is always added first.
      rerank: factors c of two-stage HATA over the TRAINED method's scores (one method each,
        named :func:`reranked_name`).
      progress: called as `progress(layer)` after each layer.

    Returns:
      {"fractions", "layers", "queries", "methods": {name: {"per_layer": [[mass per fraction] per
      layer], "mean": [mass per fraction, averaged over layers]}}}.
    """
    if rerank and TRAINED not in methods:
        raise ValueError(f"rerank needs the {TRAINED!r} method")
    score_fns = {name: jitted_scores(selector) for name, (selector, _) in methods.items()}
    per_layer = {name: [] for name in [EXACT, *methods, *map(reranked_name, rerank)]}
    queries = 0
    for layer in layers:
        samples = load_layer(samples_dir, layer)
        kv_heads, head_dim = samples.k.shape[2], samples.k.shape[3]
        masses = {name: [] for name in per_layer}
        for i in range(samples.q.shape[0]):
            probs = probs_from_raw(jnp.asarray(samples.scores[i]), head_dim, kv_heads)
            valid = jnp.asarray(samples.valid[i])
            q, k = jnp.asarray(samples.q[i]), jnp.asarray(samples.k[i])
            masses[EXACT].append(captured_mass(probs, exact_scores(probs), valid, fractions))
            for name, (_, params) in methods.items():
                scores = score_fns[name](params[layer], q, k)
                masses[name].append(captured_mass(probs, scores, valid, fractions))
                if name == TRAINED:
                    for factor in rerank:
                        masses[reranked_name(factor)].append(reranked_mass(probs, scores, valid, factor, fractions))
        for name in per_layer:
            per_layer[name].append(np.concatenate(masses[name], axis=1).mean(axis=1).tolist())
        queries = samples.q.shape[0] * samples.q.shape[1]
        if progress is not None:
            progress(layer)
    return {
        "fractions": list(fractions), "layers": list(layers), "queries_per_layer": queries,
        "methods": {name: {"per_layer": rows, "mean": np.mean(rows, axis=0).tolist()}
                    for name, rows in per_layer.items()},
    }


def check_heldout(samples_dir, checkpoints: dict[str, dict]) -> None:
    """Refuse held-out samples that share a file with the training text of any checkpoint."""
    heldout = {f["sha256"]: f["path"] for f in read_manifest(samples_dir)["corpus"]["files"]}
    for name, metadata in checkpoints.items():
        shared = sorted(heldout[f["sha256"]] for f in metadata["corpus"]["files"] if f["sha256"] in heldout)
        if shared:
            raise ValueError(f"the held-out text shares {len(shared)} files with the training text of {name} "
                             f"(e.g. {shared[:3]}); pass other --corpus files")


def fraction_label(f: float) -> str:
    return f"1/{round(1 / f)}"


def format_table(result: dict, highlight: float = HIGHLIGHT) -> str:
    """Per-layer mass at the highlighted budget, then the layer average at every budget."""
    names = list(result["methods"])
    col = result["fractions"].index(highlight)
    width = max(len(n) for n in names) + 2
    lines = [f"share of exact attention mass kept at budget {fraction_label(highlight)} of the context, per layer "
             f"({result['queries_per_layer']} held-out queries each)", "",
             "layer " + "".join(f"{n:>{width}}" for n in names)]
    for j, layer in enumerate(result["layers"]):
        cells = (result["methods"][n]["per_layer"][j][col] for n in names)
        lines.append(f"{layer:>5} " + "".join(f"{cell:>{width}.4f}" for cell in cells))
    lines += ["", "average over layers", "budget " + "".join(f"{n:>{width}}" for n in names)]
    for c, f in enumerate(result["fractions"]):
        cells = (result["methods"][n]["mean"][c] for n in names)
        lines.append(f"{fraction_label(f):>6} " + "".join(f"{cell:>{width}.4f}" for cell in cells))
    return "\n".join(lines)


def plot(result: dict, path: str | pathlib.Path, title: str, highlight: float = HIGHLIGHT) -> None:
    """Two panels: layer-averaged mass vs budget, and per-layer mass at the highlighted budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 1.6]})
    col = result["fractions"].index(highlight)
    for name, data in result["methods"].items():
        style = "--" if name == EXACT else "-"
        left.plot(result["fractions"], data["mean"], style, marker="o", label=name)
        right.plot(result["layers"], [row[col] for row in data["per_layer"]], style, marker=".", label=name)
    left.set_xscale("log", base=2)
    left.set_xticks(result["fractions"], [fraction_label(f) for f in result["fractions"]])
    left.set_xlabel("budget (fraction of the context)")
    left.set_ylabel("share of exact attention mass kept")
    left.set_title("average over layers")
    right.set_xlabel("layer")
    right.set_title(f"per layer, budget {fraction_label(highlight)}")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(result: dict, samples_dir, checkpoints: dict[str, dict], model_name: str) -> dict:
    """The JSON document: results plus what produced them (model, held-out corpus, checkpoints)."""
    manifest = read_manifest(samples_dir)
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "model": model_name, "jax": jax.__version__, "hata_jax": hata_jax.__version__,
        "backend": jax.default_backend(),
        "heldout": {"collection": manifest["config"], "corpus": {k: v for k, v in manifest["corpus"].items()
                                                                 if k != "files"},
                    "files": [f["path"] for f in manifest["corpus"]["files"]]},
        "checkpoints": {name: {"selector": m["selector"], "rbit": m["rbit"], "training": m["training"],
                               "collection": m["collection"], "corpus": m["corpus"]["name"],
                               "train_seconds": sum(r.get("seconds", 0.0) for r in m["metrics"].values())}
                        for name, m in checkpoints.items()},
        **result,
    }


def write_json(data: dict, path: str | pathlib.Path) -> None:
    pathlib.Path(path).write_text(json.dumps(data, indent=1) + "\n")
