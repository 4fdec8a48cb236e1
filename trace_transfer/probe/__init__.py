"""The warm-start probe: a short fine-tune per task, then Δ = θ* − θ0 and the diagonal Fisher.

``warmstart`` is the verb (:func:`probe`); ``fisher`` accumulates squared gradients (batch or
per-sample) in fp32/fp64.
"""

from trace_transfer.probe.fisher import FISHER_MODES, TRACE_COMPATIBLE_MODE, FisherAccumulator, accumulate_fisher
from trace_transfer.probe.warmstart import FISHER_AT, ProbeConfig, ProbeResult, probe

__all__ = ["probe", "ProbeConfig", "ProbeResult", "FISHER_AT", "FISHER_MODES", "TRACE_COMPATIBLE_MODE",
           "FisherAccumulator", "accumulate_fisher"]
