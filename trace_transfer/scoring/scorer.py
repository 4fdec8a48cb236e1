"""Scoring and selection: probe outputs (Δ, Fisher) → one CoreSet per task.

Strategies (each registered with :func:`register_strategy`; the built-ins live in ``strategies``):

- ``lf`` — TRACE-LF: ``α·norm(L2) + β·norm(F)`` per unit, where L2 is the RMS of Δ over the unit
  (‖Δ_u‖₂/√|u|; for a whole tensor exactly the official code's ‖Δ‖₂/√numel) and F the mean Fisher over
  the unit; ``norm`` is min-max over *all units in scope* (one scale for the whole model, as the
  official code does across tensors). RMS and mean keep units of different sizes comparable.
- ``cs`` — TRACE-CS: specificity ``1 − mean_j cos(Δ_k[u], Δ_j[u])`` over the other tasks j. Needs at
  least 3 tasks: with 2, both tasks' cosines are the same number, so both get the same ranking. A unit
  the task did not move (Δ = 0) scores 0; a cosine with a task that did not move it counts as 0.
- ``random`` — seeded uniform scores, same granularity and budget: the control LF/CS must beat.

Selection is exact and deterministic: units are ranked by (score desc, tensor order, unit index),
tensor order being the model's parameter order recorded in ``probe.json`` (else the Δ file's order). ``budget="tensors"`` takes
``floor(ratio × number of units)`` units (whole tensors at tensor granularity — the paper's rule);
``budget="params"`` walks the ranking and takes every unit that still fits
``floor(ratio × parameters in scope)``, skipping one that does not for smaller ones further down
(exact at element granularity; at coarser granularities it stops short by less than the smallest unit).

``preset="paper"`` reproduces the official TRACE code: whole tensors, scope = every named tensor
(embeddings and lm_head included), α = β = 0.5, ``budget="tensors"``.

Streaming: Δ and Fisher are read tensor by tensor in windows (``stream``); per-unit reductions are
one pass. Element granularity never holds all scores: an exact selection over the scores' bit
patterns (``topk``) takes one full pass after reading a 1/32 sample (plus one pass for the
normalisation ranges when the probe did not record them) and writes packed masks, never unpacked.

Example:
    >>> cores = score(["probes/math", "probes/code", "probes/med"], strategy="cs", ratio=0.05,
    ...               out_dir="cores", granularity="row")
    >>> cores["math"].num_selected()
"""

from __future__ import annotations

import json
import logging
import math
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trace_transfer.scoring.granularity import GRANULARITIES, head_axes, head_dim_from_config, in_scope, parse_scope, unit_layouts
from trace_transfer.scoring.stream import DEFAULT_CHUNK_ELEMS, TensorSource, single_threaded
from trace_transfer.scoring.topk import PackedMasks, streaming_topk
from trace_transfer.scoring.units import BUDGETS, PRESETS
from trace_transfer._version import __version__, versions
from trace_transfer.checkpoint import check_output, fingerprint_of, open_checkpoint
from trace_transfer.coreset import SUFFIX, CoreSet, UnitLayout
from trace_transfer.scoring.base import STRATEGIES, ProbeInput, ScoringRun, budget_count, load_probe, register_strategy, select_units
import trace_transfer.scoring.strategies  # noqa: F401  (registers lf, cs, random, magnitude)
import trace_transfer.scoring.spectrum  # noqa: F401  (registers spectrum)
from trace_transfer.errors import ArtifactError, ArtifactNotFoundError, ConfigError, ModelMismatchError

__all__ = ["score", "register_strategy", "STRATEGIES", "BUDGETS", "PRESETS", "GRANULARITIES", "ProbeInput", "load_probe", "coreset_filename"]

logger = logging.getLogger(__name__)

TIE_BREAK = "score desc, then tensor order (the model's, as recorded by the probe), then unit index"
# --------------------------------------------------------------------------------------------------
# The verb
# --------------------------------------------------------------------------------------------------


def _resolve_options(preset, granularity, budget, scope, alpha, beta) -> dict[str, Any]:
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"preset {preset!r} is not known; choose one of: {', '.join(PRESETS)}")
    if preset == "paper":
        fixed = {"granularity": "tensor", "budget": "tensors", "scope": "all", "alpha": 0.5, "beta": 0.5}
        given = {"granularity": granularity, "budget": budget, "scope": scope, "alpha": alpha, "beta": beta}
        conflicts = [f"{k}={given[k]!r} (the paper uses {v!r})" for k, v in fixed.items()
                     if given[k] is not None and (parse_scope(given[k]) != parse_scope(v) if k == "scope" else given[k] != v)]
        if conflicts:
            raise ConfigError("--preset paper reproduces the official TRACE code and fixes these options; drop them:",
                              conflicts)
        return {**fixed, "scope": parse_scope("all")}
    granularity = granularity or "row"
    if granularity not in GRANULARITIES:
        raise ConfigError(f"granularity {granularity!r} is not known; choose one of: {', '.join(GRANULARITIES)}")
    budget = budget or ("tensors" if granularity == "tensor" else "params")
    if budget not in BUDGETS:
        raise ConfigError(f"budget {budget!r} is not known; choose one of: {', '.join(BUDGETS)}")
    alpha = 0.5 if alpha is None else float(alpha)
    beta = 0.5 if beta is None else float(beta)
    if alpha < 0 or beta < 0 or alpha + beta == 0:
        raise ConfigError(f"alpha={alpha}, beta={beta}: both must be >= 0 and not both 0")
    return {"granularity": granularity, "budget": budget, "scope": parse_scope(scope), "alpha": alpha, "beta": beta}


def _check_same_model(probes: list[ProbeInput]) -> dict[str, tuple[int, ...]]:
    first = probes[0]
    shapes = {n: first.delta.shape(n) for n in first.delta.names()}
    for p in probes[1:]:
        other = {n: p.delta.shape(n) for n in p.delta.names()}
        if other != shapes:
            diff = next(n for n in {**shapes, **other} if shapes.get(n) != other.get(n))
            raise ModelMismatchError(
                f"probes {first.dir} and {p.dir} are of different models: tensor {diff!r} is "
                f"{list(shapes[diff]) if diff in shapes else 'missing'} vs "
                f"{list(other[diff]) if diff in other else 'missing'}; score probes of one model together"
            )
    return shapes


def _model_config(probe: ProbeInput) -> dict[str, Any] | None:
    cfg = probe.info.get("model_config")
    if cfg:
        return cfg
    model = probe.info.get("model_path") or probe.info.get("model")
    if model and (Path(model) / "config.json").is_file():
        return json.loads((Path(model) / "config.json").read_text())
    return None


def coreset_filename(task: str) -> str:
    """``<task>.coreset.safetensors`` with the task name made safe for a file name."""
    return (re.sub(r"[^A-Za-z0-9._-]+", "_", task).strip("_") or "task") + SUFFIX


def score(
    probe_dirs: Sequence[str | Path],
    strategy: str = "lf",
    ratio: float = 0.05,
    out_dir: str | Path | None = None,
    *,
    granularity: str | None = None,
    budget: str | None = None,
    preset: str | None = None,
    scope: str | Sequence[str] | None = None,
    alpha: float | None = None,
    beta: float | None = None,
    seed: int = 0,
    head_dim: int | None = None,
    progress: Progress | None = None,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    use_tensor_stats: bool = True,
    force: bool = False,
) -> dict[str, CoreSet]:
    """Score parameters of each probed task and select its core set.

    Args:
        probe_dirs: ``trace-transfer probe`` outputs, one per task, all of the same model.
        strategy: ``lf`` | ``cs`` | ``random`` (or any registered strategy).
        ratio: share of the budget to select, in (0, 1].
        out_dir: where ``<task>.coreset.safetensors`` files go (None: return without writing; element
            granularity then uses a temporary directory).
        granularity: ``tensor|row|column|head|element`` (default ``row``; ``tensor`` under the preset).
        budget: ``tensors`` (count of units) | ``params`` (default: tensors at tensor granularity,
            params otherwise).
        preset: ``paper`` reproduces the official TRACE code (see module docstring).
        scope: groups that compete, e.g. ``"layers,embeddings"`` or ``"all"`` (default ``layers``).
        alpha, beta: LF weights (default 0.5 / 0.5).
        seed: seed of the ``random`` strategy.
        head_dim: override the attention head size for ``head`` granularity.
        progress: ``(stage, done, total)`` callback.
        use_tensor_stats: at tensor granularity, use the probe's recorded per-tensor reductions
            (``fisher_tensor.json``) instead of re-reading Δ and Fisher.
        force: overwrite existing ``<task>.coreset.safetensors`` files in ``out_dir`` (else refused).

    Returns:
        ``{task: CoreSet}`` in probe order.

    Raises:
        ConfigError: unknown option, too few tasks for the strategy, conflicting preset options.
        ArtifactNotFoundError / ArtifactError / ModelMismatchError: missing, broken or mismatched probes.
    """
    t0 = time.time()
    strategy_cls = STRATEGIES.get(strategy)  # an unknown name fails here, before any file is read
    if not 0 < float(ratio) <= 1:
        raise ConfigError(f"ratio {ratio}: must be in (0, 1] (e.g. 0.05 for 5%)")
    if not probe_dirs:
        raise ConfigError("no probe directories given; pass one --probe DIR per task")
    opts = _resolve_options(preset, granularity, budget, scope, alpha, beta)
    strat = strategy_cls()
    probes = [load_probe(d) for d in probe_dirs]
    tasks = [p.task for p in probes]
    if len(set(tasks)) != len(tasks):
        dup = next(t for t in tasks if tasks.count(t) > 1)
        raise ConfigError(f"task {dup!r} appears in more than one probe directory; give each task once")
    if len(probes) < strat.min_tasks:
        raise ConfigError(
            f"strategy {strategy!r} needs at least {strat.min_tasks} tasks, got {len(probes)} ({', '.join(tasks)})"
            + ("; with 2 tasks the specificity 1 - cos(Δ_a, Δ_b) is the same number for both, so both tasks get "
               "the same ranking — add a third task's probe, or use --strategy lf" if strategy == "cs" else "")
        )
    shapes = _check_same_model(probes)
    order = probes[0].info.get("tensors")
    if isinstance(order, list) and sorted(order) == sorted(shapes):
        shapes = {n: shapes[n] for n in order}  # model order (safetensors files sort names alphabetically)
    names = in_scope(list(shapes), opts["scope"])
    if not names:
        raise ConfigError(f"scope {','.join(opts['scope'])} matches no tensor of the model; try --scope all")
    config = _model_config(probes[0])
    axes, axes_source = ({}, None)
    if opts["granularity"] == "head":
        axes, axes_source = head_axes(names, shapes, config)
        head_dim = head_dim or head_dim_from_config(config)
    layouts = unit_layouts(names, shapes, opts["granularity"], head_dim, axes)
    run = ScoringRun(probes, shapes, names, layouts, opts["granularity"], opts["budget"], float(ratio),
                     opts["alpha"], opts["beta"], seed, chunk_elems, use_tensor_stats, progress)
    strat.check(run)
    deviations = _paper_deviations(probes) if preset == "paper" else []
    for d in deviations:
        logger.warning("--preset paper: %s", d)

    base_meta = {
        "strategy": strategy, "tasks": tasks, "ratio": float(ratio), "granularity": opts["granularity"],
        "budget": opts["budget"], "alpha": opts["alpha"], "beta": opts["beta"], "preset": preset,
        "scope": list(opts["scope"]), "scope_tensors": len(names), "normalisation": "min-max over all units in scope",
        "tie_break": TIE_BREAK, "seed": seed, "head_dim": head_dim if opts["granularity"] == "head" else None,
        "head_axes_source": axes_source, "model": probes[0].info.get("model"),
        "source_probes": [str(p.dir.resolve()) for p in probes],
        "fingerprint": fingerprint_of(shapes), "tool_version": __version__, "versions": versions(),
        "creation": {"function": "trace_transfer.scoring.scorer.score", "strategy": strategy, "ratio": float(ratio),
                     "granularity": granularity, "budget": budget, "preset": preset, "scope": scope, "alpha": alpha,
                     "beta": beta, "seed": seed, "head_dim": head_dim, "use_tensor_stats": use_tensor_stats},
        "preset_deviations": deviations,
    }
    fp = probes[0].info.get("fingerprint", {}).get("hash")
    if fp and fp != base_meta["fingerprint"]["hash"]:
        raise ArtifactError(f"{probes[0].dir}: delta tensors do not match the fingerprint in probe.json; re-run the probe")

    out_path = Path(out_dir) if out_dir is not None else None
    if out_path is not None:
        # Other files in OUT are left alone: only the CoreSets this call writes may be overwritten.
        if out_path.exists() and not out_path.is_dir():
            raise ArtifactError(f"--out {out_path} is a file; score writes a directory of CoreSets: choose another path")
        for p in probes:
            check_output(out_path / coreset_filename(p.task), force, "CoreSet")
        out_path.mkdir(parents=True, exist_ok=True)
    with single_threaded():
        return _score_all(run, strat, base_meta, out_path, t0)


def _score_all(run: ScoringRun, strat, base_meta: dict, out_path: Path | None, t0: float) -> dict[str, CoreSet]:
    probes, shapes, layouts = run.probes, run.shapes, run.layouts
    result: dict[str, CoreSet] = {}
    if run.granularity == "element":
        with tempfile.TemporaryDirectory(dir=out_path) as tmp:
            for t, p in enumerate(probes):
                target = (out_path or Path(tmp)) / coreset_filename(p.task)
                cs = _select_elements(run, strat, t, target, Path(tmp), {**base_meta, "task": p.task}, t0)
                if out_path is None:  # the file vanishes with the temp dir: keep the masks in memory
                    cs = CoreSet.from_unit_masks({n: cs.unit_mask(n) for n in cs.names()},
                                                 {n: cs.layout(n) for n in cs.names()}, shapes, metadata=cs.metadata)
                result[p.task] = cs
        return result
    per_task = strat.unit_scores(run)
    for t, (p, scores) in enumerate(zip(probes, per_task)):
        masks, counts = select_units(scores, run)
        _check_not_empty(counts["selected_units"], counts["total_units"], run.ratio)
        meta = {**base_meta, "task": p.task, **counts, **(run.notes[t] if t < len(run.notes) else {}),
                "created": datetime.now(timezone.utc).isoformat(), "seconds": round(time.time() - t0, 3)}
        cs = CoreSet.from_unit_masks(masks, layouts, shapes, {n: s.float() for n, s in scores.items()}, meta)
        if out_path is not None:
            cs.save(out_path / coreset_filename(p.task))
        result[p.task] = cs
    return result


def _select_elements(run: ScoringRun, strat, t: int, target: Path, tmp: Path, meta: dict, t0: float) -> CoreSet:
    if not hasattr(strat, "element_scores"):
        raise ConfigError(f"strategy {strat.name!r} does not support element granularity")
    p = run.probes[t]
    fn = strat.element_scores(run, t)
    items = [(n, p.delta.numel(n)) for n in run.names]
    total = sum(n for _, n in items)
    k = budget_count(run.ratio, total)
    masks = PackedMasks(tmp / (coreset_filename(p.task) + ".masks"), items)
    stage = {"name": ""}
    done = {"n": 0}

    def on_pass(name: str) -> None:
        stage["name"], done["n"] = f"{name} {p.task}", 0

    def on_chunk(n: int) -> None:
        done["n"] += n
        run.tick(stage["name"], done["n"], total)

    try:
        selected = streaming_topk(items, fn, k, masks, run.chunk_elems, on_pass=on_pass, on_chunk=on_chunk,
                                  sample_fn=getattr(fn, "sample", None))
        _check_not_empty(sum(selected.values()), total, run.ratio)
        note = run.notes[-1] if run.notes else {}
        meta = {**meta, **note, "budget_target": k, "selected_units": sum(selected.values()), "total_units": total,
                "scope_params": total, "created": datetime.now(timezone.utc).isoformat(),
                "seconds": round(time.time() - t0, 3)}
        path = CoreSet.save_packed_element_masks(target, run.shapes, {n: masks.read(n) for n, _ in items}, selected, meta)
    finally:
        masks.remove()
    return CoreSet.load(path)


def _check_not_empty(selected: int, total: int, ratio: float) -> None:
    # An empty CoreSet trains nothing (TRACE) or everything (its complement): never what was asked for.
    if selected == 0:
        raise ConfigError(f"--ratio {ratio:g} selects no unit: the budget rounds down to 0 of {total:,} units; "
                          f"raise --ratio (or use a finer --granularity)")


def _paper_deviations(probes: list[ProbeInput]) -> list[str]:
    out = []
    for p in probes:
        f = p.info.get("fisher", {})
        if f.get("mode") not in (None, "batch"):
            out.append(f"{p.dir}: Fisher mode {f.get('mode')!r}; the official code squares mini-batch gradients (batch)")
        if f.get("at") not in (None, "probe"):
            out.append(f"{p.dir}: Fisher taken at {f.get('at')!r}; the official code uses the warm-started model (probe)")
    return out
