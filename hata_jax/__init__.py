"""hata-jax: learned hash-aware top-k attention (HATA) for long-context decoding in JAX.

The public API is plain functions on arrays (no Flax), each with a pure-JAX reference path and,
on GPU, a Pallas kernel path (`impl="auto" | "pallas" | "reference"`, see
:mod:`hata_jax.dispatch`).

Names used across the package:
  w               one layer's hash projection, float[Hkv, D, rbit] (the functions here)
  hash_weights    the projections of every layer of a model, {layer: w} or [num_layers, Hkv, D, rbit]
                  (:mod:`hata_jax.models.hash_projections`, `hata-jax generate --hash-weights`)
  params          one layer's parameters of a token selector (:mod:`hata_jax.selectors`): `w` for
                  hata and simhash, the MLP dict for hashattention, the PCA basis for loki
  selector_params the `params` of every layer (:func:`hata_jax.train.selector_params.selector_params`)
"""
from hata_jax.attention import combine, dense_decode_attention, sparse_decode_attention
from hata_jax.cache import HataCache
from hata_jax.config import QUERY_PLANES, HataConfig
from hata_jax.decode import hata_decode_attention
from hata_jax.dispatch import TRACE_LOG, default_impl
from hata_jax.hashing import encode, encode_step, key_norms, pack_bits, query_planes, unpack_bits
from hata_jax.scoring import hamming_scores
from hata_jax.selection import UNUSED, hamming_topk, select_topk

__version__ = "0.1.0"

__all__ = [
    "HataCache",
    "HataConfig",
    "QUERY_PLANES",
    "TRACE_LOG",
    "UNUSED",
    "combine",
    "default_impl",
    "dense_decode_attention",
    "encode",
    "encode_step",
    "hamming_scores",
    "hamming_topk",
    "hata_decode_attention",
    "key_norms",
    "pack_bits",
    "query_planes",
    "select_topk",
    "sparse_decode_attention",
    "unpack_bits",
]
