"""Score profiles for transfer: per-unit CoreSet values seen over one slot's region, resampled to
another width, and accumulated into a target tensor's unit layout.

A *profile* is a tensor with the region's dimensions in canonical torch-Linear order ``[out, in]``
(expert axis removed, Conv1D transposed back) where every dimension along which the source layout is
constant has size 1, so a whole-tensor score is a ``[1, 1]`` profile and row scores are ``[rows, 1]``.
See the module docstring of :mod:`trace_transfer.transfer.mapping` for the resampling rules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trace_transfer.coreset import CoreSet, UnitLayout
from trace_transfer.rules import HEAD_AXIS, Region

# Roles whose canonical axis 0 indexes the vocabulary.
_VOCAB_AXIS = {"token_embd": 0, "output": 0}
NO_SOURCE = float("-inf")


def unit_values(cs: CoreSet, name: str) -> torch.Tensor:
    s = cs.score(name)
    return s.float() if s is not None else cs.unit_mask(name).float()


def broadcast(layout: UnitLayout, values: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Per-unit values as a tensor of ``len(shape)`` dims, size 1 where the layout is constant."""
    if layout.kind == "tensor" or not shape:
        return values.reshape([1] * len(shape)) if shape else values.reshape(())
    if layout.kind == "element":
        return values.reshape(shape)
    along = values.repeat_interleave(layout.group) if layout.group > 1 else values
    view = [1] * len(shape)
    view[layout.axis] = shape[layout.axis]
    return along.reshape(view)


def to_canonical(b: torch.Tensor, region: Region) -> torch.Tensor:
    if region.ranges is not None and b.shape[region.split_axis] > 1:
        b = b.index_select(region.split_axis, region.index())
    if region.expert_axis is not None:
        b = b.select(region.expert_axis, region.expert if b.shape[region.expert_axis] > 1 else 0)
    if region.transposed and b.dim() >= 2:
        b = b.transpose(-2, -1)
    return b


def from_canonical(p: torch.Tensor, region: Region) -> torch.Tensor:
    if region.transposed and p.dim() >= 2:
        p = p.transpose(-2, -1)
    if region.expert_axis is not None:
        p = p.unsqueeze(region.expert_axis)
    return p


def canonical_axis(region: Region, storage_axis: int) -> int | str:
    """Storage axis → axis of the canonical ``[out, in]`` slice, or "expert"."""
    axes = list(range(len(region.shape)))
    if region.expert_axis is not None:
        if storage_axis == region.expert_axis:
            return "expert"
        axes.remove(region.expert_axis)
    if region.transposed and len(axes) >= 2:
        axes[-2], axes[-1] = axes[-1], axes[-2]
    return axes.index(storage_axis)


def storage_axis(region: Region, canonical: int | str) -> int | None:
    for a in range(len(region.shape)):
        if canonical_axis(region, a) == canonical:
            return a
    return None


def _interp(x: torch.Tensor, size: int) -> torch.Tensor:
    """Linear interpolation of the last dim over relative position (endpoints pinned)."""
    if x.shape[-1] == size:
        return x
    if x.shape[-1] == 1:
        return x.expand(*x.shape[:-1], size)
    lead = x.shape[:-1]
    y = F.interpolate(x.reshape(-1, 1, x.shape[-1]).double(), size=size, mode="linear", align_corners=True)
    return y.reshape(*lead, size).to(x.dtype)


def resample(p: torch.Tensor, target: tuple[int, ...], role: str, hd_s: int | None, hd_t: int | None, same_vocab: bool) -> tuple[torch.Tensor, bool]:
    """Resample a canonical profile to the target slice shape; returns (profile, was_resampled)."""
    if p.dim() != len(target):
        return p.max().reshape([1] * len(target)), True
    changed = False
    for d, size in enumerate(target):
        n = p.shape[d]
        if n == 1 or n == size:
            continue
        changed = True
        x = p.movedim(d, -1)
        if _VOCAB_AXIS.get(role) == d and not same_vocab:
            x = x.mean(dim=-1, keepdim=True)  # token ids of different tokenizers do not correspond
        elif HEAD_AXIS.get(role) == d and hd_s and hd_t and n % hd_s == 0 and size % hd_t == 0:
            lead = x.shape[:-1]
            heads = x.reshape(-1, n // hd_s, hd_s)
            heads = _interp(heads, hd_t)                                        # within each head
            heads = _interp(heads.transpose(-1, -2), size // hd_t).transpose(-1, -2)  # across heads
            x = heads.reshape(*lead, size)
        else:
            x = _interp(x, size)
        p = x.movedim(-1, d)
    return p, changed


# --------------------------------------------------------------------------------------------------
# Target accumulation
# --------------------------------------------------------------------------------------------------


class Accumulator:
    """Per-target-tensor score accumulator in the target layout's unit space (max-combine)."""

    def __init__(self, name: str, shape: tuple[int, ...], layout: UnitLayout):
        self.name, self.shape, self.layout = name, shape, layout
        if layout.kind == "tensor":
            self.values = torch.full((), NO_SOURCE)
        elif layout.kind == "element":
            self.values = torch.full(shape, NO_SOURCE)
        else:
            self.values = torch.full((shape[layout.axis],), NO_SOURCE)

    def add(self, p_storage: torch.Tensor, region: Region) -> None:
        lay = self.layout
        if lay.kind == "tensor":
            self.values = torch.maximum(self.values, p_storage.max())
            return
        if lay.kind == "axis":
            a = lay.axis
            other = [d for d in range(p_storage.dim()) if d != a]
            v = p_storage.amax(dim=other) if other else p_storage
            if region.ranges is not None and a == region.split_axis:
                idx = region.index()
                self.values[idx] = torch.maximum(self.values[idx], v.expand(len(idx)) if v.numel() == 1 else v)
            elif region.expert_axis is not None and a == region.expert_axis:
                e = region.expert
                self.values[e] = torch.maximum(self.values[e], v.max())
            else:
                self.values = torch.maximum(self.values, v.expand(self.shape[a]) if v.numel() == 1 else v)
            return
        sub, axis = self.values, region.split_axis
        if region.expert_axis is not None:
            sub = sub.select(region.expert_axis, region.expert)
            p_storage = p_storage.squeeze(region.expert_axis)
            if axis is not None and axis > region.expert_axis:
                axis -= 1
        if region.ranges is not None:
            idx = region.index()
            cur = sub.index_select(axis, idx)
            sub.index_copy_(axis, idx, torch.maximum(cur, p_storage.expand_as(cur)))
        else:
            sub.copy_(torch.maximum(sub, p_storage.expand_as(sub)))

    def unit_scores(self) -> torch.Tensor:
        if self.layout.kind == "tensor":
            return self.values.reshape(1)
        if self.layout.kind == "element":
            return self.values.reshape(-1)
        return self.values.reshape(-1, self.layout.group).amax(dim=1)


def region_units(layout: UnitLayout, region: Region, shape: tuple[int, ...]) -> torch.Tensor:
    """Boolean per unit: does the unit overlap the region?"""
    acc = Accumulator("", shape, layout)
    acc.add(torch.zeros([1] * len(shape)), region)
    return torch.isfinite(acc.unit_scores())


def inherit_layout(src_layout: UnitLayout, src_region: Region, tgt_region: Region, hd_s: int | None, hd_t: int | None) -> UnitLayout:
    if src_layout.kind != "axis":
        return UnitLayout(src_layout.kind)
    canonical = canonical_axis(src_region, src_layout.axis)
    axis = storage_axis(tgt_region, canonical)
    if axis is None:  # e.g. per-expert units of a stacked tensor meeting a dense target
        return UnitLayout("tensor")
    dim = tgt_region.shape[axis]
    group = 1
    if src_layout.group > 1:
        if hd_s and src_layout.group == hd_s and hd_t and dim % hd_t == 0:
            group = hd_t
        elif dim % src_layout.group == 0:
            group = src_layout.group
    return UnitLayout("axis", axis, group)


def core_in_region(cs: CoreSet, region: Region) -> int:
    b = broadcast(cs.layout(region.tensor), cs.unit_mask(region.tensor).float(), cs.shape(region.tensor))
    p = to_canonical(b, region)
    return int(p.expand(region.canonical_shape()).sum()) if p.dim() else int(p)


def layout_name(layout: UnitLayout) -> str:
    if layout.kind != "axis":
        return layout.kind
    return f"axis{layout.axis}" + (f"/{layout.group}" if layout.group > 1 else "")
