"""Turn a kernels benchmark JSON into markdown tables and plots.

    python -m bench.report bench/results/kernels_h100.json --plots bench/results

Prints the markdown (BENCHMARKS.md embeds it) and writes PNG plots next to the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def _fmt(x, spec=".1f"):
    return "" if x is None else format(x, spec)


def tables(data: dict) -> str:
    env = data["environment"]
    rows = [r for r in data["rows"] if "median_us" in r]
    lines = [
        f"Device: {env['device']}, jax {env['jax']}, commit {env['commit']}, {env['date']}. "
        f"Measured bandwidth: copy {data.get('copy_gbps', 0):.0f} GB/s (read + write), "
        f"read-only {data.get('read_gbps', 0):.0f} GB/s; floors use {data.get('floor_gbps', 0):.0f} GB/s. "
        "Wall = median per op with launch gaps (bench.timing); device = sum of the op's kernel times (profiler).",
        "",
        "| group | implementation | shape | wall (us) | device (us) | floor (us) | device x floor "
        "| kernels (device us) | note |",
        "|---|---|---|---:|---:|---:|---:|---|---|",
    ]
    skip = {"group", "name", "median_us", "p10_us", "p90_us", "reps", "ops_per_rep", "bytes", "floor_us", "gbps",
            "of_floor", "note", "best_dense", "best_dense_us", "speedup_vs_best_dense", "speedup_vs_top_k",
            "device_us", "kernels_us", "best_dense_device_us", "device_speedup_vs_best_dense"}
    top_k_device = next((r.get("device_us") for r in rows if r["name"] == "lax.top_k"), None)
    for r in rows:
        shape = ", ".join(f"{k}={v}" for k, v in r.items() if k not in skip)
        note = r.get("note", "")
        if "speedup_vs_best_dense" in r:
            note = f"{r['speedup_vs_best_dense']:.2f}x vs best dense ({r['best_dense']}) by wall"
            if "device_speedup_vs_best_dense" in r:
                note += f", {r['device_speedup_vs_best_dense']:.2f}x by device time"
        if "speedup_vs_top_k" in r:
            note = f"{r['speedup_vs_top_k']:.1f}x faster than lax.top_k by wall"
            if top_k_device and r.get("device_us"):
                note += f", {top_k_device / r['device_us']:.1f}x by device time"
        kernels = r.get("kernels_us", {})
        shown = ", ".join(f"{k} {v:.1f}" for k, v in list(kernels.items())[:6]) + (", ..." if len(kernels) > 6 else "")
        dev = r.get("device_us")
        floor = r.get("floor_us")
        lines.append(f"| {r['group']} | {r['name']} | {shape} | {r['median_us']:.1f} | {_fmt(dev)} | {_fmt(floor)} | "
                     f"{_fmt(dev / floor if dev and floor else None, '.2f')} | {shown} | {note} |")
    errors = [r for r in data["rows"] if "error" in r]
    if errors:
        lines += ["", "Errors:"] + [f"- {r.get('group')} {r.get('name', '')}: {r['error'][:300]}" for r in errors]
    return "\n".join(lines)


def plots(data: dict, folder: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["rows"] if "median_us" in r]
    written = []
    dense = [r for r in rows if r["group"] in ("dense", "hata")]
    batches = sorted({r["batch"] for r in dense})
    if dense:
        fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
        for ax, b in zip(axes[0], batches):
            for name in sorted({r["name"] for r in dense}):
                pts = sorted((r["seq"], r["median_us"]) for r in dense if r["name"] == name and r["batch"] == b)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=name)
            ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="decode attention, one layer (us)",
                   title=f"batch {b}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"{data['environment']['device']}: Llama-3.1-8B attention, budget {data['shapes']['budget']}")
        path = os.path.join(folder, "attention_latency.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        written.append(path)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("json")
    parser.add_argument("--plots", default=None, help="folder for PNG plots")
    args = parser.parse_args(argv)
    with open(args.json) as f:
        data = json.load(f)
    print(tables(data))
    if args.plots:
        for path in plots(data, args.plots):
            print(f"\n![{os.path.basename(path)}]({os.path.relpath(path)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
