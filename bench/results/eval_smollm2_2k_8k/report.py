"""The tables and plot of issue 17's evaluation (run.py's run directories, one per stage and length).

    python bench/results/eval_smollm2_2k_8k/report.py ROOT [--cpu CPU_ROOT] [--speed SPEED_JSON ...]

Writes ROOT/summary.json, ROOT/tables.md, ROOT/scores.png and ROOT/frontier_<length>.png (issue 20's
frontier: each score against the selection bytes per cached token and KV head of its method,
:mod:`hata_jax.evaluation.frontier`, the Pareto front marked per budget). Rows are (stage, method, budget);
every score is the average over the seven tasks of the share of expected answers found, with a
95% bootstrap interval over prompts (resampled within each task). Differences between two methods
are paired: both ran on the same prompts (their digests are checked), and each resample draws
the same prompts for both. With --cpu, the share of (prompt, method) units whose generated text
is the same on both runs (same prompts, same settings except the implementation). With --speed
(`bench.selector_speed` JSONs; of a row timed in two, the first given wins), the frontier rows whose plan
is the one timed there (SmolLM2 shapes, batch 1, same method, budget and options) get its tokens/s, and a
second front, score against tokens/s with dense (as timed beside that budget) competing, is marked and
plotted. Frontier rows whose stage ran the perplexity part carry its change against dense.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

from hata_jax import HataConfig
from hata_jax.evaluation import frontier
from hata_jax.evaluation.harness import BOOTSTRAP_RESAMPLES, EvalConfig
from hata_jax.models.plan import AttentionPlan
from hata_jax.models.presets import SMOLLM2

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from run import STAGES  # noqa: E402  (the stages and their methods, in run order)

STAGE_LABELS = {"main": "", "asym": " (asymmetric)", "eta": " (eta 0.02 codes)", "hashattention": "", "b32": "",
                "asym_b32": " (asymmetric)", "eta_b32": " (eta 0.02 codes)", "rbit256": " (rbit 256 codes)",
                "rbit256_asym": " (asymmetric, rbit 256 codes)", "rbit256_asym_b32": " (asymmetric, rbit 256 codes)",
                # made at c9b5d3c (reverted): projections trained with a loss for the asymmetric score
                "asym_trained": " (asymmetric, asymmetric-loss codes)",
                "asym_trained_b32": " (asymmetric, asymmetric-loss codes)",
                "asym_rerank_b32": " (asymmetric)", "asym_kept_b32": " (asymmetric, sink 4 + recent 16)",
                "selectors": "", "simhash_asym": " (asymmetric)", "loki16": " (16 channels)", "loki8": " (8 channels)",
                "quest8": " (pages of 8)", "asym_rerank2_b32": " (asymmetric, c = 2)", "loki8_b32": " (8 channels)",
                "loki_b32": "", "quest_b32": "", "hashattention_b32": "", "simhash_asym_b32": " (asymmetric)",
                "references": ""}
# The methods whose paired differences against every other method at their budget are reported.
PAIRED = ("hata", "hata (asymmetric)")
TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "variable_tracking", "common_words",
         "frequent_words")
SHORT = ("niah-1", "niah-mk", "niah-mv", "niah-mq", "vt", "cwe", "fwe")


def load(root: pathlib.Path, kind: str = "task") -> dict:
    """{(stage, length, method, budget): {(task, index): record}} of every run directory under root."""
    rows: dict = {}
    for directory in sorted(root.iterdir()):
        if not (directory / "records.jsonl").is_file():
            continue
        stage, length = directory.name.rsplit("_", 1)
        for line in (directory / "records.jsonl").read_text().splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            if r["kind"] == kind:
                rows.setdefault((stage, int(length), r["method"], r["budget"]), {})[r.get("task"), r["index"]] = r
    return rows


def _order(item) -> tuple:
    """Rows by budget (dense first), then stage as run.py orders them, then method as the stage lists it."""
    stage, _, method, budget = item[0]
    stages = list(STAGES)
    methods = STAGES[stage][0] if stage in STAGES else ()
    return (budget or 0, stages.index(stage) if stage in stages else len(stages),
            methods.index(method) if method in methods else len(methods))


def _matrix(units: dict, samples: int) -> np.ndarray | None:
    """float[tasks, samples] prompt scores, or None where a unit is missing."""
    if not all((t, i) in units for t in TASKS for i in range(samples)):
        return None
    return np.asarray([[units[t, i]["score"] for i in range(samples)] for t in TASKS], np.float64)


def bootstrap(matrices: list[np.ndarray], weights: list[float], seed: int = 0) -> tuple[float, list[float]]:
    """sum_j weights[j] * (task-averaged mean of matrices[j]) x100, and its 95% interval from one
    shared draw of prompts per resample (paired when several matrices are given)."""
    rng = np.random.default_rng(seed)
    tasks, samples = matrices[0].shape
    draws = rng.integers(0, samples, (BOOTSTRAP_RESAMPLES, tasks, samples))
    point, resampled = 0.0, np.zeros(BOOTSTRAP_RESAMPLES)
    for m, w in zip(matrices, weights):
        point += w * m.mean()
        resampled += w * np.take_along_axis(m[None], draws, axis=2).mean(axis=(1, 2))
    low, high = np.quantile(resampled, [0.025, 0.975])
    return 100 * point, [100 * float(low), 100 * float(high)]


DENSE_STAGES = ("main", "references")  # the stages that run dense, the reference of the "of dense" columns


def dense_units(units: dict, length: int) -> dict:
    """Dense's records at `length`: those of the first stage of DENSE_STAGES that ran it (else empty)."""
    return next((units[key] for key in ((stage, length, "dense", None) for stage in DENSE_STAGES) if key in units), {})


def summarize(root: pathlib.Path, samples: int, speed: dict | None = None) -> dict:
    units = load(root)
    out = {"samples": samples, "rows": [], "pairs": []}
    for length in sorted({k[1] for k in units}):
        reference = dense_units(units, length)
        dense = _matrix(reference, samples)
        keyed = {}
        for (stage, n, method, budget), got in sorted(units.items(), key=_order):
            matrix = _matrix(got, samples) if n == length else None
            if matrix is None:
                continue
            digests = {(t, i): got[t, i]["digest"] for t in TASKS for i in range(samples)}
            if dense is not None and any(reference[u]["digest"] != d for u, d in digests.items()):
                raise ValueError(f"{stage}_{length}: other prompts than dense's at {length}")
            label = method + STAGE_LABELS.get(stage, f" ({stage})")
            keyed[label, budget] = matrix
            score, ci = bootstrap([matrix], [1.0])
            row = {"length": length, "stage": stage, "method": label, "plan_method": method, "budget": budget,
                   "fraction": None if budget is None else f"1/{length // budget}", "score": score, "ci95": ci,
                   "tasks": {t: 100 * float(matrix[j].mean()) for j, t in enumerate(TASKS)}}
            if dense is not None and budget is not None:
                row["of_dense"] = 100 * matrix.mean() / dense.mean()
            out["rows"].append(row)
        for (label, budget), matrix in keyed.items():  # paired differences of each HATA score at the same budget
            if budget is None or label not in PAIRED:
                continue
            for (other, b), m in keyed.items():
                reported = other in PAIRED and PAIRED.index(other) < PAIRED.index(label)  # the pair the other way
                if other != label and b in (budget, None) and not reported:
                    diff, ci = bootstrap([matrix, m], [1.0, -1.0])
                    out["pairs"].append({"length": length, "budget": budget, "a": label, "b": other, "a_minus_b": diff,
                                         "ci95": ci})
    out["perplexity"] = perplexities(root)
    out["frontier"] = frontier_rows(out["rows"], speed, out["perplexity"])
    return out


def frontier_rows(rows: list[dict], speed: dict | None = None, perplexity: list[dict] | None = None) -> list[dict]:
    """The rows of run.py's stages with a budget, each with its method's selection bytes per token
    (SmolLM2's 3 KV heads of 64 dimensions), its perplexity change against dense where `perplexity`
    (:func:`perplexities`) has the same stage's method, and whether it is on the Pareto front of its
    length and budget (:func:`frontier.mark_fronts`); with `speed` (a bench.selector_speed document),
    the tokens/s of the same plan at batch 1, and the speed front with dense competing."""
    timed = _timed(speed)
    changes = {(r["length"], r["method"], r["budget"]): r["vs_dense_percent"] for r in perplexity or []
               if "vs_dense_percent" in r}
    points = []
    for r in rows:
        if r["budget"] is None or r["stage"] not in STAGES:
            continue
        method, budget, length = r["plan_method"], r["budget"], r["length"]
        config = EvalConfig(methods=(method,), budgets=(budget,), lengths=(length,), **STAGES[r["stage"]][2])
        cost = frontier.selection_bytes_per_token(config.plan(SMOLLM2.num_layers, method, budget), length,
                                                  SMOLLM2.num_kv_heads, SMOLLM2.head_dim)
        point = {key: r[key] for key in ("length", "method", "budget", "fraction", "score", "ci95")}
        point["selection_bytes"] = cost
        if (length, r["method"], budget) in changes:
            point["perplexity_vs_dense"] = changes[length, r["method"], budget]
        benched = AttentionPlan.for_method(SMOLLM2.num_layers, method, HataConfig(budget=budget))
        if (method, budget, length) in timed and _timed_alike(config.plan(SMOLLM2.num_layers, method, budget), benched):
            point["tokens_per_s"] = timed[method, budget, length]
        points.append(point)
    for length, budget in sorted({(p["length"], p["budget"]) for p in points}):
        frontier.mark_fronts([p for p in points if (p["length"], p["budget"]) == (length, budget)],
                             dense_point(rows, speed, length, budget))
    return points


def dense_point(rows: list[dict], speed: dict | None, length: int, budget: int) -> dict | None:
    """Dense's task score at `length` and, where `speed` timed it at batch 1 beside the methods of
    `budget` (bench.selector_speed times dense once per budget, just before that budget's methods), its
    tokens/s: the speed front compares methods with the dense of their own stretch of the run."""
    scores = [r["score"] for r in rows if r["length"] == length and r["budget"] is None]
    if not scores:
        return None
    rate = _timed(speed).get(("dense", budget, length))
    return {"score": scores[0], **({"tokens_per_s": rate} if rate is not None else {})}


def _timed(speed: dict | None) -> dict:
    """(method, budget, context) -> tokens/s of a bench.selector_speed document's SmolLM2 rows at batch 1;
    of rows timed twice, the first (so the JSONs given first win)."""
    timed: dict = {}
    for r in (speed or {}).get("rows", []):
        if r["kind"] == "method" and r["model"] == "smollm2" and r["batch"] == 1:
            timed.setdefault((r["method"], r["budget"], r["context"]), r["tokens_per_s"])
    return timed


def perplexities(root: pathlib.Path) -> list[dict]:
    """Per (stage, length, method, budget) with perplexity records: exp(summed NLL / scored tokens)
    over its sequences, and the change against dense's on the same sequences (digests checked)."""
    units = load(root, "perplexity")
    rows = []
    for (stage, length, method, budget), got in sorted(units.items(), key=_order):
        dense = dense_units(units, length)
        common = [u for u in got if u in dense]
        if any(got[u]["digest"] != dense[u]["digest"] for u in common):
            raise ValueError(f"{stage}_{length}: perplexity on other sequences than dense's at {length}")
        row = {"length": length, "method": method + STAGE_LABELS.get(stage, f" ({stage})"), "budget": budget,
               "sequences": len(got), "perplexity": _perplexity(got, got)}
        if common and budget is not None:
            row["vs_dense_percent"] = 100 * (_perplexity(got, common) / _perplexity(dense, common) - 1)
        rows.append(row)
    return rows


def _timed_alike(a: AttentionPlan, b: AttentionPlan) -> bool:
    """Whether two plans run the same decode work: the same layers and selector, and the same HATA
    settings where HATA selects (elsewhere only the budget and the forced tokens count)."""
    if a.layers != b.layers or a.selector != b.selector:
        return False
    return a.hata == b.hata if a.hashed_layers else (
        (a.hata.budget, a.hata.sink, a.hata.recent) == (b.hata.budget, b.hata.sink, b.hata.recent))


def _perplexity(records: dict, units) -> float:
    """exp(summed NLL / scored tokens) over `units` of `records`."""
    return float(np.exp(sum(records[u]["nll"] for u in units) / sum(records[u]["tokens"] for u in units)))


def run_settings(root: pathlib.Path, stage: str, length: int) -> dict:
    """The settings of one run directory's `run.json` but the implementation (trained weights by digest)."""
    settings = json.loads((root / f"{stage}_{length}" / "run.json").read_text())["settings"]
    return {k: v for k, v in settings.items() if k != "impl"}


def agreement(gpu: pathlib.Path, cpu: pathlib.Path) -> list[dict]:
    """Per (stage, length, method, budget) present on both with the same settings but the implementation
    (e.g. the same trained weights; of the settings both record): units whose prediction is identical."""
    a, b = load(gpu), load(cpu)
    rows = []
    for key in sorted(set(a) & set(b), key=str):
        mine, theirs = run_settings(gpu, *key[:2]), run_settings(cpu, *key[:2])
        if any(mine[k] != theirs[k] for k in set(mine) & set(theirs)):  # older runs record fewer settings
            continue  # other weights or settings: not a comparison of implementations
        common = [u for u in b[key] if u in a[key]]
        if any(a[key][u]["digest"] != b[key][u]["digest"] for u in common):
            raise ValueError(f"{key}: the two runs used other prompts")
        same = sum(a[key][u]["prediction"] == b[key][u]["prediction"] for u in common)
        score_gpu = float(np.mean([a[key][u]["score"] for u in common])) * 100
        score_cpu = float(np.mean([b[key][u]["score"] for u in common])) * 100
        rows.append({"stage": key[0], "length": key[1], "method": key[2], "budget": key[3], "units": len(common),
                     "same_prediction": same, "score_gpu": score_gpu, "score_cpu": score_cpu})
    return rows


def tables(summary: dict, agree: list[dict] | None) -> str:
    lines = []
    for length in sorted({r["length"] for r in summary["rows"]}):
        lines += ["", f"### {length} tokens ({summary['samples']} prompts per task)", "",
                  "| method | budget | " + " | ".join(SHORT) + " | avg [95% CI] | of dense |",
                  "|---|---|" + "---:|" * (len(SHORT) + 2)]
        for r in [r for r in summary["rows"] if r["length"] == length]:
            budget = "-" if r["budget"] is None else f"{r['budget']} ({r['fraction']})"
            lines.append(f"| {r['method']} | {budget} | " + " | ".join(f"{r['tasks'][t]:.1f}" for t in TASKS)
                         + f" | {r['score']:.1f} [{r['ci95'][0]:.1f}, {r['ci95'][1]:.1f}] | "
                         + (f"{r['of_dense']:.1f}% |" if "of_dense" in r
                            else "100% |" if r["budget"] is None else "- |"))  # "-": no dense at this length
        pairs = [p for p in summary["pairs"] if p["length"] == length]
        if pairs:
            lines += ["", "| method | minus | budget | difference [95% CI, paired] |", "|---|---|---|---:|"]
            lines += [f"| {p['a']} | {p['b']} | {p['budget']} | {p['a_minus_b']:+.1f} "
                      f"[{p['ci95'][0]:+.1f}, {p['ci95'][1]:+.1f}] |" for p in pairs]
    for length in sorted({r["length"] for r in summary.get("frontier", [])}):
        lines += ["", f"### Frontier at {length} tokens: score against selection bytes per cached token and KV head "
                  "(Pareto front per budget)", "",
                  frontier.frontier_table([r for r in summary["frontier"] if r["length"] == length]).strip()]
    if summary.get("perplexity"):
        lines += ["", "### Perplexity (teacher-forced, held-out standard library text, the last half of each sequence "
                  "scored)", "", "| length | method | budget | sequences | perplexity | vs dense |",
                  "|---:|---|---:|---:|---:|---:|"]
        lines += [f"| {r['length']} | {r['method']} | {r['budget'] or '-'} | {r['sequences']} | "
                  f"{r['perplexity']:.3f} | " + (f"{r['vs_dense_percent']:+.2f}% |" if "vs_dense_percent" in r
                                                else "- |")
                  for r in summary["perplexity"]]
    if agree:
        lines += ["", "### GPU kernels (`--impl auto`) against the CPU reference (`--impl reference`), same prompts",
                  "", "| stage | length | method | budget | prompts | same generated text | score GPU | score CPU |",
                  "|---|---:|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['stage']} | {r['length']} | {r['method']} | {r['budget'] or '-'} | {r['units']} | "
                  f"{r['same_prediction']} | {r['score_gpu']:.1f} | {r['score_cpu']:.1f} |" for r in agree]
    return "\n".join(lines).strip() + "\n"


def plot(summary: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in summary["rows"]})
    fig, axes = plt.subplots(1, len(lengths), figsize=(6 * len(lengths), 5), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        rows = [r for r in summary["rows"] if r["length"] == length]
        labels = [r["method"] if r["budget"] is None else f"{r['method']} {r['fraction']}" for r in rows]
        scores = [r["score"] for r in rows]
        errors = np.asarray([[r["score"] - r["ci95"][0], r["ci95"][1] - r["score"]] for r in rows]).T
        ax.barh(range(len(rows)), scores, xerr=errors, color=["0.5" if r["budget"] is None else "C0" for r in rows])
        ax.set_yticks(range(len(rows)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("task average (%), 95% CI")
        ax.set_title(f"SmolLM2-135M-Instruct, {length} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=pathlib.Path)
    p.add_argument("--samples", type=int, default=50)
    p.add_argument("--cpu", type=pathlib.Path, help="a run.py root of the same stages run with --impl reference")
    p.add_argument("--speed", type=pathlib.Path, nargs="+",
                   help="bench.selector_speed JSONs (their rows merged): tokens/s in the frontier table and plot")
    args = p.parse_args()
    speed = None
    if args.speed:
        speed = {"rows": [row for path in args.speed for row in json.loads(path.read_text())["rows"]]}
    summary = summarize(args.root, args.samples, speed)
    agree = agreement(args.root, args.cpu) if args.cpu else None
    if agree is not None:
        summary["gpu_vs_cpu"] = agree
    (args.root / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (args.root / "tables.md").write_text(tables(summary, agree))
    plot(summary, args.root / "scores.png")
    for length in sorted({r["length"] for r in summary["frontier"]}):
        points = [r for r in summary["frontier"] if r["length"] == length]
        dense = {r["fraction"]: dense_point(summary["rows"], speed, length, r["budget"]) for r in points}
        frontier.frontier_plot(points, args.root / f"frontier_{length}.png", f"SmolLM2-135M-Instruct, {length} tokens",
                               dense)
    print(tables(summary, agree))
    return 0


if __name__ == "__main__":
    sys.exit(main())
