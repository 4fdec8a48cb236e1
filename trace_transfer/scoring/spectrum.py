"""``spectrum``: the Spectrum baseline (Hartford et al. 2024, cognitivecomputations/spectrum) — rank
weight matrices by a signal-to-noise ratio of their singular values, from the weights alone.

How a matrix W (n × m; a 1-D tensor is taken as 1 × d) is scored, as ``spectrum.py`` does it:

1. ``S = svdvals(W)`` (float64 here), descending.
2. Noise scale from the spread of the spectrum: ``σ = IQR(S) / 1.349`` (quartiles with linear
   interpolation, ``torch.quantile``'s default).
3. Marchenko–Pastur edge ``τ = σ · (1 + √β)`` with ``β = min(n, m) / max(n, m)``.
4. ``signal = Σ S[S > τ]``, ``noise = Σ S[S ≤ τ]`` (``noise = 1`` when no value is below the edge, as
   Spectrum does), and the score is ``(signal / noise) / S[0]`` — Spectrum's ``snr_ratio``.

Spectrum then keeps, *within each module type* (the name after the layer index: ``self_attn.q_proj``,
``mlp.down_proj``, ...), the top share of layers by that score. Scoring competes over one global
ranking here, so each tensor's score is its standing inside its type: ``(count − rank) / count`` (1 for
the best ``q_proj``, ``1/L`` for the worst). Taking the top ``floor(r × tensors)`` by that score takes
the top ``≈ r`` of every type (exactly ``r × L`` per type when that is whole), and tensors alone in
their type (embeddings, lm_head) rank first, as Spectrum always unfreezes them. A bias shares its
module's weight score. Ties (norm vectors all score 1) fall to the scorer's tensor order.

Spectrum needs no task data: the weights are those the probe started from (``model_path`` in its
``probe.json``), so every task gets the same CoreSet. Use ``--granularity tensor`` (Spectrum selects
whole matrices); at row/column/head granularity every unit gets its matrix's score, so a parameter
budget (the pipeline's, shared with the other methods) is filled matrix by matrix in that order and the
last matrix partly. The raw per-tensor ``snr_ratio`` is recorded in the CoreSet metadata.

Example:
    >>> score(["probes/math"], strategy="spectrum", ratio=0.25, granularity="tensor", out_dir="cores")
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from trace_transfer.checkpoint import open_checkpoint
from trace_transfer.errors import ArtifactNotFoundError, ConfigError
from trace_transfer.scoring.base import ScoringRun, register_strategy

__all__ = ["spectrum_snr", "module_type", "Spectrum"]


def spectrum_snr(weight: torch.Tensor) -> float:
    """Spectrum's ``snr_ratio`` of one weight tensor (see the module docstring for the formula)."""
    w = weight.detach().to(torch.float64)
    w = w.reshape(1, -1) if w.ndim < 2 else w.reshape(w.shape[0], -1)
    s = torch.linalg.svdvals(w)
    sigma = (torch.quantile(s, 0.75) - torch.quantile(s, 0.25)) / 1.349
    n, m = w.shape
    beta = min(n, m) / max(n, m)
    threshold = sigma * (1 + math.sqrt(beta))
    signal_mask = s > threshold
    signal = float(s[signal_mask].sum()) if signal_mask.any() else 0.0
    noise = float(s[~signal_mask].sum()) if (~signal_mask).any() else 1.0
    snr = signal / noise if noise != 0 else math.inf
    return snr / float(s[0]) if float(s[0]) != 0 else 0.0


def module_type(name: str) -> str:
    """Spectrum's module type: the path after the first numeric component (``model.layers.3.mlp.up_proj``
    → ``mlp.up_proj``), else the whole module name."""
    module = re.sub(r"\.(weight|bias)$", "", name)
    parts = module.split(".")
    idx = next((i for i, p in enumerate(parts) if p.isdigit()), -1)
    return ".".join(parts[idx + 1:]) if idx != -1 else module


def _weights_dir(run: ScoringRun) -> Path:
    info = run.probes[0].info
    ref = info.get("model_path") or info.get("model")
    if not ref or not Path(str(ref)).exists():
        raise ArtifactNotFoundError(
            f"{run.probes[0].dir}: strategy spectrum reads the base weights from the probe's model "
            f"(probe.json model_path={ref!r}), which is not a local directory; re-run the probe on a local model dir")
    return Path(str(ref))


@register_strategy("spectrum", description="Spectrum: per-matrix SNR of singular values (Marchenko-Pastur "
                                           "edge), top share per module type; weights only, no probe signal")
class Spectrum:
    min_tasks = 1

    def check(self, run: ScoringRun) -> None:
        if run.granularity == "element":
            raise ConfigError("strategy spectrum ranks whole matrices; use --granularity tensor (Spectrum's own), "
                              "or row/column/head to fill a parameter budget matrix by matrix")
        _weights_dir(run)

    def unit_scores(self, run: ScoringRun) -> list[dict[str, torch.Tensor]]:
        reader = open_checkpoint(_weights_dir(run))
        snr: dict[str, float] = {}
        weights = [n for n in run.names if not n.endswith(".bias")]
        for i, name in enumerate(weights):
            snr[name] = spectrum_snr(reader.get(name))
            run.tick("spectrum SNR", i + 1, len(weights))
        for name in run.names:  # a bias follows its module's weight (Spectrum unfreezes whole modules)
            if name not in snr:
                snr[name] = snr.get(name[: -len(".bias")] + ".weight", 0.0)
        by_type: dict[str, list[str]] = {}
        for name in weights:
            by_type.setdefault(module_type(name), []).append(name)
        standing: dict[str, float] = {}
        for members in by_type.values():
            ranked = sorted(members, key=lambda n: -snr[n])  # stable: ties keep tensor order
            for rank, name in enumerate(ranked):
                standing[name] = (len(ranked) - rank) / len(ranked)
        for name in run.names:
            if name not in standing:
                standing[name] = standing.get(name[: -len(".bias")] + ".weight", 0.0)
        # Below tensor granularity every unit carries its matrix's score: a parameter budget is filled whole
        # matrices first, in Spectrum's order, the last one partly (its first units).
        scores = {n: torch.full((run.layouts[n].num_units(run.shapes[n]),), standing[n], dtype=torch.float64)
                  for n in run.names}
        note = {"spectrum_snr_ratio": {n: snr[n] for n in run.names},
                "spectrum": "score = (count - rank) / count of snr_ratio within the module type"}
        run.notes.extend(dict(note) for _ in run.probes)
        return [dict(scores) for _ in run.probes]
