"""Jit-compiled generation: a prefill step and a decode step (cache donated), sampling, stop tokens.

Prompts of different lengths are right-padded into one batch (see :mod:`models.llama`). The
static shapes are the batch size, the padded prompt length (rounded up to a multiple of
`PROMPT_BUCKET`) and the cache capacity (rounded up to a multiple of `CAPACITY_BUCKET`), so the
decode step compiles once per (batch, capacity, plan, sampling) and every later token reuses it.
:data:`TRACES` counts the traces of each step (tests use it to show that there is no recompile).

Short-context policy: with a plan that has HATA layers, a step whose sequences all hold at most
`dense_below` tokens (the step's new token included; default `DENSE_BELOW_BUDGETS` x the HATA
budget, 0 disables) runs dense attention in every layer. At such lengths dense attention reads
few bytes and HATA's hashing, scoring and selection would cost more than they save (and select a
large share of the context anyway). The choice is made on the host from the prompt lengths and
the step count, between two compiled decode steps (the plan and :meth:`AttentionPlan.as_dense`),
each compiled once per shape: no device-to-host read and no device-side branch. Dense layers keep
appending codes and key norms to every layer's cache, so the HATA steps after the switch select
from exactly the cache they would have had without it.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.attention import AttentionPlan, hash_weights_for
from models.llama import LlamaForCausalLM, init_caches

PROMPT_BUCKET = 32
CAPACITY_BUCKET = 128
# Default short-context threshold in HATA budgets: a step over at most 4 x budget tokens runs dense.
DENSE_BELOW_BUDGETS = 4
# step name -> number of times it was traced (compiled).
TRACES: collections.Counter = collections.Counter()


@dataclasses.dataclass(frozen=True)
class Sampling:
    """`temperature` 0 is greedy (argmax); otherwise sample from softmax(logits / temperature)
    restricted to the smallest set of tokens whose probability reaches `top_p` (nucleus)."""

    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")


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
    """(merge, prefill, decode) for models of this structure; see :class:`ModelSteps`.

    Cached on the structure, so equal models (and a second :func:`generate` on the same model)
    share the jitted steps and their compilations; the key is hashed once per :class:`ModelSteps`.
    """

    def merge(state_leaves) -> LlamaForCausalLM:
        return nnx.merge(graphdef, jax.tree_util.tree_unflatten(state_treedef, state_leaves))

    @functools.partial(jax.jit, static_argnames=("impl", "sampling"), donate_argnames=("caches",))
    def prefill(state_leaves, tokens, lengths, caches, hash_weights, key, *, impl: str, sampling: Sampling):
        """Prompts int[B, T] (right-padded to `lengths`) -> (first new tokens int32[B], caches, key)."""
        TRACES["prefill"] += 1
        model = merge(state_leaves)
        hidden, caches = model.prefill(tokens, lengths, caches, hash_weights, impl)
        last = hidden[jnp.arange(tokens.shape[0]), lengths - 1]
        key, sub = jax.random.split(key)
        return sample(model.logits(last), sub, sampling), caches, key

    @functools.partial(jax.jit, static_argnames=("plan", "sampling"), donate_argnames=("caches",))
    def decode(state_leaves, tokens, caches, hash_weights, key, *, plan: AttentionPlan, sampling: Sampling):
        """One token per sequence: tokens int32[B] -> (next tokens int32[B], caches, key)."""
        TRACES["decode"] += 1
        logits, caches = merge(state_leaves).decode(tokens, caches, hash_weights, plan)
        key, sub = jax.random.split(key)
        return sample(logits, sub, sampling), caches, key

    return merge, prefill, decode


class ModelSteps:
    """A model's jitted prefill and decode steps, which take its weights as a flat list of arrays.

    Passing the model as a static GraphDef plus an nnx.State costs milliseconds of host time per
    call (hashing the GraphDef, flattening the State), as much as a whole decode step's device time
    on a GPU; here both happen once, when the object is built.

    Attributes:
      state_leaves: the model's nnx.State flattened (`jax.tree_util.tree_flatten`): arrays.
      merge: `merge(state_leaves) -> model`, for use inside traced code (hashable, the same
        function for equal models: it can be a static argument).
      prefill: `prefill(state_leaves, tokens int[B, T], lengths int32[B], caches, hash_weights, key,
        *, impl, sampling) -> (first new tokens int32[B], caches, key)`; prompts right-padded to
        `lengths`; `caches` donated.
      decode: `decode(state_leaves, tokens int32[B], caches, hash_weights, key, *, plan, sampling)
        -> (next tokens int32[B], caches, key)`, one token per sequence; `caches` donated.
    """

    def __init__(self, model: LlamaForCausalLM):
        graphdef, state = nnx.split(model)
        self.state_leaves, state_treedef = jax.tree_util.tree_flatten(state)
        self.merge, self.prefill, self.decode = _step_functions(graphdef, state_treedef)


@dataclasses.dataclass
class GenerationResult:
    """Generated token ids per prompt (stop token excluded) and timings.

    `prefill_seconds` and `first_step_seconds` include compilation on a first call;
    `first_step_seconds` sums the first step of each decode step function used (the dense one of
    the short-context policy, then the plan's); `decode_seconds` covers the other decode steps,
    `decode_steps` of them. `dense_steps` counts the steps the short-context policy ran dense in
    every layer (see the module docstring).
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


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def short_context_threshold(plan: AttentionPlan, dense_below: int | None) -> int:
    """Tokens per sequence up to which a step runs dense in every layer (0: never).

    `dense_below` None means `DENSE_BELOW_BUDGETS * plan.hata.budget`; a plan without HATA
    layers has nothing to switch, so 0.
    """
    if dense_below is not None and (isinstance(dense_below, bool) or not isinstance(dense_below, int)
                                    or dense_below < 0):
        raise ValueError(f"dense_below must be an int >= 0 (0 disables the short-context policy), got {dense_below!r}")
    if not plan.hashed_layers:
        return 0
    return DENSE_BELOW_BUDGETS * plan.hata.budget if dense_below is None else dense_below


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
) -> GenerationResult:
    """Generate up to `max_new_tokens` tokens for each prompt (a batch of different lengths).

    Args:
      prompts: token ids per prompt (non-empty).
      plan: per-layer attention; default dense everywhere. A HATA budget above the cache
        capacity is lowered to the capacity (same result: every token is selected).
      hash_weights: per-layer projections as :func:`models.attention.hash_weights_for` takes
        them; None means random (untrained) projections, with a warning if a layer is "hata".
      sampling: greedy by default.
      stop_ids: a row stops after producing one of these (not included in its output).
      capacity: cache tokens per sequence; default: longest prompt + max_new_tokens, rounded
        up to a multiple of CAPACITY_BUCKET. Must hold the longest prompt plus max_new_tokens.
      on_tokens: called after each step with the new token of each row (None for a finished row).
      cache_dtype: KV cache dtype, default the model's.
      dense_below: short-context policy (module docstring): steps whose sequences all hold at
        most this many tokens run dense in every layer. Default `DENSE_BELOW_BUDGETS` x the HATA
        budget (after lowering it to the capacity); 0 runs the plan at every step.
    """
    config = model.config
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and every prompt must have tokens")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    lengths = [len(p) for p in prompts]
    bad = [int(t) for p in prompts for t in p if not 0 <= int(t) < config.vocab_size]
    if bad:
        raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {config.vocab_size})")
    needed = max(lengths) + max_new_tokens
    if capacity is None:
        capacity = _round_up(needed, CAPACITY_BUCKET)
    elif max(lengths) > capacity:
        raise ValueError(f"the prompt has {max(lengths)} tokens but the cache capacity is {capacity}")
    elif needed > capacity:
        raise ValueError(f"the cache capacity {capacity} cannot hold the prompt ({max(lengths)} tokens) plus "
                         f"max_new_tokens={max_new_tokens}; raise capacity or lower max_new_tokens")
    plan = plan or AttentionPlan.uniform(config.num_layers, "dense")
    if plan.hata.budget > capacity:
        plan = plan.with_budget(capacity)
    threshold = short_context_threshold(plan, dense_below)
    weights = hash_weights_for(config, plan, hash_weights)
    padded = min(_round_up(max(lengths), PROMPT_BUCKET), capacity)
    tokens = np.zeros((len(prompts), padded), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = prompt
    caches = init_caches(config, len(prompts), capacity, rbit=plan.hata.rbit, dtype=cache_dtype or model.dtype)
    steps = ModelSteps(model)
    key = jax.random.PRNGKey(seed)

    outputs: list[list[int]] = [[] for _ in prompts]
    done = np.zeros(len(prompts), bool)
    stops = set(int(s) for s in stop_ids)

    def record(new: np.ndarray) -> None:
        shown: list[int | None] = []
        for row, token in enumerate(new.tolist()):
            if done[row]:
                shown.append(None)
                continue
            if token in stops:
                done[row] = True
                shown.append(None)
                continue
            outputs[row].append(token)
            shown.append(token)
            done[row] = len(outputs[row]) >= max_new_tokens
        if on_tokens is not None:
            on_tokens(shown)

    start = time.perf_counter()
    next_tokens, caches, key = steps.prefill(steps.state_leaves, jnp.asarray(tokens), jnp.asarray(lengths, jnp.int32),
                                             caches, weights, key, impl=plan.impl, sampling=sampling)
    record(np.asarray(next_tokens))
    prefill_seconds = time.perf_counter() - start
    step_times: dict[AttentionPlan, list[float]] = {}
    longest = max(lengths)  # tokens of the longest sequence before the next step's token
    dense_steps = 0
    while not done.all():
        longest += 1
        short = longest <= threshold
        dense_steps += short
        step_plan = plan.as_dense() if short else plan
        start = time.perf_counter()
        next_tokens, caches, key = steps.decode(steps.state_leaves, next_tokens, caches, weights, key,
                                                plan=step_plan, sampling=sampling)
        record(np.asarray(next_tokens))
        step_times.setdefault(step_plan, []).append(time.perf_counter() - start)
    caches[0].raise_if_overflowed()
    return GenerationResult(
        tokens=outputs,
        prompt_lengths=lengths,
        prefill_seconds=prefill_seconds,
        first_step_seconds=float(sum(times[0] for times in step_times.values())),
        decode_seconds=float(sum(sum(times[1:]) for times in step_times.values())),
        decode_steps=sum(len(times) - 1 for times in step_times.values()),
        dense_steps=dense_steps,
    )
