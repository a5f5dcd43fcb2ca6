"""`hata-jax train` and `hata-jax recall`."""
from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys
import tempfile
import time

from hata_jax.cli.generate import require_model_extra, writable_directory
from hata_jax.models.hash_projections import random_projections
from hata_jax.models.load import load_model
from hata_jax.train import checkpoint, corpus, recall
from hata_jax.train.collect import CollectConfig, collect
from hata_jax.train.hashattention_objective import HashAttentionObjective
from hata_jax.train.hata_objective import HataLoss, HataObjective
from hata_jax.train.projections import shipped_weights
from hata_jax.train.run import train_model
from hata_jax.train.trainer import TrainConfig

# `hata-jax train` flag -> (HataLoss field, help)
LOSS_FLAGS = {
    "--loss-sigma": ("sigma", "slope of the relaxation tanh(sigma * x / 2)"),
    "--loss-eps": ("eps", "weight of the similarity term"),
    "--loss-balance": ("balance", "weight of the bit balance term"),
    "--loss-decorrelation": ("decorrelation", "weight of the decorrelation term ||W^T W - I||_F"),
}


def _add_model_args(parser, split: str, samples_default: str) -> None:
    parser.add_argument("--model", default="smollm2",
                        help="'smollm2' (the embedded SmolLM2-135M-Instruct), a HF checkpoint directory or a "
                             ".gguf file")
    parser.add_argument("--corpus", nargs="+", metavar="NAME_OR_PATH",
                        help="a named corpus, its " + split + " split: 'stdlib' (the default: the Python standard "
                             "library's sources), 'docs' (the prose packages ship under /usr/share/doc, or "
                             "$HATA_JAX_DOCS) or 'mixed' (both); or text files and directories")
    parser.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence (default 4096)")
    parser.add_argument("--queries", type=int, default=32,
                        help="query positions per sequence, drawn from [seq_len/2, seq_len) (default 32)")
    parser.add_argument("--samples", metavar="DIR", help="where the collected q/k samples are kept: reused if "
                                                          f"complete, resumed if not (default {samples_default})")


def add_train_command(subparsers) -> None:
    """Register `train` on the `hata-jax` parser's subparsers."""
    p = subparsers.add_parser(
        "train", help="train HATA hash projections (or HashAttention) for a model's layers",
        description="Collect post-RoPE q/k samples from prefills over a corpus, then train a selector for every "
                    "layer from --dense-layers on, with orbax checkpoints in OUT/checkpoints (resumable).")
    _add_model_args(p, "training", "OUT/samples")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory (checkpoints, and samples by default)")
    p.add_argument("--selector", choices=["hata", "hashattention"], default="hata")
    p.add_argument("--rbit", type=int, default=128, help="HATA hash bits (default 128)")
    p.add_argument("--dense-layers", type=int, default=2, help="first layers left dense, not trained (default 2)")
    for flag, (field, help_text) in LOSS_FLAGS.items():
        p.add_argument(flag, type=float, help=f"hata: {help_text} (default {getattr(HataLoss(), field)}, the paper's)")
    p.add_argument("--sequences", type=int, default=8, help="training sequences (default 8)")
    p.add_argument("--steps", type=int, help="optimizer steps per layer (default 300)")
    p.add_argument("--optimizer", choices=["sgd", "adam", "adamw"],
                   help="default: sgd (momentum 0.9) for hata, adam for hashattention")
    p.add_argument("--lr", type=float, help="learning rate (default 0.1 for hata, 1e-3 for hashattention)")
    p.add_argument("--momentum", type=float, help="sgd momentum (default 0.9)")
    p.add_argument("--weight-decay", type=float, help="default 1e-6 for hata, 0 for hashattention")
    p.add_argument("--batch-sequences", type=int,
                   help="sequences per step (0 = all; default all for hata, 4 for hashattention)")
    p.add_argument("--batch-keys", type=int,
                   help="key positions per step, shared by its sequences (0 = all; default 256 for hata, 512 for "
                        "hashattention)")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps within a layer")
    p.add_argument("--seed", type=int, default=0, help="corpus order, query positions, init and batches (default 0)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_train)


def add_recall_command(subparsers) -> None:
    """Register `recall` on the `hata-jax` parser's subparsers."""
    p = subparsers.add_parser(
        "recall", help="how much attention mass trained vs random hash codes keep, on held-out text",
        description="Share of the exact attention mass inside the tokens each selector picks, for budgets of "
                    "1/64 to 1/4 of the context, per layer and averaged: exact top-k, HATA with trained "
                    "projections, HATA with random projections (same rbit), and HashAttention if given.")
    _add_model_args(p, "held-out", "a temporary directory")
    p.add_argument("--hash-weights", metavar="DIR",
                   help="a `hata-jax train` run (or checkpoint) directory; default for smollm2: the shipped weights")
    p.add_argument("--hashattention", metavar="DIR", help="a `hata-jax train --selector hashattention` run directory")
    p.add_argument("--rerank", type=int, nargs="+", default=(), metavar="C",
                   help="also two-stage HATA: its top C x budget tokens ranked again by their exact scores "
                        "(the hata_rerank selector's policy), one method per C")
    p.add_argument("--sequences", type=int, default=4, help="held-out sequences (default 4)")
    p.add_argument("--seed", type=int, default=1, help="held-out file order and query positions (default 1)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG plot")
    p.set_defaults(func=run_recall)


def require_train_extra(*modules: str) -> None:
    """The model extra plus `modules` of the train extra (pyproject.toml) must be installed."""

    require_model_extra()
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"this command needs the train extra (missing {', '.join(missing)}): "
                         "pip install -e '.[train]'")


def log(message: str) -> None:
    print(f"[hata-jax] {message}", file=sys.stderr, flush=True)


def hata_loss(args: argparse.Namespace) -> HataLoss:
    """The paper's :class:`HataLoss` with the `--loss-*` values given; a bad value's error names its flag."""
    values = {}
    for flag, (field, _) in LOSS_FLAGS.items():
        value = getattr(args, f"loss_{field}")
        if value is None:
            continue
        try:
            HataLoss(**{field: value})
        except ValueError as err:
            raise ValueError(str(err).replace(f"HataLoss.{field}", flag)) from None
        values[field] = value
    return HataLoss(**values)


def run_train(args: argparse.Namespace) -> int:
    require_train_extra(*(() if args.no_progress else ("tqdm",)))
    writable_directory(args.out, "--out")
    given = [flag for flag, (field, _) in LOSS_FLAGS.items() if getattr(args, f"loss_{field}") is not None]
    if given and args.selector != "hata":
        raise ValueError(f"{', '.join(given)}: for --selector hata only")
    selector = (HataObjective(rbit=args.rbit, loss_config=hata_loss(args)) if args.selector == "hata"
                else HashAttentionObjective())
    collect_config = CollectConfig(seq_len=args.seq_len, sequences=args.sequences, queries=args.queries,
                                   seed=args.seed)
    train_config = TrainConfig.for_selector(
        selector, steps=args.steps, optimizer=args.optimizer, learning_rate=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, batch_sequences=args.batch_sequences, batch_keys=args.batch_keys,
        seed=args.seed, save_every=args.save_every)
    start = time.perf_counter()
    model, tokenizer = load_model(args.model, log=log)
    train_model(model, args.model, tokenizer, args.out, corpus=corpus.corpus_from_args(args.corpus, "train"),
                selector=selector, collect_config=collect_config, train_config=train_config,
                dense_layers=args.dense_layers, samples_dir=args.samples, resume=args.resume,
                progress=not args.no_progress, log=log)
    log(f"done in {time.perf_counter() - start:.0f} s; use it with --hash-weights {args.out}"
        if args.selector == "hata" else f"done in {time.perf_counter() - start:.0f} s")
    return 0


def run_recall(args: argparse.Namespace) -> int:
    require_train_extra(*(("matplotlib",) if args.plot else ()))
    hash_weights = args.hash_weights or shipped_weights(args.model)
    if hash_weights is None:
        raise ValueError(f"--hash-weights is required for --model {args.model} (no shipped weights)")
    model, tokenizer = load_model(args.model, log=log)
    trained, metadata = checkpoint.load_trained(hash_weights, model, "hata")
    layers, rbit = metadata["layers"], metadata["rbit"]
    selector = HataObjective(rbit=rbit)
    methods = {recall.TRAINED: (selector, trained),
               recall.TRAINED_ASYMMETRIC: (HataObjective(rbit=rbit, score="asymmetric"), trained),
               recall.RANDOM: (selector, random_projections(model.config, rbit, seed=0, layers=layers))}
    checkpoints = {str(hash_weights): metadata}
    if args.hashattention:
        ha_params, ha_meta = checkpoint.load_trained(args.hashattention, model, "hashattention")
        missing = sorted(set(layers) - set(ha_params))
        if missing:
            raise ValueError(f"{args.hashattention} has no HashAttention weights for layers {missing}")
        methods[recall.HASHATTENTION] = (HashAttentionObjective(**ha_meta["selector"]["config"]), ha_params)
        checkpoints[args.hashattention] = ha_meta
    config = CollectConfig(seq_len=args.seq_len, sequences=args.sequences, queries=args.queries, seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="hata-recall-") as tmp:
        samples = pathlib.Path(args.samples or tmp)
        start = time.perf_counter()
        log(f"collecting held-out samples: {config.sequences} sequences of {config.seq_len} tokens -> {samples}")
        collect(model, args.model, tokenizer, corpus.corpus_from_args(args.corpus, "heldout"), config, layers, samples,
                progress=lambda done, total: log(f"  prefill {done}/{total} ({time.perf_counter() - start:.0f} s)"))
        recall.check_heldout(samples, checkpoints)
        result = recall.evaluate(samples, layers, methods, rerank=tuple(args.rerank))
        document = recall.report(result, samples, checkpoints, args.model)
    print(recall.format_table(result))
    if args.json:
        recall.write_json(document, args.json)
        log(f"wrote {args.json}")
    if args.plot:
        recall.plot(result, args.plot, f"{args.model}: held-out attention mass kept (rbit {rbit}, "
                                       f"{config.seq_len}-token sequences)")
        log(f"wrote {args.plot}")
    return 0
