"""Orbax checkpoints of trained selectors: a resumable training run, and loading for use.

A training run keeps an orbax `CheckpointManager` in `OUT/checkpoints/`; each step directory holds
two items:

    state     {"layers": {"layer_<i>": params, ...},                 the finished layers
               "current": {"params": ..., "opt_state": ...}}         the layer in training (absent
                                                                     between layers and at the end)
    metadata  JSON: format, selector (name and config), model (architecture and weight
              fingerprint), layers, dense_layers, rbit, training and collection configs, corpus,
              per-layer metrics, progress ({"completed", "layer", "step"}), complete.

For HATA a finished layer's params are its projection float32[Hkv, D, rbit]. :func:`load_trained`
reads a finished run (the run directory, its `checkpoints/` manager directory, or one step
directory, such as the shipped weights) and checks it against the model it will serve.
"""
from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp

from hata_jax.models.identity import check_same_model

FORMAT = "hata-jax/selector-checkpoint"
VERSION = 1
ITEMS = ("state", "metadata")


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

    def save(self, step: int, state: dict, metadata: dict) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), metadata=ocp.args.JsonSave(metadata))
        self.manager.save(step, args=args, force=True)

    def metadata(self, step: int) -> dict:
        try:
            return self.manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore())).metadata
        except Exception as err:  # orbax raises many types for unreadable files
            raise ValueError(f"checkpoint step {step} in {self.directory} is corrupt: metadata unreadable "
                             f"({type(err).__name__}: {err})") from None

    def restore(self, step: int, abstract_state: dict) -> dict:
        """The state of `step`, restored into the structure of `abstract_state` (ShapeDtypeStructs)
        on this process's first device, whatever devices saved it."""
        try:
            args = ocp.args.Composite(state=ocp.args.StandardRestore(on_local_device(abstract_state)))
            return self.manager.restore(step, args=args).state
        except Exception as err:
            raise ValueError(f"checkpoint step {step} in {self.directory} is corrupt: state unreadable "
                             f"({type(err).__name__}: {err})") from None

    def close(self) -> None:
        self.manager.close()


def find_step_dir(path: str | pathlib.Path) -> pathlib.Path:
    """The newest checkpoint step directory of a run directory, a manager directory or a step directory."""
    path = pathlib.Path(path).expanduser().absolute()  # orbax wants absolute paths
    if not path.exists():
        raise ValueError(f"hash weights {path}: no such file or directory")
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
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT or metadata.get("version") != VERSION:
        raise ValueError(f"{step_dir} is not a {FORMAT} v{VERSION} checkpoint")
    return metadata


def on_local_device(tree):
    """ShapeDtypeStructs of `tree`'s leaves (arrays or array metadata) on this process's first
    device: orbax otherwise restores the saved sharding and refuses another machine's topology."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)


def read_state(step_dir: pathlib.Path) -> dict:
    """The state item of one checkpoint step directory (arrays as numpy).

    The arrays are restored onto this process's first device whatever devices saved them (the
    shipped weights were saved on a CPU; orbax refuses to restore their saved sharding on a GPU).
    """
    state_dir = pathlib.Path(step_dir).resolve() / "state"
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            saved = checkpointer.metadata(state_dir)
            saved = getattr(saved, "item_metadata", saved)  # StepMetadata in newer orbax
            saved = getattr(saved, "tree", saved)
            state = checkpointer.restore(state_dir, on_local_device(saved))
    except Exception as err:  # orbax raises many types for unreadable files
        raise ValueError(f"checkpoint {step_dir} is corrupt or incomplete: cannot read its state "
                         f"({type(err).__name__}: {str(err)[:300]})") from None
    return jax.tree.map(np.asarray, state)


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
    layers = read_state(step_dir).get("layers", {})
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
