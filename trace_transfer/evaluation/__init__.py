"""Evaluation: per-task metrics (``evaluate``) and the continual-learning summary of an accuracy matrix.

    >>> from trace_transfer.evaluation import evaluate, continual_metrics
    >>> evaluate(model, tokenizer, "synthetic:math", limit=100).score
    >>> continual_metrics(R)["bwt"]
"""

from trace_transfer.evaluation.continual import CONVENTIONS, continual_metrics, format_matrix_markdown
from trace_transfer.evaluation.distributed import evaluate_tasks
from trace_transfer.evaluation.metrics import (
    EvalResult,
    available_metrics,
    evaluate,
    evaluate_model,
    register_metric,
)

__all__ = [
    "evaluate", "evaluate_model", "evaluate_tasks", "EvalResult", "register_metric", "available_metrics",
    "continual_metrics", "format_matrix_markdown", "CONVENTIONS",
]
