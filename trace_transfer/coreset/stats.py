"""CoreSet statistics: what one CoreSet selects and how CoreSets overlap, per layer / module / tensor.

Counts are in parameters (elements), so CoreSets of different granularities compare. A *module* is a
tensor name with its layer index removed (``self_attn.q_proj.weight``); tensors outside the layers
count under the layer key ``"global"``. Re-exported by :mod:`trace_transfer.coreset.format`.

Example:
    >>> selection_stats(math)["per_layer"][3]["share"]
    >>> pairwise_overlap([math, code, med])["jaccard"]   # N×N
    >>> overlap_stats(math, code)["per_module"]["mlp.down_proj.weight"]
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Sequence
from functools import reduce
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trace_transfer.coreset.format import CoreSet

__all__ = ["overlap_stats", "pairwise_overlap", "selection_stats", "split_layer"]

_LAYER_RE = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


def split_layer(name: str) -> tuple[int | None, str]:
    """``model.layers.3.mlp.up_proj.weight`` → ``(3, "mlp.up_proj.weight")``; non-layer tensors → None."""
    m = _LAYER_RE.search(name)
    if not m:
        return None, name
    return int(m.group(1)), name[m.end() :]


def _group(names: Sequence[str], count) -> tuple[dict, dict, dict]:
    """Sum ``count(name) -> (part, whole)`` per tensor, per layer and per module (tensors with whole 0 left out)."""
    per_tensor, per_layer, per_module = {}, defaultdict(lambda: [0, 0]), defaultdict(lambda: [0, 0])
    for name in names:
        part, whole = count(name)
        if whole == 0:
            continue
        per_tensor[name] = (part, whole)
        layer, module = split_layer(name)
        for key, table in ((layer if layer is not None else "global", per_layer), (module, per_module)):
            table[key][0] += part
            table[key][1] += whole
    return per_tensor, dict(per_layer), dict(per_module)


def selection_stats(cs: CoreSet) -> dict[str, Any]:
    """What one CoreSet selects: overall, per layer, per module and per tensor.

    Returns:
        ``{"overall": {...}, "per_layer": {layer: {...}}, "per_module": {module: {...}},
        "per_tensor": {name: {...}}}`` where each ``{...}`` is ``{"selected", "total", "share"}``
        (parameters; every tensor of the model is counted, selected or not).
    """
    groups = _group(cs.all_names(), lambda n: (cs.num_selected(n), math.prod(cs.shape(n))))

    def cell(part: int, whole: int) -> dict[str, Any]:
        return {"selected": part, "total": whole, "share": part / whole if whole else 0.0}

    per_tensor, per_layer, per_module = ({k: cell(*v) for k, v in g.items()} for g in groups)
    return {"overall": cell(cs.num_selected(), cs.num_total()), "per_layer": per_layer, "per_module": per_module,
            "per_tensor": per_tensor}


def _jaccard_breakdown(inter: CoreSet, union: CoreSet) -> dict[str, dict]:
    groups = _group(union.all_names(), lambda n: (inter.num_selected(n), union.num_selected(n)))
    per_tensor, per_layer, per_module = ({k: p / w for k, (p, w) in g.items()} for g in groups)
    return {"per_layer": per_layer, "per_module": per_module, "per_tensor": per_tensor}


def overlap_stats(a: CoreSet, b: CoreSet) -> dict[str, Any]:
    """Jaccard overlap (in elements) of two CoreSets over the same model: overall, per layer, per
    module (tensor name with the layer index removed) and per tensor."""
    inter, union = a.intersection(b), a.union(b)
    total_u = union.num_selected()
    return {
        "overall": {
            "jaccard": inter.num_selected() / total_u if total_u else 0.0,
            "intersection": inter.num_selected(),
            "union": total_u,
            "a_selected": a.num_selected(),
            "b_selected": b.num_selected(),
        },
        **_jaccard_breakdown(inter, union),
    }


def pairwise_overlap(coresets: Sequence[CoreSet]) -> dict[str, Any]:
    """Overlap of N >= 2 CoreSets over one model.

    Returns:
        ``{"jaccard": N×N matrix (diagonal 1), "selected": [params per CoreSet],
        "pairs": {(i, j): overlap_stats(i, j)} for i < j,
        "all": {"jaccard": |∩ all| / |∪ all|, "intersection", "union", "per_layer", "per_module",
        "per_tensor"}}`` (with two CoreSets "all" is the pair's overlap).

    Raises:
        ValueError: fewer than two CoreSets. ModelMismatchError: CoreSets over different models.
    """
    n = len(coresets)
    if n < 2:
        raise ValueError(f"pairwise_overlap needs at least two CoreSets, got {n}; use selection_stats for one")
    pairs = {(i, j): overlap_stats(coresets[i], coresets[j]) for i in range(n) for j in range(i + 1, n)}
    jac = [[1.0 if i == j else pairs[min(i, j), max(i, j)]["overall"]["jaccard"] for j in range(n)] for i in range(n)]
    inter, union = reduce(lambda x, y: x & y, coresets), reduce(lambda x, y: x | y, coresets)
    total_u = union.num_selected()
    every = {"jaccard": inter.num_selected() / total_u if total_u else 0.0, "intersection": inter.num_selected(),
             "union": total_u, **_jaccard_breakdown(inter, union)}
    return {"jaccard": jac, "selected": [cs.num_selected() for cs in coresets], "pairs": pairs, "all": every}
