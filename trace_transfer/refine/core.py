"""``refine``: choose the units of a target CoreSet on the target itself, from a cheap signal.

With per-slot budgets (from ``transfer``), the units inside every slot are the slot's top units by the
signal, exactly ``budget`` of them (ties: lower unit index first); companions are taken whole. Without
budgets, the top ``ratio`` of the parameters in scope by the same signal, selected exactly as
``score`` selects (the source-free control: what a user gets without any source model).

The CoreSet's provenance records what the pass cost *on the target* — forward+backward passes,
optimizer steps, peak memory, wall time — next to what a native probe of the same task costs, so the
cost–accuracy trade-off can be read off the artifact.

Example:
    >>> cs, cost = refine("tiny-qwen3", "synthetic:math", budgets="math.budgets.json", signal="fisher", batches=16)
    >>> cs.save("math.qwen3.coreset.safetensors"); cost["relative_to_native"]
"""

from __future__ import annotations

import datetime as _dt
import math
import resource
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from trace_transfer._version import versions
from trace_transfer.checkpoint import fingerprint_of
from trace_transfer.coreset import CoreSet
from trace_transfer.errors import ConfigError, TaskError
from trace_transfer.refine.config import SIGNALS, RefineConfig
from trace_transfer.refine.signals import compute_signal
from trace_transfer.scoring import ScoringRun, select_units
from trace_transfer.scoring.granularity import in_scope, parse_scope, unit_layouts
from trace_transfer.train.loop import TrainConfig
from trace_transfer.transfer.budgets import SlotBudgets

__all__ = ["RefineConfig", "refine", "native_probe_cost", "SIGNALS"]


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


def refine(
    model: Any,
    task: Any,
    budgets: SlotBudgets | str | Path | None = None,
    config: RefineConfig | None = None,
    *,
    tokenizer: Any = None,
    native: Any = None,
) -> tuple[CoreSet, dict[str, Any]]:
    """Pick a target CoreSet's units from a cheap signal, inside per-slot budgets or globally.

    Args:
        model: the target: hub id or local dir (loaded in fp32), or a ``PreTrainedModel`` (copied; pass
            ``tokenizer``).
        task: task reference (``synthetic:math``, a task YAML) or a loaded ``Task``.
        budgets: :class:`SlotBudgets` or its ``.budgets.json`` from ``transfer``; None = source-free
            (top ``config.ratio`` of the parameters in ``config.scope`` at ``config.granularity``).
        config: :class:`RefineConfig`.
        native: what a native probe of this task costs, for the provenance: a probe directory or a
            ``ProbeConfig`` (None: not recorded).

    Returns:
        ``(CoreSet, cost)``; ``cost`` (also in ``metadata["cost"]``) holds ``forward_backward``,
        ``optimizer_steps``, ``peak_memory_mb``, ``seconds``, ``native`` and ``relative_to_native``.

    Raises:
        ConfigError: invalid settings. ModelMismatchError: the budgets are for another model.
        TaskError: the task yields no trainable example.
    """
    import copy

    from trace_transfer.data import load_task, make_dataloader
    from trace_transfer.devices import resolve_device
    from trace_transfer.models import load_model, load_tokenizer

    cfg = config or RefineConfig()
    t0 = time.perf_counter()
    device = torch.device(resolve_device(cfg.device))  # a missing GPU is one ConfigError line
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(cfg.seed)
    if isinstance(model, torch.nn.Module):
        if tokenizer is None:
            raise ConfigError("refine() got a model object but no tokenizer; pass tokenizer=...")
        net, model_ref = copy.deepcopy(model).to(device=device, dtype=torch.float32), type(model).__name__
    else:
        model_ref = str(model)
        net = load_model(model_ref, dtype=torch.float32, device=str(device))
        tokenizer = tokenizer or load_tokenizer(model_ref)
    shapes = {n: tuple(p.shape) for n, p in net.named_parameters()}
    if isinstance(budgets, (str, Path)):
        budgets_path: str | None = str(budgets)
        budgets = SlotBudgets.load(budgets)
    else:
        budgets_path = None
    if budgets is not None:
        budgets.check_fits(shapes)
        names = [n for n in shapes if n in budgets.layouts]
        layouts = {n: budgets.layouts[n] for n in names}
    else:
        names = in_scope(list(shapes), parse_scope(cfg.scope))
        layouts = unit_layouts(names, shapes, cfg.granularity)

    task_obj = load_task(task) if isinstance(task, (str, Path)) else task
    examples = list(task_obj.train_examples())[: cfg.max_examples or None]
    loader = make_dataloader(tokenizer, examples, cfg.seq_len, cfg.batch_size, shuffle=True, seed=cfg.seed)
    if not len(loader.dataset):
        raise TaskError(f"task {task_obj.name!r} yields no training example (check its data and seq_len {cfg.seq_len})")
    train_cfg = TrainConfig(lr=cfg.lr, max_steps=max(1, cfg.steps), batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                            warmup_ratio=0.0, scheduler="constant", precision=cfg.precision, seed=cfg.seed)
    t_signal = time.perf_counter()
    scores, note, work = compute_signal(
        net, cfg.signal, lambda: make_dataloader(tokenizer, examples, cfg.seq_len, cfg.batch_size, shuffle=True, seed=cfg.seed),
        lambda epoch: loader, names, shapes, layouts, batches=cfg.batches, steps=cfg.steps, train_cfg=train_cfg,
        precision=cfg.precision, task=task_obj.name)
    signal_seconds = time.perf_counter() - t_signal

    if budgets is not None:
        masks = select_in_budgets(scores, budgets)
        mode = "budgets"
    else:
        run = ScoringRun([], shapes, names, layouts, cfg.granularity, "params", cfg.ratio, 0.5, 0.5, cfg.seed)
        masks, _ = select_units(scores, run)
        mode = "source-free"

    native_cost = native_probe_cost(native, len(examples))
    cost = {"forward_backward": work.forward_backward, "optimizer_steps": work.optimizer_steps,
            "peak_memory_mb": _peak_memory_mb(device), "peak_memory_kind": "cuda allocated" if device.type == "cuda"
            else "process max RSS", "signal_seconds": round(signal_seconds, 3),
            "seconds": round(time.perf_counter() - t0, 3), "device": str(device), "native": native_cost,
            "relative_to_native": (work.forward_backward / native_cost["forward_backward"])
            if native_cost and native_cost["forward_backward"] else None}
    selected = sum(int(masks[n].sum()) * layouts[n].unit_size(shapes[n]) for n in masks)
    scope_params = sum(math.prod(shapes[n]) for n in names) if budgets is None else None
    metadata = {
        "strategy": f"refine-{cfg.signal}", "task": task_obj.name, "tasks": [task_obj.name], "mode": mode,
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
    cs = CoreSet.from_unit_masks(masks, layouts, shapes, {n: s.float() for n, s in scores.items()}, metadata)
    return cs, cost


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
