"""Which target layer does which source layer's job: CKA between activations on probe texts, and the
layer maps built from it.

``kernels`` holds the CKA variants, the all-pairs matrix and :func:`compute_cka`; ``capture`` pools
activations per probe text; ``probe_sets`` loads the shipped and user probe texts (``probe_texts/``);
``layermap`` turns a CKA matrix into a layer map (argmax, monotone, hungarian, relative depth);
``variants`` holds the choices (estimators, poolings) without torch or numpy.

Names load lazily (PEP 562): ``from trace_transfer.cka import VARIANTS`` (CLI ``--help``, pipeline
schema) loads no numpy or torch; the first heavy name loads its module.
"""

from __future__ import annotations

import importlib
from typing import Any

from trace_transfer.cka.variants import POOLINGS, VARIANTS

# name -> submodule that defines it
_LAZY = {
    **dict.fromkeys(["capture_pooled_activations", "iter_pooled_activations"], "capture"),
    **dict.fromkeys(["BestTarget", "CKAMatrix", "CKAResult", "center_gram", "cka", "cka_matrix", "cka_matrix_from_features",
                     "compute_cka", "kernel_matrix", "linear_cka_features", "plot_cka_heatmap",
                     "resolve_variant", "ucenter_gram"], "kernels"),
    **dict.fromkeys(["LayerMap", "LayerMapRow", "available_layer_mappers", "get_layer_mapper", "map_layers",
                     "register_layer_mapper"], "layermap"),
    **dict.fromkeys(["load_probe_texts", "shipped_probe_sets"], "probe_sets"),
}

__all__ = ["VARIANTS", "POOLINGS", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
