"""How main's band select (the parallel design) holds its fast path on real scores: SmolLM2-135M-Instruct over 8192
tokens of held-out standard-library text, the shipped projections, the asymmetric score, layers
2, 5, ..., 29, queries at 4 positions (8191, 7992, 6000, 4500), budget 1/64 of the context (the
Llama 128K shape's 2048 / 131072). The selection runs in interpret mode with chunks of 128 positions
(64 per row, as 2048 are at 128K) and of 512, band slots a quarter and a half of a chunk
(`BandConfig.slots_divisor` 4 and 2); every answer is checked against `exact_slots`. Prints how many rows took the
fast path (band_select.PATH_*) and how many the radix fallback (0).

    python bench/results/issue13_real_scores/band_select_paths.py   (CPU, ~5 min; installed checkout)
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import hata_jax as hj
from hata_jax.models import load_model
from hata_jax.selection import exact_slots
from hata_jax.train import corpus as corpus_lib
from hata_jax.train.checkpoint import load_projections
from hata_jax.train.collect import make_capture
from hata_jax.train.projections import shipped_weights
from pallas_kernels import band_select
from pallas_kernels.radix_select import Tiling

LENGTH, FRACTION = 8192, 64
model, tokenizer = load_model("smollm2", log=lambda *a: None)
projections = load_projections(shipped_weights("smollm2"), model)
tokens = next(iter(corpus_lib.token_sequences(corpus_lib.stdlib_corpus("heldout"), tokenizer, LENGTH, 1, 0, [])))
layers = list(range(2, 30, 3))
queries = np.array([LENGTH - 1, LENGTH - 200, 6000, 4500])
captured = make_capture(model, layers)(jnp.asarray(tokens[None]), jnp.asarray(queries))
lengths = jnp.asarray(queries + 1, jnp.int32)
budget = LENGTH // FRACTION


def scores(layer):
    q, k = captured[layer]  # [m, Hq, D], [L, Hkv, D]
    w = jnp.asarray(projections[layer])
    keys = jnp.broadcast_to(k.transpose(1, 0, 2)[None], (len(queries), *k.transpose(1, 0, 2).shape))
    codes, norms = hj.encode(keys, w, head_axis=1, impl="reference"), hj.key_norms(keys)
    planes, scales = hj.query_planes(q, w, impl="reference")
    return hj.hamming_scores(planes, codes, norms, lengths, score="asymmetric", q_scales=scales, impl="reference")


rows = {layer: scores(layer) for layer in layers}
select = jax.jit(band_select.select_topk_with_path, static_argnums=1,
                 static_argnames=("interpret", "tiling", "config"))
for chunk in (128, 512):
    for divisor in (4, 2):  # band slots: a quarter of a chunk (the default until 0bfaadd), half (since)
        tiling = Tiling(chunk=chunk, block=32, scan_block=min(chunk, 128))
        config = dataclasses.replace(band_select.BandConfig(), slots_divisor=divisor)
        paths: dict = {}
        for layer, s in rows.items():
            idx, _, path = select(s, budget, lengths, interpret=True, tiling=tiling, config=config)
            assert np.array_equal(np.asarray(idx), exact_slots(np.asarray(s), np.asarray(lengths), budget)), layer
            for p in np.asarray(path).ravel():
                paths[int(p)] = paths.get(int(p), 0) + 1
        print(f"chunks of {chunk}, slots {chunk // divisor}: rows by path {paths} (0: radix fallback; answers exact)")
