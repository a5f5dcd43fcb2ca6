"""Training of the learned token selectors: HATA's hash projections and HashAttention's MLPs.

    collect   prefills over a corpus -> per (layer, sequence) post-RoPE q, k and raw q.k on disk
    corpus    named corpora split by file (stdlib, the default; docs: /usr/share/doc prose; mixed) or your files
    hata_objective  labels (rank weights), HATA's similarity / bit-balance / decorrelation loss, scores
    hashattention_objective  per-head MLP codes, weighted BCE against the true top-k keys, scores
    trainer   optax steps per layer (all KV heads together), progress bars, resumable checkpoints
    checkpoint  orbax checkpoints with metadata; loading checks the model they are used with
    metrics, recall  share of exact attention mass kept at budgets 1/64..1/4, table, plot, JSON
    run       one training run: collect, train every layer, checkpoint (`hata-jax train`)
    projections  the shipped SmolLM2 projections (`shipped/`), and the projections `hata-jax generate` uses
    selector_params  each selector's per-layer params for a model: trained, random or calibrated

The shipped SmolLM2-135M-Instruct projections (`train/shipped/smollm2-rbit128/`) are the final
checkpoint of this command (defaults: 8 standard-library sequences of 4096 tokens, 32 query
positions each, 300 SGD steps per layer for layers 2..29, seed 0):

    hata-jax train --model smollm2 --out runs/smollm2-hata

then `cp -r runs/smollm2-hata/checkpoints/8400 train/shipped/smollm2-rbit128` (the last step).
"""
