"""Train a selector layer by layer on collected samples, with optax and resumable orbax checkpoints.

Each layer (all of its KV heads together) runs `steps` optimizer steps. Step `s` of layer `l`
draws its batch from `fold_in(fold_in(PRNGKey(seed), l), s)`: `batch_sequences` of the layer's
sequences (0 = all of them) and `batch_keys` key positions (0 = all), shared by those sequences,
with every query of the chosen sequences. So a run interrupted and resumed from its last
checkpoint makes the same steps, and the same weights, as an uninterrupted one. A resume whose
newest checkpoint is corrupt (:meth:`TrainingRun.restore` verifies every array's digest) sets it
aside, says so, and continues from the newest intact one, again to the same weights.

Training stops with a ValueError (layer, step, the loss) the moment a loss or a weight becomes
NaN or inf; the checkpoints written before stay intact.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hata_jax.train.checkpoint import TrainingRun, layer_key
from hata_jax.train.collect import LayerSamples, load_layer, read_manifest
from hata_jax.train.integrity import check_finite
from hata_jax.train.metrics import captured_mass, exact_scores, probs_from_raw

OPTIMIZERS = ("sgd", "adam", "adamw")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (per layer).

    Attributes:
      steps: optimizer steps per layer.
      optimizer: "sgd" (momentum), "adam" (L2 weight decay added to the gradient, as torch's) or "adamw".
      learning_rate, momentum, weight_decay: the optimizer's settings (momentum: sgd only).
      batch_sequences: sequences per step (0 or more than collected = all: full-batch steps).
      batch_keys: key positions per step, shared by the step's sequences (0 or more than seq_len = all).
      seed: parameter init and batch draws.
      save_every: checkpoint every this many steps inside a layer (and at each layer's end).
    """

    steps: int = 300
    optimizer: str = "sgd"
    learning_rate: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-6
    batch_sequences: int = 0
    batch_keys: int = 1024
    seed: int = 0
    save_every: int = 100

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        for name, low in (("steps", 1), ("save_every", 1), ("batch_sequences", 0), ("batch_keys", 0), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"TrainConfig.{name} must be an int >= {low}"
                                 f"{' (0 = all)' if name.startswith('batch') else ''}, got {value!r}")
        for name, low, high, closed in (("learning_rate", 0.0, math.inf, False), ("momentum", 0.0, 1.0, False),
                                        ("weight_decay", 0.0, math.inf, True)):
            value = getattr(self, name)
            ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                  and low <= value < high and (closed or name == "momentum" or value > low))
            if not ok:
                expected = {"learning_rate": "a finite float > 0", "momentum": "a float in [0, 1)",
                            "weight_decay": "a finite float >= 0"}[name]
                raise ValueError(f"TrainConfig.{name} must be {expected}, got {value!r}")

    @classmethod
    def for_selector(cls, selector, **overrides) -> TrainConfig:
        """The selector's defaults (`selector.default_training`), then every override that is not None."""
        values = {**selector.default_training, **{k: v for k, v in overrides.items() if v is not None}}
        return cls(**values)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    decay = optax.add_decayed_weights(config.weight_decay)
    if config.optimizer == "sgd":
        return optax.chain(decay, optax.sgd(config.learning_rate, momentum=config.momentum or None))
    if config.optimizer == "adam":
        return optax.chain(decay, optax.adam(config.learning_rate))
    return optax.adamw(config.learning_rate, weight_decay=config.weight_decay)


def layer_data(selector, samples: LayerSamples) -> dict:
    """Device arrays of one layer: q [N, m, Hq, D], k [N, L, Hkv, D], targets [N, m, Hq, L], valid [N, m, L]."""
    valid = jnp.asarray(samples.valid)
    targets = selector.targets(jnp.asarray(samples.scores), valid[:, :, None, :])
    return {"q": jnp.asarray(samples.q), "k": jnp.asarray(samples.k), "targets": targets, "valid": valid}


def sample_batch(data: dict, key, batch_sequences: int, batch_keys: int) -> dict:
    """A batch: the arrays of :func:`layer_data` restricted to `batch_sequences` drawn sequences and
    `batch_keys` drawn key positions (shared by those sequences); 0, or more than there are, means all."""
    n, length = data["k"].shape[:2]
    seq_key, pos_key = jax.random.split(key)
    seqs = jnp.arange(n)
    if 0 < batch_sequences < n:
        seqs = jax.random.choice(seq_key, n, (batch_sequences,), replace=False)
    keys = jnp.arange(length)
    if 0 < batch_keys < length:
        keys = jnp.sort(jax.random.choice(pos_key, length, (batch_keys,), replace=False))
    return {"q": data["q"][seqs], "k": data["k"][seqs][:, keys], "targets": data["targets"][seqs][..., keys],
            "valid": data["valid"][seqs][..., keys]}


@functools.lru_cache(maxsize=8)
def make_step(selector, config: TrainConfig):
    """A jitted `(params, opt_state, data, layer_key, step) -> (params, opt_state, loss, terms)`;
    `loss` and `terms` are measured before the update. Cached: one compile per (selector, config)."""
    optimizer = make_optimizer(config)

    @jax.jit
    def step(params, opt_state, data, key, index):
        batch = sample_batch(data, jax.random.fold_in(key, index), config.batch_sequences, config.batch_keys)
        (loss, terms), grads = jax.value_and_grad(selector.loss, has_aux=True)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, terms

    return step


@functools.lru_cache(maxsize=8)
def jitted_scores(selector):
    """`jax.jit(selector.scores)`, one per selector (selectors are frozen dataclasses)."""
    return jax.jit(selector.scores)


def samples_mass(samples: LayerSamples, selector=None, params=None, fraction: float = 1 / 16) -> float:
    """Mean share of exact attention mass kept at `fraction` of the context on the samples, by the
    selector with `params`, or by the exact top-k (the upper bound) when `selector` is None."""
    kv_heads, head_dim = samples.k.shape[2], samples.k.shape[3]
    masses = []
    for i in range(samples.q.shape[0]):
        probs = probs_from_raw(jnp.asarray(samples.scores[i]), head_dim, kv_heads)
        if selector is None:
            scores = exact_scores(probs)
        else:
            scores = jitted_scores(selector)(params, jnp.asarray(samples.q[i]), jnp.asarray(samples.k[i]))
        masses.append(captured_mass(probs, scores, jnp.asarray(samples.valid[i]), (fraction,))[0])
    return float(np.mean(masses))


def _floats(terms: dict) -> dict:
    return {k: float(v) for k, v in terms.items()}


def train_layers(selector, samples_dir, layers: list[int], run: TrainingRun, config: TrainConfig, metadata: dict, *,
                 resume: bool = False, progress: bool = True,
                 on_step: Callable[[int, int], None] | None = None,
                 log: Callable[[str], None] = print) -> dict[int, object]:
    """Train `layers` one after another; returns {layer: params}.

    Args:
      selector: :class:`hata_jax.train.hata_objective.HataObjective` or
        :class:`hata_jax.train.hashattention_objective.HashAttentionObjective`.
      samples_dir: a collection of :mod:`hata_jax.train.collect` holding these layers.
      run: the checkpoint manager; the state is saved every `config.save_every` steps and after each layer.
      metadata: the run's description (model, corpus, configs); progress and metrics are added here.
      resume: continue from the run's newest intact checkpoint (its metadata must match `metadata`);
        corrupt newer ones are set aside (:meth:`TrainingRun.set_aside`), with a message to `log`.
      on_step: called as `on_step(layer, steps_done)` after every step (progress, interruption).

    Raises:
      ValueError when a loss or a weight becomes non-finite (naming the layer and the step), or
      when no checkpoint of the run is intact.
    """
    manifest = read_manifest(samples_dir)
    start_point = {"completed": [], "layer": None, "step": 0}
    metadata = json.loads(json.dumps({**metadata, "metrics": {}, "progress": start_point, "complete": False}))
    finished: dict = {}
    current = None
    run.check_start(resume)
    if run.latest_step() is not None:
        saved, finished, current = _resume_point(run, metadata, selector, config, manifest, log)
        metadata["metrics"], metadata["progress"] = saved["metrics"], saved["progress"]
    optimizer = make_optimizer(config)
    step_fn = make_step(selector, config)
    base_key = jax.random.PRNGKey(config.seed)
    for index, layer in enumerate(layers):
        if layer in finished:
            continue
        start = time.perf_counter()
        samples = load_layer(samples_dir, layer)
        _, _, q_heads, head_dim = samples.q.shape
        kv_heads = samples.k.shape[2]
        init_key, batch_key = jax.random.split(jax.random.fold_in(base_key, layer))
        if current is not None and metadata["progress"]["layer"] == layer:
            params, opt_state = current["params"], current["opt_state"]
            done = metadata["progress"]["step"]
            record = metadata["metrics"][layer_key(layer)]
        else:
            params = selector.init(init_key, q_heads, kv_heads, head_dim)
            opt_state = optimizer.init(params)
            done = 0
            record = {"train_mass_1_16_start": samples_mass(samples, selector, params),
                      "train_mass_1_16_exact": samples_mass(samples)}
            metadata["metrics"][layer_key(layer)] = record
        current = None
        data = layer_data(selector, samples)
        bar = _progress_bar(progress, config.steps, done, f"{selector.name} layer {layer} ({index + 1}/{len(layers)})")
        for s in range(done, config.steps):
            params, opt_state, loss, terms = step_fn(params, opt_state, data, batch_key, s)
            terms = {"loss": float(loss), **_floats(terms)}
            _check_finite_step(terms, params, layer, s, config)
            if s == 0:
                record["loss_first_step"] = terms
            record["loss_last_step"] = terms
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v:.4g}" for k, v in terms.items()}, refresh=False)
            if (s + 1) % config.save_every == 0 and s + 1 < config.steps:
                metadata["progress"] = {"completed": sorted(finished), "layer": layer, "step": s + 1}
                run.save(_global_step(index, s + 1, config), _state(finished, params, opt_state), metadata)
            if on_step is not None:
                on_step(layer, s + 1)
        if bar is not None:
            bar.close()
        record["train_mass_1_16_end"] = samples_mass(samples, selector, params)
        record["seconds"] = record.get("seconds", 0.0) + time.perf_counter() - start
        finished[layer] = params
        metadata["progress"] = {"completed": sorted(finished), "layer": None, "step": 0}
        metadata["complete"] = all(i in finished for i in layers)
        run.save(_global_step(index + 1, 0, config), _state(finished), metadata)
    return finished


def _check_finite_step(terms: dict, params, layer: int, step: int, config: TrainConfig) -> None:
    """Stop training when step `step` of `layer` gave a non-finite loss term or weight."""
    where = (f"training diverged in layer {layer} at step {step + 1} of {config.steps} (optimizer {config.optimizer}, "
             f"learning rate {config.learning_rate})")
    bad = {k: v for k, v in terms.items() if not math.isfinite(v)}
    if bad:
        raise ValueError(f"{where}: loss terms {bad}; the checkpoints saved before stay intact, try a lower --lr")
    check_finite(jax.device_get(params), f"{where}: the updated weights are non-finite (try a lower --lr)")


def _resume_point(run: TrainingRun, metadata: dict, selector, config: TrainConfig, manifest: dict, log):
    """(saved metadata, finished, current) of the newest intact checkpoint of `run`; corrupt newer
    steps are set aside, with a message. Raises a ValueError if the command differs from the run's
    or if no step is intact."""
    errors = []
    for step in reversed(run.steps()):
        try:
            saved = run.metadata(step)
            _check_resumable(saved, metadata, run.directory)
            finished, current = _restore(run, step, saved, selector, config, manifest)
        except ValueError as err:
            if "is corrupt" not in str(err):
                raise
            errors.append(str(err))
            aside = run.set_aside(step)
            log(f"{err}; moved it to {aside}")
            continue
        if errors:
            log(f"resuming from checkpoint step {step}, the newest intact one")
        return saved, finished, current
    raise ValueError(f"cannot resume the run in {run.directory}: no checkpoint is intact ({'; '.join(errors)}); "
                     "the corrupt steps were moved aside; start over with another --out")


def _global_step(layer_index: int, step: int, config: TrainConfig) -> int:
    return layer_index * config.steps + step


def _state(finished: dict, params=None, opt_state=None) -> dict:
    state = {"layers": {layer_key(i): p for i, p in finished.items()}}
    if params is not None:
        state["current"] = {"params": params, "opt_state": opt_state}
    return state


def _check_resumable(saved: dict, metadata: dict, directory) -> None:
    for key in ("selector", "model", "layers", "training", "collection", "corpus"):
        if saved.get(key) != metadata.get(key):
            raise ValueError(f"cannot resume the run in {directory}: its {key} differs from this command's "
                             f"(saved {_short(saved.get(key))}, now {_short(metadata.get(key))})")


def _short(value, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _restore(run: TrainingRun, step: int, saved: dict, selector, config: TrainConfig, manifest: dict):
    """(finished {layer: params}, current {"params", "opt_state"} or None) of a saved step."""
    shapes = manifest["shapes"]
    q_heads, kv_heads, head_dim = shapes["q_heads"], shapes["kv_heads"], shapes["head_dim"]
    params_shape = jax.eval_shape(lambda: selector.init(jax.random.PRNGKey(0), q_heads, kv_heads, head_dim))
    abstract = {"layers": {layer_key(i): params_shape for i in saved["progress"]["completed"]}}
    if saved["progress"]["layer"] is not None:
        opt_shape = jax.eval_shape(make_optimizer(config).init, params_shape)
        abstract["current"] = {"params": params_shape, "opt_state": opt_shape}
    state = run.restore(step, abstract)
    finished = {int(name.split("_")[1]): p for name, p in state["layers"].items()}
    return finished, state.get("current")


def _progress_bar(enabled: bool, total: int, initial: int, description: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=description, unit="step", dynamic_ncols=True)
