"""Layer × module view of a CoreSet: what was selected where, and how important each tensor scored.

The layout follows the TRACE paper's Fig. 6: one row per transformer layer, one column per module,
attention projections first, then MLP projections, then anything else, norms last. Tensors outside
the layers (embeddings, lm_head, final norm) are listed separately.

Example:
    >>> grid = layer_module_grid(CoreSet.load("cores/math.coreset.safetensors"))
    >>> grid.selected[3][grid.modules.index("mlp.down_proj.weight")]    # share of that tensor selected
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from trace_transfer.coreset import CoreSet, split_layer
from trace_transfer.errors import ConfigError

__all__ = ["LayerModuleGrid", "layer_module_grid", "module_rank", "short_names"]

# Position of a module in the paper's column order; the first pattern that matches wins.
_ORDER = [
    (r"(^|\.)(q_proj|query|q)\.", 0), (r"(^|\.)(k_proj|key|k)\.", 1), (r"(^|\.)(v_proj|value|v)\.", 2),
    (r"(qkv|query_key_value|c_attn|Wqkv)", 3), (r"(o_proj|out_proj|attention\.dense|attn\.c_proj)", 4),
    (r"(q_norm|k_norm)", 90),
    (r"(gate_proj|w1|gate_up)", 10), (r"(up_proj|w3|fc1|c_fc|dense_h_to_4h)", 11),
    (r"(down_proj|w2|fc2|mlp\.c_proj|dense_4h_to_h)", 12), (r"(router|gate\.weight)", 13),
    (r"(norm|ln_)", 100),
]


def module_rank(module: str) -> int:
    """Column rank of a module name: projections left (attention, then MLP), norms right."""
    for pattern, rank in _ORDER:
        if re.search(pattern, module):
            return rank
    return 50


def short_names(modules: list[str]) -> list[str]:
    """``self_attn.q_proj.weight`` → ``q_proj``; biases get ``.bias``; falls back to the full name
    wherever two modules would share a short name."""
    short = [m.removesuffix(".weight").split(".")[-1] if m.endswith(".weight") else
             ".".join(m.split(".")[-2:]) for m in modules]
    return [s if short.count(s) == 1 else m.removesuffix(".weight") for s, m in zip(short, modules)]


@dataclass
class LayerModuleGrid:
    layers: list[int]
    modules: list[str]
    selected: list[list[float]]  # share of each tensor's elements selected; NaN where no such tensor
    score: list[list[float]] | None  # mean per-unit score; None when the CoreSet stores no scores
    globals: list[tuple[str, float, float | None]]  # (tensor, share selected, mean score)

    def values(self, kind: str = "auto") -> tuple[list[list[float]], str]:
        """The grid to draw: ``score`` (importance), ``selected`` (share selected) or ``auto``."""
        if kind == "score" or (kind == "auto" and self.score is not None):
            if self.score is None:
                raise ConfigError("this CoreSet stores no per-unit scores (element granularity); use 'selected'")
            return self.score, "mean score"
        return self.selected, "share selected"


def layer_module_grid(cs: CoreSet) -> LayerModuleGrid:
    """Per-layer × module shares selected (and mean scores when stored) of a CoreSet."""
    cells: dict[tuple[int, str], tuple[float, float | None]] = {}
    globals_: list[tuple[str, float, float | None]] = []
    first_seen: dict[str, int] = {}
    has_scores = False
    for name in cs.all_names():
        numel = math.prod(cs.shape(name)) or 1
        share = cs.num_selected(name) / numel
        s = cs.score(name)
        mean = float(s.double().mean()) if s is not None and s.numel() else None
        has_scores = has_scores or mean is not None
        layer, module = split_layer(name)
        if layer is None:
            globals_.append((name, share, mean))
            continue
        first_seen.setdefault(module, len(first_seen))
        cells[(layer, module)] = (share, mean)
    layers = sorted({layer for layer, _ in cells})
    modules = sorted(first_seen, key=lambda m: (module_rank(m), first_seen[m]))
    nan = float("nan")
    selected = [[cells[(la, m)][0] if (la, m) in cells else nan for m in modules] for la in layers]
    score = None
    if has_scores:
        score = [[(cells[(la, m)][1] if cells[(la, m)][1] is not None else nan) if (la, m) in cells else nan
                  for m in modules] for la in layers]
    return LayerModuleGrid(layers, modules, selected, score, globals_)
