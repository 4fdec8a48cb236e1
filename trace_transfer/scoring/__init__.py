"""Scoring and selection: probe outputs (Δ, Fisher) -> one CoreSet per task.

``scorer`` is the verb (:func:`score`); ``base`` holds the strategy registry, the inputs and the exact
budgeted selection; ``strategies`` the built-ins (lf, cs, random, magnitude); ``granularity`` the
unit layouts (tensor, row, column, head, element); ``topk`` and ``stream`` the streaming machinery.
"""

from trace_transfer.scoring.base import STRATEGIES, ProbeInput, ScoringRun, budget_count, fill_in_order, load_probe, register_strategy, select_units
from trace_transfer.scoring.granularity import GRANULARITIES
from trace_transfer.scoring.scorer import BUDGETS, PRESETS, TIE_BREAK, coreset_filename, score

__all__ = ["score", "register_strategy", "STRATEGIES", "BUDGETS", "PRESETS", "GRANULARITIES", "TIE_BREAK",
           "ProbeInput", "ScoringRun", "load_probe", "budget_count", "fill_in_order", "select_units",
           "coreset_filename"]
