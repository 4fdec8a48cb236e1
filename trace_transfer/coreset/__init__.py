"""The CoreSet: a task's core parameters, the interchange format between every step.

``format`` stores and loads it (``*.coreset.safetensors``) and holds the set algebra; ``stats`` says
where a selection sits (per layer x module) and how selections overlap.
"""

from trace_transfer.coreset.format import ELEMENT, FORMAT, FORMAT_VERSION, SUFFIX, TENSOR, CoreSet, UnitLayout
from trace_transfer.coreset.stats import overlap_stats, pairwise_overlap, selection_stats, split_layer

__all__ = ["CoreSet", "UnitLayout", "overlap_stats", "pairwise_overlap", "selection_stats", "split_layer",
           "FORMAT", "FORMAT_VERSION", "SUFFIX", "ELEMENT", "TENSOR"]
