"""The decode benchmark's results as text: the summary printed after a run, markdown tables and PNG
plots of a results JSON (`python -m bench.decode --report JSON`; rows as `bench.decode` writes them:
dicts with "kind" in {"step", "loop", "attention", "skip", "error"}, "model", "context", "batch",
"method" and the timings)."""
from __future__ import annotations

import math
import os

from hata_jax.models import generation
from hata_jax.models.presets import LLAMA_8B

GB = 1e9
METHODS = ("dense", "hata", "exact", "cudnn")  # what bench.decode measures, in report order
COLORS = {"dense": "tab:blue", "hata": "tab:orange", "exact": "tab:green", "cudnn": "tab:red"}
PLOT_COLUMNS = 4  # subplots per row of the tokens/s figure
MODEL_TITLES = {"llama": "Llama-3.1-8B shapes", "smollm2": "SmolLM2-135M shapes"}


def step_order(row: dict) -> tuple:
    return row["model"], row["batch"], row["context"], METHODS.index(row["method"])


def summary(rows: list[dict]) -> str:
    """A compact text table of the step rows (with the HATA speedup over the best dense step)."""
    steps = sorted((r for r in rows if r["kind"] == "step"), key=step_order)
    lines = [f"{'model':<8} {'context':>8} {'batch':>5} {'method':<6} {'ms/step':>9} {'tok/s':>9} {'attn':>5} "
             f"{'x floor':>7} {'b2b ms':>7} {'loop ms':>8}  vs best dense"]
    for r in steps:
        best = best_dense(steps, r["model"], r["context"], r["batch"])
        versus = f"{best['median_ms'] / r['median_ms']:.2f}x" if best and r["method"] in ("hata", "exact") else ""
        share = f"{r['attention_share']:.0%}" if "attention_share" in r else "-"
        loop, b2b = (f"{r[k]:.2f}" if k in r else "-" for k in ("loop_ms", "pipelined_ms"))
        lines.append(f"{r['model']:<8} {r['context']:>8} {r['batch']:>5} {r['method']:<6} {r['median_ms']:>9.2f} "
                     f"{r['tokens_per_s']:>9.1f} {share:>5} {r['of_floor']:>7.2f} {b2b:>7} {loop:>8}  {versus}")
    skipped = [r for r in rows if r["kind"] in ("skip", "error")]
    lines += [f"{r['kind']}: {r['model']} {r['context']} b{r['batch']} {r.get('method') or ''}: "
              f"{r.get('reason') or r.get('error', '')[:200]}" for r in skipped]
    return "\n".join(lines)


def best_dense(rows, model, context, batch, kind="step", key="median_ms"):
    dense = [r for r in rows if r["kind"] == kind and r["method"] in ("dense", "cudnn")
             and (r["model"], r["context"], r["batch"]) == (model, context, batch)]
    return min(dense, key=lambda r: r[key]) if dense else None


def _find(rows, kind, model, context, batch, method):
    """The row of `kind` for (model, context, batch, method), or None."""
    for r in rows:
        if r["kind"] == kind and (r["model"], r["context"], r["batch"], r["method"]) == (model, context, batch, method):
            return r
    return None


def title(data: dict, model: str) -> str:
    return f"{model} (small)" if data["settings"]["small"] else MODEL_TITLES.get(model, model)


def report_markdown(data: dict) -> str:
    env, s, rows = data["environment"], data["settings"], data["rows"]
    steps = [r for r in rows if r["kind"] == "step"]
    attention = [r for r in rows if r["kind"] == "attention"]
    bw = data["bandwidth"]
    lines = [f"Device: {env['device']} ({env['backend']}), jax {env['jax']}, commit {env['commit']}, {env['date']}. "
             f"Bandwidth measured in the run: copy {bw['copy_gbps']:.0f} GB/s, read {bw['read_gbps']:.0f} GB/s; "
             f"floors use {bw['floor_gbps']:.0f} GB/s. HATA: budget {s['budget']}, rbit {s['rbit']}, layers "
             f"< {s['dense_layers']} dense; {s['dtype']}; median of {s['reps']} steps after {s['warmup']} warm-up "
             f"calls.{'' if data.get('complete') else ' (INCOMPLETE run: the JSON was cut off.)'}", ""]
    for model in dict.fromkeys(r["model"] for r in steps + attention):
        name = title(data, model)
        mine = sorted((r for r in steps if r["model"] == model), key=step_order)
        sweep = [r for r in attention if r["model"] == model]
        if model == "llama" and not s["small"]:
            lines += [f"### {name}: goals", ""] + goals_table(steps, attention, s["budget"]) + [""]
        single = [(c, 1) for c in sorted({r["context"] for r in mine if r["batch"] == 1})]
        batched = sorted({(r["context"], r["batch"]) for r in mine if any(
            o["context"] == r["context"] and o["batch"] > 1 for o in mine)})
        lines += pivot(f"{name}: decode step latency (ms) vs context, batch 1", mine, "step", single,
                       lambda r: f"{r['median_ms']:.2f}", with_batch=False)
        lines += pivot(f"{name}: tokens/s vs batch", mine, "step", batched, lambda r: f"{r['tokens_per_s']:.1f}")
        if mine:
            lines += [f"### {name}: every step measured", "",
                      "| context | batch | method | ms/step (p10-p90) | tokens/s | attention share | GB moved "
                      "| floor ms | x floor | back to back ms/step | in-jit loop ms/step | compile s |",
                      "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for r in mine:
                share = f"{r['attention_share']:.0%}" if "attention_share" in r else "-"
                extra = [f"{r[k]:.2f}" if k in r else "-" for k in ("pipelined_ms", "loop_ms")]
                lines.append(f"| {r['context']} | {r['batch']} | {r['method']} ({r['implementation']}) | "
                             f"{r['median_ms']:.2f} ({r['p10_ms']:.2f}-{r['p90_ms']:.2f}) | {r['tokens_per_s']:.1f} | "
                             f"{share} | {r['bytes'] / GB:.2f} | {r['floor_ms']:.2f} | {r['of_floor']:.2f} | "
                             f"{' | '.join(extra)} | {r.get('compile_s', r.get('first_call_s', 0)):.1f} |")
            lines.append("")
        configs = sorted({(r["context"], r["batch"]) for r in sweep}, key=lambda cb: (cb[1], cb[0]))
        lines += pivot(f"{name}: attention only, one layer (us; x floor)", sweep, "attention", configs,
                       lambda r: f"{r['median_us']:.1f} ({r['of_floor']:.1f}x)", key="median_us")
        crossing = None  # the shortest context from which HATA attention wins at every longer one
        for c in sorted({r["context"] for r in sweep if r["batch"] == 1}, reverse=True):
            best = best_dense(sweep, model, c, 1, "attention", "median_us")
            hata = _find(sweep, "attention", model, c, 1, "hata")
            if not (best and hata and hata["median_us"] < best["median_us"]):
                break
            crossing = c
        if crossing:
            lines += [f"HATA attention beats the best dense attention at batch 1 from context {crossing} on (the "
                      f"short-context policy's threshold, `dense_below`, should sit near it).", ""]
    other = [r for r in rows if r["kind"] in ("skip", "error")]
    if other:
        lines += ["Skipped or failed:", ""] + [
            f"- {r['model']} context {r['context']} batch {r['batch']} {r.get('method') or ''}: "
            f"{r.get('reason') or r.get('error', '')[:300]}" for r in other]
    return "\n".join(lines)


def pivot(heading, rows, kind, configs, cell, *, key="median_ms", with_batch=True) -> list[str]:
    """A markdown table of one model's `rows`: a line per (context, batch) in `configs`, a column
    per method (`cell(row)`), and HATA's speedup over the best dense (by `key`, lower is better)."""
    if not configs:
        return []
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    lead = ["context", "batch"] if with_batch else ["context"]
    lines = [f"### {heading}", "", "| " + " | ".join(lead + methods) + " | HATA vs best dense |",
             "|" + "---:|" * (len(lead) + len(methods) + 1)]
    model = rows[0]["model"]
    for c, b in configs:
        found = [_find(rows, kind, model, c, b, m) for m in methods]
        best, hata = best_dense(rows, model, c, b, kind, key), _find(rows, kind, model, c, b, "hata")
        speedup = f"{best[key] / hata[key]:.2f}x" if best and hata else "-"
        cells = [str(c)] + ([str(b)] if with_batch else []) + [cell(r) if r else "-" for r in found]
        lines.append("| " + " | ".join(cells) + f" | {speedup} |")
    return lines + [""]


def _speedup(rows, kind, context, batch, key):
    """(best dense / HATA by `key`, the best dense method) of the Llama rows, or (None, None)."""
    best = best_dense(rows, "llama", context, batch, kind, key)
    hata = _find(rows, kind, "llama", context, batch, "hata")
    return (best[key] / hata[key], best["method"]) if best and hata else (None, None)


def llama_dense_below(budget: int, batch: int) -> int:
    """The default short-context threshold for Llama-3.1-8B shapes in bf16 at `batch`."""
    token_bytes = generation.kv_token_bytes(batch, LLAMA_8B.num_kv_heads, LLAMA_8B.head_dim, "bfloat16")
    return generation.default_dense_below(budget, token_bytes)


def goals(steps, attention, budget: int) -> list[dict]:
    """The performance goals, read from the Llama rows: per goal {"goal": text, "value": the
    measured ratio or None, "versus": the best dense method, "met": "yes" | "NO" | "by the policy"
    | "-" (not measured)}. The 4K goal's value is a cost (HATA / best dense), the others speedups."""
    found = []
    for text, rows, kind, context, batch, key, target in (
            ("attention only, 128K, batch 1: HATA >= 10x faster than the best dense", attention, "attention", 131072, 1,
             "median_us", 10.0),
            ("whole step, 128K, batch 1: HATA >= 2x the best dense tokens/s", steps, "step", 131072, 1,
             "median_ms", 2.0),
            ("whole step, 32K, batch 8: HATA >= 3x the best dense tokens/s", steps, "step", 32768, 8,
             "median_ms", 3.0)):
        value, best = _speedup(rows, kind, context, batch, key)
        found.append({"goal": text, "value": value, "versus": best,
                      "met": "-" if value is None else "yes" if value >= target else "NO"})
    value, best = _speedup(steps, "step", 4096, 1, "median_ms")
    cost = 1 / value if value else None
    threshold = llama_dense_below(budget, 1)
    met = "-" if cost is None else "yes" if cost <= 1.10 else "by the policy" if threshold >= 4096 else "NO"
    found.append({"goal": "whole step, 4K, batch 1: HATA costs <= 1.10x the best dense, or the model switches to "
                          "dense", "value": cost, "versus": best, "met": met})
    return found


def goals_table(steps, attention, budget: int) -> list[str]:
    """:func:`goals` as a markdown table, and the short-context policy it relies on."""
    lines = ["| goal | measured | met |", "|---|---:|---|"]
    for g in goals(steps, attention, budget):
        measured = f"{g['value']:.2f}x (vs {g['versus']})" if g["value"] else "not measured"
        lines.append(f"| {g['goal']} | {measured} | {g['met']} |")
    lines += ["",
              "Short-context policy: `hata_jax.models.generate` (and `hata-jax generate`) run the all-dense step "
              "while every sequence holds at most `dense_below` tokens, by default where one layer's K + V over "
              f"the batch reach {generation.DENSE_BELOW_KV_BYTES >> 20} MiB: for Llama-3.1-8B shapes in bf16 "
              f"{llama_dense_below(budget, 1)} tokens at batch 1 and {llama_dense_below(budget, 8)} at batch 8, so "
              "contexts up to that length decode at the dense step's speed."]
    return lines


def report_plots(data: dict, folder: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, written = data["rows"], []
    steps = [r for r in rows if r["kind"] == "step"]
    attention = [r for r in rows if r["kind"] == "attention"]
    models = list(dict.fromkeys(r["model"] for r in steps + attention))

    def save(fig, name):
        path = os.path.join(folder, name)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    def lines_by_method(ax, rows, x, y, where):
        for method in METHODS:
            pts = sorted((r[x], r[y]) for r in rows if r["method"] == method and where(r))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method, color=COLORS[method])
        ticks = sorted({r[x] for r in rows if where(r)})
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [f"{t // 1024}K" if t >= 1024 and t % 1024 == 0 else str(t) for t in ticks])
        ax.minorticks_off()
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)

    device = data["environment"]["device"]
    for kind, rows_of, y, ylabel, name in (
            ("step", steps, "median_ms", "decode step (ms)", "decode_latency_vs_context.png"),
            ("attention", attention, "median_us", "attention, one layer (us)", "attention_latency_vs_context.png")):
        if not any(r["batch"] == 1 for r in rows_of):
            continue
        fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
        for ax, model in zip(axes[0], models):
            lines_by_method(ax, rows_of, "context", y, lambda r, m=model: r["model"] == m and r["batch"] == 1)
            ax.set(yscale="log", xlabel="context (tokens)", ylabel=ylabel, title=f"{title(data, model)}, batch 1")
        fig.suptitle(f"{device}: {kind} latency vs context")
        save(fig, name)
    contexts = sorted({(r["model"], r["context"]) for r in steps if r["batch"] > 1})
    if contexts:
        columns = min(len(contexts), PLOT_COLUMNS)
        rows = math.ceil(len(contexts) / columns)
        fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.6 * rows), squeeze=False)
        for ax, (model, context) in zip(axes.flat, contexts):
            lines_by_method(ax, steps, "batch", "tokens_per_s",
                            lambda r, m=model, c=context: (r["model"], r["context"]) == (m, c))
            ax.set(xlabel="batch", ylabel="tokens/s", title=f"{title(data, model)}, context {context}")
        for ax in list(axes.flat)[len(contexts):]:
            ax.set_visible(False)
        fig.suptitle(f"{device}: decode tokens/s vs batch")
        save(fig, "decode_tokens_per_s_vs_batch.png")
    return written
