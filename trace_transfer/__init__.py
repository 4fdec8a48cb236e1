"""trace-transfer: discover, isolate and transfer task-specific core parameters of LLMs.

Public API (everything else is internal and may change):

    CoreSet, UnitLayout, overlap_stats      the interchange format (trace_transfer.coreset)
    open_checkpoint, ShardedWriter          streaming safetensors I/O (trace_transfer.checkpoint)
    errors                                  TraceTransferError and its subclasses

Heavier pieces are imported from their modules (``trace_transfer.probe``, ``.scoring``, ``.cka``,
``.layermap``, ``.rules``, ``.transfer``, ``.train``, ``.evaluation``, ``.surgery``).
"""

from trace_transfer._version import __version__
from trace_transfer.checkpoint import ShardedWriter, open_checkpoint
from trace_transfer.coreset import CoreSet, UnitLayout, overlap_stats
from trace_transfer.errors import TraceTransferError

__all__ = ["CoreSet", "UnitLayout", "overlap_stats", "open_checkpoint", "ShardedWriter", "TraceTransferError", "__version__"]
