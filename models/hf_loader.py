"""Load a HF checkpoint directory: `config.json` + `*.safetensors` (single file or sharded), no torch."""
from __future__ import annotations

import json
import pathlib

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so safetensors can read bf16 tensors)
import numpy as np

from hata_jax.models.config import LlamaConfig

INDEX = "model.safetensors.index.json"


def read_config(directory: pathlib.Path) -> LlamaConfig:
    path = directory / "config.json"
    if not path.is_file():
        raise ValueError(f"{directory} is not a HF checkpoint directory: config.json is missing")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    return LlamaConfig.from_hf(raw)


def safetensors_files(directory: pathlib.Path) -> list[pathlib.Path]:
    """The checkpoint's shard files; with an index, every shard it names must exist."""
    index = directory / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        shards = sorted(set(weight_map.values()))
        absent = [s for s in shards if not (directory / s).is_file()]
        if absent:
            raise ValueError(f"partial checkpoint in {directory}: {INDEX} names {len(shards)} shards but "
                             f"{absent} are missing")
        return [directory / s for s in shards]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt*"))
        hint = f" (found {others}: torch pickles are not supported, convert them to safetensors)" if others else ""
        raise ValueError(f"no *.safetensors weights in {directory}{hint}")
    return files


def read_tensors(files: list[pathlib.Path]) -> dict[str, np.ndarray]:
    """{name: array} from safetensors files (bf16 stays bf16 via ml_dtypes)."""
    from safetensors import SafetensorError, safe_open

    tensors: dict[str, np.ndarray] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="np") as handle:
                for name in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                    if name in tensors:
                        raise ValueError(f"tensor {name} appears in more than one shard ({file.name})")
                    tensors[name] = handle.get_tensor(name)
        except (OSError, SafetensorError) as err:
            raise ValueError(f"cannot read {file}: {err}") from None
    return tensors


def load_hf_checkpoint(directory: str | pathlib.Path) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    """(config, {HF tensor name: numpy array}) of a HF checkpoint directory."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise ValueError(f"checkpoint directory {directory} does not exist")
    config = read_config(directory)
    return config, read_tensors(safetensors_files(directory))
