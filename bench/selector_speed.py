"""The speed side of issue 20's frontier: every selector's decode step and per-layer attention on
this machine, at the budgets of the accuracy evaluation.

    python -m bench.selector_speed --out $OUT/selector_speed.json [--small] [--models smollm2 llama] \
        [--contexts N ...] [--batches B ...] [--fractions 16 32] [--methods ...] [--time-budget S]
    python -m bench.selector_speed --table A.json [B.json ...]     # markdown tables of finished runs

Per model shapes (random weights in bf16, as `bench.decode`), context N, batch B and budget N /
fraction, for every method of :data:`hata_jax.models.plan.METHODS` (`AttentionPlan.for_method`,
layers 0-1 dense, rbit 128, HATA's default score):
- `step`: the model's own jitted decode step (`ModelSteps.decode`, caches donated), greedy, each
  step waited for; median and p10/p90 over `--reps` steps after `--warmup`; tokens/s = B / median.
  After every other method, dense's step is timed again on the same caches (`dense_beside_ms`), and
  `speed_vs_dense` = that / the method's median: a ratio that the drift of a long run (clocks, the
  host) does not bias, as it does comparisons of methods timed minutes apart.
- `attention`: one layer's work after the token's append, median over distinct layers' caches
  (`bench.timing.median_us`): dense `dense_decode_attention`; hata `encode_step` of the query +
  `hamming_topk` + `sparse_decode_attention`; a selector `select_indices` (its scores in XLA, then
  the selection kernel; StreamingLLM's positions without either) + `sparse_decode_attention`
  (:func:`hata_jax.models.selector_cache.selector_attention`).
- `selection_bytes`: what choosing reads per cached token and KV head
  (:func:`hata_jax.evaluation.frontier.selection_bytes_per_token`).
- `step_bytes`: what one decode step reads (:func:`bench.decode_bytes.step_bytes`: the weights, the
  dense layers' K and V, each selecting layer's choosing and its chosen tokens' K, V and indices), and
  `floor_ms`, those bytes at the bandwidth measured at the start of the run (`bench.timing`).

Caches: every layer holds N - slack random tokens per sequence (K, V ~ N(0, 1), the keys' HATA
codes and norms), capacity N; a selector's state is made from them (`with_selector_states`), and
its layers get no hash projection, so its steps append no HATA codes. Random selector params:
projections N(0, 1) (hata, hata_rerank, simhash), a random orthonormal basis (loki), HashAttention's
MLPs at their initialisation. Methods run in METHODS order from the same caches (lengths reset).

Budget: configs run in the order given (models, then contexts, then batches); a config whose
caches do not fit `--memory-gb` is skipped with the reason, and once `--time-budget` is spent the
rest are skipped. Rows are written to the JSON as they complete.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import hata_jax as hj
from bench.decode import memory_limit_bytes
from bench.decode_bytes import cache_bytes, step_bytes, weight_bytes, weight_read_bytes
from bench.decode_steps import GREEDY, hata_attention, random_hata_cache, with_length
from bench.timing import environment, floor_bandwidth_gbps, median_us, write_json
from hata_jax import HataConfig
from hata_jax.evaluation.frontier import selection_bytes_per_token
from hata_jax.models import LlamaForCausalLM, generation
from hata_jax.models.plan import METHODS, AttentionPlan
from hata_jax.models.presets import FULL_MODELS, SMALL_MODELS
from hata_jax.models.selector_cache import SelectorCache, selector_attention, with_selector_states
from hata_jax.selectors import HashAttentionSelector, HataSelector, LokiSelector
from hata_jax.train.hashattention_objective import HashAttentionObjective

GB = 1e9
SWEEP_LAYERS = 4  # distinct layers' caches per attention timing


@dataclasses.dataclass(frozen=True)
class Settings:
    models: tuple[str, ...] = ("smollm2", "llama")
    contexts: tuple[int, ...] | None = None  # None: each model's CONTEXTS
    batches: tuple[int, ...] = (1, 8)
    fractions: tuple[int, ...] = (16, 32)
    methods: tuple[str, ...] = METHODS
    rbit: int = 128
    dense_layers: int = 2
    warmup: int = 2
    reps: int = 20
    time_budget_s: float = 520.0
    memory_gb: float | None = None
    small: bool = False


CONTEXTS = {"smollm2": (2048, 4096, 8192), "llama": (32768, 131072)}  # SmolLM2: the accuracy evaluation's
SMALL = dict(contexts=(160,), batches=(2,), fractions=(16,), warmup=1, reps=2)


def random_selector_params(plan: AttentionPlan, key, q_heads: int, kv_heads: int, head_dim: int):
    """One layer's random params for `plan`'s selector (None where it has none)."""
    selector = plan.selector
    if isinstance(selector, HataSelector):  # hata_rerank, simhash
        return jax.random.normal(key, (kv_heads, head_dim, selector.rbit), jnp.float32)
    if isinstance(selector, LokiSelector):
        basis, _ = jnp.linalg.qr(jax.random.normal(key, (kv_heads, head_dim, head_dim), jnp.float32))
        return basis
    if isinstance(selector, HashAttentionSelector):
        return HashAttentionObjective(bits=selector.bits).init(key, q_heads, kv_heads, head_dim)
    return None


class SelectorSpeed:
    def __init__(self, settings: Settings, out: str, memory_limit: float, started: float, bandwidth: dict):
        self.s, self.out, self.memory_limit, self.bandwidth = settings, out, memory_limit, bandwidth
        self.configs = SMALL_MODELS if settings.small else FULL_MODELS
        self.deadline = started + settings.time_budget_s
        self.rows: list[dict] = []
        self.env = environment()
        self.key = jax.random.PRNGKey(20261207)

    def _next_key(self):
        self.key, sub = jax.random.split(self.key)
        return sub

    def record(self, row: dict) -> None:
        self.rows.append(row)
        write_json(self.out, {"environment": self.env, "settings": dataclasses.asdict(self.s),
                              "bandwidth": self.bandwidth, "memory_limit_gb": self.memory_limit / GB,
                              "rows": self.rows})

    def skip(self, base: dict, reason: str) -> None:
        print(f"  skip {base}: {reason}", flush=True)
        self.record({"kind": "skip", **base, "reason": reason})

    def run(self) -> None:
        for model_name in self.s.models:
            config = self.configs[model_name]
            model = nnx.jit(lambda c=config: LlamaForCausalLM(c, dtype=jnp.bfloat16, rngs=nnx.Rngs(7)))()
            steps = generation.ModelSteps(model)
            for context in self.s.contexts or CONTEXTS[model_name]:
                for batch in self.s.batches:
                    base = {"model": model_name, "context": context, "batch": batch}
                    if time.perf_counter() > self.deadline:
                        self.skip(base, "time budget spent")
                        continue
                    need = (weight_bytes(config, 2) + cache_bytes(config, batch, context, self.s.rbit, 2, False)
                            * 1.5 + 1e9)  # selector states and the sweep's copies: at most half the caches again
                    if need > self.memory_limit:
                        self.skip(base, f"memory: needs ~{need / GB:.1f} GB, limit {self.memory_limit / GB:.1f} GB")
                        continue
                    self.run_config(steps, config, base)
            del steps, model

    def run_config(self, steps, config, base: dict) -> None:
        s, (b, n) = self.s, (base["batch"], base["context"])
        slack = 2 * (s.warmup + s.reps)  # the method's steps and the dense control's
        print(f"== {base}", flush=True)
        w = [jax.random.normal(self._next_key(), (config.num_kv_heads, config.head_dim, s.rbit), jnp.float32)
             for _ in range(config.num_layers)]
        shape = (b, config.num_kv_heads, n, config.head_dim)
        caches = [random_hata_cache(self._next_key(), wi, n - slack, shape=shape, dtype=jnp.bfloat16) for wi in w]
        for fraction in s.fractions:
            budget = n // fraction
            for method in s.methods:
                if time.perf_counter() > self.deadline:
                    self.skip({**base, "method": method, "budget": budget}, "time budget spent")
                    continue
                caches = self.run_method(steps, config, base, method, budget, fraction, w,
                                         with_length(caches, n - slack))
        for leaf in jax.tree.leaves(caches):
            leaf.delete()

    def run_method(self, steps, config, base, method, budget, fraction, w, caches):
        """Time `method`'s step and per-layer attention; returns the plain caches for the next method."""
        s = self.s
        hata = HataConfig(rbit=s.rbit, budget=budget)
        plan = AttentionPlan.for_method(config.num_layers, method, hata, hj.default_impl(), dense_layers=s.dense_layers)
        params = [random_selector_params(plan, self._next_key(), config.num_heads, config.num_kv_heads,
                                         config.head_dim) if kind == "sparse" else None for kind in plan.layers]
        weights = [None if kind == "sparse" else wi for wi, kind in zip(w, plan.layers)]
        if plan.sparse_layers:
            caches = with_selector_states(caches, plan, params)
        row = {"kind": "method", **base, "method": method, "budget": budget, "fraction": f"1/{fraction}",
               "implementation": hj.default_impl(),
               "selection_bytes": selection_bytes_per_token(plan, base["context"], config.num_kv_heads,
                                                            config.head_dim)}
        row["step_bytes"] = row_step_bytes(row, dataclasses.asdict(s))
        row["floor_ms"] = row["step_bytes"] / (self.bandwidth["floor_gbps"] * 1e6)
        row["attention"] = self.time_attention(config, method, plan, caches, w, params, base["batch"])
        start = time.perf_counter()
        timed, caches = self.time_steps(steps, plan, caches, weights, params, base["batch"])
        median = statistics.median(timed)
        row.update(median_ms=1e3 * median, p10_ms=1e3 * float(np.percentile(timed, 10)),
                   p90_ms=1e3 * float(np.percentile(timed, 90)), steps=len(timed), tokens_per_s=base["batch"] / median,
                   seconds=time.perf_counter() - start)
        caches = [c.base if isinstance(c, SelectorCache) else c for c in caches]
        if method != "dense":  # a control: dense's step right after, so drift over the run shows in the ratio
            dense = AttentionPlan.for_method(config.num_layers, "dense", hata, hj.default_impl(),
                                             dense_layers=s.dense_layers)
            control, caches = self.time_steps(steps, dense, caches, w, None, base["batch"])
            row["dense_beside_ms"] = 1e3 * statistics.median(control)
            row["speed_vs_dense"] = row["dense_beside_ms"] / row["median_ms"]
        self.record(row)
        attention = row["attention"]
        print(f"  {method:<22} budget {budget:>5}: step {row['median_ms']:8.2f} ms ({row['tokens_per_s']:8.1f} tok/s), "
              f"attention {attention['median_us'] if attention else float('nan'):9.1f} us/layer, "
              f"selection {row['selection_bytes'] if row['selection_bytes'] is not None else '-'} B/token"
              + (f", {row['speed_vs_dense']:.2f}x dense beside it" if "speed_vs_dense" in row else ""), flush=True)
        return caches

    def time_steps(self, steps, plan, caches, weights, params, batch) -> tuple[list[float], list]:
        """`warmup` + `reps` greedy decode steps of `plan`, each waited for; the timed ones' seconds, and
        the caches after them."""
        tokens = jnp.zeros((batch,), jnp.int32)
        key = jax.random.PRNGKey(0)
        times = []
        for _ in range(self.s.warmup + self.s.reps):
            t0 = time.perf_counter()
            tokens, caches, key = steps.decode(steps.state_leaves, tokens, caches, weights, key,
                                               params if plan.sparse_layers else None, plan=plan, sampling=GREEDY)
            tokens.block_until_ready()
            times.append(time.perf_counter() - t0)
        return times[self.s.warmup:], caches

    def time_attention(self, config, method, plan, caches, w, params, batch) -> dict | None:
        """Per-layer attention after the append (see the module docstring), over SWEEP_LAYERS layers."""
        layers = list(range(self.s.dense_layers, config.num_layers))[:SWEEP_LAYERS] or [0]
        qs = [jax.random.normal(self._next_key(), (batch, config.num_heads, config.head_dim), jnp.bfloat16)
              for _ in layers]
        impl = plan.impl
        if method == "dense":
            def fn(q, c):
                return hj.dense_decode_attention(q, c.k, c.v, c.lengths, impl=impl)
            sets = [(q, caches[i]) for q, i in zip(qs, layers)]
        elif method == "hata":
            k_new = jax.random.normal(self._next_key(), (batch, config.num_kv_heads, config.head_dim), jnp.bfloat16)

            def fn(q, c, wi):
                return hata_attention(q, k_new, c, wi, plan.hata, impl)
            sets = [(q, caches[i], w[i]) for q, i in zip(qs, layers)]
        else:
            def fn(q, c, p):
                return selector_attention(q, c, plan, p)
            sets = [(q, caches[i], params[i]) for q, i in zip(qs, layers)]
        return median_us(fn, sets, reps=5 if self.s.small else 25)


def row_step_bytes(row: dict, settings: dict) -> int:
    """Bytes one decode step of a method row reads (`step_bytes` in the module docstring), from the
    row's model, context, batch, method and budget and the run's `settings` (rbit, dense_layers, small)."""
    config = (SMALL_MODELS if settings.get("small") else FULL_MODELS)[row["model"]]
    hata = HataConfig(rbit=settings["rbit"], budget=row["budget"])
    return step_bytes(config, row["method"], row["batch"], row["context"], hata, 2,
                      weight_read_bytes(config, weight_bytes(config, 2), 2), settings["dense_layers"],
                      row["selection_bytes"])


def speed_tables(document: dict) -> str:
    """Markdown tables of a bench.selector_speed document, one per (model, context, batch, budget), in
    its order: step median [p10, p90], tokens/s, speed against dense (the control beside the method where
    the row has one, else the config's dense row), bytes a step reads (and their floor at the run's
    bandwidth, where it was measured), attention per layer and selection bytes per token."""
    groups: dict = {}
    for r in document["rows"]:
        if r["kind"] == "method":
            groups.setdefault((r["model"], r["context"], r["batch"], r["budget"], r["fraction"]), []).append(r)
    out = []
    for (model, context, batch, budget, fraction), group in groups.items():
        dense = next((r for r in group if r["method"] == "dense"), None)
        out += [f"{model}, {context} tokens, batch {batch}, budget {budget} ({fraction})", "",
                "| method | selection B / token | step ms [p10, p90] | tokens/s | vs dense | MB / step (floor ms) | "
                "attention us / layer |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in group:
            if "speed_vs_dense" in r:
                ratio = f"{r['speed_vs_dense']:.2f}x (beside)"
            elif dense is not None:
                ratio = f"{dense['median_ms'] / r['median_ms']:.2f}x"
            else:
                ratio = "-"
            attention = f"{r['attention']['median_us']:.1f}" if r.get("attention") else "-"
            chosen = "-" if r["selection_bytes"] is None else f"{r['selection_bytes']:g}"
            nbytes = r.get("step_bytes") or row_step_bytes(r, document["settings"])
            floor = f" ({r['floor_ms']:.2f})" if "floor_ms" in r else ""
            out.append(f"| {r['method']} | {chosen} | {r['median_ms']:.2f} [{r['p10_ms']:.2f}, {r['p90_ms']:.2f}] | "
                       f"{r['tokens_per_s']:.1f} | {ratio} | {nbytes / 1e6:,.0f}{floor} | {attention} |")
        out.append("")
    return "\n".join(out)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="results JSON (written after every method)")
    parser.add_argument("--small", action="store_true", help="tiny models and one short context (CPU smoke run)")
    parser.add_argument("--models", nargs="+", choices=sorted(FULL_MODELS))
    parser.add_argument("--contexts", nargs="+", type=int, help="default: 2048 4096 8192 for smollm2, 32768 131072 "
                                                                 "for llama")
    parser.add_argument("--batches", nargs="+", type=int)
    parser.add_argument("--fractions", nargs="+", type=int, help="budgets as fractions of the context (default 16 32)")
    parser.add_argument("--methods", nargs="+", choices=METHODS)
    parser.add_argument("--reps", type=int)
    parser.add_argument("--time-budget", type=float, dest="time_budget_s", help="seconds (default 520)")
    parser.add_argument("--memory-gb", type=float, help="device memory to plan for (default: 97%% of the allocator's)")
    args = parser.parse_args(argv)
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items()
             if v is not None and k in {f.name for f in dataclasses.fields(Settings)}}
    settings = Settings(**{**(SMALL if args.small else {}), **given})
    for fraction in settings.fractions:
        for context in settings.contexts or [c for m in settings.models for c in CONTEXTS[m]]:
            if fraction < 1 or context // fraction < 1:
                parser.error(f"--fractions: {fraction} leaves no budget at context {context}")
    return args, settings


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--table"]:
        if len(argv) < 2:
            raise SystemExit("--table needs one or more bench.selector_speed JSONs")
        for path in argv[1:]:
            document = json.loads(pathlib.Path(path).read_text())
            print(f"### `{pathlib.Path(path).name}` ({document['environment'].get('device')}, commit "
                  f"{document['environment'].get('commit')})\n")
            print(speed_tables(document))
        return 0
    args, settings = parse_args(argv)
    started = time.perf_counter()
    bandwidth = floor_bandwidth_gbps(1 << (20 if settings.small else 30))
    bench = SelectorSpeed(settings, args.out, memory_limit_bytes(settings), started, bandwidth)
    print(bench.env, flush=True)
    bench.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
