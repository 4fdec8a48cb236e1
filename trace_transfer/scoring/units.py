"""The choices scoring offers, in a module without torch: the CLI's ``--help`` and the pipeline schema
import them from here, so they can never drift from what :func:`~trace_transfer.scoring.score` accepts.
"""

from __future__ import annotations

# Unit of selection: a whole tensor (the official TRACE code), a row/column/attention head, or an element.
GRANULARITIES = ("tensor", "row", "column", "head", "element")
# What the ratio counts: units (whole tensors at tensor granularity, as the paper) or parameters.
BUDGETS = ("tensors", "params")
# paper = the official TRACE code: whole tensors, every tensor in scope, 0.5/0.5, floor(r% of tensors).
PRESETS = ("paper",)
# Tensor groups that compete for the budget (``--scope``; ``all`` = every group).
SCOPE_GROUPS = ("layers", "embeddings", "lm_head", "final_norm", "other")
DEFAULT_SCOPE = ("layers",)

__all__ = ["GRANULARITIES", "BUDGETS", "PRESETS", "SCOPE_GROUPS", "DEFAULT_SCOPE"]
