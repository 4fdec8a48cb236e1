"""Which target layer does which source layer's job: CKA between activations on probe texts, and the
layer maps built from it.

``kernels`` holds the CKA variants, the all-pairs matrix and :func:`compute_cka`; ``capture`` pools
activations per probe text; ``probe_sets`` loads the shipped and user probe texts (``probe_texts/``);
``layermap`` turns a CKA matrix into a layer map (argmax, monotone, hungarian, relative depth).
"""

from trace_transfer.cka.capture import POOLINGS, capture_pooled_activations, iter_pooled_activations
from trace_transfer.cka.kernels import (
    VARIANTS,
    CKAMatrix,
    CKAResult,
    center_gram,
    cka,
    cka_matrix,
    cka_matrix_from_features,
    compute_cka,
    kernel_matrix,
    linear_cka_features,
    plot_cka_heatmap,
    resolve_variant,
    ucenter_gram,
)
from trace_transfer.cka.layermap import LayerMap, LayerMapRow, available_layer_mappers, get_layer_mapper, map_layers, register_layer_mapper
from trace_transfer.cka.probe_sets import load_probe_texts, shipped_probe_sets

__all__ = ["VARIANTS", "POOLINGS", "CKAMatrix", "CKAResult", "load_probe_texts", "shipped_probe_sets",
           "iter_pooled_activations", "capture_pooled_activations", "cka", "linear_cka_features", "cka_matrix",
           "cka_matrix_from_features", "kernel_matrix", "center_gram", "ucenter_gram", "compute_cka",
           "plot_cka_heatmap", "resolve_variant", "LayerMap", "LayerMapRow", "map_layers",
           "register_layer_mapper", "available_layer_mappers", "get_layer_mapper"]
