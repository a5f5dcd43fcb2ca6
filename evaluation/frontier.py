"""The accuracy-cost frontier of the token selectors: a task score against what a decode step reads
to choose its tokens, one point per (method, budget), the Pareto front marked.

Cost: selection bytes per cached token and KV head, for a 16-bit key cache
(:meth:`hata_jax.selectors.Selector.selection_bytes` over length x KV heads): HATA (rbit 128) 20,
Loki 2 per channel, Quest 4 x head_dim / page_size, HashAttention 4, exact top-k the key itself
(2 x head_dim), two-stage HATA its codes plus its candidates' keys, StreamingLLM 0. The attention
over the chosen tokens reads the same at a budget whatever chose them, so it is not counted; a
GPU's tokens/s, where measured, is the other cost axis.

    rows = [{"method": "hata", "budget": 128, "score": 53.2, "selection_bytes": 20.0}, ...]
    on_front = pareto_front([r["selection_bytes"] for r in rows], [r["score"] for r in rows])
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


def frontier_table(rows: list[dict]) -> str:
    """A markdown table of `rows` ({"method", "fraction", "budget", "score", "ci95" (optional),
    "selection_bytes", "on_front", "tokens_per_s" (optional)}), cheapest first within each budget."""
    timed = any("tokens_per_s" in r for r in rows)
    lines = ["| budget | method | selection bytes / token | score [95% CI] | on the front |"
             + (" tokens/s |" if timed else ""), "|---|---|---:|---:|:---:|" + ("---:|" if timed else "")]
    for r in sorted(rows, key=lambda r: (r["budget"], r["selection_bytes"], -r["score"])):
        ci = f" [{r['ci95'][0]:.1f}, {r['ci95'][1]:.1f}]" if "ci95" in r else ""
        speed = (f" {r['tokens_per_s']:.0f} |" if "tokens_per_s" in r else " - |") if timed else ""
        lines.append(f"| {r['budget']} ({r['fraction']}) | {r['method']} | {r['selection_bytes']:g} | "
                     f"{r['score']:.1f}{ci} | {'yes' if r['on_front'] else ''} |{speed}")
    return "\n".join(lines) + "\n"


def frontier_plot(rows: list[dict], path: str | pathlib.Path, title: str, dense_score: float | None = None) -> None:
    """Score against selection bytes per token (symlog axis: StreamingLLM reads 0), one panel per
    budget fraction; front points filled and joined, the others hollow; dense as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = list(dict.fromkeys(r["fraction"] for r in sorted(rows, key=lambda r: -r["budget"])))
    fig, axes = plt.subplots(1, len(fractions), figsize=(7 * len(fractions), 5), squeeze=False, sharex=True)
    for ax, fraction in zip(axes[0], fractions):
        group = sorted((r for r in rows if r["fraction"] == fraction), key=lambda r: r["selection_bytes"])
        front = [r for r in group if r["on_front"]]
        ax.plot([r["selection_bytes"] for r in front], [r["score"] for r in front], "-", color="C0", zorder=1)
        for r in group:
            ax.scatter(r["selection_bytes"], r["score"], s=40, zorder=2, color="C0" if r["on_front"] else "white",
                       edgecolors="C0")
            if "ci95" in r:
                ax.plot([r["selection_bytes"]] * 2, r["ci95"], color="0.7", lw=1, zorder=0)
            ax.annotate(r["method"], (r["selection_bytes"], r["score"]), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
        if dense_score is not None:
            ax.axhline(dense_score, color="0.5", ls="--", lw=1, label="dense")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_xscale("symlog", linthresh=4)
        ax.set_xlabel("selection bytes per cached token and KV head (16-bit keys)")
        ax.set_ylabel("task average (%)")
        ax.set_title(f"{title}, budget {fraction} of the context")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
