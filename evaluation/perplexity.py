"""Teacher-forced perplexity on held-out text, with every scored token predicted by sparse attention.

The text is the Python standard library's held-out split (:func:`hata_jax.train.corpus.stdlib_corpus`,
files the hash projections never trained on), cut into sequences of the evaluation length. The
scored tokens are the last half of each sequence: token t is predicted from the logits at t - 1,
which :func:`hata_jax.models.sparse_logits` computes with each selecting layer attending only to the keys
its selector keeps among positions <= t - 1 (the selection a decode step there would make): with
a budget of 1/16 of the sequence, each scored token sees between 1/16 and 1/8 of its prefix.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from hata_jax.models.teacher_forcing import sparse_logits
from hata_jax.train import corpus as corpus_lib


def heldout_sequences(tokenizer, length: int, count: int, seed: int = 0) -> np.ndarray:
    """int32[count, length]: held-out standard library text (files shuffled with `seed`)."""
    corpus = corpus_lib.stdlib_corpus("heldout")
    return np.stack(list(corpus_lib.token_sequences(corpus, tokenizer, length, count, seed)))


def scored_start(length: int) -> int:
    """The first scored position: the last half of a sequence of `length` tokens is scored."""
    return length // 2


@jax.jit
def _nll(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """logits float32[B, n, V] predicting tokens int32[B, n] -> summed negative log-likelihood float32[B]."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0].sum(axis=-1)


def sequence_nll(model, tokens: np.ndarray, plan, params=None) -> np.ndarray:
    """Summed negative log-likelihood (nats) of each row's scored tokens under `plan`.

    Args:
      tokens: int[B, T] full sequences (no padding).
      plan, params: as :func:`hata_jax.models.sparse_logits` takes them.

    Returns:
      float64[B], over the `T - scored_start(T)` scored tokens of each row.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    b, t = tokens.shape
    start = scored_start(t)
    logits = sparse_logits(model, tokens, jnp.full((b,), t, jnp.int32), plan, params)
    return np.asarray(_nll(logits[:, start - 1: t - 1], tokens[:, start:]), np.float64)


def perplexity(nll_sum: float, tokens: int) -> float:
    return float(np.exp(nll_sum / tokens))
