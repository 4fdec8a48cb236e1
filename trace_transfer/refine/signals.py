"""Cheap per-unit signals on the target: one-shot Fisher, |W ⊙ g| saliency, micro-probe.

All three end in the TRACE-LF combination of :mod:`trace_transfer.scoring` (``α·norm(RMS Δ per unit) +
β·norm(mean F per unit)``), computed by the registered ``lf`` strategy over in-memory tensors, so units,
granularities and normalisation are exactly those of ``score``:

- ``fisher``: squared mini-batch gradients at the base weights over K batches (no optimizer state);
  score = mean Fisher over the unit (α = 0, β = 1). K forward+backward passes.
- ``saliency``: first-order |W ⊙ g| with g the root-mean-square gradient over the same K batches;
  score = mean of W²·F over the unit, which ranks like the unit's RMS of |w|·g_rms. Same cost as
  ``fisher``; it favours units whose weights are both large and sensitive.
- ``microprobe``: S optimizer steps of the probe's warm start, then K Fisher batches at the moved
  weights; LF on (Δ after S steps, that Fisher) with α = β = 0.5. S + K passes (× grad_accum).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trace_transfer.probe.fisher import accumulate_fisher
from trace_transfer.refine.config import SIGNALS
from trace_transfer.scoring import STRATEGIES, ProbeInput, ScoringRun
from trace_transfer.train.loop import TrainConfig, train


class MemorySource:
    """The read interface of ``scoring.stream.TensorSource`` over in-memory tensors."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self._t = {n: t.detach().float().cpu().reshape(-1) for n, t in tensors.items()}
        self._shapes = {n: tuple(t.shape) for n, t in tensors.items()}

    def names(self) -> list[str]:
        return list(self._t)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def numel(self, name: str) -> int:
        return self._t[name].numel()

    def window(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._t[name][start:stop]

    def __contains__(self, name: str) -> bool:
        return name in self._t


@dataclass
class SignalCost:
    """Work done on the target to compute a signal."""

    forward_backward: int = 0
    optimizer_steps: int = 0


def lf_unit_scores(delta: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor], names: list[str],
                   shapes: dict[str, tuple[int, ...]], layouts: dict, alpha: float, beta: float,
                   task: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Per-unit LF scores of in-memory Δ and Fisher, through the registered ``lf`` strategy."""
    probe = ProbeInput(Path("."), task, {}, MemorySource({n: delta[n] for n in names}),
                       MemorySource({n: fisher[n] for n in names}), {})
    return probe_unit_scores(probe, names, shapes, layouts, alpha, beta)


def probe_unit_scores(probe: ProbeInput, names: list[str], shapes: dict[str, tuple[int, ...]], layouts: dict,
                      alpha: float, beta: float) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Per-unit LF scores of one probe's Δ and Fisher (in memory, or a probe directory read streaming:
    ``scoring.load_probe``). Per-tensor stats are not used, so both give the same scores."""
    run = ScoringRun([probe], shapes, names, layouts, "refine", "params", 1.0, alpha, beta, 0, use_tensor_stats=False)
    (scores,) = STRATEGIES.get("lf")().unit_scores(run)
    return scores, run.notes[0]


def compute_signal(model: torch.nn.Module, signal: str, fisher_batches, train_batches, names: list[str],
                   shapes: dict[str, tuple[int, ...]], layouts: dict, *, batches: int, steps: int,
                   train_cfg: TrainConfig, precision: str, task: str) -> tuple[dict[str, torch.Tensor], dict, SignalCost]:
    """Per-unit scores of ``signal`` for the tensors ``names`` (model changed in place for microprobe).

    ``fisher_batches()`` and ``train_batches(epoch)`` yield data-loader batches.
    """
    cost = SignalCost()
    params = dict(model.named_parameters())
    theta0 = {n: params[n].detach().clone() for n in names} if signal == "microprobe" else None
    if signal == "microprobe" and steps > 0:
        result = train(model, train_batches, train_cfg, steps=steps)
        cost.optimizer_steps = result.steps
        cost.forward_backward += result.steps * train_cfg.grad_accum
    acc = accumulate_fisher(model, fisher_batches(), mode="batch", elements=True, max_batches=batches, precision=precision)
    cost.forward_backward += acc.count
    fisher = {n: acc.fisher(n) for n in names}
    if signal == "fisher":
        scores, note = lf_unit_scores(fisher, fisher, names, shapes, layouts, 0.0, 1.0, task)
    elif signal == "saliency":
        sal = {n: params[n].detach().float() ** 2 * fisher[n] for n in names}
        scores, note = lf_unit_scores(sal, sal, names, shapes, layouts, 0.0, 1.0, task)
    else:
        delta = {n: params[n].detach().float() - theta0[n].float() for n in names}
        scores, note = lf_unit_scores(delta, fisher, names, shapes, layouts, 0.5, 0.5, task)
    return scores, {**note, "signal": signal, "description": SIGNALS[signal]}, cost
