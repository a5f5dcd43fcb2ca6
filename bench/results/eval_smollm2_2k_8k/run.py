"""Issue 17's evaluation of SmolLM2-135M-Instruct at 2K, 4K and 8K tokens, 50 prompts per task:
every stage below is one `hata-jax eval` run directory per length (the harness of
`hata_jax.evaluation.harness`, resumable), run in this order until a deadline.

    python bench/results/eval_smollm2_2k_8k/run.py --root DIR --impl auto \
        --eta RUN --hashattention RUN --rbit256 RUN [--deadline SECONDS] [--stages NAME ...] [--lengths N ...]

Stages (budget = 1/16 or 1/32 of the length, tokens per KV head; layers 0-1 dense; no forced
sink or recent tokens except where a method's authors force them and in asym_kept_b32):
  main           dense, hata (the shipped projections, the paper's key_norm score), exact, hata_rerank
                 (c = 4), quest_authors, quest
  asym           hata and hata_rerank with the asymmetric score (HataConfig.score)
  eta            hata with the eta 0.02 / lr 0.2 projections (--eta)
  hashattention  hashattention_authors, hashattention (--hashattention: a `hata-jax train
                 --selector hashattention` run)
  b32            hata, exact at 1/32
  asym_b32       hata with the asymmetric score at 1/32
  eta_b32        hata with the --eta projections at 1/32
  rbit256        hata with 256-bit projections (--rbit256)
  rbit256_asym   the same with the asymmetric score (and rbit256_asym_b32 at 1/32)
  loki_b32, quest_b32, hashattention_b32, simhash_asym_b32: loki (32 channels),
                 quest_authors, hashattention_authors (--hashattention), simhash (asymmetric) at 1/32
  asym_rerank_b32  hata_rerank (c = 4) with the asymmetric score at 1/32
  asym_kept_b32  hata with the asymmetric score at 1/32, the first 4 and the last 16 positions forced
  selectors      the other selectors of issue 20's frontier: loki (32 channels), streaming
  simhash_asym   simhash (random projections) with the asymmetric score
  loki16, loki8  loki with 16 and 8 channels (32 and 16 selection bytes per token and KV head at D = 64)
  quest8         quest_authors with pages of 8 tokens (32 bytes per token; pages of 16: 16)
  asym_rerank2_b32  hata_rerank with c = 2 and the asymmetric score at 1/32
  loki8_b32      loki with 8 channels at 1/32
  references     dense and exact only (the references without main's other methods: e.g. perplexity at 4K on the
                 CPU, where main's six methods take an hour)
  perplexity     teacher-forced perplexity (4 held-out sequences) of the methods of the stages named by
                 --perplexity-of (default: main, asym and eta)

The prompts of every (task, length) are built once, in parallel (a process per (task, length)),
and shared by the stages: the harness builds them the same way (`tasks.make_samples`).
Batches: 10 prompts per prefill at 2K and 4K, 5 at 8K. Interrupting (SIGINT) stops after the
unit in progress; a rerun resumes every run directory.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import pathlib
import signal
import sys
import time

from hata_jax.evaluation import harness
from hata_jax.evaluation import tasks as tasks_lib
from hata_jax.models.gguf_loader import open_gguf
from hata_jax.models.load import load_model, resolve_model_path
from hata_jax.models.tokenizer import Tokenizer

SAMPLES = 50
BATCH = {2048: 10, 4096: 10, 8192: 5}
MAIN = ("dense", "hata", "exact", "hata_rerank", "quest_authors", "quest")
KEY_NORM, ASYMMETRIC = {"score": "key_norm"}, {"score": "asymmetric"}
STAGES = {  # name: (methods, budget fraction, extra EvalConfig fields, which weights option)
    "main": (MAIN, 16, KEY_NORM, None),
    "asym": (("hata", "hata_rerank"), 16, ASYMMETRIC, None),
    "eta": (("hata",), 16, KEY_NORM, "eta"),
    "hashattention": (("hashattention_authors", "hashattention"), 16, KEY_NORM, "hashattention"),
    "b32": (("hata", "exact"), 32, KEY_NORM, None),
    "asym_b32": (("hata",), 32, ASYMMETRIC, None),
    "eta_b32": (("hata",), 32, KEY_NORM, "eta"),
    "rbit256": (("hata",), 16, {"rbit": 256, **KEY_NORM}, "rbit256"),
    "rbit256_asym": (("hata",), 16, {"rbit": 256, **ASYMMETRIC}, "rbit256"),
    "rbit256_asym_b32": (("hata",), 32, {"rbit": 256, **ASYMMETRIC}, "rbit256"),
    "asym_rerank_b32": (("hata_rerank",), 32, ASYMMETRIC, None),
    "asym_kept_b32": (("hata",), 32, {"sink": 4, "recent": 16, **ASYMMETRIC}, None),
    "selectors": (("loki", "streaming"), 16, {}, None),
    "simhash_asym": (("simhash",), 16, ASYMMETRIC, None),
    "loki16": (("loki",), 16, {"loki_channels": 16}, None),
    "loki8": (("loki",), 16, {"loki_channels": 8}, None),
    "quest8": (("quest_authors",), 16, {"quest_page_size": 8}, None),
    "asym_rerank2_b32": (("hata_rerank",), 32, {"candidates": 2, **ASYMMETRIC}, None),
    "loki8_b32": (("loki",), 32, {"loki_channels": 8}, None),
    "loki_b32": (("loki",), 32, {}, None),
    "quest_b32": (("quest_authors",), 32, {}, None),
    "hashattention_b32": (("hashattention_authors",), 32, KEY_NORM, "hashattention"),
    "simhash_asym_b32": (("simhash",), 32, ASYMMETRIC, None),
    "references": (("dense", "exact"), 16, {}, None),
}
PERPLEXITY = ("main", "asym", "eta")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _samples(job):
    gguf, task, length = job
    tokenizer = Tokenizer.from_gguf(open_gguf(gguf))
    return (task, length), tasks_lib.make_samples(task, tokenizer, length, SAMPLES)


def _stop(*_):
    raise KeyboardInterrupt


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="where the run directories go (ROOT/<stage>_<length>)")
    p.add_argument("--impl", default="auto", choices=["auto", "pallas", "reference"])
    p.add_argument("--eta", help="the eta 0.02 / lr 0.2 projections (a `hata-jax train` run)")
    p.add_argument("--hashattention", help="a `hata-jax train --selector hashattention` run")
    p.add_argument("--rbit256", help="256-bit HATA projections (a `hata-jax train --rbit 256` run)")
    p.add_argument("--stages", nargs="+", default=[*STAGES, "perplexity"], choices=[*STAGES, "perplexity"])
    p.add_argument("--perplexity-of", nargs="+", default=list(PERPLEXITY), choices=list(STAGES),
                   help="the stages whose methods the perplexity stage scores (default: %(default)s)")
    p.add_argument("--lengths", nargs="+", type=int, default=list(BATCH), choices=list(BATCH))
    p.add_argument("--samples", type=int, default=SAMPLES, help="prompts per task (a prefix of the 50)")
    p.add_argument("--batch", type=int, help="prompts per prefill (default: 10 at 2K and 4K, 5 at 8K)")
    p.add_argument("--deadline", type=float, help="stop starting units after this many seconds")
    args = p.parse_args()
    if args.batch is not None and args.batch < 1:
        p.error(f"--batch must be >= 1, got {args.batch}")
    start = time.perf_counter()
    if args.deadline:
        signal.signal(signal.SIGALRM, _stop)
        signal.alarm(int(args.deadline))
    try:
        return run(args, start)
    except KeyboardInterrupt:
        log(f"stopped at the deadline after {time.perf_counter() - start:.0f} s; rerun to resume")
        return 3


def run(args, start: float) -> int:
    gguf = resolve_model_path("smollm2", log=log)
    jobs = [(str(gguf), task, length) for length in args.lengths for task in tasks_lib.TASKS]
    with concurrent.futures.ProcessPoolExecutor(min(len(jobs), os.cpu_count() or 1)) as pool:
        built = dict(pool.map(_samples, jobs))
    log(f"{len(built) * SAMPLES} prompts built in {time.perf_counter() - start:.0f} s")
    make_samples = tasks_lib.make_samples

    def cached(task, tokenizer, length, count, seed=0):
        if seed == 0 and (task, length) in built and count <= SAMPLES:
            return built[task, length][:count]
        return make_samples(task, tokenizer, length, count, seed)

    tasks_lib.make_samples = cached
    model, tokenizer = load_model("smollm2", log=log)
    weights = {"eta": args.eta, "hashattention": args.hashattention, "rbit256": args.rbit256}
    todo = [(stage, length, ("tasks",)) for stage in args.stages if stage != "perplexity" for length in args.lengths]
    if "perplexity" in args.stages:
        todo += [(stage, length, ("perplexity",)) for stage in args.perplexity_of for length in args.lengths]
    for stage, length, parts in todo:
        methods, fraction, extra, option = STAGES[stage]
        if option and not weights[option]:
            log(f"skip {stage} {length}: no --{option}")
            continue
        config = harness.EvalConfig(methods=methods, budgets=(length // fraction,), lengths=(length,),
                                    samples=args.samples, batch=args.batch or BATCH[length], impl=args.impl,
                                    metric_prompts=0, **extra)
        directory = pathlib.Path(args.root) / f"{stage}_{length}"
        log(f"{stage} {length} {parts[0]}: {', '.join(methods)} at budget {length // fraction} -> {directory}")
        t = time.perf_counter()
        harness.run_eval(model, "smollm2", tokenizer, config, directory,
                         hash_weights=weights[option] if option in ("eta", "rbit256") else None,
                         hashattention_dir=weights["hashattention"], progress=False, log=log, parts=parts)
        log(f"{stage} {length} {parts[0]} done in {time.perf_counter() - t:.0f} s")
    log(f"all stages done in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
