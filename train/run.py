"""One training run: collect samples from a corpus, train a selector for every hashed layer, checkpoint.

    from hata_jax.models import load_model
    from hata_jax.train.run import train_model
    model, tokenizer = load_model("smollm2")
    layers = train_model(model, "smollm2", tokenizer, "runs/smollm2")   # HATA, rbit 128, layers 2..29

`OUT/samples/` holds the collection (unless `samples_dir` points elsewhere, e.g. to share one
collection between HATA and HashAttention runs) and `OUT/checkpoints/` the orbax checkpoints.
"""
from __future__ import annotations

import dataclasses
import pathlib
import time

import jax

import hata_jax
from hata_jax.models.identity import model_identity
from hata_jax.train import checkpoint, collect
from hata_jax.train import corpus as corpus_lib
from hata_jax.train.hata_objective import HataObjective
from hata_jax.train.trainer import TrainConfig, train_layers


def selector_bits(selector) -> int:
    return selector.rbit if isinstance(selector, HataObjective) else selector.bits


def train_model(model, model_name: str, tokenizer, out: str | pathlib.Path, *,
                corpus: corpus_lib.Corpus | None = None, selector=None,
                collect_config: collect.CollectConfig = collect.CollectConfig(),
                train_config: TrainConfig | None = None, dense_layers: int = 2,
                samples_dir: str | pathlib.Path | None = None, resume: bool = False, progress: bool = True,
                log=print, on_step=None) -> dict[int, object]:
    """Collect, train and checkpoint; returns {layer: params} of layers `dense_layers..num_layers-1`.

    Args:
      corpus: training text; default the standard library's training split.
      selector: :class:`HataObjective` (default, rbit 128) or
        :class:`hata_jax.train.hashattention_objective.HashAttentionObjective`.
      train_config: default the selector's optimizer with :class:`TrainConfig`'s other defaults.
      resume: continue an interrupted run in `out` (collection and training pick up where they stopped).
      on_step: see :func:`hata_jax.train.trainer.train_layers`.
    """
    out = pathlib.Path(out)
    selector = selector or HataObjective()
    train_config = train_config or TrainConfig.for_selector(selector)
    corpus = corpus or corpus_lib.stdlib_corpus("train")
    num_layers = model.config.num_layers
    if not 0 <= dense_layers < num_layers:
        raise ValueError(f"dense_layers must lie in [0, {num_layers}) for a {num_layers}-layer model, "
                         f"got {dense_layers}")
    layers = list(range(dense_layers, num_layers))
    samples_dir = pathlib.Path(samples_dir) if samples_dir else out / "samples"
    run = checkpoint.TrainingRun(out / "checkpoints")
    try:
        run.check_start(resume)
        start = time.perf_counter()
        log(f"collecting q/k samples: {collect_config.sequences} sequences of {collect_config.seq_len} tokens from "
            f"{corpus.name} ({len(corpus.files)} files), {collect_config.queries} query positions each, "
            f"layers {layers[0]}..{layers[-1]} -> {samples_dir}")
        manifest = collect.collect(model, model_name, tokenizer, corpus, collect_config, layers, samples_dir,
                                   progress=lambda done, total: log(f"  prefill {done}/{total} "
                                                                    f"({time.perf_counter() - start:.0f} s)"))
        collect_seconds = time.perf_counter() - start
        metadata = {
            "format": checkpoint.FORMAT, "version": checkpoint.VERSION,
            "selector": {"name": selector.name, "config": dataclasses.asdict(selector)},
            "model": model_identity(model, model_name),
            "layers": layers, "dense_layers": dense_layers, "rbit": selector_bits(selector),
            "training": dataclasses.asdict(train_config), "collection": manifest["config"],
            "corpus": manifest["corpus"],
            "versions": {"hata_jax": hata_jax.__version__, "jax": jax.__version__, "backend": jax.default_backend()},
        }
        log(f"training {selector.name} ({train_config.steps} {train_config.optimizer} steps per layer, "
            f"lr {train_config.learning_rate}) -> {run.directory}")
        start = time.perf_counter()
        trained = train_layers(selector, samples_dir, layers, run, train_config, metadata, resume=resume,
                               progress=progress, on_step=on_step, log=log)
        log(f"collection {collect_seconds:.0f} s, training {time.perf_counter() - start:.0f} s "
            f"(this session); checkpoint {run.directory}")
        return trained
    finally:
        run.close()
