"""Model surgery: SLERP/LERP merges, core transplantation, task clustering (CPI-FT), sparse task deltas.

    slerp, lerp, slerp_many, lerp_many        tensor-level interpolation (trace_transfer.surgery.slerp)
    transplant_tensor, transplant_state_dict  core transplantation + collision rules (.transplant)
    cluster_tasks, jaccard_matrix             CPI-FT task clustering (.clustering)
    merge_models, MergeOptions                streaming merges of model dirs (.merge)
    delta.extract / delta.apply / delta.revert  sparse task deltas (.delta)
"""

from trace_transfer.surgery import delta
from trace_transfer.surgery.clustering import ClusterResult, cluster_tasks, jaccard_matrix
from trace_transfer.surgery.merge import MergeOptions, MergeReport, merge_models, register_merge_method
from trace_transfer.surgery.slerp import lerp, lerp_many, slerp, slerp_many
from trace_transfer.surgery.transplant import TransplantStats, transplant_state_dict, transplant_tensor

__all__ = [
    "slerp", "lerp", "slerp_many", "lerp_many",
    "transplant_tensor", "transplant_state_dict", "TransplantStats",
    "cluster_tasks", "jaccard_matrix", "ClusterResult",
    "merge_models", "MergeOptions", "MergeReport", "register_merge_method",
    "delta",
]
