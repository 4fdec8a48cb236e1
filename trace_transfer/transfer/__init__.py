"""Source CoreSet -> target CoreSet across architectures: layers by the layer map, tensors by role
through the rule files.

``mapping`` is the verb (:func:`transfer`); ``budgets`` turns the source's allocation into per-slot
budgets on the target (the default below tensor granularity); ``refine`` picks units inside those
budgets from a cheap signal on the target (or globally: the source-free control); ``profiles``
carries per-unit score profiles between slots (the ``carry="profile"`` ablation); ``rebudget``
selects exactly the target budget.
"""

from trace_transfer.transfer.budgets import BUDGETS_SUFFIX, SlotBudget, SlotBudgets
from trace_transfer.transfer.mapping import CARRY_MODES, ROLE_FALLBACKS, TransferReport, load_layer_map, transfer

__all__ = ["transfer", "TransferReport", "ROLE_FALLBACKS", "CARRY_MODES", "load_layer_map", "SlotBudgets",
           "SlotBudget", "BUDGETS_SUFFIX"]
