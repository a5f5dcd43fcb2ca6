"""Orbax checkpoints of trained selectors: a resumable training run, and loading for use.

A training run keeps an orbax `CheckpointManager` in `OUT/checkpoints/`; each step directory holds
two items:

    state     {"layers": {"layer_<i>": params, ...},                 the finished layers
               "current": {"params": ..., "opt_state": ...}}         the layer in training (absent
                                                                     between layers and at the end)
    metadata  JSON: format, selector (name and config), model (architecture and weight
              fingerprint), layers, dense_layers, rbit, training and collection configs, corpus,
              per-layer metrics, progress ({"completed", "layer", "step"}), complete, and
              digests: {array name: sha256} of every array of `state` (:mod:`train.integrity`).

For HATA a finished layer's params are its projection float32[Hkv, D, rbit]. :func:`load_trained`
reads a finished run (the run directory, its `checkpoints/` manager directory, or one step
directory, such as the shipped weights) and checks it against the model it will serve.

What a checkpoint proves: saving refuses non-finite arrays and records every array's digest;
loading (for use or to resume) recomputes the digests and refuses a mismatch or a non-finite
array, naming the checkpoint and the array, in one line (orbax's own logging is kept out of the
terminal). Version 1 checkpoints (before digests) still load, finite-checked, with a warning.
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import pathlib
import shutil
import sys
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp

from hata_jax.models.identity import check_same_model
from hata_jax.train.integrity import check_finite, tree_digests, verify_digests

FORMAT = "hata-jax/selector-checkpoint"
VERSION = 2  # 2: metadata["digests"]; 1 (no digests) is still read
READABLE_VERSIONS = (1, 2)
ITEMS = ("state", "metadata")
# Loggers orbax and tensorstore write through: silenced around orbax calls, whose failures we
# report ourselves in one line (:func:`orbax_error`).
ORBAX_LOGGERS = ("absl", "orbax", "asyncio", "jax._src.distributed")


@contextlib.contextmanager
def quiet_orbax():
    """Keep orbax's warnings and asyncio tracebacks out of the terminal for the duration; when the
    orbax call fails, also the "coroutine was never awaited" reports of the reads it abandoned."""
    saved = {name: logging.getLogger(name).level for name in ORBAX_LOGGERS}
    try:
        for name in ORBAX_LOGGERS:
            logging.getLogger(name).setLevel(logging.CRITICAL)
        yield
    except BaseException:
        hook, sys.unraisablehook = sys.unraisablehook, lambda unraisable: None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                gc.collect()
        finally:
            sys.unraisablehook = hook
        raise
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def orbax_error(err: BaseException, limit: int = 200) -> str:
    """`Type: first line of the message` (orbax's errors carry whole TensorStore specs)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text[:limit]}" + ("..." if len(text) > limit else "")


def check_state(state: dict, metadata: dict, what: str) -> None:
    """Verify a restored state against `metadata["digests"]` (when recorded) and refuse non-finite
    arrays; raises a ValueError naming `what` and the array."""
    if "digests" in metadata:
        verify_digests(state, metadata["digests"], what)
    else:
        warnings.warn(f"{what} predates content digests (format v1): its arrays are checked for NaN and inf only",
                      stacklevel=3)
    check_finite(state, f"{what} is corrupt")


def layer_key(layer: int) -> str:
    return f"layer_{layer:02d}"


class TrainingRun:
    """The CheckpointManager of one training run, in `directory` (created if missing)."""

    def __init__(self, directory: str | pathlib.Path, max_to_keep: int = 2):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=False,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def check_start(self, resume: bool) -> None:
        """Refuse to start over a run that already has checkpoints unless resuming it."""
        if self.latest_step() is not None and not resume:
            raise ValueError(f"{self.directory} already holds a training run; pass --resume to continue it "
                             "or choose another --out")

    def steps(self) -> list[int]:
        """The saved steps, oldest first."""
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: dict, metadata: dict) -> None:
        """Save `state` with `metadata` plus the digests of its arrays as step `step`.

        Raises a ValueError naming the array, and writes nothing, if an array holds NaN or inf.
        """
        state = jax.device_get(state)
        check_finite(state, f"refusing to save checkpoint step {step} in {self.directory}")
        metadata = {**metadata, "version": VERSION, "digests": tree_digests(state)}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), metadata=ocp.args.JsonSave(metadata))
        with quiet_orbax():
            self.manager.save(step, args=args, force=True)

    def metadata(self, step: int) -> dict:
        try:
            with quiet_orbax():
                return self.manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore())).metadata
        except Exception as err:  # orbax raises many types for unreadable files
            raise ValueError(f"checkpoint step {step} in {self.directory} is corrupt: metadata unreadable "
                             f"({orbax_error(err)})") from None

    def restore(self, step: int, abstract_state: dict) -> dict:
        """The state of `step`, restored into the structure of `abstract_state` (ShapeDtypeStructs)
        on this process's first device, whatever devices saved it, and verified against the
        digests of its metadata (:func:`check_state`). Raises a one-line ValueError if corrupt."""
        metadata = self.metadata(step)
        try:
            args = ocp.args.Composite(state=ocp.args.StandardRestore(on_local_device(abstract_state)))
            with quiet_orbax():
                state = self.manager.restore(step, args=args).state
        except Exception as err:
            raise ValueError(f"checkpoint step {step} in {self.directory} is corrupt: state unreadable "
                             f"({orbax_error(err)})") from None
        check_state(state, metadata, f"checkpoint step {step} in {self.directory}")
        return state

    def set_aside(self, step: int) -> pathlib.Path:
        """Move step `step` out of the manager's directory (to `<directory>.corrupt/<step>`, kept for
        inspection) so that the run continues from an older step; returns where it went."""
        target = self.directory.with_name(self.directory.name + ".corrupt") / str(step)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        (self.directory / str(step)).rename(target)
        self.manager.reload()
        return target

    def close(self) -> None:
        self.manager.close()


def find_step_dir(path: str | pathlib.Path) -> pathlib.Path:
    """The newest checkpoint step directory of a run directory, a manager directory or a step directory."""
    path = pathlib.Path(path).expanduser().absolute()  # orbax wants absolute paths
    if not path.exists():
        raise ValueError(f"hash weights {path}: no such file or directory")
    if not path.is_dir():
        raise ValueError(f"hash weights {path} is a file, but neither an .npz of projections nor a checkpoint "
                         "(expected a `hata-jax train --out` directory, its checkpoints/ directory, one checkpoint "
                         "step directory, or an .npz)")
    if (path / "metadata").is_dir():
        return path
    manager_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = sorted((int(p.name), p) for p in manager_dir.iterdir() if p.is_dir() and p.name.isdigit())
    if not steps:
        raise ValueError(f"no hata-jax checkpoint in {path} (expected a `hata-jax train --out` directory, its "
                         "checkpoints/ directory, or one checkpoint step directory)")
    return steps[-1][1]


def read_metadata(step_dir: pathlib.Path) -> dict:
    """The metadata of one checkpoint step directory."""
    metadata_file = pathlib.Path(step_dir) / "metadata" / "metadata"
    try:
        metadata = json.loads(metadata_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"checkpoint {step_dir} is corrupt or incomplete: cannot read {metadata_file} "
                         f"({type(err).__name__}: {err})") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ValueError(f"{step_dir} is not a {FORMAT} checkpoint")
    if metadata.get("version") not in READABLE_VERSIONS:
        raise ValueError(f"{step_dir} is a {FORMAT} checkpoint of version {metadata.get('version')!r}; this hata-jax "
                         f"reads versions {READABLE_VERSIONS}")
    return metadata


def on_local_device(tree):
    """ShapeDtypeStructs of `tree`'s leaves (arrays or array metadata) on this process's first
    device: orbax otherwise restores the saved sharding and refuses another machine's topology."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)


def read_state(step_dir: pathlib.Path, metadata: dict | None = None) -> dict:
    """The state item of one checkpoint step directory (arrays as numpy), verified against the
    digests of its metadata (`metadata`, read from `step_dir` when None): see :func:`check_state`.

    The arrays are restored onto this process's first device whatever devices saved them (the
    shipped weights were saved on a CPU; orbax refuses to restore their saved sharding on a GPU).
    """
    metadata = read_metadata(step_dir) if metadata is None else metadata
    state_dir = pathlib.Path(step_dir).resolve() / "state"
    try:
        with quiet_orbax(), ocp.StandardCheckpointer() as checkpointer:
            saved = checkpointer.metadata(state_dir)
            saved = getattr(saved, "item_metadata", saved)  # StepMetadata in newer orbax
            saved = getattr(saved, "tree", saved)
            state = checkpointer.restore(state_dir, on_local_device(saved))
    except Exception as err:  # orbax raises many types for unreadable files
        raise ValueError(f"checkpoint {step_dir} is corrupt or incomplete: cannot read its state "
                         f"({orbax_error(err)})") from None
    state = jax.tree.map(np.asarray, state)
    check_state(state, metadata, f"checkpoint {step_dir}")
    return state


def load_trained(path: str | pathlib.Path, model, selector: str) -> tuple[dict[int, object], dict]:
    """({layer: params}, metadata) of a finished training run, checked against `model`.

    Raises:
      ValueError (with the reason) if the path holds no checkpoint, a corrupt or unfinished one,
      one of another selector, or one made for another model.
    """
    step_dir = find_step_dir(path)
    metadata = read_metadata(step_dir)
    if metadata["selector"]["name"] != selector:
        raise ValueError(f"{path} holds {metadata['selector']['name']} weights, not {selector}")
    if not metadata.get("complete"):
        progress = metadata.get("progress", {})
        raise ValueError(f"the training in {path} did not finish (stopped in layer {progress.get('layer')} at step "
                         f"{progress.get('step')}); finish it with `hata-jax train ... --resume`")
    check_same_model(metadata["model"], model, f"the checkpoint {step_dir}")
    layers = read_state(step_dir, metadata).get("layers", {})
    missing = [i for i in metadata["layers"] if layer_key(i) not in layers]
    if missing:
        raise ValueError(f"checkpoint {step_dir} is corrupt: layers {missing} are missing from its state")
    return {i: layers[layer_key(i)] for i in metadata["layers"]}, metadata


def load_projections(path: str | pathlib.Path, model, rbit: int | None = None) -> dict[int, np.ndarray]:
    """HATA projections {layer: float32[Hkv, D, rbit]} of a finished run, checked against `model`
    (and against `rbit` when given)."""
    layers, metadata = load_trained(path, model, "hata")
    if rbit is not None and metadata["rbit"] != rbit:
        raise ValueError(f"{path} holds rbit {metadata['rbit']} projections, but rbit {rbit} was asked for")
    config = model.config
    expected = (config.num_kv_heads, config.head_dim, metadata["rbit"])
    for layer, w in layers.items():
        if w.shape != expected:
            raise ValueError(f"{path}: layer {layer} has shape {w.shape}, expected {expected}; "
                             "the checkpoint is corrupt")
    return {layer: np.asarray(w, np.float32) for layer, w in layers.items()}
