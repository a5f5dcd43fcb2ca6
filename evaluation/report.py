"""Tables and plots of an evaluation's results document (:func:`hata_jax.evaluation.harness.summarize`)."""
from __future__ import annotations

import pathlib

# Column headers of the score table.
TASK_LABELS = {"niah_single": "niah-1", "niah_multikey": "niah-mk", "niah_multivalue": "niah-mv",
               "niah_multiquery": "niah-mq", "variable_tracking": "vt", "common_words": "cwe",
               "frequent_words": "fwe", "average": "avg"}


def _budget_label(budget, length: int) -> str:
    """"256 (1/16)" for a budget that divides the length, "-" for dense."""
    if budget is None:
        return "-"
    return f"{budget} (1/{length // budget})" if length % budget == 0 else str(budget)


def format_table(document: dict) -> str:
    """Per length: the score of each method and budget per task and averaged; perplexity per
    method and budget; layer-averaged mass recall and relative output error versus dense."""
    config = document["config"]
    lines = [f"model {document['model']['name']}; first {config['dense_layers']} layers dense, budgets in tokens per "
             f"KV head"]
    for length in config["lengths"]:
        rows = [r for r in document["scores"] if r["length"] == length]
        if rows:
            tasks = list(dict.fromkeys(r["task"] for r in rows))
            cell = {(r["task"], r["method"], r["budget"]): r["score"] for r in rows}
            interval = {(r["method"], r["budget"]): r["ci95"] for r in rows if r["task"] == "average" and "ci95" in r}
            samples = max(r["samples"] for r in rows if r["task"] != "average")
            dense = cell.get(("average", "dense", None))
            lines += ["", f"context {length}: score (% of expected answers found, string match; up to {samples} "
                          "samples per task)" + ("; avg 95% CI: bootstrap over prompts" if interval else "")
                          + ("; last column: average as % of dense's" if dense else ""),
                      f"{'method':<22}{'budget':>12}" + "".join(f"{TASK_LABELS.get(t, t):>9}" for t in tasks)
                      + (f"{'avg 95% CI':>15}" if interval else "") + (f"{'of dense':>10}" if dense else "")]
            for method, budget in dict.fromkeys((r["method"], r["budget"]) for r in rows):
                average = cell.get(("average", method, budget))
                ci = interval.get((method, budget))
                lines.append(f"{method:<22}{_budget_label(budget, length):>12}" + "".join(
                    f"{cell[t, method, budget]:>9.1f}" if (t, method, budget) in cell else f"{'':>9}"
                    for t in tasks) + ((f"{f'[{ci[0]:.1f}, {ci[1]:.1f}]':>15}" if ci else f"{'':>15}") if interval
                                       else "")
                    + (f"{100 * average / dense:>9.1f}%" if dense and average is not None else ""))
        ppl = [r for r in document["perplexity"] if r["length"] == length]
        if ppl:
            dense = next((r["perplexity"] for r in ppl if r["method"] == "dense"), None)
            lines += ["", f"context {length}: perplexity of the last half of {max(r['sequences'] for r in ppl)} "
                          "held-out sequences (every scored token predicted with sparse attention over its prefix)",
                      f"{'method':<22}{'budget':>12}{'perplexity':>12}" + (f"{'vs dense':>10}" if dense else "")]
            for r in ppl:
                change = f"{100 * (r['perplexity'] / dense - 1):>+9.2f}%" if dense else ""
                lines.append(f"{r['method']:<22}{_budget_label(r['budget'], length):>12}{r['perplexity']:>12.3f}"
                             + change)
        attention = [r for r in document["attention"] if r["length"] == length]
        if attention:
            layers = attention[0]["layers"]
            span = f"{layers[0]}..{layers[-1]}" if layers else "none"
            lines += ["", f"context {length}: attention versus dense in the selecting layers ({span}), averaged over "
                          f"layers, {max(r['prompts'] for r in attention)} prompts x {config['metric_queries']} query "
                          "positions (mass recall: share of the exact softmax mass kept; output error: "
                          "||o - o_dense|| / ||o_dense||)",
                      f"{'method':<22}{'budget':>12}{'mass recall':>13}{'output error':>14}"]
            for r in attention:
                lines.append(f"{r['method']:<22}{_budget_label(r['budget'], length):>12}{r['mass_mean']:>13.3f}"
                             f"{r['error_mean']:>14.3f}")
    return "\n".join(lines)


def plot_scores(document: dict, length: int, path: str | pathlib.Path) -> None:
    """Score versus budget per method at one length, one panel per task (and the average); dense
    is a dashed line."""
    plt = _pyplot()
    rows = [r for r in document["scores"] if r["length"] == length]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    columns = min(4, len(tasks))
    nrows = -(-len(tasks) // columns)
    fig, axes = plt.subplots(nrows, columns, figsize=(4 * columns, 3.3 * nrows), squeeze=False, sharey=True)
    budgets = document["config"]["budgets"]
    for ax, task in zip(axes.flat, tasks):
        _budget_lines(ax, [r for r in rows if r["task"] == task], "score", budgets)
        ax.set_title(task)
        ax.set_ylim(-3, 103)
    for ax in axes.flat[len(tasks):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("score (%)")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{document['model']['name']}: RULER-style tasks at context {length}")
    _save(fig, plt, path)


def plot_attention(document: dict, length: int, path: str | pathlib.Path) -> None:
    """Perplexity, mass recall and output error versus budget per method at one length."""
    plt = _pyplot()
    budgets = document["config"]["budgets"]
    panels = [("perplexity", [r for r in document["perplexity"] if r["length"] == length], "perplexity"),
              ("mass_mean", [r for r in document["attention"] if r["length"] == length], "mass recall"),
              ("error_mean", [r for r in document["attention"] if r["length"] == length],
               "relative output error")]
    panels = [p for p in panels if p[1]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (field, rows, label) in zip(axes[0], panels):
        _budget_lines(ax, rows, field, budgets)
        ax.set_title(label)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"{document['model']['name']}: context {length}, versus dense attention")
    _save(fig, plt, path)


MARKERS = "osD^vP*Xh"


def _budget_lines(ax, rows: list[dict], field: str, budgets: list[int]) -> None:
    """One line per method over the budgets (a distinct marker each, so equal points stay visible);
    dense (no budget) is a dashed horizontal line."""
    for i, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        mine = [r for r in rows if r["method"] == method]
        if mine[0]["budget"] is None:
            ax.axhline(mine[0][field], color="black", linestyle="--", linewidth=1, label=method)
            continue
        ax.plot([r["budget"] for r in mine], [r[field] for r in mine], marker=MARKERS[i % len(MARKERS)],
                markerfacecolor="none", label=method)
    ax.set_xscale("log", base=2)
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.set_xlabel("budget (tokens per KV head)")
    ax.grid(alpha=0.3)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, plt, path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(document: dict, directory: str | pathlib.Path) -> list[pathlib.Path]:
    """Write `scores_<length>.png` and `attention_<length>.png` (when there are perplexity or
    attention results) for every length into `directory`; returns the paths written."""
    directory = pathlib.Path(directory)
    written = []
    for length in document["config"]["lengths"]:
        if any(r["length"] == length for r in document["scores"]):
            written.append(directory / f"scores_{length}.png")
            plot_scores(document, length, written[-1])
        if any(r["length"] == length for r in document["perplexity"] + document["attention"]):
            written.append(directory / f"attention_{length}.png")
            plot_attention(document, length, written[-1])
    return written
