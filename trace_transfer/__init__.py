"""trace-transfer: discover, isolate and transfer task-specific core parameters of LLMs.

The public API is importable from here. Names load lazily (PEP 562), so ``import trace_transfer`` and
``trace-transfer --help`` stay free of torch; each name's home module is in ``_PUBLIC`` below.

    >>> from trace_transfer import CoreSet, probe, score, transfer, apply_coreset, run_sequence
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from trace_transfer._version import __version__
from trace_transfer.errors import TraceTransferError

# name -> module that defines it; one line per public name, grouped by pipeline step.
_PUBLIC: dict[str, str] = {
    # the interchange format and I/O
    "CoreSet": "trace_transfer.coreset", "UnitLayout": "trace_transfer.coreset",
    "overlap_stats": "trace_transfer.coreset",
    "open_checkpoint": "trace_transfer.checkpoint", "ShardedWriter": "trace_transfer.checkpoint",
    # models and data
    "load_model": "trace_transfer.models", "load_tokenizer": "trace_transfer.models",
    "build_tiny_model": "trace_transfer.models",
    "load_task": "trace_transfer.data", "TaskSpec": "trace_transfer.data",
    # discovery
    "probe": "trace_transfer.probe", "ProbeConfig": "trace_transfer.probe",
    "score": "trace_transfer.scoring", "register_strategy": "trace_transfer.scoring",
    # transfer
    "compute_cka": "trace_transfer.cka", "map_layers": "trace_transfer.cka",
    "find_rules": "trace_transfer.rules", "check_model": "trace_transfer.rules",
    "transfer": "trace_transfer.transfer",
    # training
    "apply_coreset": "trace_transfer.train.masking", "TrainConfig": "trace_transfer.train.config",
    "run_sequence": "trace_transfer.train.runner", "Stage": "trace_transfer.train.runner",
    "verify_frozen": "trace_transfer.train.verify", "pretrain": "trace_transfer.train.pretrain",
    "CoreSetCallback": "trace_transfer.train.hf", "CoreSetTrainer": "trace_transfer.train.hf",
    # evaluation, surgery, pipeline
    "evaluate": "trace_transfer.evaluation", "continual_metrics": "trace_transfer.evaluation",
    "cpi_ft": "trace_transfer.surgery.cpi_ft", "merge_models": "trace_transfer.surgery",
    "run_pipeline": "trace_transfer.pipeline.run",
}

__all__ = sorted([*_PUBLIC, "TraceTransferError", "__version__"])


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'trace_transfer' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # static tools see the real names
    from trace_transfer.checkpoint import ShardedWriter, open_checkpoint  # noqa: F401
    from trace_transfer.coreset import CoreSet, UnitLayout, overlap_stats  # noqa: F401
