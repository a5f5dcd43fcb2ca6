"""Benchmarks and GPU checks (run from the repo root: python -m bench.<name>)."""
