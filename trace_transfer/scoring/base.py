"""What every scoring strategy shares: the strategy registry, the probe inputs, the run description and
the exact budgeted selection over per-unit scores. ``scorer`` (the verb) and ``strategies`` (the
built-ins) both build on this module, so neither imports the other's internals.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trace_transfer.checkpoint import open_checkpoint
from trace_transfer.coreset import UnitLayout
from trace_transfer.errors import ArtifactError, ArtifactNotFoundError
from trace_transfer.scoring.stream import DEFAULT_CHUNK_ELEMS, TensorSource

__all__ = ["STRATEGIES", "register_strategy", "ProbeInput", "load_probe", "ScoringRun", "budget_count", "select_units"]

Progress = Callable[[str, int, int], None]

STRATEGIES: dict[str, type] = {}


def register_strategy(name: str) -> Callable[[type], type]:
    """Class decorator registering a scoring strategy under ``name`` (lower-case, unique).

    A strategy class has ``min_tasks``, ``check(run)`` (raise ConfigError for unsupported settings)
    and ``unit_scores(run) -> list[{tensor: per-unit float64 scores}]`` (one dict per task); to
    support element granularity also ``element_scores(run, task) -> (name, start, stop) -> float32
    scores`` (>= 0, bit-identical on every call; may carry a ``.sample`` function scoring only the
    sampled blocks, see ``_topk``).
    """

    def deco(cls: type) -> type:
        if not re.fullmatch(r"[a-z][a-z0-9_-]*", name):
            raise ValueError(f"strategy name {name!r}: use lower-case letters, digits, '-' or '_'")
        if name in STRATEGIES:
            raise ValueError(f"scoring strategy {name!r} is already registered by {STRATEGIES[name].__qualname__}")
        cls.name = name
        STRATEGIES[name] = cls
        return cls

    return deco


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


@dataclass
class ProbeInput:
    """One probe directory: its task, provenance and streaming views of Δ and Fisher."""

    dir: Path
    task: str
    info: dict[str, Any]
    delta: TensorSource
    fisher: TensorSource | None
    stats: dict[str, dict[str, float]]


def load_probe(path: str | Path) -> ProbeInput:
    """Open a probe directory (``delta*.safetensors``, ``fisher*.safetensors``, ``fisher_tensor.json``,
    ``probe.json``); Δ is required, the rest optional.

    Raises:
        ArtifactNotFoundError: the directory or its Δ file is missing.
    """
    d = Path(path)
    if not d.is_dir():
        raise ArtifactNotFoundError(f"probe directory not found: {d} (create it with `trace-transfer probe`)")
    try:
        delta = TensorSource(open_checkpoint(d, prefix="delta"))
    except ArtifactNotFoundError:
        raise ArtifactNotFoundError(f"{d} holds no delta.safetensors; is it a `trace-transfer probe` output?") from None
    try:
        fisher = TensorSource(open_checkpoint(d, prefix="fisher"))
    except ArtifactNotFoundError:
        fisher = None
    info = json.loads((d / "probe.json").read_text()) if (d / "probe.json").exists() else {}
    stats_file = d / "fisher_tensor.json"
    stats = json.loads(stats_file.read_text()).get("tensors", {}) if stats_file.exists() else {}
    task = str(info.get("task") or d.name)
    if fisher is not None:
        missing = [n for n in delta.names() if n not in fisher]
        if missing:
            raise ArtifactError(f"{d}: tensor {missing[0]!r} is in delta but not in fisher; re-run the probe")
    return ProbeInput(d, task, info, delta, fisher, stats)


@dataclass
class ScoringRun:
    """Everything a strategy needs: the probes, the tensors in scope and their unit layouts."""

    probes: list[ProbeInput]
    shapes: dict[str, tuple[int, ...]]  # the universe: every tensor of the model
    names: list[str]  # tensors in scope, in tie-break order
    layouts: dict[str, UnitLayout]
    granularity: str
    budget: str
    ratio: float
    alpha: float
    beta: float
    seed: int
    chunk_elems: int = DEFAULT_CHUNK_ELEMS
    use_tensor_stats: bool = True
    progress: Progress | None = None
    notes: list[dict[str, Any]] = field(default_factory=list)  # per-task metadata from the strategy

    def tick(self, what: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(what, done, total)

    def unit_size(self, name: str) -> int:
        return self.layouts[name].unit_size(self.shapes[name])


# --------------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------------


def budget_count(ratio: float, total: int) -> int:
    """floor(ratio × total), exactly (0.29 × 100 is 29 here, 28 in float arithmetic)."""
    return math.floor(Fraction(repr(float(ratio))) * total)


def select_units(scores: dict[str, torch.Tensor], run: ScoringRun) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Exact budgeted top selection over per-unit scores; returns per-tensor unit masks and counts."""
    names = run.names
    lens = [len(scores[n]) for n in names]
    flat = torch.cat([scores[n].double().reshape(-1) for n in names]).numpy() if names else np.zeros(0)
    if np.isnan(flat).any():
        bad = names[int(np.searchsorted(np.cumsum(lens), int(np.flatnonzero(np.isnan(flat))[0]), side="right"))]
        raise ArtifactError(f"score of tensor {bad!r} is NaN; its Δ or Fisher holds NaN values — re-run the probe")
    tidx = np.repeat(np.arange(len(names)), lens)
    uidx = np.concatenate([np.arange(n) for n in lens]) if names else np.zeros(0, dtype=np.int64)
    sizes = np.repeat([run.unit_size(n) for n in names], lens).astype(np.int64)
    order = np.lexsort((uidx, tidx, -flat))
    if run.budget == "tensors":
        target = budget_count(run.ratio, len(flat))
        take = target
    else:
        target = budget_count(run.ratio, int(sizes.sum()))
        take = int(np.searchsorted(np.cumsum(sizes[order]), target, side="right"))
    chosen = np.zeros(len(flat), dtype=bool)
    chosen[order[:take]] = True
    masks, offset = {}, 0
    for n, length in zip(names, lens):
        masks[n] = torch.from_numpy(chosen[offset : offset + length].copy())
        offset += length
    return masks, {"budget_target": target, "selected_units": take, "total_units": len(flat),
                   "selected_params": int(sizes[order[:take]].sum()), "scope_params": int(sizes.sum())}
