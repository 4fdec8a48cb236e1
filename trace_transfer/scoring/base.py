"""What every scoring strategy shares: the strategy registry, the probe inputs, the run description and
the exact budgeted selection over per-unit scores. ``scorer`` (the verb) and ``strategies`` (the
built-ins) both build on this module, so neither imports the other's internals.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trace_transfer.checkpoint import open_checkpoint, read_json_object
from trace_transfer.coreset import UnitLayout
from trace_transfer.errors import ArtifactError, ArtifactNotFoundError, ConfigError
from trace_transfer.registry import Registry
from trace_transfer.scoring.stream import DEFAULT_CHUNK_ELEMS, TensorSource

__all__ = ["STRATEGIES", "register_strategy", "ProbeInput", "load_probe", "ScoringRun", "budget_count", "fill_in_order",
           "select_units"]

Progress = Callable[[str, int, int], None]


def _check_strategy(name: str, cls: type) -> None:
    missing = [m for m in ("check", "unit_scores") if not callable(getattr(cls, m, None))]
    if not isinstance(getattr(cls, "min_tasks", None), int):
        missing.append("min_tasks")
    if missing:
        raise ConfigError(f"scoring strategy {name!r} ({getattr(cls, '__qualname__', cls)}) lacks "
                          f"{', '.join(missing)}; see trace_transfer.scoring.base.register_strategy")


STRATEGIES: Registry[type] = Registry("scoring strategy", cli_hint="--strategy", validate=_check_strategy,
                                      how_to_add="or register your own with register_strategy")


def register_strategy(name: str, *, description: str = "", replace: bool = False) -> Callable[[type], type]:
    """Class decorator registering a scoring strategy under ``name`` (lower-case, unique).

    A strategy class has ``min_tasks``, ``check(run)`` (raise ConfigError for unsupported settings)
    and ``unit_scores(run) -> list[{tensor: per-unit float64 scores}]`` (one dict per task); to
    support element granularity also ``element_scores(run, task) -> (name, start, stop) -> float32
    scores`` (>= 0, bit-identical on every call; may carry a ``.sample`` function scoring only the
    sampled blocks, see ``topk``).

    Raises:
        ConfigError: the name is malformed or taken (``replace=True`` overrides on purpose), or the
            class lacks ``min_tasks``, ``check`` or ``unit_scores``.
    """

    def deco(cls: type) -> type:
        STRATEGIES.register(name, cls, description=description, replace=replace)
        cls.name = name  # provenance: ScoringRun and CoreSet metadata name the strategy
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
    ``probe.json``); Δ and probe.json (written last: the probe finished) are required, the rest optional.

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
        fisher = TensorSource(open_checkpoint(d, prefix="fisher"), nonnegative=True)
    except ArtifactNotFoundError:
        fisher = None
    if not (d / "probe.json").exists():
        # probe.json is written last: without it the probe was interrupted and Δ/Fisher may be partial.
        raise ArtifactError(f"{d} has no probe.json, so its probe did not finish; re-run `trace-transfer probe` "
                            f"into it (with --force)")
    info = read_json_object(d / "probe.json", "re-run `trace-transfer probe` to rewrite it")
    stats_file = d / "fisher_tensor.json"
    stats = (read_json_object(stats_file, "re-run `trace-transfer probe` to rewrite it").get("tensors", {})
             if stats_file.exists() else {})
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


def fill_in_order(sizes: np.ndarray, budget: int) -> np.ndarray:
    """Which units to take, walking them in the given (rank) order: each unit that still fits is taken;
    one that does not is skipped and the walk goes on with the smaller ones after it.

    Stopping at the first unit that does not fit would leave most of a budget empty whenever units
    are large next to it (whole tensors under a parameter budget: random tensor cores held 0-256
    parameters of a budget of thousands).

    Args:
        sizes: unit sizes (parameters), in the order of preference.
        budget: parameters available.

    Returns:
        A boolean array aligned with ``sizes``.

    Example:
        >>> fill_in_order(np.array([5, 8, 3, 2]), 10).tolist()
        [True, False, True, True]
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    take = np.zeros(len(sizes), dtype=bool)
    cum = np.cumsum(sizes)
    prefix = int(np.searchsorted(cum, budget, side="right"))  # the common case in one vectorised step
    take[:prefix] = True
    left = budget - (int(cum[prefix - 1]) if prefix else 0)
    i = prefix
    while left > 0 and i < len(sizes):
        fits = np.flatnonzero(sizes[i:] <= left)
        if not fits.size:
            break
        j = i + int(fits[0])
        take[j] = True
        left -= int(sizes[j])
        i = j + 1
    return take


def select_units(scores: dict[str, torch.Tensor], run: ScoringRun) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Exact budgeted top selection over per-unit scores; returns per-tensor unit masks and counts.

    ``budget="tensors"`` takes the top ``floor(ratio × units)`` units; ``budget="params"`` walks the
    ranking and takes every unit that still fits (:func:`fill_in_order`), so a large unit that does
    not fit is skipped for smaller ones further down.
    """
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
        take = -1
    chosen = np.zeros(len(flat), dtype=bool)
    if take >= 0:
        chosen[order[:take]] = True
    else:
        picked = order[fill_in_order(sizes[order], target)]
        chosen[picked] = True
        take = len(picked)
    masks, offset = {}, 0
    for n, length in zip(names, lens):
        masks[n] = torch.from_numpy(chosen[offset : offset + length].copy())
        offset += length
    return masks, {"budget_target": target, "selected_units": take, "total_units": len(flat),
                   "selected_params": int(sizes[chosen].sum()), "scope_params": int(sizes.sum())}
