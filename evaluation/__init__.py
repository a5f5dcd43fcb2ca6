"""Long-context accuracy of sparse-attention methods on a real model (`hata-jax eval`, `hata-jax demo`).

    from hata_jax.models import load_model
    from hata_jax.evaluation import EvalConfig, format_table, run_eval
    model, tokenizer = load_model("smollm2")
    config = EvalConfig(methods=("dense", "hata", "quest"), budgets=(256,), samples=4)
    document = run_eval(model, "smollm2", tokenizer, config, "runs/eval")   # resumable
    print(format_table(document))

Modules: :mod:`~hata_jax.evaluation.tasks` (RULER-style prompts at a length in tokens, string-match
scoring), :mod:`~hata_jax.evaluation.perplexity` (teacher-forced, sparse attention over each prefix),
:mod:`~hata_jax.evaluation.attention_metrics` (per-layer mass recall and output error versus dense),
:mod:`~hata_jax.evaluation.harness` (the resumable loop over methods x budgets x tasks x lengths, one
prefill per prompt batch), :mod:`~hata_jax.evaluation.report` (table, plots), :mod:`~hata_jax.cli.evaluate`.
"""
from hata_jax.evaluation.harness import EvalConfig, run_eval, summarize
from hata_jax.evaluation.report import format_table, write_report
from hata_jax.evaluation.tasks import TASKS, Sample, make_sample, make_samples, score

__all__ = ["TASKS", "EvalConfig", "Sample", "format_table", "make_sample", "make_samples", "run_eval", "score",
           "summarize", "write_report"]
