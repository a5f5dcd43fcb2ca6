"""The accuracy-cost frontier of the token selectors: a task score against what a decode step reads
to choose its tokens, one point per (method, budget), the Pareto front marked.

Cost: selection bytes per cached token and KV head, for a 16-bit key cache
(:meth:`hata_jax.selectors.Selector.selection_bytes` over length x KV heads): HATA (rbit 128) 20,
Loki 2 per channel, Quest 4 x head_dim / page_size, HashAttention 4, exact top-k the key itself
(2 x head_dim), two-stage HATA its codes plus its candidates' keys, StreamingLLM 0. The attention
over the chosen tokens reads the same at a budget whatever chose them, so it is not counted; a
GPU's tokens/s, where measured, is the other cost axis: a second front per budget, where dense decoding
(no selection at all) competes too, since a user who needs a score asks which method decodes fastest.

    rows = [{"method": "hata", "budget": 128, "score": 53.2, "selection_bytes": 20.0, "tokens_per_s": 148.2}, ...]
    mark_fronts(rows, dense={"score": 55.5, "tokens_per_s": 183.5})   # sets on_front and on_speed_front
"""
from __future__ import annotations

import pathlib

from hata_jax.models.plan import AttentionPlan
from hata_jax.selectors import HataRerankSelector, HataSelector


def selection_bytes_per_token(plan: AttentionPlan, length: int, kv_heads: int, head_dim: int) -> float | None:
    """Bytes a selecting layer of `plan` reads per cached token and KV head to choose its
    `plan.hata.budget` of `length` tokens (16-bit keys); None for a plan without selecting layers.

    "sparse" layers: the plan's selector; "hata" layers: HATA's codes and norms at `plan.hata.rbit`,
    with the candidates' keys of two-stage HATA (`plan.hata.candidates > 1`). length, kv_heads,
    head_dim >= 1 (checked by :meth:`hata_jax.selectors.Selector.selection_bytes`)."""
    if length < 1:
        raise ValueError(f"length must be >= 1 (bytes per token of an empty cache are undefined), got {length}")
    if plan.selector is not None:
        selector = plan.selector
    elif plan.hashed_layers:
        hata = plan.hata
        selector = (HataRerankSelector(rbit=hata.rbit, candidates=hata.candidates) if hata.candidates > 1
                    else HataSelector(rbit=hata.rbit))
    else:
        return None
    return selector.selection_bytes(length, plan.hata.budget, kv_heads, head_dim) / (length * kv_heads)


def pareto_front(costs: list[float], scores: list[float]) -> list[bool]:
    """For each point, whether no other point is at least as cheap and at least as good, and
    strictly better in one of the two (lower cost, higher score). Equal points are all on it."""
    if len(costs) != len(scores):
        raise ValueError(f"costs and scores must have one entry per point, got {len(costs)} and {len(scores)}")
    return [not any(c <= cost and s >= score and (c < cost or s > score) for c, s in zip(costs, scores))
            for cost, score in zip(costs, scores)]


def mark_fronts(points: list[dict], dense: dict | None = None) -> None:
    """Set each point's `on_front` (the Pareto front of selection bytes against score) and, for the
    points with a `tokens_per_s`, `on_speed_front` (tokens/s against score, `dense` ({"score",
    "tokens_per_s"}) competing when given), within each group of equal `length` (if present) and `budget`.
    Raises ValueError for a point without "budget", "selection_bytes" or "score", or a `dense` without "score"."""
    for i, p in enumerate(points):
        missing = [key for key in ("budget", "selection_bytes", "score") if key not in p]
        if missing:
            raise ValueError(f"points[{i}] lacks {missing} (each point needs budget, selection_bytes and score)")
    if dense is not None and "score" not in dense:
        raise ValueError(f"dense must hold a 'score' (and optionally 'tokens_per_s'), got keys {sorted(dense)}")
    for key in dict.fromkeys((p.get("length"), p["budget"]) for p in points):
        group = [p for p in points if (p.get("length"), p["budget"]) == key]
        for p, on in zip(group, pareto_front([p["selection_bytes"] for p in group], [p["score"] for p in group])):
            p["on_front"] = on
        for p in group:
            p.pop("on_speed_front", None)
        timed = [p for p in group if "tokens_per_s" in p]
        rivals = [dense] if dense is not None and "tokens_per_s" in dense else []
        fronts = pareto_front([-p["tokens_per_s"] for p in timed + rivals], [p["score"] for p in timed + rivals])
        for p, on in zip(timed, fronts):
            p["on_speed_front"] = on


def frontier_table(rows: list[dict]) -> str:
    """A markdown table of `rows` ({"method", "fraction", "budget", "score", "ci95" (optional),
    "selection_bytes", "on_front", and optionally "perplexity_vs_dense" (percent), "tokens_per_s" and
    "on_speed_front"}), cheapest first within each budget; optional columns appear when any row has them."""
    perplexity = any("perplexity_vs_dense" in r for r in rows)
    timed = any("tokens_per_s" in r for r in rows)
    header = "| budget | method | selection bytes / token | score [95% CI] | on the front |"
    rule = "|---|---|---:|---:|:---:|"
    if perplexity:
        header, rule = header + " perplexity vs dense |", rule + "---:|"
    if timed:
        header, rule = header + " tokens/s | on the speed front |", rule + "---:|:---:|"
    lines = [header, rule]
    for r in sorted(rows, key=lambda r: (r["budget"], r["selection_bytes"], -r["score"])):
        ci = f" [{r['ci95'][0]:.1f}, {r['ci95'][1]:.1f}]" if "ci95" in r else ""
        line = (f"| {r['budget']} ({r['fraction']}) | {r['method']} | {r['selection_bytes']:g} | "
                f"{r['score']:.1f}{ci} | {'yes' if r['on_front'] else ''} |")
        if perplexity:
            line += f" {r['perplexity_vs_dense']:+.2f}% |" if "perplexity_vs_dense" in r else " - |"
        if timed:
            line += (f" {r['tokens_per_s']:.0f} | {'yes' if r.get('on_speed_front') else ''} |"
                     if "tokens_per_s" in r else " - | |")
        lines.append(line)
    return "\n".join(lines) + "\n"


BYTE_TICKS = (0, 4, 8, 16, 32, 64, 128, 256)  # the plot's selection-bytes ticks


def frontier_plot(rows: list[dict], path: str | pathlib.Path, title: str,
                  dense: dict[str, dict | None] | None = None) -> None:
    """Score against selection bytes per token (symlog axis: StreamingLLM reads 0), one panel per
    budget fraction; front points filled and joined, the others hollow. When rows carry `tokens_per_s`,
    a second row of panels puts the timed ones against tokens/s, `on_speed_front` joined. `dense` maps
    a fraction (e.g. "1/16") to dense's {"score", "tokens_per_s" (optional)} beside it: its score a line,
    its tokens/s a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fractions = list(dict.fromkeys(r["fraction"] for r in sorted(rows, key=lambda r: -r["budget"])))
    timed = any("tokens_per_s" in r for r in rows)
    fig, axes = plt.subplots(2 if timed else 1, len(fractions), figsize=(7 * len(fractions), 5 * (2 if timed else 1)),
                             squeeze=False)
    axis_specs = [("selection_bytes", "on_front", "selection bytes per cached token and KV head (16-bit keys)")]
    if timed:
        axis_specs.append(("tokens_per_s", "on_speed_front", "decode tokens/s (GPU, batch 1)"))
    for row_axes, (x_key, front_key, x_label) in zip(axes, axis_specs):
        for ax, fraction in zip(row_axes, fractions):
            group = sorted((r for r in rows if r["fraction"] == fraction and x_key in r), key=lambda r: r[x_key])
            ax.set_title(f"{title}, budget {fraction} of the context")
            if not group:  # e.g. no tokens/s measured at this budget
                ax.text(0.5, 0.5, f"{x_label.split(' (')[0]}: not measured at this budget", ha="center",
                        va="center", transform=ax.transAxes)
                ax.set_xticks([])
                ax.set_yticks([])
                continue
            front = [r for r in group if r.get(front_key)]
            ax.plot([r[x_key] for r in front], [r["score"] for r in front], "-", color="C0", zorder=1)
            for r in group:
                ax.scatter(r[x_key], r["score"], s=40, zorder=2, color="C0" if r.get(front_key) else "white",
                           edgecolors="C0")
                if "ci95" in r:
                    ax.plot([r[x_key]] * 2, r["ci95"], color="0.7", lw=1, zorder=0)
                ax.annotate(r["method"], (r[x_key], r["score"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
            reference = (dense or {}).get(fraction)
            if reference is not None:
                ax.axhline(reference["score"], color="0.5", ls="--", lw=1, label="dense")
                if x_key == "tokens_per_s" and "tokens_per_s" in reference:
                    ax.scatter(reference["tokens_per_s"], reference["score"], marker="*", s=120, color="0.3", zorder=3)
                ax.legend(loc="lower right", fontsize=8)
            if x_key == "selection_bytes":  # symlog (0 is a cost) with the byte counts as plain ticks
                ax.set_xscale("symlog", linthresh=4)
                ticks = [t for t in BYTE_TICKS if t <= 2 * group[-1][x_key]]
                ax.set_xlim(-0.5, 1.3 * group[-1][x_key])
                ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
                ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_xlabel(x_label)
            ax.set_ylabel("task average (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
