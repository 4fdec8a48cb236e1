"""Task clustering by core-region overlap (CPI-FT step 2).

Tasks whose core regions overlap compete for the same parameters, so CPI-FT groups them and models
them jointly, while tasks with disjoint cores can be isolated from each other. The recipe:

1. Jaccard similarity ``|C_i ∩ C_j| / |C_i ∪ C_j|`` (in parameters) between every pair of CoreSets;
2. a graph with one node per task and an edge wherever the Jaccard *exceeds* τ (paper: τ = 0.1),
   weighted by the Jaccard — strictly greater, so ``τ = 0`` means "any overlap at all";
3. groups = the graph's connected components (the paper), or Louvain communities
   (``method="louvain"``, networkx), which can split a long chain of weak overlaps that connected
   components would lump into one group.

The Jaccard matrix is computed streaming, one tensor at a time; where all CoreSets share a tensor's
unit layout it is counted on the per-unit masks (rows, heads) without expanding them.

Example:
    >>> res = cluster_tasks({"math": cs_math, "code": cs_code, "qa": cs_qa}, tau=0.1)
    >>> res.groups        # [['math', 'code'], ['qa']]
    >>> res.matrix[0][1]  # Jaccard(math, code)
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx

from trace_transfer._version import versions
from trace_transfer.checkpoint import write_json_atomic
from trace_transfer.coreset import CoreSet
from trace_transfer.errors import ConfigError, ModelMismatchError
from trace_transfer.surgery.modes import CLUSTER_METHODS, DEFAULT_TAU

__all__ = ["cluster_tasks", "jaccard_matrix", "ClusterResult", "CLUSTER_METHODS", "DEFAULT_TAU", "named_coresets"]


@dataclass
class ClusterResult:
    """Groups of tasks and the overlap matrix they were cut from."""

    names: list[str]
    matrix: list[list[float]]
    groups: list[list[str]]
    tau: float
    method: str
    selected: list[int] = field(default_factory=list)
    intersections: list[list[int]] = field(default_factory=list)
    edges: list[tuple[str, str, float]] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)

    def group_of(self, name: str) -> int:
        """Index of the group holding task ``name``."""
        for i, g in enumerate(self.groups):
            if name in g:
                return i
        raise KeyError(f"task {name!r} is not clustered here; tasks: {', '.join(self.names)}")

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "trace-transfer/clusters",
            "tau": self.tau,
            "method": self.method,
            "names": self.names,
            "groups": self.groups,
            "jaccard": self.matrix,
            "selected_params": self.selected,
            "intersection_params": self.intersections,
            "edges": [{"a": a, "b": b, "jaccard": j} for a, b, j in self.edges],
            "provenance": self.provenance,
        }

    def save(self, path: str | Path) -> Path:
        """Write the result as JSON (atomically)."""
        write_json_atomic(path, self.to_json())
        return Path(path)


def named_coresets(coresets: Mapping[str, CoreSet] | Sequence[CoreSet],
                   fallback: Sequence[str] | None = None) -> dict[str, CoreSet]:
    """``{name: CoreSet}``; unnamed CoreSets are named by their ``task`` metadata, else by ``fallback[i]``
    (e.g. the file name), else ``task<i>``; repeated names get ``#2``, ``#3``, ... so none is lost.

    Example:
        >>> named_coresets([CoreSet.load(p) for p in paths], fallback=[p.name for p in paths])
    """
    if isinstance(coresets, Mapping):
        return dict(coresets)
    out: dict[str, CoreSet] = {}
    for i, cs in enumerate(coresets, start=1):
        base = str(cs.metadata.get("task") or (fallback[i - 1] if fallback else f"task{i}"))
        name, k = base, 2
        while name in out:
            name, k = f"{base}#{k}", k + 1
        out[name] = cs
    return out


def jaccard_matrix(coresets: Sequence[CoreSet]) -> tuple[list[list[float]], list[int], list[list[int]]]:
    """Pairwise Jaccard similarity (in parameters) of CoreSets over one model.

    Returns:
        ``(jaccard, selected, intersections)``: the N×N Jaccard matrix (diagonal 1), the number of
        selected parameters per CoreSet and the N×N intersection counts.

    Raises:
        ModelMismatchError: the CoreSets are over different models (names the first differing tensor).
    """
    n = len(coresets)
    first = coresets[0]
    universe = {name: first.shape(name) for name in first.all_names()}
    for k, cs in enumerate(coresets[1:], start=2):
        other = {name: cs.shape(name) for name in cs.all_names()}
        if other != universe:
            diff = next((x for x in {**universe, **other} if universe.get(x) != other.get(x)), None)
            raise ModelMismatchError(f"CoreSet {k} is over a different model than CoreSet 1; first differing tensor: {diff!r}")
    inter = [[0] * n for _ in range(n)]
    core_names = [set(cs.names()) for cs in coresets]
    for name in universe:
        holders = [i for i in range(n) if name in core_names[i]]
        if not holders:
            continue
        layouts = {coresets[i].layout(name) for i in holders}
        if len(layouts) == 1:  # same units everywhere: count units, weight by unit size
            layout = layouts.pop()
            unit = layout.unit_size(universe[name])
            masks = {i: coresets[i].unit_mask(name) for i in holders}
        else:
            unit = 1
            masks = {i: coresets[i].mask(name).reshape(-1) for i in holders}
        for a_pos, i in enumerate(holders):
            inter[i][i] += int(masks[i].sum()) * unit
            for j in holders[a_pos + 1:]:
                c = int((masks[i] & masks[j]).sum()) * unit
                inter[i][j] += c
                inter[j][i] += c
    selected = [inter[i][i] for i in range(n)]
    jac = [[1.0 if i == j else _ratio(inter[i][j], selected[i] + selected[j] - inter[i][j]) for j in range(n)]
           for i in range(n)]
    return jac, selected, inter


def cluster_tasks(
    coresets: Mapping[str, CoreSet] | Sequence[CoreSet],
    tau: float = DEFAULT_TAU,
    method: str = "components",
    *,
    seed: int = 0,
    resolution: float = 1.0,
) -> ClusterResult:
    """Group tasks whose core regions overlap (CPI-FT step 2).

    Args:
        coresets: ``{task: CoreSet}`` (or a list, named by each CoreSet's ``task`` metadata).
        tau: connect two tasks when their Jaccard similarity exceeds ``tau`` (paper: 0.1).
        method: ``components`` (connected components, the paper) or ``louvain`` (communities).
        seed, resolution: Louvain's random seed and resolution (ignored for components).

    Returns:
        A :class:`ClusterResult`; groups are ordered by their first task's position in the input and
        tasks within a group keep input order, so the result is deterministic.

    Raises:
        ConfigError: fewer than two CoreSets, an unknown method, tau outside [0, 1].
        ModelMismatchError: the CoreSets are over different models.
    """
    named = named_coresets(coresets)
    if len(named) < 2:
        raise ConfigError(f"clustering needs at least two CoreSets, got {len(named)}")
    if method not in CLUSTER_METHODS:
        raise ConfigError(f"clustering method {method!r} is unknown; choose one of {', '.join(CLUSTER_METHODS)}")
    if not 0.0 <= tau <= 1.0:
        raise ConfigError(f"tau={tau} is outside [0, 1]; it is a Jaccard similarity threshold (paper: 0.1)")
    names = list(named)
    jac, selected, inter = jaccard_matrix([named[n] for n in names])
    graph = nx.Graph()
    graph.add_nodes_from(names)
    edges = []
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            if jac[i][j] > tau:
                graph.add_edge(names[i], names[j], weight=jac[i][j])
                edges.append((names[i], names[j], jac[i][j]))
    if method == "components":
        parts = list(nx.connected_components(graph))
    else:
        parts = nx.community.louvain_communities(graph, weight="weight", resolution=resolution, seed=seed)
    order = {n: i for i, n in enumerate(names)}
    groups = sorted((sorted(p, key=order.__getitem__) for p in parts), key=lambda g: order[g[0]])
    prov = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "inputs": {n: str(named[n]._file) if getattr(named[n], "_file", None) else named[n].metadata.get("task")
                   for n in names},
        "params": {"tau": tau, "method": method, "seed": seed, "resolution": resolution},
    }
    return ClusterResult(names, jac, groups, tau, method, selected, inter, edges, prov)


def _ratio(a: int, b: int) -> float:
    return a / b if b else 0.0
