"""The choices model surgery offers, in a module without torch: the CLI's ``--help`` and the pipeline
schema import them from here, so they can never drift from what the surgery functions accept.
"""

from __future__ import annotations

# Task clustering (CPI-FT step 2): connected components of the thresholded graph (paper), or Louvain.
CLUSTER_METHODS = ("components", "louvain")
DEFAULT_TAU = 0.1
# Who wins an element that several transplanted cores claim (see surgery/transplant.py).
COLLISION_RULES = ("auto", "score", "first", "last", "error")
# Merge-level collision rules: the tensor-level ones plus ``update`` (largest |model − base| wins,
# CPI-FT's own notion of importance), which needs the base model.
MERGE_COLLISION_RULES = (*COLLISION_RULES, "update")
# SLERP over more than two models: iterative pairwise SLERP, or the normalised weighted mean.
MULTI_METHODS = ("pairwise", "nlerp")
# With CoreSets, slerp/lerp change only the elements inside them, or only those outside.
RESTRICT_MODES = ("inside", "outside")
# What a transplant's non-core elements get.
FILL_MODES = ("first", "base", "slerp", "lerp")
# CPI-FT step 5: one SFT stage per task, or per group on mixed data (paper); freeze every core, or earlier ones.
SFT_MODES = ("sequence", "groups")
FREEZE_MODES = ("all", "prior")

__all__ = ["CLUSTER_METHODS", "DEFAULT_TAU", "COLLISION_RULES", "MERGE_COLLISION_RULES", "MULTI_METHODS",
           "RESTRICT_MODES", "FILL_MODES", "SFT_MODES", "FREEZE_MODES"]
