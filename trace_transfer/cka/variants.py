"""The choices CKA offers, in a module without torch or numpy: the CLI's ``--help`` and the pipeline
schema import them from here, so they can never drift from what :mod:`.kernels` accepts.
"""

from __future__ import annotations

# The estimators. Debiased (U-centered) first: biased CKA drifts toward 1 when probes < hidden units.
VARIANTS = ("linear-debiased", "linear", "rbf", "rbf-debiased")
# One vector per probe text: the mean over its real tokens, or its last real token.
POOLINGS = ("mean", "last")

__all__ = ["VARIANTS", "POOLINGS"]
