"""Collect training samples: post-RoPE queries, their keys and raw q.k scores, from prefills.

For each token sequence of a corpus, one dense prefill records every layer's post-RoPE q and k
(`LlamaForCausalLM.prefill(..., capture_qk=True)`). `queries` positions are drawn from
`[seq_len/2, seq_len)` (seeded by the sequence index); for each hashed layer the sample keeps

    q:         float32[queries, Hq, D]   the queries at those positions (every query head)
    k:         float32[seq_len, Hkv, D]  all keys of the sequence (query j attends to keys <= positions[j])
    positions: int32[queries]
    scores:    float32[queries, Hq, seq_len]  raw q.k (no 1/sqrt(D)), -inf after the query's position

in `DIR/layer_<i>/seq_<j>.npz`, one file per (layer, sequence), written as each sequence is
done (memory: one sequence). `DIR/manifest.json` records the configuration, the model, the corpus
and how many sequences are complete, so an interrupted collection resumes where it stopped.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hata_jax.files import write_atomically
from hata_jax.models.identity import check_same_model, model_identity
from hata_jax.train import corpus as corpus_lib

FORMAT = "hata-jax/qk-samples"
VERSION = 1
ARRAYS = ("q", "k", "positions", "scores")


@dataclasses.dataclass(frozen=True)
class CollectConfig:
    """How many samples to collect.

    Attributes:
      seq_len: tokens per sequence (one prefill each).
      sequences: sequences to run.
      queries: query positions per sequence, drawn without replacement from [seq_len/2, seq_len).
      seed: shuffles the corpus files and draws the query positions.
    """

    seq_len: int = 4096
    sequences: int = 8
    queries: int = 32
    seed: int = 0

    def __post_init__(self):
        for name in ("seq_len", "sequences", "queries"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"CollectConfig.{name} must be a positive int, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"CollectConfig.seed must be an int >= 0, got {self.seed!r}")
        if self.seq_len < 2 or self.queries > self.seq_len - self.seq_len // 2:
            raise ValueError(f"CollectConfig: {self.queries} query positions do not fit in "
                             f"[{self.seq_len // 2}, {self.seq_len})")


def query_positions(config: CollectConfig, sequence: int) -> np.ndarray:
    """int32[queries], sorted: the query positions of sequence `sequence`."""
    rng = np.random.default_rng([config.seed, sequence])
    low = config.seq_len // 2
    return np.sort(rng.choice(np.arange(low, config.seq_len), config.queries, replace=False)).astype(np.int32)


def raw_scores(q: jax.Array, k: jax.Array, positions: jax.Array) -> jax.Array:
    """q [..., m, Hq, D], k [..., L, Hkv, D], positions int[..., m] -> q.k float32[..., m, Hq, L], -inf
    at keys after each query's position (query head h uses KV head h // (Hq / Hkv))."""
    *lead, m, hq, d = q.shape
    hkv = k.shape[-2]
    qg = q.reshape(*lead, m, hkv, hq // hkv, d).astype(jnp.float32)
    s = jnp.einsum("...mhgd,...lhd->...mhgl", qg, k.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    s = s.reshape(*lead, m, hq, k.shape[-3])
    causal = jnp.arange(k.shape[-3]) <= positions[..., :, None, None]
    return jnp.where(causal, s, -jnp.inf)


def make_capture(model, layers: list[int]):
    """A jitted `(tokens int32[1, L], positions int32[m]) -> {layer: (q [m, Hq, D], k [L, Hkv, D])}`,
    post-RoPE, float32, for `layers`."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def capture(state, tokens, positions):
        m = nnx.merge(graphdef, state)
        run = nnx.capture(lambda mm, t: mm.prefill(t, jnp.array([t.shape[1]], jnp.int32), capture_qk=True),
                          nnx.Intermediate)
        _, inter = run(m, tokens)
        out = {}
        for i in layers:
            (q, k), = inter["layers"][i]["self_attn"]["qk"]
            out[i] = (q[0, positions].astype(jnp.float32), k[0].astype(jnp.float32))
        return out

    return lambda tokens, positions: capture(state, tokens, positions)


def write_manifest(directory: pathlib.Path, manifest: dict) -> None:
    text = json.dumps(manifest, indent=1).encode()
    write_atomically(pathlib.Path(directory) / "manifest.json", lambda f: f.write(text))


def write_sequence(directory: pathlib.Path, layer: int, index: int, q, k, positions) -> None:
    """Store one (layer, sequence) sample: q [m, Hq, D], k [L, Hkv, D], positions [m]; the raw
    scores are computed here (:func:`raw_scores`)."""
    layer_dir = pathlib.Path(directory) / f"layer_{layer:02d}"
    layer_dir.mkdir(exist_ok=True)
    arrays = {"q": np.asarray(q, np.float32), "k": np.asarray(k, np.float32),
              "positions": np.asarray(positions, np.int32)}
    arrays["scores"] = np.asarray(raw_scores(jnp.asarray(arrays["q"]), jnp.asarray(arrays["k"]),
                                             jnp.asarray(arrays["positions"])))
    write_atomically(layer_dir / f"seq_{index:04d}.npz", lambda f: np.savez(f, **arrays))


def read_manifest(directory: pathlib.Path) -> dict:
    path = pathlib.Path(directory) / "manifest.json"
    if not path.is_file():
        raise ValueError(f"{directory} holds no collected samples (no manifest.json)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is corrupt ({err})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"{path} is not a {FORMAT} v{VERSION} manifest")
    return manifest


def collect(model, model_name: str, tokenizer, corpus: corpus_lib.Corpus, config: CollectConfig,
            layers: list[int], directory: str | pathlib.Path, progress=None) -> dict:
    """Run the prefills and write the samples of `layers` under `directory`; returns the manifest.

    Resumes a collection that stopped early if the directory's manifest has the same config,
    layers, model and corpus; refuses a directory that holds a different collection.
    `progress(done, total)` is called after each sequence.
    """
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    identity = model_identity(model, model_name)
    files_used: list[dict] = []
    sequences = corpus_lib.token_sequences(corpus, tokenizer, config.seq_len, config.sequences, config.seed,
                                           files_used)
    sequences = list(sequences)
    manifest = {
        "format": FORMAT, "version": VERSION, "config": dataclasses.asdict(config), "layers": list(layers),
        "shapes": {"q_heads": model.config.num_heads, "kv_heads": model.config.num_kv_heads,
                   "head_dim": model.config.head_dim},
        "model": identity,
        "corpus": corpus_lib.describe(corpus, files_used, config.seq_len, config.sequences, config.seed),
        "completed": 0,
    }
    if (directory / "manifest.json").exists():
        old = read_manifest(directory)
        check_same_model(old["model"], model, f"the samples in {directory}")
        for key in ("config", "layers", "corpus"):
            if old[key] != manifest[key]:
                raise ValueError(f"{directory} holds a different collection ({key} differs); use another directory")
        manifest["completed"] = old["completed"]
    write_manifest(directory, manifest)
    capture = None
    for index in range(manifest["completed"], config.sequences):
        capture = capture or make_capture(model, layers)
        positions = query_positions(config, index)
        out = capture(jnp.asarray(sequences[index][None]), jnp.asarray(positions))
        for layer in layers:
            write_sequence(directory, layer, index, *out[layer], positions)
        manifest["completed"] = index + 1
        write_manifest(directory, manifest)
        if progress is not None:
            progress(index + 1, config.sequences)
    return manifest


@dataclasses.dataclass
class LayerSamples:
    """One layer's samples, stacked over the N sequences.

    Attributes:
      q: float32[N, m, Hq, D]; k: float32[N, L, Hkv, D]; positions: int32[N, m];
      scores: float32[N, m, Hq, L] raw q.k, -inf after each query's position.
    """

    q: np.ndarray
    k: np.ndarray
    positions: np.ndarray
    scores: np.ndarray

    @property
    def valid(self) -> np.ndarray:
        """bool[N, m, L]: key t is attended by query j (t <= positions[j])."""
        return np.arange(self.k.shape[1]) <= self.positions[..., None]


def load_layer(directory: str | pathlib.Path, layer: int) -> LayerSamples:
    """Read one layer's samples (memory: that layer only), checking completeness and shapes.

    Raises:
      ValueError naming the file when the collection is incomplete or a file is missing, corrupt or
      of the wrong shape.
    """
    directory = pathlib.Path(directory)
    manifest = read_manifest(directory)
    config = CollectConfig(**manifest["config"])
    if layer not in manifest["layers"]:
        raise ValueError(f"{directory} has no samples of layer {layer} (layers {manifest['layers']})")
    if manifest["completed"] != config.sequences:
        raise ValueError(f"the collection in {directory} is incomplete ({manifest['completed']} of "
                         f"{config.sequences} sequences); run the command again to finish it")
    shapes = manifest["shapes"]
    hq, hkv, d = shapes["q_heads"], shapes["kv_heads"], shapes["head_dim"]
    m, seq = config.queries, config.seq_len
    expected = {"q": (m, hq, d), "k": (seq, hkv, d), "positions": (m,), "scores": (m, hq, seq)}
    parts = {name: [] for name in ARRAYS}
    for index in range(config.sequences):
        path = directory / f"layer_{layer:02d}" / f"seq_{index:04d}.npz"
        try:
            with np.load(path) as data:
                arrays = {name: np.asarray(data[name]) for name in ARRAYS}
        except FileNotFoundError:
            raise ValueError(f"sample file {path} is missing; delete {directory} and collect again") from None
        except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError) as err:
            raise ValueError(f"sample file {path} is corrupt ({type(err).__name__}: {err}); delete {directory} "
                             "and collect again") from None
        got = {name: a.shape for name, a in arrays.items()}
        if got != expected:
            raise ValueError(f"sample file {path} has shapes {got}, the manifest implies {expected}")
        for name in ARRAYS:
            parts[name].append(arrays[name])
    return LayerSamples(*(np.stack(parts[name]) for name in ARRAYS))
