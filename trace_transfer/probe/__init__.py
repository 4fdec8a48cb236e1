"""The warm-start probe: a short fine-tune per task, then Δ = θ* − θ0 and the diagonal Fisher.

``warmstart`` is the verb (:func:`probe`), ``distributed`` the same under DeepSpeed ZeRO-2/3
(:func:`probe_deepspeed`, every rank calls it); ``fisher`` accumulates squared gradients (batch or
per-sample) in fp32/fp64; ``config`` holds the settings (:class:`ProbeConfig`) and constants.
Names load lazily (PEP 562) so that the settings come without torch (CLI ``--help``, YAML checks).
"""

from __future__ import annotations

import importlib
from typing import Any

from trace_transfer.probe.config import FISHER_AT, FISHER_MODES, TRACE_COMPATIBLE_MODE, ProbeConfig

_LAZY = {"probe": "warmstart", "ProbeResult": "warmstart", "FisherAccumulator": "fisher", "accumulate_fisher": "fisher",
         "probe_deepspeed": "distributed"}

__all__ = ["probe", "probe_deepspeed", "ProbeConfig", "ProbeResult", "FISHER_AT", "FISHER_MODES", "TRACE_COMPATIBLE_MODE",
           "FisherAccumulator", "accumulate_fisher"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'trace_transfer.probe' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"trace_transfer.probe.{_LAZY[name]}"), name)
    globals()[name] = value
    return value
