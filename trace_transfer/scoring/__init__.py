"""Scoring and selection: probe outputs (Δ, Fisher) -> one CoreSet per task.

``scorer`` is the verb (:func:`score`); ``base`` holds the strategy registry, the inputs and the exact
budgeted selection; ``strategies`` the built-ins (lf, cs, random, magnitude); ``granularity`` the
unit layouts (tensor, row, column, head, element); ``topk`` and ``stream`` the streaming machinery;
``units`` the choices (granularities, budgets, presets, scope groups) without torch.

Names load lazily (PEP 562): ``from trace_transfer.scoring import GRANULARITIES`` (CLI ``--help``,
pipeline schema) loads no torch; the first heavy name loads the scorer and the built-in strategies.
"""

from __future__ import annotations

import importlib
from typing import Any

from trace_transfer.scoring.units import BUDGETS, DEFAULT_SCOPE, GRANULARITIES, PRESETS, SCOPE_GROUPS

# name -> submodule that defines it
_LAZY = {
    **dict.fromkeys(["STRATEGIES", "ProbeInput", "ScoringRun", "budget_count", "fill_in_order", "load_probe",
                     "register_strategy", "select_units"], "base"),
    **dict.fromkeys(["TIE_BREAK", "coreset_filename", "score"], "scorer"),
}

__all__ = ["score", "register_strategy", "STRATEGIES", "BUDGETS", "PRESETS", "GRANULARITIES", "SCOPE_GROUPS",
           "DEFAULT_SCOPE", "TIE_BREAK", "ProbeInput", "ScoringRun", "load_probe", "budget_count", "fill_in_order",
           "select_units", "coreset_filename"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    importlib.import_module(f"{__name__}.scorer")  # registers the built-in strategies, as the eager import did
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
