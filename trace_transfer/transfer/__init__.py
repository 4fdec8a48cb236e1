"""Source CoreSet -> target CoreSet across architectures: layers by the layer map, tensors by role
through the rule files.

``mapping`` is the verb (:func:`transfer`); ``profiles`` carries per-unit score profiles between
slots; ``rebudget`` selects exactly the target budget.
"""

from trace_transfer.transfer.mapping import ROLE_FALLBACKS, TransferReport, load_layer_map, transfer

__all__ = ["transfer", "TransferReport", "ROLE_FALLBACKS", "load_layer_map"]
