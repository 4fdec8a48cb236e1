"""What one target pass and its distributed form share: the budgets and units in play, selection
(exactly ``budget`` units per slot, or the global top ratio as ``score`` selects), the CoreSet's
provenance and the cost record."""

from __future__ import annotations

import datetime as _dt
import math
import resource
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from trace_transfer._version import versions
from trace_transfer.checkpoint import fingerprint_of
from trace_transfer.coreset import CoreSet
from trace_transfer.refine.config import RefineConfig
from trace_transfer.refine.signals import SignalCost
from trace_transfer.scoring import ScoringRun, select_units
from trace_transfer.scoring.granularity import in_scope, parse_scope, unit_layouts
from trace_transfer.transfer.budgets import SlotBudgets

__all__ = ["native_probe_cost", "load_budgets", "units_in_play", "pass_cost", "select_coreset", "select_in_budgets"]


def native_probe_cost(native: Any, n_examples: int) -> dict[str, Any] | None:
    """Forward+backward passes of a native probe: from a probe directory's ``probe.json`` (what it
    did), or from a ``ProbeConfig``-like object applied to ``n_examples`` training examples."""
    if native is None:
        return None
    if isinstance(native, (str, Path)):
        import json

        info = json.loads((Path(native) / "probe.json").read_text())
        cfg = info.get("config", {})
        accum = int(cfg.get("grad_accum") or cfg.get("train", {}).get("grad_accum") or 1)
        steps = int(info.get("train", {}).get("steps", 0))
        fisher = int(info.get("fisher", {}).get("batches", 0))
        return {"from": str(native), "optimizer_steps": steps, "forward_backward": steps * accum + fisher,
                "fisher_batches": fisher, "seconds": info.get("seconds")}
    t = getattr(native, "train", native)  # a ProbeConfig holding a TrainConfig, or flat
    n_batches = math.ceil(min(n_examples, native.max_examples or n_examples) / t.batch_size)
    steps = t.max_steps or max(1, math.ceil(t.epochs * n_batches / t.grad_accum))
    fisher = min(native.fisher_batches, n_batches) if native.fisher_batches else n_batches
    return {"from": "probe config", "optimizer_steps": steps, "forward_backward": steps * t.grad_accum + fisher,
            "fisher_batches": fisher, "seconds": None}


def load_budgets(budgets: SlotBudgets | str | Path | None) -> tuple[SlotBudgets | None, str | None]:
    """``(budgets, the file they came from or None)``."""
    if isinstance(budgets, (str, Path)):
        return SlotBudgets.load(budgets), str(budgets)
    return budgets, None


def units_in_play(shapes: dict[str, tuple[int, ...]], budgets: SlotBudgets | None,
                  cfg: RefineConfig) -> tuple[list[str], dict[str, Any]]:
    """The tensors that compete and their unit layouts: the budgets' (checked against ``shapes``), or
    ``cfg.scope`` at ``cfg.granularity`` (source-free)."""
    if budgets is not None:
        budgets.check_fits(shapes)
        names = [n for n in shapes if n in budgets.layouts]
        return names, {n: budgets.layouts[n] for n in names}
    names = in_scope(list(shapes), parse_scope(cfg.scope))
    return names, unit_layouts(names, shapes, cfg.granularity)


def pass_cost(work: SignalCost, native_cost: dict[str, Any] | None, *, signal_seconds: float, seconds: float,
              **extra: Any) -> dict[str, Any]:
    """The cost record of one target pass (``extra``: peak memory, device, ...), next to a native probe's."""
    return {"forward_backward": work.forward_backward, "optimizer_steps": work.optimizer_steps, **extra,
            "signal_seconds": round(signal_seconds, 3), "seconds": round(seconds, 3), "native": native_cost,
            "relative_to_native": (work.forward_backward / native_cost["forward_backward"])
            if native_cost and native_cost["forward_backward"] else None}


def select_coreset(scores: dict[str, torch.Tensor], note: dict[str, Any], shapes: dict[str, tuple[int, ...]],
                   names: list[str], layouts: dict[str, Any], budgets: SlotBudgets | None, budgets_path: str | None,
                   cfg: RefineConfig, *, cost: dict[str, Any], model_ref: str, task: str) -> CoreSet:
    """Select units from per-unit ``scores`` (exactly ``budget`` per slot, or the global top ``cfg.ratio``
    as ``score`` selects) and build the CoreSet with its provenance."""
    if budgets is not None:
        masks = select_in_budgets(scores, budgets)
        mode = "budgets"
    else:
        run = ScoringRun([], shapes, names, layouts, cfg.granularity, "params", cfg.ratio, 0.5, 0.5, cfg.seed)
        masks, _ = select_units(scores, run)
        mode = "source-free"
    selected = sum(int(masks[n].sum()) * layouts[n].unit_size(shapes[n]) for n in masks)
    scope_params = sum(math.prod(shapes[n]) for n in names) if budgets is None else None
    metadata = {
        "strategy": f"refine-{cfg.signal}", "task": task, "tasks": [task], "mode": mode,
        "ratio": cfg.ratio if budgets is None else (budgets.metadata.get("ratio")),
        "granularity": cfg.granularity if budgets is None else (budgets.metadata.get("granularity")),
        "budget": "params", "budget_unit": "params", "scope": list(parse_scope(cfg.scope)) if budgets is None
        else budgets.metadata.get("transfer", {}).get("source_metadata", {}).get("scope"),
        "selected_params": selected, "scope_params": scope_params, "signal": note, "cost": cost,
        "config": asdict(cfg), "model": model_ref, "seed": cfg.seed,
        "budgets": None if budgets is None else {"file": budgets_path, "groups": len(budgets.groups),
                                                 "budgeted_params": budgets.total_params,
                                                 "transfer": budgets.metadata.get("transfer")},
        "fingerprint": fingerprint_of(shapes), "versions": versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return CoreSet.from_unit_masks(masks, layouts, shapes, {n: s.float() for n, s in scores.items()}, metadata)


def select_in_budgets(scores: dict[str, torch.Tensor], budgets: SlotBudgets) -> dict[str, torch.Tensor]:
    """Per tensor unit masks: each group's top ``budget`` candidates by score (ties: lower index)."""
    masks = {n: torch.zeros(len(s), dtype=torch.bool) for n, s in scores.items()}
    for g in budgets.groups:
        cand = g.candidates()
        if g.fixed:
            masks[g.tensor][cand] = True
            continue
        if g.budget == 0:
            continue
        s = scores[g.tensor][cand].double()
        order = torch.argsort(-s, stable=True)  # stable on ascending candidates: ties go to the lower index
        masks[g.tensor][cand[order[: g.budget]]] = True
    return masks


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux
