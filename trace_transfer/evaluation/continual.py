"""Continual-learning summary of an accuracy matrix: AA, BWT, FWT, forgetting, plasticity (GEM).

Conventions (the same strings are written into every ``results.json``, so a reader never has to
guess which variant a number is):

* ``R`` has one row per evaluation point and one column per task of the stream, in stream order.
  Row 0 is the model **before any stage**; row ``i`` (1-based) is the model after stage ``i``.
  With ``T`` tasks trained one per stage, ``R`` is ``(T+1) x T`` and ``R[j][j]`` (task ``j``,
  1-based, right after it was trained) sits on the shifted diagonal — column index ``j-1`` in Python.
* **AA** (average accuracy) = mean of the last row over all ``T`` tasks.
* **BWT** (backward transfer, Lopez-Paz & Ranzato 2017) = ``1/(T-1) * sum_{j=1}^{T-1} (R[T][j] - R[j][j])``.
  Denominator ``T-1``: the last task has no later stage to be forgotten by. Negative = forgetting.
* **FWT** (forward transfer, GEM) = ``1/(T-1) * sum_{j=2}^{T} (R[j-1][j] - R[0][j])``: how much the
  stages before task ``j`` moved its score, measured against the pre-stage row 0 (GEM uses a
  random-init model as the baseline ``b_j``; for fine-tuning a pretrained model the natural
  baseline is the model before any stage). Denominator ``T-1``: task 1 has no earlier stage.
* **forgetting** of task ``j < T`` (Chaudhry et al. 2018) = ``max_{i in 1..T-1} R[i][j] - R[T][j]``:
  the best score task ``j`` ever had after some stage (row 0 excluded), minus its final score.
  ``None`` for the last task. ``mean_forgetting`` averages over ``j = 1..T-1``.
* **plasticity** of task ``j`` = ``R[j][j]``, the score right after it was trained.

A stream whose stages do not train one task each (``joint``: one stage over all tasks, so ``R`` is
``2 x T``) gets AA and the rows, while BWT, FWT, forgetting and plasticity are ``None`` — they are
not defined without a stage per task.

Tasks scored lower-is-better (perplexity; ``higher_is_better[j] = False``) stay in ``R`` but are
**left out of AA, BWT, FWT and mean forgetting** — averaging a perplexity with accuracies means
nothing; ``averaged_tasks`` lists the columns that were averaged. Their per-task ``forgetting`` and
``plasticity`` are still reported, forgetting sign-adjusted (a rise in perplexity is forgetting).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from trace_transfer.errors import ConfigError

__all__ = ["continual_metrics", "CONVENTIONS", "format_matrix_markdown"]

CONVENTIONS = {
    "R": "R[i][j] = score on task j after stage i; row 0 = before any stage; columns in stream order",
    "AA": "mean of the last row over the T tasks (lower-is-better tasks such as perplexity excluded: "
    "see averaged_tasks)",
    "BWT": "1/(T-1) * sum_{j=1}^{T-1} (R[T][j] - R[j][j]); denominator T-1; negative = forgetting",
    "FWT": "1/(T-1) * sum_{j=2}^{T} (R[j-1][j] - R[0][j]); baseline = row 0 (model before any stage); "
    "denominator T-1",
    "forgetting": "task j<T: max_{i=1..T-1} R[i][j] - R[T][j] (Chaudhry et al. 2018; row 0 excluded); "
    "None for the last task",
    "plasticity": "R[j][j], the score right after task j was trained",
}


def _validate(R: Sequence[Sequence[float]]) -> list[list[float]]:
    rows = [list(map(float, r)) for r in R]
    problems = []
    if len(rows) < 2:
        problems.append(f"need a row before training and at least one row after, got {len(rows)} row(s)")
    widths = {len(r) for r in rows}
    if len(widths) > 1:
        problems.append(f"rows have different lengths {sorted(widths)}; every row scores every task")
    if rows and not rows[0]:
        problems.append("rows are empty: there must be at least one task")
    if problems:
        raise ConfigError("invalid accuracy matrix R", problems)
    return rows


def continual_metrics(R: Sequence[Sequence[float]], higher_is_better: Sequence[bool] | None = None) -> dict[str, Any]:
    """Summarise an accuracy matrix (see the module docstring for every convention).

    Args:
        R: ``(S+1) x T`` scores; row 0 before any stage, row ``i`` after stage ``i``. When ``S == T``
            stage ``i`` is taken to have trained task ``i`` (stream order).
        higher_is_better: per task; default all True. Lower-is-better columns are not averaged.

    Returns:
        ``{"R", "num_tasks", "num_stages", "aa", "bwt", "fwt", "forgetting" (list, None for the
        last task), "mean_forgetting", "plasticity" (list), "conventions"}``. Sequential metrics
        are ``None`` when ``S != T`` (e.g. joint training) or, for BWT/FWT/forgetting, when ``T == 1``.

    Raises:
        ConfigError: ragged or too small ``R``.

    Example:
        >>> m = continual_metrics([[0.1, 0.2], [0.9, 0.3], [0.5, 0.8]])
        >>> round(m["bwt"], 3), round(m["fwt"], 3), m["aa"]
        (-0.4, 0.1, 0.65)
    """
    rows = _validate(R)
    T, S = len(rows[0]), len(rows) - 1
    hib = [True] * T if higher_is_better is None else [bool(h) for h in higher_is_better]
    if len(hib) != T:
        raise ConfigError(f"higher_is_better has {len(hib)} entries for {T} tasks")
    avg = [j for j in range(T) if hib[j]]  # 0-based columns that enter the averages
    last = rows[-1]
    out: dict[str, Any] = {
        "R": rows,
        "num_tasks": T,
        "num_stages": S,
        "averaged_tasks": avg,
        "aa": sum(last[j] for j in avg) / len(avg) if avg else None,
        "bwt": None,
        "fwt": None,
        "forgetting": [None] * T,
        "mean_forgetting": None,
        "plasticity": [None] * T,
        "conventions": dict(CONVENTIONS),
    }
    if S != T:
        out["note"] = (
            f"{S} stage(s) for {T} task(s): BWT, FWT, forgetting and plasticity need one stage per task"
        )
        return out
    # 1-based task j lives in column j-1; row j is "after stage j".
    out["plasticity"] = [rows[j][j - 1] for j in range(1, T + 1)]
    if T < 2:
        return out
    bwt_cols = [j for j in range(1, T) if hib[j - 1]]
    fwt_cols = [j for j in range(2, T + 1) if hib[j - 1]]
    out["bwt"] = sum(rows[T][j - 1] - rows[j][j - 1] for j in bwt_cols) / len(bwt_cols) if bwt_cols else None
    out["fwt"] = sum(rows[j - 1][j - 1] - rows[0][j - 1] for j in fwt_cols) / len(fwt_cols) if fwt_cols else None
    forgetting: list[float | None] = []
    for j in range(1, T + 1):
        if j == T:
            forgetting.append(None)
            continue
        sign = 1.0 if hib[j - 1] else -1.0  # for perplexity the best is the minimum
        best = max(sign * rows[i][j - 1] for i in range(1, T))
        forgetting.append(best - sign * rows[T][j - 1])
    out["forgetting"] = forgetting
    done = [f for j, f in enumerate(forgetting) if f is not None and hib[j]]
    out["mean_forgetting"] = sum(done) / len(done) if done else None
    return out


def format_matrix_markdown(
    R: Sequence[Sequence[float]],
    task_names: Sequence[str],
    row_labels: Sequence[str] | None = None,
    digits: int = 3,
) -> str:
    """Markdown table of ``R`` with an ``avg`` column (the row mean; in the last row that is AA)."""
    rows = _validate(R)
    if len(task_names) != len(rows[0]):
        raise ConfigError(f"{len(task_names)} task names for {len(rows[0])} columns of R")
    labels = list(row_labels) if row_labels is not None else ["before"] + [f"after stage {i}" for i in range(1, len(rows))]
    head = "| | " + " | ".join(task_names) + " | avg |"
    sep = "|---|" + "---:|" * (len(task_names) + 1)
    body = [
        f"| {lab} | " + " | ".join(f"{v:.{digits}f}" for v in r) + f" | {sum(r) / len(r):.{digits}f} |"
        for lab, r in zip(labels, rows)
    ]
    return "\n".join([head, sep, *body])
