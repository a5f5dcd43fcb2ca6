"""Jit-compiled generation: a prefill step and a decode step (cache donated), sampling, stop tokens.

    generate(model, prompts, plan=...)          prefill, then decode with one plan
    prefilled = prefill_prompts(model, prompts, capacity=...)
    generate_from(prefilled, plan, params)      decode from a shared prefill, for any plan/budget

Prompts of different lengths are right-padded into one batch (see :mod:`hata_jax.models.llama`). The
static shapes are the batch size, the padded prompt length (rounded up to a multiple of
`PROMPT_BUCKET`) and the cache capacity (rounded up to a multiple of `CAPACITY_BUCKET`), so the
decode step compiles once per (batch, capacity, plan, sampling) and every later token reuses it.
:data:`TRACES` counts the traces of each step (tests use it to show that there is no recompile).

`tokens_per_dispatch` n > 1 runs n decode steps per host dispatch, in one jitted `lax.scan` of the
same step (a fixed trip count: no data-dependent exit, which a GPU would sync to the host at every
iteration); rows that stop inside a chunk keep decoding and the host drops their tokens. It saves
the host's dispatch of the steps, which matters where a step's device time is short.

A prefill is plan-independent: every layer's HataCache gets the prompt's keys, values, codes and
norms, plus the logits of each prompt's next token. :func:`generate_from` never changes it: its
start step (jitted once per plan and shape, caches not donated) copies the caches, re-encodes the
"hata" layers' codes when it is given their projections, builds the "sparse" layers' selector
states from the cached keys (:func:`hata_jax.models.selector_cache.with_selector_states`) and samples the
first token; the decode steps then donate those copies.

Short-context policy: with a plan that has selecting ("hata" or "sparse") layers, a step whose
sequences all hold at most `dense_below` tokens (the step's new token included; 0 disables)
runs dense attention in every layer. At such lengths dense attention reads few bytes and
hashing, scoring and selection would cost more than they save (and select a large share of the
context anyway). The default threshold is where one layer's K and V of the whole batch reach
`DENSE_BELOW_KV_BYTES` (at least the budget): a selecting step's overhead is roughly fixed per
layer, dense attention's time grows with those bytes (:func:`short_context_threshold`). The
choice is made on the host from the prompt lengths and the step count, between two compiled
decode steps (the plan and :meth:`AttentionPlan.as_dense`), each compiled once per shape: no
device-to-host read and no device-side branch. Dense layers keep appending codes and key norms
to every layer's cache (and the selector's metadata to a "sparse" layer's state), so the
selecting steps after the switch select from exactly the cache they would have had without it.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import hata_jax
from hata_jax import HataCache, HataConfig
from hata_jax import sharding as head_sharding
from hata_jax.models.hash_projections import hash_weights_for
from hata_jax.models.llama import LlamaForCausalLM, check_prefill_chunk, init_caches
from hata_jax.models.plan import AttentionPlan
from hata_jax.models.selector_cache import with_selector_states

PROMPT_BUCKET = 32
CAPACITY_BUCKET = 128
# One layer's K + V bytes over the whole batch below which the all-dense step is the faster one.
# Measured crossovers of the whole decode step (BENCHMARKS.md, end-to-end run 5, H100, budget
# 2048): Llama-3.1-8B shapes (8 KV heads, D 128, bf16; 64 KiB per token and sequence) between 32K
# and 64K tokens at batch 1 and between 8K and 32K at batches 4 and 8; SmolLM2-135M shapes (3 KV
# heads, D 64; 24 KiB) between 128K and 256K at batch 1 and between 8K and 32K at batches 8 and
# 16. 160 MiB gives 40K, 10K, 5K and 213K, 27K, 13K tokens for those: the measured side of the
# crossover in each config but two near-ties (Llama 4K at batch 16 runs HATA at 0.82x of cuDNN's
# step, SmolLM2 32K at batch 4 dense at 0.96x of HATA's).
DENSE_BELOW_KV_BYTES = 160 * 2**20
# step name -> number of times it was traced (compiled).
TRACES: collections.Counter = collections.Counter()


@dataclasses.dataclass(frozen=True)
class Sampling:
    """`temperature` 0 is greedy (argmax); otherwise sample from softmax(logits / temperature)
    restricted to the smallest set of tokens whose probability reaches `top_p` (nucleus)."""

    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite float >= 0 (0 = greedy), got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p!r}")


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """logits: float32[B, V] -> int32[B] next tokens."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_p < 1:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        keep = jnp.cumsum(probs, axis=-1) - probs < sampling.top_p  # the most likely token always stays
        cutoff = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.lru_cache(maxsize=32)
def _step_functions(graphdef: nnx.GraphDef, state_treedef):
    """(merge, prefill, decode, decode_chunk) for models of this structure; see :class:`ModelSteps`.

    Cached on the structure, so equal models (and a second :func:`generate` on the same model)
    share the jitted steps and their compilations; the key is hashed once per :class:`ModelSteps`.
    """

    def merge(state_leaves) -> LlamaForCausalLM:
        return nnx.merge(graphdef, jax.tree_util.tree_unflatten(state_treedef, state_leaves))

    @functools.partial(jax.jit, static_argnames=("impl", "mesh", "mesh_axis", "mesh_split", "chunk"),
                       donate_argnames=("caches",))
    def prefill(state_leaves, tokens, lengths, caches, hash_weights, *, impl: str, mesh=None, mesh_axis="model",
                mesh_split="heads", chunk=None):
        """Prompts int[B, T] (right-padded to `lengths`) -> (next-token logits float32[B, vocab], caches);
        `chunk`: prompt tokens at a time (:meth:`LlamaForCausalLM.prefill_chunked`), None: at once."""
        TRACES["prefill"] += 1
        model = merge(state_leaves)
        if chunk is not None:
            last, caches = model.prefill_chunked(tokens, lengths, caches, hash_weights, chunk=chunk, mesh=mesh,
                                                 mesh_axis=mesh_axis, impl=impl)
            return model.logits(last), caches
        hidden, caches = model.prefill(tokens, lengths, caches, hash_weights, impl, mesh=mesh, mesh_axis=mesh_axis,
                                       mesh_split=mesh_split)
        return model.logits(hidden[jnp.arange(tokens.shape[0]), lengths - 1]), caches

    def step(state_leaves, tokens, caches, hash_weights, key, selector_params, plan, sampling):
        logits, caches = merge(state_leaves).decode(tokens, caches, hash_weights, plan, selector_params)
        key, sub = jax.random.split(key)
        return sample(logits, sub, sampling), caches, key

    @functools.partial(jax.jit, static_argnames=("plan", "sampling"), donate_argnames=("caches",))
    def decode(state_leaves, tokens, caches, hash_weights, key, selector_params=None, *, plan: AttentionPlan,
               sampling: Sampling):
        """One token per sequence: tokens int32[B] -> (next tokens int32[B], caches, key)."""
        TRACES["decode"] += 1
        return step(state_leaves, tokens, caches, hash_weights, key, selector_params, plan, sampling)

    @functools.partial(jax.jit, static_argnames=("plan", "sampling", "steps"), donate_argnames=("caches",))
    def decode_chunk(state_leaves, tokens, caches, hash_weights, key, selector_params=None, *, plan: AttentionPlan,
                     sampling: Sampling, steps: int):
        """`steps` decode steps in one dispatch (a `lax.scan` of :func:`decode`'s step, the key split
        the same way per step): tokens int32[B] -> (next tokens int32[steps, B], caches, key)."""
        TRACES["decode_chunk"] += 1

        def body(carry, _):
            tokens, caches, key = carry
            carry = step(state_leaves, tokens, caches, hash_weights, key, selector_params, plan, sampling)
            return carry, carry[0]

        (_, caches, key), tokens = jax.lax.scan(body, (tokens, caches, key), length=steps)
        return tokens, caches, key

    return merge, prefill, decode, decode_chunk


class ModelSteps:
    """A model's jitted prefill and decode steps, which take its weights as a flat list of arrays.

    Passing the model as a static GraphDef plus an nnx.State costs milliseconds of host time per
    call (hashing the GraphDef, flattening the State), as much as a whole decode step's device time
    on a GPU; here both happen once, when the object is built.

    Attributes:
      state_leaves: the model's nnx.State flattened (`jax.tree_util.tree_flatten`): arrays.
      merge: `merge(state_leaves) -> model`, for use inside traced code (hashable, the same
        function for equal models: it can be a static argument).
      prefill: `prefill(state_leaves, tokens int[B, T], lengths int32[B], caches, hash_weights,
        *, impl, mesh=None, mesh_axis="model", mesh_split="heads", chunk=None) -> (next-token logits
        float32[B, vocab], caches)`; prompts right-padded to `lengths`; `caches` donated (split over the
        mesh axis if any); `chunk` tokens at a time into caches split by positions, None: at once.
      decode: `decode(state_leaves, tokens int32[B], caches, hash_weights, key, selector_params=None,
        *, plan, sampling) -> (next tokens int32[B], caches, key)`, one token per sequence;
        `caches` donated; `selector_params` as :meth:`LlamaForCausalLM.decode` takes them.
      decode_chunk: `decode_chunk(state_leaves, tokens int32[B], caches, hash_weights, key,
        selector_params=None, *, plan, sampling, steps) -> (next tokens int32[steps, B], caches, key)`:
        `steps` (static) of `decode`'s steps in one jitted `lax.scan`, each feeding its tokens to the
        next, with the same tokens and keys as `steps` calls of `decode`; `caches` donated.
    """

    def __init__(self, model: LlamaForCausalLM):
        graphdef, state = nnx.split(model)
        self.state_leaves, state_treedef = jax.tree_util.tree_flatten(state)
        self.merge, self.prefill, self.decode, self.decode_chunk = _step_functions(graphdef, state_treedef)


@dataclasses.dataclass
class GenerationResult:
    """Generated token ids per prompt (stop token excluded) and timings.

    `prefill_seconds` and `first_step_seconds` include compilation on a first call;
    `prefill_seconds` is the prefill's time plus the start step's of :func:`generate_from` (cache
    copies, selector states, first token); `first_step_seconds` sums the first dispatch of each
    decode step function used (the dense one of the short-context policy, then the plan's; one of
    `tokens_per_dispatch` steps and one of a single step each); `decode_seconds` covers the other
    dispatches, which ran `decode_steps` steps. `dense_steps` counts the steps the short-context
    policy ran dense in every layer (see the module docstring).
    """

    tokens: list[list[int]]
    prompt_lengths: list[int]
    prefill_seconds: float
    first_step_seconds: float
    decode_seconds: float
    decode_steps: int
    dense_steps: int = 0

    @property
    def tokens_per_second(self) -> float:
        """Decode throughput over the steps after the first (batch rows counted), 0 if none ran."""
        batch = len(self.tokens)
        return batch * self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else 0.0


@dataclasses.dataclass(frozen=True, eq=False)
class Prefilled:
    """Prompts run through a model once (:func:`prefill_prompts`), to decode from with any plan
    and budget (:func:`generate_from`, which never changes it).

    Attributes:
      steps: the model's jitted steps.
      caches: one HataCache per layer: k, v [B, Hkv, capacity, D], codes of `hash_weights`, norms.
      hash_weights: one float32[Hkv, D, rbit] per layer, the projections of the caches' codes.
      logits: float32[B, vocab], the next-token logits after each prompt.
      prompt_lengths: tokens per prompt.
      seconds: wall time of the prefill (compilation included on a first call).
    """

    steps: ModelSteps
    caches: list[HataCache]
    hash_weights: list[jax.Array]
    logits: jax.Array
    prompt_lengths: list[int]
    seconds: float

    @property
    def capacity(self) -> int:
        return self.caches[0].capacity


class TokenRecorder:
    """The tokens each row generated: a row stops after one of `stop_ids` (not kept) or at
    `max_new_tokens`; `on_tokens` sees each step's new token per row (None for a finished row)."""

    def __init__(self, rows: int, max_new_tokens: int, stop_ids: Sequence[int] = (),
                 on_tokens: Callable[[list[int | None]], None] | None = None):
        self.outputs: list[list[int]] = [[] for _ in range(rows)]
        self.done = np.zeros(rows, bool)
        self.max_new_tokens = max_new_tokens
        self.stops = set(int(s) for s in stop_ids)
        self.on_tokens = on_tokens

    @property
    def finished(self) -> bool:
        return bool(self.done.all())

    def record(self, new) -> None:
        """new: int[rows], one step's tokens, or int[steps, rows], consecutive steps' tokens; the
        steps after every row has finished are ignored (`on_tokens` does not see them)."""
        for step in np.asarray(new).reshape(-1, len(self.outputs)).tolist():
            if self.finished:
                return
            shown: list[int | None] = []
            for row, token in enumerate(step):
                if self.done[row] or token in self.stops:
                    self.done[row] = True
                    shown.append(None)
                    continue
                self.outputs[row].append(token)
                shown.append(token)
                self.done[row] = len(self.outputs[row]) >= self.max_new_tokens
            if self.on_tokens is not None:
                self.on_tokens(shown)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def kv_token_bytes(batch: int, kv_heads: int, head_dim: int, dtype) -> int:
    """One layer's K + V bytes per token position over a batch of `batch` sequences."""
    return 2 * batch * kv_heads * head_dim * jnp.dtype(dtype).itemsize


def default_dense_below(budget: int, token_bytes: int) -> int:
    """The default short-context threshold in tokens: where one layer's K + V over the batch
    (`token_bytes` per token, :func:`kv_token_bytes`) reach DENSE_BELOW_KV_BYTES, at least `budget`."""
    if isinstance(token_bytes, bool) or not isinstance(token_bytes, int) or token_bytes <= 0:
        raise ValueError(f"token_bytes must be a positive int, got {token_bytes!r}")
    return max(budget, DENSE_BELOW_KV_BYTES // token_bytes)


def short_context_threshold(plan: AttentionPlan, dense_below: int | None, token_bytes: int) -> int:
    """Tokens per sequence up to which a step runs dense in every layer (0: never).

    `dense_below` None means :func:`default_dense_below` for `token_bytes`, one layer's K + V
    bytes per token over the batch (:func:`kv_token_bytes`); a plan without selecting ("hata" or
    "sparse") layers has nothing to switch, so 0.
    """
    if dense_below is not None and (isinstance(dense_below, bool) or not isinstance(dense_below, int)
                                    or dense_below < 0):
        raise ValueError(f"dense_below must be an int >= 0 (0 disables the short-context policy), got {dense_below!r}")
    if not plan.selecting_layers:
        return 0
    return default_dense_below(plan.hata.budget, token_bytes) if dense_below is None else dense_below


def check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> list[int]:
    """The prompt lengths, after checking that every prompt has tokens in the vocabulary."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and every prompt must have tokens")
    bad = [int(t) for p in prompts for t in p if not 0 <= int(t) < vocab_size]
    if bad:
        raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    return [len(p) for p in prompts]


def check_tokens_per_dispatch(tokens_per_dispatch: int) -> None:
    if (isinstance(tokens_per_dispatch, bool) or not isinstance(tokens_per_dispatch, int)
            or tokens_per_dispatch < 1):
        raise ValueError(f"tokens_per_dispatch must be a positive int, got {tokens_per_dispatch!r}")


def dispatch_sizes(steps: int, dense: int, tokens_per_dispatch: int) -> list[tuple[int, bool]]:
    """(decode steps, whether they run dense) per dispatch, in order, for `steps` decode steps of
    which the first `dense` run dense (short-context policy): each part in dispatches of
    `tokens_per_dispatch` steps, its remainder in single steps, so that a dispatch never crosses
    the switch and at most two sizes compile per step function."""
    sizes: list[tuple[int, bool]] = []
    for count, short in ((dense, True), (steps - dense, False)):
        full, rest = divmod(count, tokens_per_dispatch)
        sizes += [(tokens_per_dispatch, short)] * full + [(1, short)] * rest
    return sizes


def check_room(lengths: list[int], max_new_tokens: int, capacity: int) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if max(lengths) > capacity:
        raise ValueError(f"the prompt has {max(lengths)} tokens but the cache capacity is {capacity}")
    if max(lengths) + max_new_tokens > capacity:
        raise ValueError(f"the cache capacity {capacity} cannot hold the prompt ({max(lengths)} tokens) plus "
                         f"max_new_tokens={max_new_tokens}; raise capacity or lower max_new_tokens")


def memory_bytes(device=None) -> int | None:
    """The memory a device can allocate: its `bytes_limit` (accelerators), else the host's RAM."""
    device = device or jax.local_devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_cache_fits(config, batch: int, capacity: int, rbit: int, dtype, mesh=None) -> None:
    """Refuse, before allocating anything, caches that cannot fit in the device's memory: every
    layer's k and v [batch, Hkv, capacity, D] in `dtype`, codes and key norms (split over `mesh`)."""
    per_token = config.num_kv_heads * (2 * config.head_dim * jnp.dtype(dtype).itemsize + rbit // 8 + 4)
    needed = config.num_layers * batch * capacity * per_token // (mesh.devices.size if mesh is not None else 1)
    available = memory_bytes()
    if available is not None and needed > available:
        raise ValueError(f"a KV cache of {capacity} tokens per sequence (prompt + max_new_tokens, rounded up to "
                         f"{CAPACITY_BUCKET}) for {batch} sequences needs {needed / 2**30:.1f} GiB over "
                         f"{config.num_layers} layers, more than the {available / 2**30:.1f} GiB of "
                         f"{jax.local_devices()[0]}; lower max_new_tokens (or the prompt, or the batch)")


def _projection_rbit(hash_weights) -> int:
    """The rbit of projections given as :func:`hash_weights_for` takes them (default HataConfig's)."""
    if hash_weights is None:
        return HataConfig().rbit
    first = next(iter(hash_weights.values())) if isinstance(hash_weights, Mapping) else hash_weights[0]
    return int(np.shape(first)[-1])


def prefill_prompts(
    model: LlamaForCausalLM,
    prompts: Sequence[Sequence[int]],
    *,
    capacity: int,
    hash_weights=None,
    cache_dtype=None,
    impl: str = "auto",
    mesh=None,
    mesh_axis: str = "model",
    mesh_split: str = "heads",
    prefill_chunk: int | None = None,
) -> Prefilled:
    """Run the prompts (a batch of different lengths) through the model once: caches and logits.

    Args:
      prompts: token ids per prompt (non-empty).
      capacity: cache tokens per sequence (prompt plus the tokens to generate).
      hash_weights: per-layer projections as :func:`hata_jax.models.hash_projections.hash_weights_for` takes them
        (all of one rbit); None, or layers missing from them, get random Gaussian projections
        (rbit 128 when none is given). "hata" plans decode with these codes unless
        :func:`generate_from` is given their projections.
      cache_dtype: KV cache dtype, default the model's.
      impl: "auto", "pallas" or "reference" for encoding the prompt's keys.
      mesh, mesh_axis, mesh_split: make the caches split over this axis of a `jax.sharding.Mesh`,
        by KV heads with the hash projections ("heads", :mod:`hata_jax.models.sharding`) or by
        positions with the projections replicated ("positions", :mod:`hata_jax.sequence_sharding`);
        None: one device.
      prefill_chunk: with a mesh split by positions, run the prompts this many tokens at a time
        (:meth:`LlamaForCausalLM.prefill_chunked`: no device ever attends over the whole prompt,
        the same caches and logits); None: the whole prompt at once.
    """
    config = model.config
    lengths = check_prompts(prompts, config.vocab_size)
    check_prefill_chunk(prefill_chunk, mesh, mesh_split)
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity <= 0:
        raise ValueError(f"capacity must be a positive int, got {capacity!r}")
    if max(lengths) > capacity:
        raise ValueError(f"the prompt has {max(lengths)} tokens but the cache capacity is {capacity}")
    rbit = _projection_rbit(hash_weights)
    weights = hash_weights_for(config, AttentionPlan.uniform(config.num_layers, "dense", HataConfig(rbit=rbit)),
                               hash_weights)
    padded = min(round_up(max(lengths), PROMPT_BUCKET), capacity)
    tokens = np.zeros((len(prompts), padded), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = prompt
    check_cache_fits(config, len(prompts), capacity, rbit, cache_dtype or model.dtype, mesh)
    if mesh is not None and mesh_split == "positions":
        weights = [jax.device_put(w, NamedSharding(mesh, PartitionSpec())) for w in weights]
    elif mesh is not None:
        weights = [head_sharding.shard_projection(w, mesh, mesh_axis) for w in weights]
    caches = init_caches(config, len(prompts), capacity, rbit=rbit, dtype=cache_dtype or model.dtype, mesh=mesh,
                         mesh_axis=mesh_axis, mesh_split=mesh_split)
    steps = ModelSteps(model)
    start = time.perf_counter()
    logits, caches = steps.prefill(steps.state_leaves, jnp.asarray(tokens), jnp.asarray(lengths, jnp.int32), caches,
                                   weights, impl=impl, mesh=mesh, mesh_axis=mesh_axis, mesh_split=mesh_split,
                                   chunk=prefill_chunk)
    logits.block_until_ready()
    return Prefilled(steps=steps, caches=caches, hash_weights=weights, logits=logits, prompt_lengths=lengths,
                     seconds=time.perf_counter() - start)


@functools.partial(jax.jit, static_argnames=("plan", "sampling"))
def _start(caches, logits, recode, selector_params, key, *, plan: AttentionPlan, sampling: Sampling):
    """The caches to decode `plan` from, fresh copies of the prefill's (which are not donated),
    and the first new tokens int32[B]; `recode[i]` (a projection or None) re-encodes layer i's codes."""
    TRACES["start"] += 1
    caches = jax.tree.map(jnp.copy, caches)
    caches = [c if w is None else dataclasses.replace(c, codes=hata_jax.encode(c.k, w, head_axis=1, impl=plan.impl))
              for c, w in zip(caches, recode)]
    caches = with_selector_states(caches, plan, selector_params)
    key, sub = jax.random.split(key)
    return sample(logits, sub, sampling), caches, key


def _layer_arguments(prefilled: Prefilled, plan: AttentionPlan, params):
    """(decode projections, projections to re-encode the caches with or None, selector params),
    one entry per layer; see :func:`generate_from`."""
    num_layers = len(prefilled.caches)
    if len(plan.layers) != num_layers:
        raise ValueError(f"the attention plan has {len(plan.layers)} layers, the model {num_layers}")
    if params is not None and len(params) != num_layers:
        raise ValueError(f"params must have one entry per layer ({num_layers}), got {len(params)}")
    recode = [None] * num_layers
    if params is not None:
        missing = [i for i in plan.hashed_layers if params[i] is None]
        if missing:
            raise ValueError(f"params has no projection for the 'hata' layers {missing}")
        recode = [jnp.asarray(p, jnp.float32) if kind == "hata" else None for p, kind in zip(params, plan.layers)]
    weights = [w if r is None else r for w, r in zip(prefilled.hash_weights, recode)]
    selector_params = None
    if plan.sparse_layers:
        selector_params = [jax.tree.map(jnp.asarray, params[i]) if kind == "sparse" and params is not None else None
                           for i, kind in enumerate(plan.layers)]
    return weights, recode, selector_params


def generate_from(
    prefilled: Prefilled,
    plan: AttentionPlan,
    params=None,
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int] = (),
    sampling: Sampling = Sampling(),
    seed: int = 0,
    on_tokens: Callable[[list[int | None]], None] | None = None,
    dense_below: int | None = None,
    tokens_per_dispatch: int = 1,
) -> GenerationResult:
    """Generate up to `max_new_tokens` tokens per prompt of `prefilled` with `plan`, leaving
    `prefilled` unchanged (call it again with other plans, budgets or seeds).

    Args:
      plan: per-layer attention; a budget above the cache capacity is lowered to the capacity.
      params: None, or one entry per layer (:func:`hata_jax.train.selector_params`): a "hata" layer's
        projection float[Hkv, D, rbit] (its cached codes are re-encoded with it; without params the
        prefill's codes and projections are used), a "sparse" layer's selector params; other
        layers' entries are ignored.
      sampling: greedy by default; `seed` seeds it.
      stop_ids: a row stops after producing one of these (not included in its output).
      on_tokens: called after each step with the new token of each row (None for a finished row).
      dense_below: short-context policy (module docstring): steps whose sequences all hold at
        most this many tokens run dense in every layer. Default: where one layer's K + V over
        the batch reach `DENSE_BELOW_KV_BYTES`, at least the budget (after lowering it to the
        capacity); 0 runs the plan at every step.
      tokens_per_dispatch: decode steps per host dispatch (a positive int). With n > 1, n steps run
        in one jitted loop (:attr:`ModelSteps.decode_chunk`), which saves the host's dispatch of
        every step but the first; rows that stop inside it keep decoding on the device and the
        host drops their tokens. Dispatches never cross the short-context switch nor go past
        `max_new_tokens` (the steps left over run one at a time). The tokens are those of n = 1.
    """
    lengths = prefilled.prompt_lengths
    check_room(lengths, max_new_tokens, prefilled.capacity)
    check_tokens_per_dispatch(tokens_per_dispatch)
    if plan.hata.budget > prefilled.capacity:
        plan = plan.with_budget(prefilled.capacity)
    batch, kv_heads, _, head_dim = prefilled.caches[0].k.shape
    token_bytes = kv_token_bytes(batch, kv_heads, head_dim, prefilled.caches[0].k.dtype)
    threshold = short_context_threshold(plan, dense_below, token_bytes)
    weights, recode, selector_params = _layer_arguments(prefilled, plan, params)
    steps = prefilled.steps

    recorder = TokenRecorder(len(lengths), max_new_tokens, stop_ids, on_tokens)

    start = time.perf_counter()
    next_tokens, caches, key = _start(prefilled.caches, prefilled.logits, recode, selector_params,
                                      jax.random.PRNGKey(seed), plan=plan, sampling=sampling)
    recorder.record(next_tokens)
    start_seconds = time.perf_counter() - start
    total_steps = max_new_tokens - 1
    dense = min(total_steps, max(0, threshold - max(lengths)))  # step i holds max(lengths) + i tokens
    times: dict[tuple[int, bool], list[float]] = {}  # (steps, dense) of a dispatch -> seconds per dispatch
    dense_steps = 0
    last = time.perf_counter()

    def read(tokens, size: int, short: bool) -> None:
        nonlocal last, dense_steps
        recorder.record(tokens)
        now = time.perf_counter()
        times.setdefault((size, short), []).append(now - last)
        last = now
        dense_steps += size * short

    # The host reads a dispatch's tokens only after making the next one (its last tokens feed it
    # on the device), so the host's dispatch of chunk c + 1 overlaps the device's work on chunk c;
    # except before the first dispatch of each step function (a compilation on a first call):
    # reading first times it as that function's first dispatch, not as the previous chunk. When
    # every row stops early, the one chunk dispatched past the end is discarded.
    in_flight = None  # (tokens int32[B] or int32[steps, B], steps, dense) of the unread dispatch
    seen: set[tuple[int, bool]] = set()  # (steps, dense) of the dispatches made
    for size, short in dispatch_sizes(total_steps, dense, tokens_per_dispatch):
        if in_flight is not None and (size, short) not in seen:
            read(*in_flight)
            in_flight = None
        if recorder.finished:
            break
        seen.add((size, short))
        decode = steps.decode if size == 1 else functools.partial(steps.decode_chunk, steps=size)
        new, caches, key = decode(steps.state_leaves, next_tokens, caches, weights, key, selector_params,
                                  plan=plan.as_dense() if short else plan, sampling=sampling)
        next_tokens = new if size == 1 else new[-1]
        if in_flight is not None:
            read(*in_flight)
        in_flight = (new, size, short)
    if in_flight is not None and not recorder.finished:
        read(*in_flight)
    caches[0].raise_if_overflowed()
    return GenerationResult(
        tokens=recorder.outputs,
        prompt_lengths=list(lengths),
        prefill_seconds=prefilled.seconds + start_seconds,
        first_step_seconds=float(sum(seconds[0] for seconds in times.values())),
        decode_seconds=float(sum(sum(seconds[1:]) for seconds in times.values())),
        decode_steps=sum(size * (len(seconds) - 1) for (size, _), seconds in times.items()),
        dense_steps=dense_steps,
    )


def generate(
    model: LlamaForCausalLM,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    plan: AttentionPlan | None = None,
    hash_weights=None,
    sampling: Sampling = Sampling(),
    stop_ids: Sequence[int] = (),
    capacity: int | None = None,
    seed: int = 0,
    on_tokens: Callable[[list[int | None]], None] | None = None,
    cache_dtype=None,
    dense_below: int | None = None,
    tokens_per_dispatch: int = 1,
    prefill_chunk: int | None = None,
) -> GenerationResult:
    """Generate up to `max_new_tokens` tokens for each prompt (a batch of different lengths):
    :func:`prefill_prompts`, then :func:`generate_from`.

    Args:
      prompts: token ids per prompt (non-empty).
      plan: per-layer attention; default dense everywhere. A budget above the cache capacity is
        lowered to the capacity (same result: every token is selected). A plan with "sparse"
        layers needs selectors without params (others: :func:`generate_from`). A plan with a mesh
        (:meth:`AttentionPlan.on_mesh`) decodes split over it (KV heads or positions): the caches
        and projections are made in that layout (split by heads, place the model with
        :func:`hata_jax.models.sharding.shard_model`; by positions, its weights stay replicated).
      hash_weights: per-layer projections as :func:`hata_jax.models.hash_projections.hash_weights_for` takes
        them; None means random (untrained) projections, with a warning if a layer is "hata".
      sampling: greedy by default.
      stop_ids: a row stops after producing one of these (not included in its output).
      capacity: cache tokens per sequence; default: longest prompt + max_new_tokens, rounded
        up to a multiple of CAPACITY_BUCKET (and of the devices when the plan splits positions).
        Must hold the longest prompt plus max_new_tokens.
      on_tokens: called after each step with the new token of each row (None for a finished row).
      cache_dtype: KV cache dtype, default the model's.
      dense_below: short-context policy (module docstring): steps whose sequences all hold at
        most this many tokens run dense in every layer. Default: where one layer's K + V over
        the batch reach `DENSE_BELOW_KV_BYTES`, at least the budget (after lowering it to the
        capacity); 0 runs the plan at every step.
      tokens_per_dispatch: decode steps per host dispatch, run in one jitted loop when > 1 (same
        tokens; see :func:`generate_from`).
      prefill_chunk: with a plan that splits positions, prefill this many prompt tokens at a time
        (see :func:`prefill_prompts`); None: the whole prompt at once.
    """
    config = model.config
    lengths = check_prompts(prompts, config.vocab_size)
    check_tokens_per_dispatch(tokens_per_dispatch)
    if capacity is None:
        bucket = CAPACITY_BUCKET
        if plan is not None and plan.mesh is not None and plan.mesh_split == "positions":
            bucket = math.lcm(bucket, plan.mesh.shape[plan.mesh_axis])  # every device holds as many positions
        capacity = round_up(max(lengths) + max_new_tokens, bucket)
    check_room(lengths, max_new_tokens, capacity)
    plan = plan or AttentionPlan.uniform(config.num_layers, "dense")
    weights = hash_weights_for(config, plan, hash_weights)
    prefilled = prefill_prompts(model, prompts, capacity=capacity, hash_weights=weights, cache_dtype=cache_dtype,
                                impl=plan.impl, mesh=plan.mesh, mesh_axis=plan.mesh_axis, mesh_split=plan.mesh_split,
                                prefill_chunk=prefill_chunk)
    return generate_from(prefilled, plan, max_new_tokens=max_new_tokens, stop_ids=stop_ids, sampling=sampling,
                         seed=seed, on_tokens=on_tokens, dense_below=dense_below,
                         tokens_per_dispatch=tokens_per_dispatch)
