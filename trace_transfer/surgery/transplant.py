"""Parameter transplantation (CPI-FT step 3): copy each donor's core elements into one backbone.

Each donor is a fine-tuned model paired with its CoreSet. Every element that is core for exactly one
donor takes that donor's value; elements core for nobody keep the backbone's value. Elements core for
two or more donors are *collisions*, and a rule decides which donor's value wins:

=========  ==========================================================================================
rule       winner at a collision
=========  ==========================================================================================
``auto``   (default) ``score`` where every colliding donor's CoreSet carries scores for the tensor,
           otherwise ``first``
``score``  the donor whose CoreSet gives the element the highest score (ties: first listed);
           an error if a colliding donor has no scores for the tensor
``first``  the first listed donor (list donors in priority order)
``last``   the last listed donor (the most recent task wins, as sequential fine-tuning would)
``error``  any collision is an error naming the tensor — for callers that require disjoint cores
=========  ==========================================================================================

Scores of different CoreSets are compared as they are stored; LF/CS scores are min-max normalised
per task, so they are comparable in scale but not calibrated across tasks — ``first``/``last`` are
the rules to pick when that matters. Collisions are counted per tensor, and *conflicts* (collisions
where the donors' values actually differ bitwise) separately, since only those change the outcome.

Example:
    >>> out, stats = transplant_tensor(backbone, [w_math, w_code], [m_math, m_code], [s_math, s_code])
    >>> stats  # {'core': 812, 'collisions': 40, 'conflicts': 37, 'resolved_by': 'score', ...}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from trace_transfer.errors import ConfigError, ModelMismatchError
from trace_transfer.surgery.modes import COLLISION_RULES

__all__ = ["transplant_tensor", "transplant_state_dict", "TransplantStats", "COLLISION_RULES", "bits"]


@dataclass
class TransplantStats:
    """Per-tensor counts of a transplantation, and their totals."""

    per_tensor: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add(self, name: str, row: Mapping[str, Any]) -> None:
        self.per_tensor[name] = dict(row)

    def totals(self) -> dict[str, Any]:
        rows = list(self.per_tensor.values())
        out: dict[str, Any] = {k: sum(int(r.get(k, 0)) for r in rows) for k in ("core", "collisions", "conflicts")}
        n = max((len(r.get("from_donor", [])) for r in rows), default=0)
        out["from_donor"] = [sum(r.get("from_donor", [0] * n)[i] for r in rows) for i in range(n)]
        return out

    def colliding_tensors(self) -> list[str]:
        return [n for n, r in self.per_tensor.items() if r.get("collisions")]


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view of a tensor's storage, for exact (bitwise) comparison and copying.

    ``==`` on floats treats NaN != NaN and -0.0 == 0.0; comparing the bit patterns does neither.
    """
    if t.dtype == torch.bool:
        return t.view(torch.uint8)
    if not (t.is_floating_point() or t.is_complex()):
        return t
    size = t.element_size()
    int_dtype = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}.get(size)
    if int_dtype is None:  # complex128 etc.: compare through the real view
        return torch.view_as_real(t).view(torch.int64) if t.is_complex() else t
    return t.view(int_dtype)


def transplant_tensor(
    backbone: torch.Tensor,
    donors: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor | None],
    scores: Sequence[torch.Tensor | None] | None = None,
    *,
    rule: str = "auto",
    name: str = "tensor",
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Transplant the masked elements of each donor into ``backbone`` (one tensor).

    Args:
        backbone: the tensor receiving the cores (not modified; a new tensor is returned).
        donors: one tensor per donor, same shape as ``backbone``.
        masks: per donor a full-shape BoolTensor of its core elements, or None (no core here).
        scores: per donor a full-shape float tensor (expanded CoreSet scores) or None.
        rule: collision rule, one of ``COLLISION_RULES`` (see the module docstring).
        name: tensor name, used in messages and errors.

    Returns:
        ``(tensor, stats)`` — the result in the backbone's dtype and a dict with ``core`` (elements
        transplanted), ``collisions``, ``conflicts``, ``resolved_by`` and ``from_donor`` (counts).

    Raises:
        ConfigError: unknown rule; ``rule="error"`` and cores collide; ``rule="score"`` without scores.
        ModelMismatchError: shapes differ.
    """
    if rule not in COLLISION_RULES:
        raise ConfigError(f"collision rule {rule!r} is unknown; choose one of {', '.join(COLLISION_RULES)}")
    n = len(donors)
    if len(masks) != n or (scores is not None and len(scores) != n):
        raise ConfigError(f"{name}: {n} donors but {len(masks)} masks"
                          + (f" and {len(scores)} score tensors" if scores is not None else ""))
    shape = tuple(backbone.shape)
    for i, (d, m) in enumerate(zip(donors, masks), start=1):
        if tuple(d.shape) != shape or (m is not None and tuple(m.shape) != shape):
            raise ModelMismatchError(f"{name}: donor {i} (or its mask) has shape {list(d.shape)}, backbone {list(shape)}")
    scores = list(scores) if scores is not None else [None] * n
    active = [i for i, m in enumerate(masks) if m is not None and bool(m.any())]
    stats: dict[str, Any] = {"core": 0, "collisions": 0, "conflicts": 0, "resolved_by": None, "from_donor": [0] * n}
    if not active:
        return backbone.clone(), stats

    flat_masks = torch.stack([masks[i].reshape(-1) for i in active])          # (k, numel)
    count = flat_masks.sum(dim=0)
    core = count > 0
    colliding = count > 1
    n_coll = int(colliding.sum())
    resolved = None
    if n_coll:
        have_scores = all(scores[i] is not None for i in active if bool((masks[i].reshape(-1) & colliding).any()))
        resolved = "score" if rule == "score" or (rule == "auto" and have_scores) else rule
        if resolved == "auto":
            resolved = "first"
        if resolved == "error":
            raise ConfigError(
                f"{name}: the cores of {len(active)} donors collide on {n_coll} elements and the collision rule "
                f"is 'error'; use --collision score|first|last to resolve collisions, or make the cores disjoint"
            )
        if resolved == "score" and not have_scores:
            missing = next(i + 1 for i in active if scores[i] is None)
            raise ConfigError(f"{name}: collision rule 'score' but donor {missing}'s CoreSet has no scores for this "
                              f"tensor; use --collision first|last, or score the CoreSet with stored scores")

    # Pick, per element, the row of flat_masks that wins.
    if resolved == "score":
        ranked = torch.stack([
            torch.where(flat_masks[j], scores[i].reshape(-1).to(torch.float32), torch.tensor(float("-inf")))
            for j, i in enumerate(active)
        ])
        winner = torch.argmax(ranked, dim=0)  # ties → lowest index, i.e. first listed
    elif resolved == "last":
        winner = (flat_masks.shape[0] - 1) - torch.argmax(flat_masks.flip(0).to(torch.uint8), dim=0)
    else:  # first (also the only possibility when nothing collides)
        winner = torch.argmax(flat_masks.to(torch.uint8), dim=0)

    out_bits = bits(backbone.contiguous()).reshape(-1).clone()
    donor_bits = [bits(donors[i].to(backbone.dtype).contiguous()).reshape(-1) for i in active]
    conflict = torch.zeros_like(core)
    for j, i in enumerate(active):
        take = core & (winner == j)
        out_bits[take] = donor_bits[j][take]
        stats["from_donor"][i] = int(take.sum())
    if n_coll:
        for j in range(len(active)):
            conflict |= flat_masks[j] & colliding & (donor_bits[j] != out_bits)
    stats.update(core=int(core.sum()), collisions=n_coll, conflicts=int(conflict.sum()), resolved_by=resolved)
    return out_bits.view(backbone.dtype).reshape(shape), stats


def transplant_state_dict(
    backbone: Mapping[str, torch.Tensor],
    donors: Sequence[Mapping[str, torch.Tensor]],
    coresets: Sequence[Any],
    *,
    rule: str = "auto",
) -> tuple[dict[str, torch.Tensor], TransplantStats]:
    """In-memory transplantation over whole state dicts (each donor paired with its CoreSet).

    For model directories use :func:`trace_transfer.surgery.merge.merge_models` with
    ``method="transplant"``, which streams tensor by tensor.

    Returns:
        ``(state_dict, stats)``; tensors no CoreSet marks are the backbone's, unchanged.
    """
    if len(donors) != len(coresets):
        raise ConfigError(f"{len(donors)} donor models but {len(coresets)} CoreSets; pair each donor with its CoreSet")
    for cs in coresets:
        cs.check_fits({k: tuple(v.shape) for k, v in backbone.items()})
    out, stats = {}, TransplantStats()
    core_names = [set(cs.names()) for cs in coresets]
    for name, base in backbone.items():
        masks = [cs.mask(name) if name in names else None for cs, names in zip(coresets, core_names)]
        if all(m is None for m in masks):
            out[name] = base.clone()
            continue
        scores = [expanded_score(cs, name) for cs in coresets]
        out[name], row = transplant_tensor(base, [d[name] for d in donors], masks, scores, rule=rule, name=name)
        stats.add(name, row)
    return out, stats


def expanded_score(coreset: Any, name: str) -> torch.Tensor | None:
    """A CoreSet's per-unit scores of one tensor broadcast to the tensor's full shape (or None)."""
    s = coreset.score(name)
    if s is None:
        return None
    return coreset.layout(name).expand(s, coreset.shape(name))
