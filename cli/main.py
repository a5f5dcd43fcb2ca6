"""The `hata-jax` command line."""
from __future__ import annotations

import argparse
import sys

import jax

import hata_jax
from hata_jax import demo as synthetic_demo
from hata_jax.cli.evaluate import add_demo_args, add_eval_command, run_demo
from hata_jax.cli.generate import add_generate_command
from hata_jax.cli.train import add_recall_command, add_train_command
from hata_jax.dispatch import default_impl


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.context is not None and args.context < 1:
        raise ValueError(f"--context must be >= 1 (prompt or cached tokens), got {args.context}")
    if args.budgets is not None and min(args.budgets) < 1:
        raise ValueError(f"--budgets must all be >= 1, got {args.budgets}")
    if not args.synthetic:
        return run_demo(args)
    defaults = synthetic_demo.DemoConfig()
    cfg = synthetic_demo.DemoConfig(context=defaults.context if args.context is None else args.context,
                                    budgets=tuple(args.budgets or defaults.budgets), seed=args.seed, rbit=args.rbit)
    print(synthetic_demo.format_table(synthetic_demo.run_demo(cfg, impl=args.impl), cfg))
    return 0


def _cmd_info(args: argparse.Namespace) -> int:

    print(f"hata-jax {hata_jax.__version__}, jax {jax.__version__}, backend {jax.default_backend()}")
    print(f"devices: {', '.join(str(d) for d in jax.devices())}")
    print(f"impl='auto' runs: {default_impl()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hata-jax", description="Learned hash-aware top-k attention for JAX.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser(
        "demo", help="a small long-context evaluation of SmolLM2: dense vs HATA vs Quest vs StreamingLLM",
        description="Run SmolLM2-135M-Instruct (fetched on first use) on a few RULER-style long-context prompts with "
                    "dense attention, HATA (the shipped trained projections), Quest and StreamingLLM at one budget, "
                    "and print the scores and attention metrics (about 4 minutes on 2 CPU cores). --synthetic: "
                    "planted heavy hitters instead, no model.")
    demo.add_argument("--context", type=int, help="prompt tokens (default 2048); --synthetic: cached tokens "
                                                  "(default 8192)")
    demo.add_argument("--budgets", type=int, nargs="+", help="tokens selected per KV head (default 128; --synthetic: "
                                                             "32 64 128 256 512)")
    demo.add_argument("--rbit", type=int, default=128, help="hash bits (multiple of 32)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--impl", choices=["auto", "pallas", "reference"], default="auto")
    add_demo_args(demo)
    demo.set_defaults(func=_cmd_demo)

    info = sub.add_parser("info", help="print versions, devices and which implementation impl='auto' runs")
    info.set_defaults(func=_cmd_info)

    add_generate_command(sub)
    add_train_command(sub)
    add_recall_command(sub)
    add_eval_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:
        print(f"hata-jax {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resume = {"train": "the same command with --resume", "eval": "the same command"}.get(args.command)
        print(f"hata-jax {args.command}: interrupted" + (f"; {resume} continues where it stopped" if resume else ""),
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
