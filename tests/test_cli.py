"""The `hata-jax` command line: subcommands listed, the synthetic demo prints its table, errors are clean
(the real-model demo and `eval`: tests/test_eval.py)."""
import pathlib
import subprocess
import sys

import pytest

from hata_jax.cli import main as cli
from hata_jax.demo import DemoConfig, run_demo


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "info", "generate", "train", "recall", "eval"):
        assert command in out


def test_synthetic_demo_prints_table(capsys):
    assert cli.main(["demo", "--synthetic", "--context", "2048", "--budgets", "32", "128"]) == 0
    out = capsys.readouterr().out
    for name in ("exact top-k", "simhash key-norm", "simhash hamming", "recent window", "k=32", "k=128"):
        assert name in out


def test_demo_ranks_exact_first_and_recency_last():
    cfg = DemoConfig(context=2048, budgets=(64, 256))
    rows = run_demo(cfg, impl="reference")
    for budget in cfg.budgets:
        mass = {r["method"]: r["mass"] for r in rows if r["budget"] == budget}
        recall = {r["method"]: r["oracle_recall"] for r in rows if r["budget"] == budget}
        assert recall["exact top-k"] == 1.0
        assert mass["exact top-k"] >= mass["simhash key-norm"] > mass["recent window"]
        assert mass["simhash key-norm"] > mass["simhash hamming"]


def test_demo_bad_rbit_is_a_clean_error(capsys):
    assert cli.main(["demo", "--synthetic", "--rbit", "100", "--context", "512", "--budgets", "8"]) == 2
    assert "rbit" in capsys.readouterr().err


def test_console_script_entry_point():
    """The `hata-jax` script that pip installed next to this interpreter (pyproject's [project.scripts])."""
    script = pathlib.Path(sys.executable).parent / "hata-jax"
    result = subprocess.run([str(script), "info"], capture_output=True, text=True, check=True)
    assert "impl='auto' runs:" in result.stdout
