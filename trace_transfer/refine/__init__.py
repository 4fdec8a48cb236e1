"""Refine: choose a target CoreSet's units on the target from a cheap signal (one-shot Fisher,
|W ⊙ g| saliency or a micro-probe), inside the per-slot budgets that ``transfer`` carried from the
source, or globally (the source-free control).

``core`` is the verb (:func:`refine`); ``distributed`` runs its micro-probe on many GPUs under
DeepSpeed (``refine(..., deepspeed_config=...)``, every rank calling it); ``signals`` computes the
per-unit signals through the scoring module's LF strategy; ``select`` picks the units and builds the
CoreSet for both; ``config`` holds the settings (torch-free). Names load lazily, so that
reading the settings (the CLI's ``--help``) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["refine", "refine_deepspeed", "RefineConfig", "SIGNALS", "native_probe_cost", "select_in_budgets"]

_WHERE = {"refine": "core", "refine_deepspeed": "distributed", "native_probe_cost": "select",
          "select_in_budgets": "select", "RefineConfig": "config", "SIGNALS": "config"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
