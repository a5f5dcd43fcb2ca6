"""Jit-compiled generation: a prefill step and a decode step (cache donated), sampling, stop tokens.

Prompts of different lengths are right-padded into one batch (see :mod:`models.llama`). The
static shapes are the batch size, the padded prompt length (rounded up to a multiple of
`PROMPT_BUCKET`) and the cache capacity (rounded up to a multiple of `CAPACITY_BUCKET`), so the
decode step compiles once per (batch, capacity, plan, sampling) and every later token reuses it.
:data:`TRACES` counts the traces of each step (tests use it to show that there is no recompile).
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


@functools.partial(jax.jit, static_argnames=("graphdef", "impl", "sampling"), donate_argnames=("caches",))
def prefill_step(graphdef, state, tokens, lengths, caches, hash_weights, key, *, impl: str, sampling: Sampling):
    """Prompts int[B, T] (right-padded to `lengths`) -> (first new tokens int32[B], caches, key)."""
    TRACES["prefill"] += 1
    model = nnx.merge(graphdef, state)
    hidden, caches = model.prefill(tokens, lengths, caches, hash_weights, impl)
    last = hidden[jnp.arange(tokens.shape[0]), lengths - 1]
    key, sub = jax.random.split(key)
    return sample(model.logits(last), sub, sampling), caches, key


@functools.partial(jax.jit, static_argnames=("graphdef", "plan", "sampling"), donate_argnames=("caches",))
def decode_step(graphdef, state, tokens, caches, hash_weights, key, *, plan: AttentionPlan, sampling: Sampling):
    """One token per sequence: tokens int32[B] -> (next tokens int32[B], caches, key)."""
    TRACES["decode"] += 1
    model = nnx.merge(graphdef, state)
    logits, caches = model.decode(tokens, caches, hash_weights, plan)
    key, sub = jax.random.split(key)
    return sample(logits, sub, sampling), caches, key


@dataclasses.dataclass
class GenerationResult:
    """Generated token ids per prompt (stop token excluded) and timings.

    `prefill_seconds` and `first_step_seconds` include compilation on a first call;
    `decode_seconds` covers the decode steps after the first, `decode_steps` of them.
    """

    tokens: list[list[int]]
    prompt_lengths: list[int]
    prefill_seconds: float
    first_step_seconds: float
    decode_seconds: float
    decode_steps: int

    @property
    def tokens_per_second(self) -> float:
        """Decode throughput over the steps after the first (batch rows counted), 0 if none ran."""
        batch = len(self.tokens)
        return batch * self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else 0.0


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


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
    weights = hash_weights_for(config, plan, hash_weights)
    padded = min(_round_up(max(lengths), PROMPT_BUCKET), capacity)
    tokens = np.zeros((len(prompts), padded), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = prompt
    caches = init_caches(config, len(prompts), capacity, rbit=plan.hata.rbit, dtype=cache_dtype or model.dtype)
    graphdef, state = nnx.split(model)
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
    next_tokens, caches, key = prefill_step(graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths, jnp.int32),
                                            caches, weights, key, impl=plan.impl, sampling=sampling)
    record(np.asarray(next_tokens))
    prefill_seconds = time.perf_counter() - start
    step_times = []
    while not done.all():
        start = time.perf_counter()
        next_tokens, caches, key = decode_step(graphdef, state, next_tokens, caches, weights, key,
                                               plan=plan, sampling=sampling)
        record(np.asarray(next_tokens))
        step_times.append(time.perf_counter() - start)
    caches[0].raise_if_overflowed()
    return GenerationResult(
        tokens=outputs,
        prompt_lengths=lengths,
        prefill_seconds=prefill_seconds,
        first_step_seconds=step_times[0] if step_times else 0.0,
        decode_seconds=float(sum(step_times[1:])),
        decode_steps=max(len(step_times) - 1, 0),
    )
