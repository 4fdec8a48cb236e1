"""TRACE-Transfer: map a source model's CoreSet onto an architecturally different target.

How a source unit finds its target (``transfer``):

1. **Roles.** Both models are resolved through their rule files (``trace_transfer.rules.loader``), so every
   tensor slice is a slot ``(role, field, layer, expert)``. Slots are matched by role, never by list
   position. Fused tensors contribute per part (Llama ``q_proj`` ↔ Phi-3 ``qkv_proj`` rows
   ``[0:q_size]``; GPT-NeoX's per-head interleaved parts; GPT-2's Conv1D columns).
2. **Layers.** Through the layer map. By default (``direction="reverse"``) every *target* layer takes
   the source layer the map assigns to it, so a deeper target has no layer without a source (many
   target layers may share one source layer; source layers nobody picks are reported).
   ``direction="forward"`` instead sends each source layer to its mapped target layer (the paper's
   argmax per source layer); target layers nobody maps to stay non-core.
3. **Experts.** Same index when the expert counts agree, else by relative position. A dense source
   feeds every expert of an MoE target (``ffn_gate`` → ``ffn_gate_exp``) and shared experts.
4. **What crosses over.** Whole-tensor units map exactly (``carry="exact"``). Below tensor
   granularity the default is ``carry="budget"``: each target slot gets a budget of units in
   proportion to how much of its mapped source slot is core (see ``budgets``), and the units inside
   it are chosen on the target by ``refine``. Neuron order is not shared by independently trained
   models, so positions inside a tensor do not transfer; the allocation across slots does.
   ``carry="profile"`` is the ablation that carries positions anyway, described next.
   **Profiles.** Finer units carry their *score profile* across: the
   profile along each dimension whose size differs is resampled by linear interpolation over relative
   position (``align_corners=True``: first and last indices map onto each other). Along head axes
   (q/k/v rows, o columns, q/k norms) the profile is viewed as ``[heads, head_dim]`` and both are
   resampled separately, so a head's profile stays within one head and positions inside a head (RoPE
   frequency pairs) keep their relative place. Vocabulary axes (embedding rows, LM-head rows) are
   only carried over when both vocabularies have the same size (same tokenizer); otherwise the profile
   is averaged over tokens, since token ids of different tokenizers do not correspond.
5. **Target layout.** A target tensor inherits the granularity of its source (tensor / rows / columns
   / heads / elements, along the same *semantic* axis — GPT-2's transposed Conv1D included). Where
   several sources meet in one target unit (a fused tensor at tensor granularity, a tied LM head,
   forward maps with several source layers), the maximum score wins.
6. **Budget.** The target CoreSet is re-selected by transferred score at the target's own size,
   counted like ``scoring`` counts it: ``floor(ratio × N)`` with N the target's tensors (``tensors``,
   the paper's unit) or parameters (``params``) in the source CoreSet's ``scope`` (all when it records
   none). Units are taken in descending score; one that does not fit is skipped for smaller ones, so
   the count is exact whenever unit sizes allow (always at element or tensor granularity).
   Companions (``expand:`` in the target's rule file, e.g. Qwen3's q_norm/k_norm following q/k) are
   paid from the same budget. Tensors the source did not score (outside its scope) carry nothing.
7. **Report.** Which source slots had no counterpart (and how many core parameters that drops),
   which target slots had no source, which companions were added, and the budget figures.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trace_transfer.transfer.profiles import (
    Accumulator,
    broadcast,
    core_in_region,
    from_canonical,
    inherit_layout,
    layout_name,
    resample,
    to_canonical,
    unit_values,
)
from trace_transfer.transfer.budgets import SlotBudgets, build_budgets
from trace_transfer.transfer.rebudget import select
from trace_transfer._version import versions
from trace_transfer.checkpoint import fingerprint_of
from trace_transfer.coreset import CoreSet, UnitLayout
from trace_transfer.errors import ArtifactError, ArtifactNotFoundError, ConfigError, ModelMismatchError
from trace_transfer.rules.loader import ModelSpec, Region, Resolution, RuleSet, Slot, _config_of, find_rules, model_spec, resolve

__all__ = ["transfer", "TransferReport", "ROLE_FALLBACKS", "CARRY_MODES", "load_layer_map"]

# Where a target role finds a source when the source architecture lacks that exact role.
ROLE_FALLBACKS: dict[str, tuple[str, ...]] = {
    "ffn_gate_exp": ("ffn_gate", "ffn_shared_gate"),
    "ffn_up_exp": ("ffn_up", "ffn_shared_up"),
    "ffn_down_exp": ("ffn_down", "ffn_shared_down"),
    "ffn_shared_gate": ("ffn_gate",),
    "ffn_shared_up": ("ffn_up",),
    "ffn_shared_down": ("ffn_down",),
    "ffn_gate": ("ffn_shared_gate",),
    "ffn_up": ("ffn_shared_up",),
    "ffn_down": ("ffn_shared_down",),
}


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


@dataclass
class TransferReport:
    """What ``transfer`` did; ``rows()``/``to_dict()`` for tables and JSON."""

    source_family: str
    target_family: str
    direction: str
    layer_pairs: list[tuple[int, int]]
    pairs: list[dict[str, Any]] = field(default_factory=list)
    source_unmapped: list[dict[str, Any]] = field(default_factory=list)
    target_unsourced: list[dict[str, Any]] = field(default_factory=list)
    source_layers_unused: list[int] = field(default_factory=list)
    companions: list[dict[str, Any]] = field(default_factory=list)
    budget: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def lost_core_params(self) -> int:
        """Core parameters of the source that had no counterpart in the target."""
        return sum(r["core_params"] for r in self.source_unmapped)

    def role_rows(self) -> list[dict[str, Any]]:
        """One row per role: target slots fed, resampled, from a fallback role, with no source."""
        rows: dict[str, dict[str, Any]] = defaultdict(lambda: {"mapped": 0, "resampled": 0, "fallback": 0, "no_source": 0, "source_lost": 0})
        for p in self.pairs:
            r = rows[p["target_role"]]
            r["mapped"] += 1
            r["resampled"] += bool(p["resampled"])
            r["fallback"] += p["source_role"] != p["target_role"]
        for u in self.target_unsourced:
            rows[u["role"]]["no_source"] += 1
        for u in self.source_unmapped:
            rows[u["role"]]["source_lost"] += 1
        return [{"role": k, **v} for k, v in sorted(rows.items())]

    def unmapped_rows(self) -> list[dict[str, Any]]:
        """Source slots with no counterpart in the target, one row per ``role.field``: how many slots,
        and how many core parameters were dropped with them (details per slot: ``source_unmapped``)."""
        rows: dict[str, dict[str, Any]] = {}
        for u in self.source_unmapped:
            key = u["slot"].split()[0]  # str(Slot): "attn_q.weight L3" -> "attn_q.weight"
            r = rows.setdefault(key, {"role": key, "slots": 0, "core_params": 0})
            r["slots"] += 1
            r["core_params"] += u["core_params"]
        return list(rows.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "source_family": self.source_family, "target_family": self.target_family, "direction": self.direction,
            "layer_pairs": self.layer_pairs, "budget": self.budget, "lost_core_params": self.lost_core_params,
            "source_unmapped": self.source_unmapped, "target_unsourced": self.target_unsourced,
            "source_layers_unused": self.source_layers_unused, "companions": self.companions,
            "warnings": self.warnings, "pairs": self.pairs,
        }

    def save(self, path: str | Path) -> None:
        from trace_transfer.checkpoint import write_json_atomic

        write_json_atomic(path, self.to_dict())


# --------------------------------------------------------------------------------------------------
# Layer map
# --------------------------------------------------------------------------------------------------


def load_layer_map(layer_map: Any) -> tuple[dict[int, int], dict[int, int]]:
    """``(forward, reverse)`` from a LayerMap (``.forward``/``.reverse``), a dict or a JSON path.

    Accepted: an object with ``forward``/``reverse`` attributes; ``{"forward": {...}, "reverse": {...}}``
    (either may be missing); a plain ``{source_layer: target_layer}`` dict; a path to such JSON.
    Keys may be strings. Values may be ints or ``{"target": t}`` / ``{"source": s}`` records.
    """
    if isinstance(layer_map, (str, Path)):
        path = Path(layer_map)
        if not path.is_file():
            raise ArtifactNotFoundError(f"layer map not found: {path}; create it with `trace-transfer map-layers`")
        try:
            layer_map = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"{path}: not valid JSON ({exc}); recreate it with `trace-transfer map-layers`") from None
        try:
            return load_layer_map(layer_map)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    if hasattr(layer_map, "forward") and not isinstance(layer_map, dict):
        fwd, rev = getattr(layer_map, "forward", None), getattr(layer_map, "reverse", None)
    elif isinstance(layer_map, dict) and ("forward" in layer_map or "reverse" in layer_map):
        fwd, rev = layer_map.get("forward"), layer_map.get("reverse")
    elif isinstance(layer_map, dict):
        fwd, rev = layer_map, None
    else:
        raise ConfigError(f"layer map of type {type(layer_map).__name__}: expected a LayerMap, a dict or a JSON path")

    def ints(d: Any, key: str) -> dict[int, int]:
        out = {}
        for k, v in (d or {}).items():
            if isinstance(v, dict):
                v = v.get(key, v.get("layer"))
            if isinstance(v, (list, tuple)):
                v = v[0]
            try:
                out[int(k)] = int(v)
            except (TypeError, ValueError):
                raise ConfigError(f"layer map entry {k!r}: {v!r} is not a layer index") from None
        return out

    return ints(fwd, "target"), ints(rev, "source")


def _check_depths(layer_map: Any, n_src: int, n_tgt: int) -> None:
    """A layer map records the depths of the models it was made for; indices that merely fall in range
    of other models' depths would map the wrong layers without a word."""
    d = layer_map
    if isinstance(layer_map, (str, Path)):
        try:
            d = json.loads(Path(layer_map).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return  # load_layer_map has already reported an unreadable file
    get = d.get if isinstance(d, dict) else lambda k: getattr(d, k, None)
    made = (get("num_source_layers"), get("num_target_layers"))
    if None not in made and (int(made[0]), int(made[1])) != (n_src, n_tgt):
        where = f"{layer_map}" if isinstance(layer_map, (str, Path)) else "the layer map"
        raise ModelMismatchError(
            f"{where} was made for models of {made[0]} source and {made[1]} target layers, but these have "
            f"{n_src} and {n_tgt}; recompute it for these two models with `trace-transfer cka` and `map-layers`")


def _layer_pairs(forward: dict[int, int], reverse: dict[int, int], n_src: int, n_tgt: int, direction: str) -> list[tuple[int, int]]:
    bad = [f"source layer {s}" for s in forward if not 0 <= s < n_src] + [f"target layer {t}" for t in forward.values() if not 0 <= t < n_tgt]
    bad += [f"target layer {t}" for t in reverse if not 0 <= t < n_tgt] + [f"source layer {s}" for s in reverse.values() if not 0 <= s < n_src]
    if bad:
        raise ConfigError(f"layer map does not fit the models ({n_src} source, {n_tgt} target layers): {', '.join(sorted(set(bad))[:5])}; "
                          f"recompute it for these two models with `trace-transfer map-layers`")
    if direction == "forward":
        if not forward:
            raise ConfigError("direction='forward' needs the layer map's forward (source → target) entries")
        return sorted((s, t) for s, t in forward.items())
    if direction != "reverse":
        raise ConfigError(f"direction {direction!r}: expected 'reverse' or 'forward'")
    if not reverse:
        if not forward:
            raise ConfigError("the layer map is empty")
        # No reverse map given: each target layer takes the source layer mapped nearest to it
        # (ties: the shallower source), so deeper targets still get a source for every layer.
        reverse = {t: min(forward, key=lambda s: (abs(forward[s] - t), s)) for t in range(n_tgt)}
    return sorted((s, t) for t, s in reverse.items())


# --------------------------------------------------------------------------------------------------
# transfer()
# --------------------------------------------------------------------------------------------------


def transfer(
    coreset: CoreSet | str | Path,
    source: Any,
    target: Any,
    layer_map: Any,
    ratio: float | None = None,
    rules: Any = None,
    *,
    source_rules: RuleSet | str | Path | None = None,
    target_rules: RuleSet | str | Path | None = None,
    direction: str = "reverse",
    budget: str = "auto",
    target_layout: str = "model",
    carry: str = "auto",
) -> tuple[CoreSet | SlotBudgets, TransferReport]:
    """Map a source CoreSet onto a target model by role, layer map and re-budgeting.

    Below tensor granularity the default result is a :class:`SlotBudgets` (how many units each target
    slot gets), not a CoreSet: which units inside a slot matter is not identifiable across
    independently trained models, so ``refine`` picks them on the target. ``carry="profile"`` keeps
    the old behaviour (per-unit scores resampled by relative position) as an ablation.

    Args:
        coreset: the source CoreSet (or its path). Its tensor names are resolved against the source
            rule file, so it must be keyed by the source model's parameter names.
        source: the source model's config holder: a model dir / hub id, ``PretrainedConfig``,
            ``nn.Module`` or ``ModelSpec`` (only the config is used; names come from the CoreSet).
        target: the target model (same kinds). Its tensor names default to those of the model class
            (``target_layout="model"``: ``named_parameters`` on the meta device, i.e. what training
            sees); ``"checkpoint"`` uses the safetensors names instead.
        layer_map: see :func:`load_layer_map`.
        ratio: the target's budget as a fraction; default: the source CoreSet's ratio.
        rules: extra rule files/directories searched (by model_type) for both models.
        source_rules, target_rules: force a rule file for one side.
        direction: ``reverse`` (each target layer takes its mapped source layer; default) or
            ``forward`` (each source layer feeds its mapped target layer).
        budget: ``tensors`` (floor(ratio × #tensors in scope) tensors, the paper's unit), ``params``
            (floor(ratio × #params) parameters, exact where unit sizes allow), or ``auto`` (the source's
            ``budget_unit`` metadata, else tensors when every source unit is a whole tensor).
            Budgets (``carry="budget"``) are always counted in parameters.
        carry: what crosses over. ``exact`` — whole-tensor scores, mapped exactly (the only choice
            when every source unit is a whole tensor); ``budget`` — per-slot budgets (finer
            granularities); ``profile`` — per-unit scores resampled by relative position (an ablation:
            on the demo pair those scores are uncorrelated with the target's own, Spearman ≈ 0.03, and
            train no better than random units in the same per-tensor counts); ``auto`` — exact for
            whole-tensor CoreSets, budget otherwise.

    Returns:
        ``(target CoreSet, TransferReport)``, or ``(SlotBudgets, TransferReport)`` when carrying budgets.

    Raises:
        RuleError: a rule file does not cover its model (every problem listed).
        ConfigError: the layer map does not fit the models, or options are invalid.

    Example:
        >>> tgt, report = transfer("math.coreset.safetensors", "tiny-llama", "tiny-qwen3", "layer_map.json")
        >>> tgt.save("math.qwen3.coreset.safetensors")
    """
    src_cs = coreset if isinstance(coreset, CoreSet) else CoreSet.load(coreset)
    src_cfg, tgt_spec, src_res, tgt_res = _resolve_both(src_cs, source, target, rules, source_rules, target_rules,
                                                       target_layout)
    forward, reverse, pairs = _layer_pairs_checked(layer_map, src_res, tgt_res, direction)
    report = TransferReport(src_res.rules.family, tgt_res.rules.family, direction, pairs)
    report.source_layers_unused = sorted(set(range(src_res.num_layers)) - {s for s, _ in pairs})

    # 1. Target slot -> source slots; 2. each target tensor inherits the granularity of its first source.
    links, used_sources = _link_slots(src_res, tgt_res, pairs, report)
    layouts = _target_layouts(links, src_cs, src_res.head_dim, tgt_res.head_dim)

    unit = _budget_unit(budget, src_cs)
    if ratio is None:
        ratio = _source_ratio(src_cs, unit)
    if not 0.0 < ratio <= 1.0:
        raise ConfigError(f"ratio {ratio}: must be in (0, 1] (e.g. 0.05 for 5%)")
    mode = _carry_mode(carry, src_cs)
    metadata = _metadata(src_cs, src_res, tgt_res, tgt_spec, pairs, direction, ratio,
                         "params" if mode == "budget" else unit, forward, reverse, carry=mode)
    if mode == "budget":
        return _carry_budgets(links, layouts, src_cs, src_res, tgt_res, tgt_spec, ratio, report, used_sources,
                              metadata), report
    same_vocab = _cfg(src_cfg, "vocab_size") == _cfg(tgt_spec.config, "vocab_size")
    return _carry_profiles(links, layouts, src_cs, src_res, tgt_res, tgt_spec, unit, ratio, report, used_sources,
                           same_vocab, metadata), report


def _resolve_both(src_cs: CoreSet, source: Any, target: Any, rules: Any, source_rules: Any, target_rules: Any,
                  target_layout: str) -> tuple[Any, ModelSpec, Resolution, Resolution]:
    """Both models resolved by their rule files; the source's names come from the CoreSet."""
    extra = [rules] if isinstance(rules, (str, Path, RuleSet)) else list(rules or [])
    src_cfg = _config_of(source)  # only the config is needed
    src_spec = ModelSpec(src_cfg, {n: src_cs.shape(n) for n in src_cs.all_names()}, "coreset")
    tgt_spec = target if isinstance(target, ModelSpec) else model_spec(target, layout=target_layout)
    src_res = resolve(_pick_rules(src_spec, source_rules, extra), src_spec).raise_for_problems()
    tgt_res = resolve(_pick_rules(tgt_spec, target_rules, extra), tgt_spec).raise_for_problems()
    return src_cfg, tgt_spec, src_res, tgt_res


def _layer_pairs_checked(layer_map: Any, src_res: Resolution, tgt_res: Resolution, direction: str):
    """The layer map loaded and checked against both depths; errors name the layer-map file."""
    forward, reverse = load_layer_map(layer_map)
    _check_depths(layer_map, src_res.num_layers, tgt_res.num_layers)
    try:
        pairs = _layer_pairs(forward, reverse, src_res.num_layers, tgt_res.num_layers, direction)
    except ConfigError as exc:
        if not isinstance(layer_map, (str, Path)):
            raise
        raise ConfigError(f"{layer_map}: {exc}") from None
    return forward, reverse, pairs


def _link_slots(src_res: Resolution, tgt_res: Resolution, pairs, report: TransferReport):
    """(target slot, target region, source slot, source region) for every mapped pair of slots."""
    src_for_tgt: dict[int, list[int]] = defaultdict(list)
    for s, t in pairs:
        src_for_tgt[t].append(s)
    used_sources: set[Slot] = set()
    links: list[tuple[Slot, Region, Slot, Region]] = []
    for t_slot, t_region in tgt_res.slots.items():
        found = _sources_for(t_slot, src_res, src_for_tgt, tgt_res.num_experts)
        if not found:
            report.target_unsourced.append({"role": t_slot.role, "slot": str(t_slot), "tensor": str(t_region)})
        for s_slot in found:
            used_sources.add(s_slot)
            links.append((t_slot, t_region, s_slot, src_res.slots[s_slot]))
    return links, used_sources


def _target_layouts(links, src_cs: CoreSet, hd_s, hd_t) -> dict[str, UnitLayout]:
    layouts: dict[str, UnitLayout] = {}
    for _t_slot, t_region, _s_slot, s_region in links:
        if t_region.tensor not in layouts:
            layouts[t_region.tensor] = inherit_layout(src_cs.layout(s_region.tensor), s_region, t_region, hd_s, hd_t)
    return layouts


def _pair_record(t_slot, t_region, s_slot, s_region, resampled: bool, layout: UnitLayout) -> dict[str, Any]:
    return {"target_role": t_slot.role, "target": str(t_slot), "target_tensor": str(t_region),
            "source_role": s_slot.role, "source": str(s_slot), "source_tensor": str(s_region),
            "resampled": resampled, "layout": layout_name(layout)}


def _carry_budgets(links, layouts, src_cs, src_res, tgt_res, tgt_spec, ratio, report, used_sources,
                   metadata) -> SlotBudgets:
    """Per-slot budgets: the share of the core each mapped source slot holds, scaled to the target."""
    budgets = build_budgets(links, layouts, src_cs, tgt_res, tgt_spec, ratio, src_cs.metadata.get("scope"), report)
    for t_slot, t_region, s_slot, s_region in links:
        report.pairs.append(_pair_record(t_slot, t_region, s_slot, s_region, False, layouts[t_region.tensor]))
    _report_unmapped(report, src_res, src_cs, used_sources)
    budgets.metadata.update(metadata)
    budgets.metadata["budget_params"] = report.budget["budget"]
    budgets.metadata["budgeted_params"] = report.budget["selected"]
    return budgets


def _carry_profiles(links, layouts, src_cs, src_res, tgt_res, tgt_spec, unit, ratio, report, used_sources,
                    same_vocab, metadata) -> CoreSet:
    """Exact (whole tensors) or profile carry: per-unit scores mapped across, then re-budgeted."""
    # A scored CoreSet only scores the tensors in its scope; the others carry nothing (a mask-only
    # CoreSet carries its mask as a 0/1 score everywhere).
    scored = any(src_cs.score(n) is not None for n in src_cs.all_names())
    hd_s, hd_t = src_res.head_dim, tgt_res.head_dim
    accs: dict[str, Accumulator] = {}
    src_cache: dict[str, torch.Tensor] = {}
    for t_slot, t_region, s_slot, s_region in links:
        name = s_region.tensor
        if scored and src_cs.score(name) is None:
            continue
        if name not in src_cache:
            src_cache[name] = broadcast(src_cs.layout(name), unit_values(src_cs, name), src_cs.shape(name))
        p = to_canonical(src_cache[name], s_region)
        p, resampled = resample(p, t_region.canonical_shape(), t_slot.role, hd_s, hd_t, same_vocab)
        acc = accs.setdefault(t_region.tensor, Accumulator(t_region.tensor, tgt_spec.shapes[t_region.tensor],
                                                           layouts[t_region.tensor]))
        acc.add(from_canonical(p, t_region), t_region)
        report.pairs.append(_pair_record(t_slot, t_region, s_slot, s_region, resampled, layouts[t_region.tensor]))
    _report_unmapped(report, src_res, src_cs, used_sources)

    # Re-budget by transferred score, companions inside the budget.
    masks, scores = select(accs, layouts, tgt_res, tgt_spec, unit, ratio, src_cs.metadata.get("scope"), report)
    tgt_cs = CoreSet.from_unit_masks(masks, {n: layouts[n] for n in masks}, tgt_spec.shapes, scores=scores,
                                     metadata=metadata)
    if tgt_cs.num_selected() == 0:  # an empty core trains nothing: never what a transfer is for
        raise ConfigError(f"ratio {ratio:g} selects no unit of the target; raise --ratio")
    report.budget["selected_params"] = tgt_cs.num_selected()
    report.budget["selected_tensors"] = len(tgt_cs.names())
    if report.source_layers_unused:
        report.warnings.append(f"source layers {report.source_layers_unused} map to no target layer; their core is dropped")
    return tgt_cs

CARRY_MODES = ("auto", "exact", "budget", "profile")


def _carry_mode(carry: str, cs: CoreSet) -> str:
    if carry not in CARRY_MODES:
        raise ConfigError(f"carry {carry!r}: expected one of {', '.join(CARRY_MODES)}")
    whole = {cs.layout(n).kind for n in cs.all_names()} <= {"tensor"}
    if carry == "exact" and not whole:
        raise ConfigError("carry='exact' maps whole tensors only, but the source CoreSet has finer units; "
                          "use carry='budget' (then `trace-transfer refine`) or score the source at --granularity tensor")
    if carry == "auto":
        return "exact" if whole else "budget"
    return "exact" if carry == "profile" and whole else carry


def _report_unmapped(report: TransferReport, src_res: Resolution, src_cs: CoreSet, used_sources: set) -> None:
    for s_slot, s_region in src_res.slots.items():
        if s_slot not in used_sources and s_region.tied_from is None:
            report.source_unmapped.append({
                "role": s_slot.role, "slot": str(s_slot), "tensor": str(s_region),
                "core_params": core_in_region(src_cs, s_region),
            })


def _pick_rules(spec: ModelSpec, forced: Any, extra: list) -> RuleSet:
    if forced is not None:
        return find_rules(spec, forced)
    return find_rules(spec, extra, must_match=True)


def _cfg(config: Any, key: str) -> Any:
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def _sources_for(t_slot: Slot, src: Resolution, src_for_tgt: dict[int, list[int]], tgt_experts: int | None) -> list[Slot]:
    layers: list[int | None] = [None] if t_slot.layer is None else src_for_tgt.get(t_slot.layer, [])
    for role in (t_slot.role, *ROLE_FALLBACKS.get(t_slot.role, ())):
        found = []
        for layer in layers:
            for expert in _source_experts(t_slot.expert, src.num_experts, tgt_experts):
                cand = Slot(role, t_slot.field, layer, expert)
                if cand in src.slots:
                    found.append(cand)
        if found:
            return found
    return []


def _source_experts(e_t: int | None, n_src: int | None, n_tgt: int | None) -> list[int | None]:
    if e_t is None:
        return [None]
    if n_src:
        e_s = e_t if n_src == n_tgt else min(n_src - 1, int(e_t * n_src / (n_tgt or 1)))
        return [e_s, None]  # None: a dense source slot feeding every expert (via the fallback roles)
    return [None]


def _budget_unit(budget: str, cs: CoreSet) -> str:
    if budget in ("tensors", "params"):
        return budget
    if budget != "auto":
        raise ConfigError(f"budget {budget!r}: expected tensors, params or auto")
    declared = cs.metadata.get("budget_unit") or cs.metadata.get("budget")
    if isinstance(declared, str) and declared.rstrip("s") in ("tensor", "param", "parameter"):
        return "tensors" if declared.startswith("tensor") else "params"
    kinds = {cs.layout(n).kind for n in cs.all_names()}
    return "tensors" if kinds <= {"tensor"} else "params"


def _source_ratio(cs: CoreSet, unit: str) -> float:
    r = cs.metadata.get("ratio")
    if isinstance(r, (int, float)) and 0 <= r <= 1:
        return float(r)
    if unit == "tensors":
        return len(cs.names()) / max(1, len(cs.all_names()))
    return cs.ratio()


def _metadata(src_cs, src_res, tgt_res, tgt_spec, pairs, direction, ratio, unit, forward, reverse, carry) -> dict[str, Any]:
    src_meta = {k: v for k, v in src_cs.metadata.items() if k != "tensors"}
    return {
        "strategy": "transfer",
        "carry": carry,
        "task": src_cs.metadata.get("task"),
        "tasks": src_cs.metadata.get("tasks"),
        "ratio": ratio,
        "budget_unit": unit,
        "granularity": src_cs.metadata.get("granularity"),
        "fingerprint": fingerprint_of(tgt_spec.shapes),
        "transfer": {
            "source": {"family": src_res.rules.family, "model_type": src_res.spec.model_type,
                       "fingerprint": src_cs.metadata.get("fingerprint") or fingerprint_of({n: src_cs.shape(n) for n in src_cs.all_names()}),
                       "rule_file": str(src_res.rules.path), "num_layers": src_res.num_layers},
            "target": {"family": tgt_res.rules.family, "model_type": tgt_res.spec.model_type, "names_from": tgt_spec.origin,
                       "rule_file": str(tgt_res.rules.path), "num_layers": tgt_res.num_layers},
            "layer_map": {"direction": direction, "pairs": [list(p) for p in pairs],
                          "forward": {str(k): v for k, v in forward.items()}, "reverse": {str(k): v for k, v in reverse.items()}},
            "source_metadata": src_meta,
        },
        "versions": versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
