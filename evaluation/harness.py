"""The evaluation loop: methods x budgets x tasks x lengths on one model, resumable.

Work is done in units, each written to `DIR/records.jsonl` (one JSON object per line) as soon as
it is finished, so an interrupted run resumes where it stopped and skips every unit already done:

- task units (kind "task"): a (prompt, method, budget) generation and its score. Prompts go in
  batches of `batch`; each batch is prefilled once (:func:`hata_jax.models.prefill_prompts`) and every
  method and budget decodes from that prefill (:func:`hata_jax.models.generate_from`, greedy, the plan at
  every step: `dense_below=0`); a batch whose units are all done is not even prefilled.
- perplexity units (kind "perplexity"): a (held-out sequence, method, budget) teacher-forced NLL
  (:mod:`hata_jax.evaluation.perplexity`).
- attention units (kind "attention"): a (prompt, method, budget) per-layer mass recall and output
  error (:mod:`hata_jax.evaluation.attention_metrics`), on the first `metric_prompts` prompts of each task.

"dense" runs once per prompt (budget None). `DIR/run.json` holds the model's identity and the
settings that change results (dense layers, rbit, sink, recent, seed, batch, impl..., and the
content digests of hata's and hashattention's params, whatever path they came from, and
hata_rerank's candidates, loki's channels, quest's page size): a resumed run must match them;
methods, budgets, tasks, lengths and sample counts may grow. Each record carries its prompt's
digest, and a resumed run refuses records of other prompts. Everything is deterministic (seeded
prompts, greedy decoding, fixed batches), so a resumed run ends with the results an uninterrupted
one gives.

A crash can cut the last line of `records.jsonl` at any byte: :class:`Records` moves such a torn
tail to `records.jsonl.torn` and truncates the file before appending, so the unit is simply
redone. :func:`summarize` turns the records into the results document and refuses (ValueError
listing them) a configuration with missing units, so no average is reported over part of them.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import sys
import time
import warnings

import jax
import numpy as np

import hata_jax
from hata_jax import HataConfig
from hata_jax.evaluation import attention_metrics, perplexity
from hata_jax.evaluation import tasks as tasks_lib
from hata_jax.files import write_atomically
from hata_jax.models.generation import CAPACITY_BUCKET, generate_from, prefill_prompts
from hata_jax.models.identity import check_same_model, model_identity
from hata_jax.models.plan import METHODS, AttentionPlan
from hata_jax.selectors import params_source
from hata_jax.train.integrity import content_digest
from hata_jax.train.selector_params import selector_params

FORMAT = "hata-jax/eval"
VERSION = 1
DEFAULT_METHODS = ("dense", "hata", "exact", "simhash", "quest", "loki", "streaming")
# EvalConfig fields that change the result of a unit: a resumed run must keep them.
RESULT_SETTINGS = ("batch", "metric_queries", "dense_layers", "rbit", "score", "sink", "recent", "seed", "impl")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What to evaluate.

    Attributes:
      methods: names of :data:`hata_jax.models.METHODS` ("dense", "hata", or a selector).
      budgets: tokens kept per KV head in the selecting layers.
      tasks: names of :data:`hata_jax.evaluation.tasks.TASKS`; lengths: target prompt lengths in tokens.
      samples: prompts per task and length.
      batch: prompts per prefill (the last batch of a task is padded with its last prompt).
      perplexity_sequences: held-out sequences per length (0: no perplexity).
      metric_prompts: prompts per task and length whose attention metrics are measured (0: none).
      metric_queries: query positions per metric prompt.
      dense_layers: the first layers every plan keeps dense (`AttentionPlan.for_method`).
      rbit, score, sink, recent: the plans' HataConfig fields (rbit and score: hata, hata_rerank
        and simhash).
      candidates: hata_rerank's factor c (HATA picks c x budget candidates, exact scores the budget).
      loki_channels: loki's principal channels per key; quest_page_size: quest's and
        quest_authors' tokens per page.
      seed: prompts, held-out files, query positions, simhash projections.
      impl: "auto", "pallas" or "reference" for the hata_jax ops.
    """

    methods: tuple[str, ...] = DEFAULT_METHODS
    budgets: tuple[int, ...] = (128, 256, 512)
    tasks: tuple[str, ...] = tuple(tasks_lib.TASKS)
    lengths: tuple[int, ...] = (4096,)
    samples: int = 20
    batch: int = 2
    perplexity_sequences: int = 4
    metric_prompts: int = 1
    metric_queries: int = 16
    dense_layers: int = 2
    rbit: int = 128
    score: str = HataConfig.score
    candidates: int = 4
    loki_channels: int = 32
    quest_page_size: int = 16
    sink: int = 0
    recent: int = 0
    seed: int = 0
    impl: str = "auto"

    def __post_init__(self):
        for name in ("methods", "budgets", "tasks", "lengths"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not value or len(set(value)) != len(value):
                raise ValueError(f"EvalConfig.{name} must be a non-empty tuple without repeats, got {value!r}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"unknown methods {bad}; supported: {', '.join(METHODS)}")
        bad = [t for t in self.tasks if t not in tasks_lib.TASKS]
        if bad:
            raise ValueError(f"unknown tasks {bad}; supported: {', '.join(tasks_lib.TASKS)}")
        for name in ("samples", "batch", "metric_queries", "rbit", "candidates", "loki_channels", "quest_page_size"):
            _check_int(getattr(self, name), f"EvalConfig.{name}", 1)
        for name in ("perplexity_sequences", "metric_prompts", "dense_layers", "sink", "recent", "seed"):
            _check_int(getattr(self, name), f"EvalConfig.{name}", 0)
        for name in ("budgets", "lengths"):
            for value in getattr(self, name):
                _check_int(value, f"EvalConfig.{name} entry", 1)
        for budget in self.budgets:  # validates sink + recent <= budget and the rbit
            HataConfig(rbit=self.rbit, budget=budget, sink=self.sink, recent=self.recent, score=self.score)

    @property
    def configs(self) -> list[tuple[str, int | None]]:
        """(method, budget) pairs to run: dense once (budget None), every other method per budget."""
        return [(m, None) if m == "dense" else (m, b) for m in self.methods for b in
                ((None,) if m == "dense" else self.budgets)]

    def plan(self, num_layers: int, method: str, budget: int | None) -> AttentionPlan:
        hata = HataConfig(rbit=self.rbit, budget=budget or max(self.budgets), sink=self.sink, recent=self.recent,
                          score=self.score)
        return AttentionPlan.for_method(num_layers, method, hata, self.impl, dense_layers=self.dense_layers,
                                        selector_options=self.selector_options)

    @property
    def selector_options(self) -> dict:
        """The selector fields this run sets (`AttentionPlan.for_method`'s `selector_options`)."""
        return {"candidates": self.candidates, "channels": self.loki_channels, "page_size": self.quest_page_size}

    def settings(self) -> dict:
        return {name: getattr(self, name) for name in RESULT_SETTINGS}


def _check_int(value, name: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def unit_key(record: dict) -> tuple:
    """What identifies a unit of work (two records with the same key are the same unit)."""
    return (record["kind"], record.get("task"), record["length"], record["index"], record["method"],
            record["budget"])


class Records:
    """The records of `DIR/records.jsonl`: loaded on start, appended (and fsynced) one by one.

    Every record is one line ending in a newline. On load, a last line that is cut short (no
    newline, or not a JSON record: an interrupted write) is appended to `records.jsonl.torn` and
    cut from the file, with a warning, so the next record starts on a line of its own; an
    unreadable line before the last one is not a torn write and is refused (ValueError).
    """

    def __init__(self, directory: pathlib.Path):
        self.path = directory / "records.jsonl"
        self.by_key: dict[tuple, dict] = {}
        if self.path.is_file():
            data = self.path.read_bytes()
            lines = data.split(b"\n")  # lines[-1]: what follows the last newline (b"" normally)
            end = 0  # bytes of complete, readable lines
            for number, line in enumerate(lines[:-1], 1):
                record = _parse_record(line)
                if record is None:
                    if number == len(lines) - 1 and not lines[-1]:  # the last line: a torn write
                        break
                    raise ValueError(f"{self.path} line {number} is not a record, and it is not the last line "
                                     "(a torn write only cuts the last one): the file is damaged; use another "
                                     "--out or repair it")
                self.by_key[unit_key(record)] = record
                end += len(line) + 1
            if end < len(data):
                self._cut_tail(data, end)

    def _cut_tail(self, data: bytes, end: int) -> None:
        torn = self.path.with_name(self.path.name + ".torn")
        with open(torn, "ab") as f:
            f.write(data[end:] + b"\n")
            f.flush()
            os.fsync(f.fileno())
        with open(self.path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
        warnings.warn(f"{self.path}: its last line was cut short by an interruption ({len(data) - end} bytes); "
                      f"moved it to {torn}, and that unit will be redone", stacklevel=3)

    def done(self, kind: str, task: str | None, length: int, index: int, method: str, budget, digest: str | None):
        """Whether the unit is recorded; raises if it is, for another prompt than `digest`."""
        record = self.by_key.get((kind, task, length, index, method, budget))
        if record is None:
            return False
        if record.get("digest") != digest:
            raise ValueError(f"{self.path} holds results for other prompts ({kind} {task} length {length} sample "
                             f"{index}: prompt digest {record.get('digest')}, now {digest}); use another --out")
        return True

    def add(self, record: dict) -> None:
        """Append `record` as one line and fsync it (a crash leaves at most a torn last line)."""
        self.by_key[unit_key(record)] = record
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _parse_record(line: bytes) -> dict | None:
    """The record of one line of records.jsonl, or None if the line is not one."""
    try:
        record = json.loads(line)
        unit_key(record)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError):
        return None
    return record if isinstance(record, dict) else None


def open_run(directory: str | pathlib.Path, model, model_name: str, config: EvalConfig,
             sources: dict | None = None) -> Records:
    """Create `directory` (or check that the run there used this model, these settings and these
    `sources` of the methods' params, e.g. {"hata_params_sha256": digest}) and load its records.

    A source that is None (its method is not run now) is not compared; one the run has not
    recorded yet (its method joins the run) is added to `run.json`."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "run.json"
    settings = {**config.settings(), **{k: v for k, v in (sources or {}).items() if v is not None}}
    if path.is_file():
        run = json.loads(path.read_text())
        if run.get("format") != FORMAT or run.get("version") != VERSION:
            raise ValueError(f"{path} is not a {FORMAT} v{VERSION} run; use another --out")
        check_same_model(run["model"], model, f"the evaluation in {directory}")
        run["settings"].setdefault("score", "key_norm")  # runs made before the setting existed used key_norm
        keys = {*config.settings(), *(k for k in settings if k in run["settings"])}
        differ = {k: (run["settings"].get(k), settings.get(k)) for k in sorted(keys)
                  if run["settings"].get(k) != settings.get(k)}
        if differ:
            raise ValueError(f"the evaluation in {directory} used other settings ({differ}, as (there, now)); "
                             "use another --out")
        if not set(settings) <= set(run["settings"]):
            run["settings"] = {**run["settings"], **settings}
            _write_json(path, run)
    else:
        _write_json(path, {"format": FORMAT, "version": VERSION, "model": model_identity(model, model_name),
                           "settings": settings})
    return Records(directory)


def _write_json(path: pathlib.Path, payload: dict) -> None:
    write_atomically(path, lambda f: f.write((json.dumps(payload, indent=1) + "\n").encode()))


class MethodParams:
    """Each method's per-layer params, made on first use (:func:`hata_jax.train.selector_params`)."""

    def __init__(self, model, tokenizer, config: EvalConfig, hash_weights=None, hashattention_dir=None, log=print):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.hash_weights, self.hashattention_dir, self.log = hash_weights, hashattention_dir, log
        self.cache: dict[str, list | None] = {}

    def __call__(self, method: str):
        method = params_method(method)  # methods that read another's params share them
        if method not in self.cache:
            if method == "dense":
                self.cache[method] = None
            else:
                start = time.perf_counter()
                self.cache[method] = selector_params(
                    method, self.model, rbit=self.config.rbit, hash_weights=self.hash_weights,
                    hashattention_dir=self.hashattention_dir, tokenizer=self.tokenizer, seed=self.config.seed)
                if time.perf_counter() - start > 5:
                    self.log(f"{method}: params ready in {time.perf_counter() - start:.0f} s")
        return self.cache[method]


def _progress(enabled: bool, total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, dynamic_ncols=True, leave=True)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def run_tasks(model, tokenizer, config: EvalConfig, records: Records, params: MethodParams, progress: bool,
              samples: dict) -> None:
    """Generate and score every (prompt, method, budget) not recorded yet."""
    num_layers = model.config.num_layers
    configs = config.configs
    new_tokens = max(tasks_lib.TASKS[t].max_new_tokens for t in config.tasks)
    batches = [(length, task, group) for length in config.lengths for task in config.tasks
               for group in _batches(samples[task, length], config.batch)]
    with _progress(progress, len(batches) * len(configs), "tasks (batch x method x budget)") as bar:
        for length, task, group in batches:
            bar.set_postfix_str(f"{task} {length}")
            todo = [(m, b) for m, b in configs
                    if not all(records.done("task", task, length, s.index, m, b, s.digest) for s in group)]
            if not todo:
                bar.update(len(configs))
                continue
            prompts = [list(s.tokens) for s in group] + [list(group[-1].tokens)] * (config.batch - len(group))
            prefilled = prefill_prompts(model, prompts, capacity=_round_up(length + new_tokens, CAPACITY_BUCKET),
                                        impl=config.impl)
            for method, budget in configs:
                if (method, budget) in todo:
                    start = time.perf_counter()
                    result = generate_from(prefilled, config.plan(num_layers, method, budget), params(method),
                                           max_new_tokens=group[0].max_new_tokens, stop_ids=tokenizer.stop_ids,
                                           dense_below=0)
                    seconds = time.perf_counter() - start
                    for sample, tokens in zip(group, result.tokens):
                        if records.done("task", task, length, sample.index, method, budget, sample.digest):
                            continue
                        prediction = tokenizer.decode(tokens)
                        records.add({"kind": "task", "task": task, "length": length, "index": sample.index,
                                     "digest": sample.digest, "method": method, "budget": budget,
                                     "prompt_tokens": len(sample.tokens), "prediction": prediction,
                                     "answers": list(sample.answers),
                                     "score": tasks_lib.score(prediction, sample.answers), "seconds": seconds})
                bar.update(1)


def _batches(items: list, size: int) -> list[list]:
    return [items[i: i + size] for i in range(0, len(items), size)]


def run_attention(model, config: EvalConfig, records: Records, params: MethodParams, progress: bool,
                  samples: dict) -> None:
    """Per-layer mass recall and output error of every selecting method on the metric prompts."""
    num_layers = model.config.num_layers
    configs = [(m, b) for m, b in config.configs if m != "dense"]
    prompts = [s for length in config.lengths for task in config.tasks
               for s in samples[task, length][: config.metric_prompts]]
    with _progress(progress, len(prompts) * len(configs), "attention metrics (prompt x method x budget)") as bar:
        for sample in prompts:
            todo = [(m, b) for m, b in configs
                    if not records.done("attention", sample.task, sample.length, sample.index, m, b, sample.digest)]
            if not todo:
                bar.update(len(configs))
                continue
            positions = attention_metrics.query_positions(len(sample.tokens), config.metric_queries,
                                                          seed=config.seed + sample.index)
            inputs = attention_metrics.capture_attention_inputs(model, sample.tokens, positions)
            for method, budget in configs:
                if (method, budget) in todo:
                    metrics = attention_metrics.plan_metrics(config.plan(num_layers, method, budget), params(method),
                                                             inputs, positions)
                    records.add({"kind": "attention", "task": sample.task, "length": sample.length,
                                 "index": sample.index, "digest": sample.digest, "method": method, "budget": budget,
                                 "positions": positions.tolist(), **metrics})
                bar.update(1)


def run_perplexity(model, tokenizer, config: EvalConfig, records: Records, params: MethodParams,
                   progress: bool) -> None:
    """Teacher-forced NLL of every (held-out sequence, method, budget) not recorded yet."""
    num_layers = model.config.num_layers
    configs = config.configs
    units = [(length, i) for length in config.lengths for i in range(config.perplexity_sequences)]
    sequences = {length: perplexity.heldout_sequences(tokenizer, length, config.perplexity_sequences, config.seed)
                 for length in config.lengths} if units else {}
    with _progress(progress, len(units) * len(configs), "perplexity (sequence x method x budget)") as bar:
        for length, index in units:
            tokens = sequences[length][index]
            digest = tasks_lib.digest(tokens)
            for method, budget in configs:
                if not records.done("perplexity", None, length, index, method, budget, digest):
                    nll = perplexity.sequence_nll(model, tokens[None], config.plan(num_layers, method, budget),
                                                  params(method))
                    records.add({"kind": "perplexity", "length": length, "index": index, "digest": digest,
                                 "method": method, "budget": budget, "nll": float(nll[0]),
                                 "tokens": length - perplexity.scored_start(length)})
                bar.update(1)


PARTS = ("tasks", "attention", "perplexity")


def run_eval(model, model_name: str, tokenizer, config: EvalConfig, directory: str | pathlib.Path, *,
             hash_weights=None, hashattention_dir=None, progress: bool = True, log=print,
             parts: tuple[str, ...] = PARTS) -> dict:
    """Run (or resume) the evaluation in `directory`; returns :func:`summarize`'s document, also
    written to `directory/results.json`. `parts`: which of :data:`PARTS` to run now (none: only
    summarize); the document summarizes every record of the directory, e.g. parts run earlier or
    on another machine."""
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise ValueError(f"parts must be a subset of {PARTS}, got {parts!r}")
    params = MethodParams(model, tokenizer, config, hash_weights, hashattention_dir, log)
    reads = {params_method(m) for m in config.methods}
    sources = {f"{method}_params_sha256": params_digest(params(method)) if method in reads else None
               for method in ("hata", "hashattention")}
    sources["hata_rerank_candidates"] = config.candidates if "hata_rerank" in config.methods else None
    sources["loki_channels"] = config.loki_channels if "loki" in config.methods else None
    sources["quest_page_size"] = (config.quest_page_size if {"quest", "quest_authors"} & set(config.methods)
                                  else None)
    records = open_run(directory, model, model_name, config, sources)
    start = time.perf_counter()
    samples = {(task, length): tasks_lib.make_samples(task, tokenizer, length, config.samples, config.seed)
               for length in config.lengths for task in config.tasks}
    log(f"{len(samples) * config.samples} prompts ready in {time.perf_counter() - start:.1f} s; each result is "
        f"appended to {records.path} when done")
    if "tasks" in parts:
        run_tasks(model, tokenizer, config, records, params, progress, samples)
    if config.metric_prompts and "attention" in parts:
        run_attention(model, config, records, params, progress, samples)
    if config.perplexity_sequences and "perplexity" in parts:
        run_perplexity(model, tokenizer, config, records, params, progress)
    document = summarize(list(records.by_key.values()), config, model_identity(model, model_name))
    (pathlib.Path(directory) / "results.json").write_text(json.dumps(document, indent=1) + "\n")
    return document


def params_method(method: str) -> str:
    """The method whose params `method` reads: itself, or e.g. "hata" for "hata_rerank"."""
    return method if method in ("dense", "hata") else params_source(method)


def params_digest(layers: list) -> str:
    """The content digest of a method's per-layer params (:func:`train.integrity.content_digest`):
    what identifies trained weights in `run.json`, whatever path they were loaded from."""
    return content_digest({str(i): p for i, p in enumerate(layers) if p is not None})


def missing_units(records: list[dict], config: EvalConfig) -> dict[str, list[tuple]]:
    """{kind: [unit keys (as :func:`unit_key`)]} of the units `config` asks for that `records`
    lack, for each kind with at least one record of `config` (a kind never run is not missing)."""
    configs = config.configs
    selecting = [c for c in configs if c[0] != "dense"]
    expected = {
        "task": [("task", t, n, i, m, b) for n in config.lengths for t in config.tasks for i in range(config.samples)
                 for m, b in configs],
        "attention": [("attention", t, n, i, m, b) for n in config.lengths for t in config.tasks
                      for i in range(min(config.metric_prompts, config.samples)) for m, b in selecting],
        "perplexity": [("perplexity", None, n, i, m, b) for n in config.lengths
                       for i in range(config.perplexity_sequences) for m, b in configs],
    }
    have = {unit_key(r) for r in records}
    missing = {}
    for kind, units in expected.items():
        if any(u in have for u in units):
            lacking = [u for u in units if u not in have]
            if lacking:
                missing[kind] = lacking
    return missing


BOOTSTRAP_RESAMPLES = 2000


def bootstrap_ci(tasks: list[np.ndarray], seed: int = 0) -> list[float]:
    """The 95% percentile-bootstrap interval (x100) of the mean over tasks of each task's mean
    prompt score: each resample draws every task's prompts with replacement (within the task),
    BOOTSTRAP_RESAMPLES resamples from a fixed seed, so a document is reproducible.

    Args:
      tasks: per task, float[n_task] prompt scores in [0, 1] (n_task >= 1).

    Returns:
      [low, high], the 2.5% and 97.5% quantiles of the resampled means, x100.
    """
    rng = np.random.default_rng(seed)
    means = np.zeros(BOOTSTRAP_RESAMPLES)
    for values in tasks:
        means += values[rng.integers(0, len(values), (BOOTSTRAP_RESAMPLES, len(values)))].mean(axis=1)
    low, high = np.quantile(means / len(tasks), [0.025, 0.975])
    return [100 * float(low), 100 * float(high)]


def summarize(records: list[dict], config: EvalConfig, model: dict) -> dict:
    """The results document: scores (x100) per (task, length, method, budget) and averaged over
    tasks, each with its 95% bootstrap interval `ci95` (:func:`bootstrap_ci`; the average's
    resamples the prompts of every task), perplexity per (length, method, budget), and attention
    metrics per layer and averaged over the metric prompts, from the records of this config's
    methods, budgets, tasks, lengths and sample counts (a run directory may hold more).

    Raises:
      ValueError naming the configurations whose units are missing (:func:`missing_units`): a
      kind of work is summarized complete or not at all.
    """
    missing = missing_units(records, config)
    if missing:
        parts = {"task": "tasks", "attention": "attention", "perplexity": "perplexity"}
        lines = []
        for kind, units in missing.items():
            by_config: dict[tuple, list] = {}
            for _, task, length, index, method, budget in units:
                by_config.setdefault((task, length, method, budget), []).append(index)
            shown = "; ".join(f"{m}{'' if b is None else f' budget {b}'}{f' {t}' if t else ''} length {n}: "
                              f"indices {idx}" for (t, n, m, b), idx in list(by_config.items())[:4])
            more = f" (and {len(by_config) - 4} more configurations)" if len(by_config) > 4 else ""
            lines.append(f"{kind} ({len(units)} units missing: {shown}{more}); run --parts {parts[kind]} to compute "
                         "them")
        raise ValueError("refusing to summarize incomplete results: " + " | ".join(lines))
    wanted = set(config.configs)
    order = {"task": {t: i for i, t in enumerate(config.tasks)}, "method": {m: i for i, m in enumerate(config.methods)}}

    def groups(kind: str, limit: int, by_task: bool) -> list[tuple[tuple, list[dict]]]:
        """Records of `kind` grouped by (task or None, length, method, budget), in the config's order."""
        out: dict[tuple, list[dict]] = {}
        for r in records:
            if (r["kind"] == kind and r["length"] in config.lengths and r["index"] < limit
                    and (r.get("task") is None or r["task"] in config.tasks)
                    and (r["method"], r["budget"]) in wanted):
                key = (r.get("task") if by_task else None, r["length"], r["method"], r["budget"])
                out.setdefault(key, []).append(r)
        return sorted(out.items(), key=lambda item: (item[0][1], order["task"].get(item[0][0], -1),
                                                     order["method"][item[0][2]], item[0][3] or 0))

    scores, prompt_scores = [], {}
    for (task, length, method, budget), group in groups("task", config.samples, by_task=True):
        values = np.asarray([r["score"] for r in sorted(group, key=lambda r: r["index"])], np.float64)
        prompt_scores[task, length, method, budget] = values
        scores.append({"task": task, "length": length, "method": method, "budget": budget, "samples": len(group),
                       "score": 100 * float(np.mean(values)), "ci95": bootstrap_ci([values])})
    per_config: dict[tuple, list[dict]] = {}
    for row in scores:
        per_config.setdefault((row["length"], row["method"], row["budget"]), []).append(row)
    for (length, method, budget), rows in per_config.items():
        if len(rows) == len(config.tasks):
            scores.append({"task": "average", "length": length, "method": method, "budget": budget,
                           "samples": sum(r["samples"] for r in rows),
                           "score": float(np.mean([r["score"] for r in rows])),
                           "ci95": bootstrap_ci([prompt_scores[r["task"], length, method, budget] for r in rows])})
    ppl = []
    for (_, length, method, budget), group in groups("perplexity", config.perplexity_sequences, by_task=False):
        nll, tokens = sum(r["nll"] for r in group), sum(r["tokens"] for r in group)
        ppl.append({"length": length, "method": method, "budget": budget, "sequences": len(group), "tokens": tokens,
                    "perplexity": perplexity.perplexity(nll, tokens)})
    attention = []
    for (_, length, method, budget), group in groups("attention", config.metric_prompts, by_task=False):
        mass, error = np.mean([r["mass"] for r in group], axis=0), np.mean([r["error"] for r in group], axis=0)
        attention.append({"length": length, "method": method, "budget": budget, "prompts": len(group),
                          "layers": group[0]["layers"], "mass": mass.tolist(), "error": error.tolist(),
                          "mass_mean": float(mass.mean()), "error_mean": float(error.mean())})
    return {
        "format": FORMAT, "version": VERSION,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "model": model, "config": dataclasses.asdict(config),
        "versions": {"hata_jax": hata_jax.__version__, "jax": jax.__version__, "python": sys.version.split()[0],
                     "backend": jax.default_backend()},
        "scores": scores, "perplexity": ppl, "attention": attention,
    }
