"""`hata-jax eval` (the evaluation harness) and `hata-jax demo` (a small evaluation of SmolLM2)."""
from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

from hata_jax.cli.generate import writable_directory
from hata_jax.cli.train import require_train_extra
from hata_jax.evaluation.harness import DEFAULT_METHODS, PARTS, EvalConfig, params_method, run_eval
from hata_jax.evaluation.report import format_table, write_report
from hata_jax.evaluation.tasks import TASKS
from hata_jax.models.load import load_model
from hata_jax.models.plan import METHODS

# `hata-jax demo`: what it evaluates, and its run options.
DEMO = dict(methods=("dense", "hata", "quest", "streaming"), budgets=(128,),
            tasks=("niah_single", "niah_multikey", "variable_tracking", "frequent_words"), lengths=(2048,), samples=4)
DEMO_RUN = dict(batch=4, perplexity_sequences=0, metric_prompts=1)


def _names(text: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(dict.fromkeys(int(part) for part in text.split(",") if part.strip()))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_eval_command(subparsers) -> None:
    """Register `eval` on the `hata-jax` parser's subparsers."""
    defaults = EvalConfig()
    p = subparsers.add_parser(
        "eval", help="long-context accuracy of dense vs HATA vs other selectors (RULER-style tasks, perplexity, "
                     "attention metrics)",
        description="Evaluate sparse-attention methods on a model: RULER-style synthetic tasks (string-match score), "
                    "teacher-forced perplexity on held-out text, and per-layer attention mass recall and output "
                    "error versus dense. Each prompt batch is prefilled once and shared by every method and budget; "
                    "results are appended to OUT/records.jsonl as they are done, so rerunning the same command "
                    "resumes an interrupted run. Writes OUT/results.json and plots, and prints the table.")
    p.add_argument("--model", default="smollm2",
                   help="'smollm2' (the embedded SmolLM2-135M-Instruct), a HF checkpoint directory or a .gguf file")
    p.add_argument("--methods", type=_names,
                   help=f"comma-separated, from {', '.join(METHODS)} (default {','.join(DEFAULT_METHODS)}, plus "
                        "hashattention with --hashattention)")
    p.add_argument("--budgets", type=_ints, default=defaults.budgets,
                   help="comma-separated tokens per KV head (default 128,256,512)")
    p.add_argument("--tasks", type=_names, default=defaults.tasks,
                   help=f"comma-separated, from {', '.join(TASKS)} (default all)")
    p.add_argument("--lengths", type=_ints, default=defaults.lengths,
                   help="comma-separated prompt lengths in tokens (default 4096)")
    p.add_argument("--samples", type=int, default=defaults.samples, help="prompts per task and length (default 20)")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory (records, results.json, plots)")
    p.add_argument("--parts", type=_names, default=PARTS,
                   help=f"comma-separated, from {','.join(PARTS)} (default all; '' = none, only summarize OUT): what "
                        "to run now; the results "
                        "summarize every record in OUT, so parts may run at different times or on different machines "
                        "(same settings; set HATA_JAX_STDLIB to one Python's standard library on both, as the prompts "
                        "and held-out text come from it)")
    _add_run_args(p, defaults)
    p.set_defaults(func=run_eval_command)


def _add_run_args(p, defaults) -> None:
    p.add_argument("--hash-weights", metavar="PATH",
                   help="hata's trained projections (a `hata-jax train` run or an .npz); default for smollm2: the "
                        "shipped ones")
    p.add_argument("--hashattention", metavar="DIR", help="a `hata-jax train --selector hashattention` run directory")
    p.add_argument("--dense-layers", type=int, default=defaults.dense_layers,
                   help="first layers that stay dense (default 2)")
    p.add_argument("--rbit", type=int, default=defaults.rbit, help="hata/simhash code bits (default 128)")
    p.add_argument("--score", choices=["key_norm", "asymmetric"], default=defaults.score,
                   help="HATA's score (hata, hata_rerank, simhash): 'key_norm', the paper's, or 'asymmetric', "
                        f"the query's quantized projection against the key codes (default {defaults.score})")
    p.add_argument("--candidates", type=int, default=defaults.candidates,
                   help="hata_rerank: HATA picks CANDIDATES x budget tokens, their exact scores the budget (default 4)")
    p.add_argument("--loki-channels", type=int, default=defaults.loki_channels,
                   help="loki: principal channels kept per key (2 bytes each per KV head; default 32)")
    p.add_argument("--quest-page-size", type=int, default=defaults.quest_page_size,
                   help="quest, quest_authors: tokens per page (default 16)")
    p.add_argument("--sink", type=int, default=defaults.sink, help="first positions always kept (default 0)")
    p.add_argument("--recent", type=int, default=defaults.recent, help="last positions always kept (default 0)")
    p.add_argument("--batch", type=int, default=defaults.batch,
                   help="prompts per prefill (default 2; 4 at 4096 tokens needs about 10 GB of memory)")
    p.add_argument("--perplexity-sequences", type=int, default=defaults.perplexity_sequences,
                   help="held-out sequences per length for perplexity (default 4; 0 = none)")
    p.add_argument("--metric-prompts", type=int, default=defaults.metric_prompts,
                   help="prompts per task and length for the attention metrics (default 1; 0 = none)")
    p.add_argument("--metric-queries", type=int, default=defaults.metric_queries,
                   help="query positions per metric prompt (default 16)")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--impl", choices=["auto", "pallas", "reference"], default=defaults.impl)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def log(message: str) -> None:
    print(f"[hata-jax] {message}", file=sys.stderr, flush=True)


def run_eval_command(args: argparse.Namespace) -> int:
    methods = args.methods or (DEFAULT_METHODS + (("hashattention",) if args.hashattention else ()))
    return evaluate(args, methods=methods, budgets=args.budgets, tasks=args.tasks, lengths=args.lengths,
                    samples=args.samples, out=args.out, parts=args.parts)


def evaluate(args: argparse.Namespace, *, out: str, keep: bool = True, parts: tuple[str, ...] | None = None,
             **fields) -> int:
    """Run the evaluation that `args` (the run options of :func:`_add_run_args`) and `fields`
    (EvalConfig fields) describe in the run directory `out`; print the table. `keep`: `out` stays
    (plots are written there too, and the log says how to resume); False for a temporary one.
    `parts`: which of `hata_jax.evaluation.harness.PARTS` to run now (None: all)."""
    require_train_extra(*(("matplotlib",) if keep else ()), *(() if args.no_progress else ("tqdm",)))
    writable_directory(out, "--out")
    needs = [m for m in fields["methods"] if m in METHODS and params_method(m) == "hashattention"]
    if needs and not args.hashattention:
        raise ValueError(f"{', '.join(needs)} needs --hashattention DIR (a `hata-jax train --selector hashattention` "
                         "run)")
    config = EvalConfig(dense_layers=args.dense_layers, rbit=args.rbit, score=args.score, candidates=args.candidates,
                        loki_channels=args.loki_channels, quest_page_size=args.quest_page_size, sink=args.sink,
                        recent=args.recent,
                        batch=args.batch, perplexity_sequences=args.perplexity_sequences,
                        metric_prompts=args.metric_prompts, metric_queries=args.metric_queries, seed=args.seed,
                        impl=args.impl, **fields)
    start = time.perf_counter()
    model, tokenizer = load_model(args.model, log=log)
    log(f"loaded {args.model} in {time.perf_counter() - start:.1f} s; methods {', '.join(config.methods)}, budgets "
        f"{', '.join(map(str, config.budgets))}, lengths {', '.join(map(str, config.lengths))}, {config.samples} "
        f"samples of {len(config.tasks)} tasks" + (f"; run directory {out} (rerun the same command to resume an "
                                                   "interrupted run)" if keep else ""))
    document = run_eval(model, args.model, tokenizer, config, out, hash_weights=args.hash_weights,
                        hashattention_dir=args.hashattention, progress=not args.no_progress, log=log,
                        parts=PARTS if parts is None else parts)
    print(format_table(document), flush=True)
    written = [pathlib.Path(out) / "results.json", *(write_report(document, out) if keep else [])]
    log(f"done in {time.perf_counter() - start:.0f} s" + (f"; wrote {', '.join(map(str, written))}" if keep else ""))
    return 0


def add_demo_args(p) -> None:
    """The real-model demo's options on the `demo` parser (besides the synthetic demo's)."""
    p.add_argument("--synthetic", action="store_true",
                   help="the synthetic demo instead: planted heavy hitters, no model, no download")
    p.add_argument("--out", metavar="DIR", help="keep the demo's records, results and plots in DIR (default: a "
                                                "temporary directory)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    defaults = EvalConfig(**DEMO, **DEMO_RUN)
    p.set_defaults(**{name: getattr(defaults, name) for name in
                      ("dense_layers", "candidates", "loki_channels", "quest_page_size", "sink", "recent", "batch",
                       "perplexity_sequences", "metric_prompts", "metric_queries")},
                   hash_weights=None, hashattention=None)


def run_demo(args: argparse.Namespace) -> int:
    """The main demo: SmolLM2 with the shipped HATA projections versus dense, Quest and StreamingLLM
    on a few RULER-style prompts (about 4 minutes on 2 idle CPU cores, the first-use download included)."""
    fields = {**DEMO, "budgets": tuple(args.budgets or DEMO["budgets"]),
              "lengths": (args.context,) if args.context is not None else DEMO["lengths"]}
    log("demo: a small long-context evaluation of SmolLM2-135M-Instruct (dense vs HATA with the shipped projections "
        f"vs Quest vs StreamingLLM; {fields['samples']} prompts of {fields['lengths'][0]} tokens per task); "
        "`hata-jax eval` runs the full one")
    args.model = "smollm2"
    if args.out:
        return evaluate(args, out=args.out, **fields)
    with tempfile.TemporaryDirectory(prefix="hata-demo-") as out:
        return evaluate(args, out=out, keep=False, **fields)
