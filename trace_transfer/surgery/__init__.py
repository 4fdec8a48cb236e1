"""Model surgery: SLERP/LERP merges, core transplantation, task clustering (CPI-FT), sparse task deltas.

    slerp, lerp, slerp_many, lerp_many        tensor-level interpolation (trace_transfer.surgery.slerp)
    transplant_tensor, transplant_state_dict  core transplantation + collision rules (.transplant)
    cluster_tasks, jaccard_matrix             CPI-FT task clustering (.clustering)
    merge_models, MergeOptions                streaming merges of model dirs (.merge)
    delta.extract / delta.apply / delta.revert  sparse task deltas (.delta)
    CLUSTER_METHODS, FILL_MODES, ...          the choices, without torch (.modes)

Names load lazily (PEP 562): the choices come without torch (CLI ``--help``, pipeline schema); the
first heavy name loads its module. ``delta`` is a submodule: ``from trace_transfer.surgery import delta``.
"""

from __future__ import annotations

import importlib
from typing import Any

from trace_transfer.surgery.modes import (
    CLUSTER_METHODS,
    COLLISION_RULES,
    FILL_MODES,
    FREEZE_MODES,
    MERGE_COLLISION_RULES,
    MULTI_METHODS,
    RESTRICT_MODES,
    SFT_MODES,
)

# name -> submodule that defines it
_LAZY = {
    **dict.fromkeys(["slerp", "lerp", "slerp_many", "lerp_many"], "slerp"),
    **dict.fromkeys(["transplant_tensor", "transplant_state_dict", "TransplantStats"], "transplant"),
    **dict.fromkeys(["cluster_tasks", "jaccard_matrix", "ClusterResult"], "clustering"),
    **dict.fromkeys(["merge_models", "MergeOptions", "MergeReport", "register_merge_method"], "merge"),
}

__all__ = [*_LAZY, "delta", "CLUSTER_METHODS", "COLLISION_RULES", "MERGE_COLLISION_RULES", "MULTI_METHODS",
           "RESTRICT_MODES", "FILL_MODES", "SFT_MODES", "FREEZE_MODES"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
