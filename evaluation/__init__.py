"""Long-context accuracy of sparse-attention methods on a real model (`hata-jax eval`, `hata-jax demo`).

    from models import load_model
    from models.eval import EvalConfig, format_table, run_eval
    model, tokenizer = load_model("smollm2")
    config = EvalConfig(methods=("dense", "hata", "quest"), budgets=(256,), samples=4)
    document = run_eval(model, "smollm2", tokenizer, config, "runs/eval")   # resumable
    print(format_table(document))

Modules: :mod:`~models.eval.tasks` (RULER-style prompts at a length in tokens, string-match
scoring), :mod:`~models.eval.perplexity` (teacher-forced, sparse attention over each prefix),
:mod:`~models.eval.attention_metrics` (per-layer mass recall and output error versus dense),
:mod:`~models.eval.harness` (the resumable loop over methods x budgets x tasks x lengths, one
prefill per prompt batch), :mod:`~models.eval.report` (table, plots), :mod:`~models.eval.cli`.
"""
from models.eval.harness import EvalConfig, run_eval, summarize
from models.eval.report import format_table, write_report
from models.eval.tasks import TASKS, Sample, make_sample, make_samples, score

__all__ = ["TASKS", "EvalConfig", "Sample", "format_table", "make_sample", "make_samples", "run_eval", "score",
           "summarize", "write_report"]
