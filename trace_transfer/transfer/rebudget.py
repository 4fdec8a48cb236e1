"""Re-budgeting a transferred CoreSet: exact top-by-score selection with companions in the budget."""

from __future__ import annotations

import math
from collections import defaultdict
from fractions import Fraction
from typing import Any

import torch

from trace_transfer.transfer.profiles import layout_name, region_units
from trace_transfer.coreset import UnitLayout
from trace_transfer.errors import ConfigError
from trace_transfer.rules import ModelSpec, Region, Resolution


def select(accs, layouts, tgt_res: Resolution, tgt_spec: ModelSpec, unit: str, ratio: float, scope: Any, report: Any):
    """Exact top-by-score selection with companions paid from the same budget.

    Walks the units in descending transferred score. A unit that would first switch on a companion
    group (e.g. the first selected row of layer 3's q_proj pulls in layer 3's q_norm) costs its own
    size plus the companions'; it is taken only if both fit, otherwise skipped like any unit that
    does not fit. Runs of units that trigger nothing new are taken in one vectorised step.
    Returns per-tensor unit masks and scores; fills ``report.budget``/``companions``/``warnings``.
    """
    names = list(tgt_spec.shapes)
    in_scope = scope_tensors(tgt_res, scope)
    total = len(in_scope) if unit == "tensors" else sum(math.prod(tgt_spec.shapes[n]) for n in in_scope)
    k = math.floor(Fraction(repr(float(ratio))) * total)  # exact floor: 0.29 × 100 is 29, not 28
    if unit == "tensors" and any(layouts[n].kind != "tensor" for n in accs):
        raise ConfigError("budget='tensors' needs whole-tensor units, but the source CoreSet has finer units; use budget='params'")

    def unit_cost(n: str) -> int:
        return 1 if unit == "tensors" else layouts.get(n, UnitLayout("tensor")).unit_size(tgt_spec.shapes[n])

    # Flatten the candidate units in model order, so a stable sort breaks score ties by model order.
    unit_scores = {n: accs[n].unit_scores() for n in names if n in accs}
    flat: dict[str, torch.Tensor] = {}
    tids, uidx, sc, cost = [], [], [], []
    start = 0
    for t, n in enumerate(names):
        if n not in unit_scores:
            continue
        us = unit_scores[n]
        ok = torch.isfinite(us).nonzero().flatten()
        flat[n] = torch.full((len(us),), -1, dtype=torch.long)
        flat[n][ok] = torch.arange(start, start + len(ok))
        start += len(ok)
        tids.append(torch.full((len(ok),), t, dtype=torch.long))
        uidx.append(ok)
        sc.append(us[ok].double())
        cost.append(torch.full((len(ok),), unit_cost(n), dtype=torch.long))
    cat = (lambda xs, dt: torch.cat(xs) if xs else torch.zeros(0, dtype=dt))
    tids, uidx, cost, sc = cat(tids, torch.long), cat(uidx, torch.long), cat(cost, torch.long), cat(sc, torch.float64)
    rank = torch.argsort(-sc, stable=True)
    chosen = torch.zeros(len(sc), dtype=torch.bool)

    # Companion groups: the candidate units of one slot whose role has companions, and those companions.
    groups: list[tuple[torch.Tensor, list[Region]]] = []
    for n, entries in _triggers(accs, layouts, tgt_res, tgt_spec).items():
        for units, comps in entries:
            idx = flat[n][units]
            groups.append((idx[idx >= 0], comps))
    pending = torch.zeros(len(sc), dtype=torch.long)  # untriggered groups containing each unit
    for idx, _ in groups:
        pending[idx] += 1
    armed = [True] * len(groups)
    cover: dict[str, torch.Tensor] = {}  # companion units switched on, per tensor (in its layout)

    def companions(g: int, apply: bool) -> int:
        extra = 0
        for r in groups[g][1]:
            ru = region_units(layouts.get(r.tensor, UnitLayout("tensor")), r, tgt_spec.shapes[r.tensor])
            new = ru & ~cover.get(r.tensor, torch.zeros_like(ru))
            if r.tensor in flat:  # a companion that is also a candidate may already be bought
                fi = flat[r.tensor]
                bought = torch.zeros_like(new)
                bought[fi >= 0] = chosen[fi[fi >= 0]]
                new &= ~bought
            extra += int(new.sum()) * unit_cost(r.tensor)
            if apply:
                cover[r.tensor] = cover.get(r.tensor, torch.zeros_like(ru)) | ru
                if r.tensor in flat:
                    fi = flat[r.tensor][ru]
                    chosen[fi[fi >= 0]] = True
        return extra

    left, i, n_cand = k, 0, len(sc)
    while i < n_cand and left > 0:
        seg = rank[i:]
        event = ((pending[seg] > 0) & ~chosen[seg]).nonzero()
        stop = int(event[0]) if len(event) else len(seg)
        left = _take(seg[:stop], cost, chosen, left)
        if stop == len(seg) or left <= 0:
            break
        u = int(seg[stop])
        i += stop + 1
        gs = [g for g, (idx, _) in enumerate(groups) if armed[g] and bool((idx == u).any())]
        price = int(cost[u]) + sum(companions(g, apply=False) for g in gs)
        if price <= left:
            chosen[u] = True
            left -= int(cost[u])
            for g in gs:
                left -= companions(g, apply=True)
                armed[g] = False
                pending[groups[g][0]] -= 1

    masks = {n: torch.zeros(len(us), dtype=torch.bool) for n, us in unit_scores.items()}
    scores = {n: torch.where(torch.isfinite(us), us, torch.zeros_like(us)) for n, us in unit_scores.items()}
    for j in chosen.nonzero().flatten().tolist():
        masks[names[int(tids[j])]][int(uidx[j])] = True
    for n, units in cover.items():
        if n not in masks:  # a companion with no transferred score: whole tensor
            layouts[n] = UnitLayout("tensor")
            masks[n], scores[n] = torch.zeros(1, dtype=torch.bool), torch.zeros(1)
            units = torch.ones(1, dtype=torch.bool)
        report.companions.append({"tensor": n, "units": int(units.sum()), "layout": layout_name(layouts[n])})
        masks[n] |= units
    selected = sum(int(m.sum()) * unit_cost(n) for n, m in masks.items())
    report.budget.update({"unit": unit, "ratio": ratio, "total": total, "budget": k, "selected": selected,
                          "candidates": n_cand, "scope": list(scope) if scope else "all"})
    if selected != k:
        if selected > k:
            why = "unit sizes do not add up exactly"
        elif bool((~chosen).any()):
            why = f"every unit left is larger than the {k - selected} {unit} still free (finer granularity gets closer)"
        else:
            why = "too few target units received a score"
        report.warnings.append(f"selected {selected} {unit} instead of the budget {k}: {why}")
    return masks, scores


# Scope groups of the scoring module, decided here by role rather than by name.
_SCOPE_OF_ROLE = {"token_embd": "embeddings", "pos_embd": "embeddings", "token_types": "embeddings",
                  "token_embd_norm": "embeddings", "output": "lm_head", "output_norm": "final_norm"}


def scope_tensors(res: Resolution, scope: Any) -> list[str]:
    """Target tensors in the source CoreSet's scope (all tensors when it records none)."""
    names = list(res.spec.shapes)
    if not scope or "all" in scope:
        return names
    groups = set([scope] if isinstance(scope, str) else scope)
    group_of: dict[str, str] = {}
    for slot, region in res.slots.items():
        if region.tied_from is None:
            group_of.setdefault(region.tensor, "layers" if slot.layer is not None else _SCOPE_OF_ROLE.get(slot.role, "other"))
    return [n for n in names if group_of.get(n, "other") in groups]


def _take(order: torch.Tensor, cost: torch.Tensor, chosen: torch.Tensor, left: int) -> int:
    """Take units in ``order`` while they fit; skip ones that do not and go on with smaller ones."""
    order = order[~chosen[order]]
    if left <= 0 or not len(order):
        return left
    c = cost[order]
    cum = torch.cumsum(c, 0)
    prefix = int((cum <= left).sum())
    chosen[order[:prefix]] = True
    left -= int(cum[prefix - 1]) if prefix else 0
    rest, c_rest = order[prefix:], c[prefix:]
    while left > 0 and len(rest):
        fits = (c_rest <= left).nonzero()
        if not len(fits):
            break
        j = int(fits[0])
        chosen[rest[j]] = True
        left -= int(c_rest[j])
        rest, c_rest = rest[j + 1 :], c_rest[j + 1 :]
    return left


def _triggers(accs, layouts, tgt_res: Resolution, tgt_spec: ModelSpec) -> dict[str, list[tuple[torch.Tensor, list[Region]]]]:
    """Per target tensor: (units inside a slot whose role has companions, the companion regions)."""
    expand = tgt_res.rules.expand
    out: dict[str, list] = defaultdict(list)
    for slot, region in tgt_res.slots.items():
        if slot.role not in expand or region.tied_from is not None or region.tensor not in accs:
            continue
        comps = [r for c_role in expand[slot.role] for s2, r in tgt_res.slots.items()
                 if s2.role == c_role and s2.layer == slot.layer and s2.expert == slot.expert and r.tied_from is None]
        if comps:
            out[region.tensor].append((region_units(layouts[region.tensor], region, tgt_spec.shapes[region.tensor]), comps))
    return out
