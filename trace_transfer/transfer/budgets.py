"""Per-slot budgets: what transfer carries across models at finer-than-tensor granularity.

Independently trained models share no neuron order, so a row profile carried across by relative
position picks rows at random inside each target tensor (measured on the demo pair: Spearman ≈ 0.03
with the target's own row scores). What does carry over is the *allocation*: how much of the core each
(layer, role, expert) slot holds. So transfer writes a **budgets file** and leaves the choice of units
inside each slot to the target (:mod:`trace_transfer.transfer.refine`).

Why a separate file rather than a CoreSet without masks: a CoreSet promises a mask for every unit, and
every consumer (training, algebra, stats) would have to learn that some CoreSets have none. A budgets
file is a different artifact with a different next step, so it gets its own name and format; the
CoreSet format is unchanged and every existing CoreSet reads as before.

``<task>.budgets.json`` (format ``trace-transfer/budgets``, version 1):

- ``shapes`` / ``fingerprint``: the target's tensors (the file only fits that model);
- ``layouts``: the unit layout of each target tensor (inherited from the source CoreSet's granularity);
- ``groups``: one per target slot (slots sharing units of one tensor are merged): the tensor, its
  candidate units as ``[start, stop)`` ranges, ``budget`` (units to pick), ``unit_size`` (parameters
  per unit), the source slots it came from and their core density; ``fixed`` groups (companions such
  as Qwen3's q_norm/k_norm) are taken whole;
- ``metadata``: ratio, budget in parameters, provenance of the source CoreSet and the layer map.

How a budget is made (:func:`allocate`): each target slot's weight is the *density* of its mapped
source slot(s) (the share of the source slot that is core) times the target slot's size; budgets are
proportional to it, capped at the slot's size (the excess is spread over the others), rounded to whole
units by largest remainder, and filled so that the total is ``floor(ratio × parameters in scope)``
whenever unit sizes allow. Companions are paid first.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from trace_transfer.checkpoint import fingerprint_of, read_json_object, write_json_atomic
from trace_transfer.coreset import UnitLayout
from trace_transfer.errors import ArtifactError, ArtifactNotFoundError, ModelMismatchError

__all__ = ["SlotBudget", "SlotBudgets", "allocate", "BUDGETS_SUFFIX"]

FORMAT = "trace-transfer/budgets"
FORMAT_VERSION = 1
BUDGETS_SUFFIX = ".budgets.json"


@dataclass
class SlotBudget:
    """How many units to pick among one target slot's candidate units."""

    slot: str
    tensor: str
    units: list[list[int]]  # candidate units of ``tensor`` (in its layout) as [start, stop) ranges
    budget: int  # units to pick
    unit_size: int  # parameters per unit
    sources: list[str] = field(default_factory=list)
    density: float = 0.0  # share of the mapped source slot(s) that is core
    fixed: bool = False  # a companion: every candidate is taken

    def candidates(self) -> torch.Tensor:
        """Candidate unit indices, ascending."""
        if not self.units:
            return torch.zeros(0, dtype=torch.long)
        return torch.cat([torch.arange(a, b) for a, b in self.units])

    @property
    def capacity(self) -> int:
        return sum(b - a for a, b in self.units)


@dataclass
class SlotBudgets:
    """Per-slot budgets on a target model: the output of ``transfer`` below tensor granularity."""

    shapes: dict[str, tuple[int, ...]]
    layouts: dict[str, UnitLayout]
    groups: list[SlotBudget]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.shapes = {n: tuple(int(d) for d in s) for n, s in self.shapes.items()}
        problems = [f"group {g.slot!r}: tensor {g.tensor!r} is not in the model" for g in self.groups if g.tensor not in self.shapes]
        problems += [f"group {g.slot!r}: budget {g.budget} outside [0, {g.capacity}]" for g in self.groups
                     if not 0 <= g.budget <= g.capacity]
        if problems:
            raise ArtifactError("invalid budgets:\n" + "\n".join(f"  - {p}" for p in problems))
        self.metadata.setdefault("fingerprint", fingerprint_of(self.shapes))

    @property
    def total_params(self) -> int:
        """Parameters the budgets add up to (companions included)."""
        return sum(g.budget * g.unit_size for g in self.groups)

    def layout(self, name: str) -> UnitLayout:
        return self.layouts.get(name, UnitLayout("tensor"))

    def per_tensor(self) -> dict[str, int]:
        """Budgeted parameters per tensor."""
        out: dict[str, int] = {}
        for g in self.groups:
            out[g.tensor] = out.get(g.tensor, 0) + g.budget * g.unit_size
        return out

    def check_fits(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Raise ModelMismatchError naming the first tensor whose shape differs."""
        for name, shape in self.shapes.items():
            if name not in shapes:
                raise ModelMismatchError(f"budgets are for a model with tensor {name!r}, which this model lacks; "
                                         "transfer onto this model to get budgets for it")
            if tuple(shapes[name]) != shape:
                raise ModelMismatchError(f"tensor {name!r} is {list(shapes[name])} here but {list(shape)} in the budgets; "
                                         "transfer onto this model to get budgets for it")

    # -- files -----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "metadata": self.metadata,
                "shapes": {n: list(s) for n, s in self.shapes.items()},
                "layouts": {n: lay.to_json() for n, lay in self.layouts.items()},
                "groups": [asdict(g) for g in self.groups]}

    def save(self, path: str | Path) -> Path:
        """Write JSON atomically."""
        write_json_atomic(path, self.to_dict())
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> SlotBudgets:
        path = Path(path)
        if not path.is_file():
            raise ArtifactNotFoundError(f"budgets file not found: {path}; create it with `trace-transfer transfer` "
                                        "(row/column/head/element CoreSets give budgets)")
        d = read_json_object(path, "re-create it with `trace-transfer transfer`")
        if d.get("format") != FORMAT:
            raise ArtifactError(f"{path} is not a budgets file (format={d.get('format')!r}); "
                                "create one with `trace-transfer transfer`")
        if d.get("format_version", 0) > FORMAT_VERSION:
            raise ArtifactError(f"{path}: budgets format version {d['format_version']}; this trace-transfer reads up "
                                f"to {FORMAT_VERSION}, upgrade it")
        try:
            return cls({n: tuple(s) for n, s in d["shapes"].items()},
                       {n: UnitLayout.from_json(v) for n, v in d["layouts"].items()},
                       [SlotBudget(**g) for g in d["groups"]], d.get("metadata", {}))
        except (KeyError, TypeError) as exc:
            raise ArtifactError(f"{path}: malformed budgets file ({exc!r})") from None


def ranges_of(units: torch.Tensor) -> list[list[int]]:
    """Sorted unit indices → ``[start, stop)`` runs."""
    idx = sorted(set(int(u) for u in units.tolist()))
    out: list[list[int]] = []
    for u in idx:
        if out and out[-1][1] == u:
            out[-1][1] = u + 1
        else:
            out.append([u, u + 1])
    return out


def allocate(groups: list[SlotBudget], total: int) -> int:
    """Set ``budget`` (units) of every non-fixed group from its density, for ``total`` parameters.

    Fixed groups (companions) are paid first. The rest get ``total`` in proportion to
    ``density × capacity in parameters``, water-filled at each group's capacity, rounded down to whole
    units; the parameters left go one unit at a time to the groups with the largest rounding
    remainders (then to any group with room), skipping units that no longer fit. Returns the
    parameters allocated (``<= total``).
    """
    for g in groups:
        if g.fixed:
            g.budget = g.capacity
    left = total - sum(g.budget * g.unit_size for g in groups if g.fixed)
    free = [g for g in groups if not g.fixed]
    for g in free:
        g.budget = 0
    if left <= 0:
        return total - left
    share = {id(g): 0.0 for g in free}
    open_ = [g for g in free if g.density > 0 and g.capacity > 0]
    room = float(left)
    while open_ and room > 0:  # water-filling: a group never gets more than its size
        weight = sum(g.density * g.capacity * g.unit_size for g in open_)
        full = [g for g in open_ if room * g.density * g.capacity * g.unit_size / weight >= g.capacity * g.unit_size]
        if not full:
            for g in open_:
                share[id(g)] = room * g.density * g.capacity * g.unit_size / weight
            break
        for g in full:
            share[id(g)] = float(g.capacity * g.unit_size)
            room -= share[id(g)]
        open_ = [g for g in open_ if g not in full]
    for g in free:
        g.budget = min(g.capacity, int(math.floor(share[id(g)] / g.unit_size + 1e-9)) if g.unit_size else 0)
    left -= sum(g.budget * g.unit_size for g in free)
    # Largest rounding remainder first (at most one unit each: remainders are below one unit), then
    # by density whatever still fits; a zero-density group is used only when nothing else can take it.
    for g in sorted(free, key=lambda g: -(share[id(g)] / g.unit_size - g.budget) if g.unit_size else 0.0):
        if share[id(g)] > g.budget * g.unit_size and g.budget < g.capacity and 0 < g.unit_size <= left:
            g.budget += 1
            left -= g.unit_size
    for g in sorted(free, key=lambda g: -g.density):
        if left <= 0:
            break
        if g.unit_size:
            add = min(g.capacity - g.budget, left // g.unit_size)
            g.budget += add
            left -= add * g.unit_size
    return total - left


def build_budgets(links, layouts: dict[str, UnitLayout], src_cs, tgt_res, tgt_spec, ratio: float, scope: Any,
                  report: Any) -> SlotBudgets:
    """Per-slot budgets from the mapped (target slot, region, source slot, region) links.

    A target slot's density is the mean, over its source slots, of the share of the source slot that
    is core. Slots whose candidate units overlap in one tensor (e.g. column units of a fused tensor
    split by rows) form one group. Companions of a budgeted slot (``expand:`` in the target's rule
    file) become fixed groups. Fills ``report.budget`` and ``report.companions``.
    """
    from trace_transfer.scoring import budget_count
    from trace_transfer.transfer.profiles import core_in_region, region_units
    from trace_transfer.transfer.rebudget import scope_tensors

    in_scope = set(scope_tensors(tgt_res, scope))
    scored = any(src_cs.score(n) is not None for n in src_cs.all_names())
    per_slot: dict[Any, dict[str, Any]] = {}
    for t_slot, t_region, s_slot, s_region in links:
        if t_region.tied_from is not None or t_region.tensor not in in_scope:
            continue
        if scored and src_cs.score(s_region.tensor) is None:
            continue  # outside the source's scope: it carries nothing
        entry = per_slot.setdefault(t_slot, {"region": t_region, "sources": [], "densities": []})
        entry["sources"].append(str(s_slot))
        entry["densities"].append(core_in_region(src_cs, s_region) / max(1, math.prod(s_region.canonical_shape())))

    def candidates(region) -> torch.Tensor:
        lay = layouts.setdefault(region.tensor, UnitLayout("tensor"))
        return region_units(lay, region, tgt_spec.shapes[region.tensor]).nonzero().flatten()

    by_tensor: dict[str, list[tuple[list[str], torch.Tensor, float, list[str]]]] = {}
    for t_slot, e in per_slot.items():
        units = candidates(e["region"])
        by_tensor.setdefault(e["region"].tensor, []).append(
            ([str(t_slot)], units, sum(e["densities"]) / len(e["densities"]), e["sources"]))
    groups: list[SlotBudget] = []
    for tensor, entries in by_tensor.items():
        size = layouts[tensor].unit_size(tgt_spec.shapes[tensor])
        for slots, units, density, sources in _merge_overlapping(entries):
            groups.append(SlotBudget(", ".join(slots), tensor, ranges_of(units), 0, size, sources, density))

    # Companions of every slot the source gives some core, taken whole and paid first.
    expand = tgt_res.rules.expand
    group_of = {g.tensor: g for g in groups if g.capacity == layouts[g.tensor].num_units(tgt_spec.shapes[g.tensor])}
    for t_slot, e in per_slot.items():
        if t_slot.role not in expand or not any(d > 0 for d in e["densities"]):
            continue
        for s2, r in tgt_res.slots.items():
            if s2.role in expand[t_slot.role] and s2.layer == t_slot.layer and s2.expert == t_slot.expert and r.tied_from is None:
                if r.tensor in group_of:
                    group_of[r.tensor].fixed = True
                    continue
                units = candidates(r)
                g = SlotBudget(str(s2), r.tensor, ranges_of(units), 0, layouts[r.tensor].unit_size(tgt_spec.shapes[r.tensor]),
                               [f"companion of {t_slot}"], 0.0, fixed=True)
                groups.append(g)
                group_of[r.tensor] = g
                report.companions.append({"tensor": r.tensor, "units": len(units), "companion_of": str(t_slot)})

    total = sum(math.prod(tgt_spec.shapes[n]) for n in in_scope)
    k = budget_count(ratio, total)
    allocated = allocate(groups, k)
    report.budget.update({"unit": "params", "ratio": ratio, "total": total, "budget": k, "selected": allocated,
                          "groups": len(groups), "budgeted_groups": sum(g.budget > 0 for g in groups),
                          "scope": list(scope) if scope else "all"})
    if allocated != k:
        report.warnings.append(f"budgets add up to {allocated} params instead of {k}: unit sizes do not add up exactly")
    if not any(g.density > 0 for g in groups):
        report.warnings.append("the source core holds nothing the target can use: every budget is empty")
    return SlotBudgets(dict(tgt_spec.shapes), {g.tensor: layouts[g.tensor] for g in groups}, groups)


def _merge_overlapping(entries):
    """Merge slots whose candidate units overlap (capacity-weighted density)."""
    out: list[list[Any]] = []
    for slots, units, density, sources in entries:
        merged = [slots, units, density, sources]
        keep = []
        for o in out:
            if bool(torch.isin(o[1], merged[1]).any()):
                n_a, n_b = len(o[1]), len(merged[1])
                merged = [o[0] + merged[0], torch.unique(torch.cat([o[1], merged[1]])),
                          (o[2] * n_a + merged[2] * n_b) / max(1, n_a + n_b), o[3] + merged[3]]
            else:
                keep.append(o)
        out = keep + [merged]
    return out
