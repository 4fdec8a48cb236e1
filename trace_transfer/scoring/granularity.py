"""Units of selection: which tensors compete (scope) and how each is cut into units (granularity).

Granularities (the unit layout of each tensor in scope):

- ``tensor``: the whole tensor is one unit (the official TRACE code).
- ``row`` / ``column``: slices along axis 0 / axis 1 of tensors with two or more dimensions.
- ``head``: attention projections cut into heads of ``head_dim`` — q/k/v (and fused qkv) along their
  output axis, the output projection along its input axis (axes flip for GPT-2's transposed Conv1D
  storage). Which tensor is an attention projection comes from the architecture's rule file
  (roles ``attn_q/k/v/o``) and, where no rule file matches, from common Hugging Face names.
  Every other tensor with two or more dimensions falls back to rows.
- ``element``: every parameter is a unit.

1-D tensors (norm weights, biases) are a single unit at ``row``/``column``/``head`` granularity: they
are tiny (well under 0.1% of the parameters), and cutting them into one-element "rows" would pit
size-1 units against rows thousands of elements wide, where single-element extremes dominate the
min-max scale. At ``element`` granularity they are split like everything else.

Scope groups: ``layers`` (tensors of the transformer blocks — the default outside the paper preset),
``embeddings``, ``lm_head``, ``final_norm``, ``other`` (any remaining global tensor), or ``all``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from trace_transfer.scoring.stream import DEFAULT_CHUNK_ELEMS, TensorSource
from trace_transfer.scoring.units import DEFAULT_SCOPE, GRANULARITIES, SCOPE_GROUPS
from trace_transfer.coreset import ELEMENT, TENSOR, UnitLayout, split_layer
from trace_transfer.errors import ConfigError

logger = logging.getLogger(__name__)

# Fallback when no rule file covers the model: (name regex, head axis in storage order).
_HEAD_PATTERNS: list[tuple[re.Pattern[str], int]] = [
    (re.compile(r"\.(q_proj|k_proj|v_proj|qkv_proj|query_key_value|Wqkv|query|key|value)\.weight$"), 0),
    (re.compile(r"\.(o_proj|out_proj)\.weight$"), 1),
    (re.compile(r"\.attention\.dense\.weight$"), 1),  # GPT-NeoX output projection
    (re.compile(r"\.attn\.c_attn\.weight$"), 1),  # GPT-2 Conv1D stores [in, out]
    (re.compile(r"\.attn\.c_proj\.weight$"), 0),
]


def scope_group(name: str) -> str:
    """Which scope group a tensor belongs to (by name)."""
    if split_layer(name)[0] is not None:
        return "layers"
    low = name.lower()
    if low.startswith("lm_head") or "embed_out" in low or low.endswith("output.weight"):
        return "lm_head"
    if "embed" in low or re.search(r"(^|\.)(wte|wpe)\.", low):
        return "embeddings"
    if "norm" in low or "ln_f" in low:
        return "final_norm"
    return "other"


def parse_scope(scope: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"layers,embeddings"`` / ``["all"]`` → validated tuple of groups (``all`` expands)."""
    if scope is None:
        return DEFAULT_SCOPE
    items = [s.strip() for s in (scope.split(",") if isinstance(scope, str) else scope) if s.strip()]
    if "all" in items:
        return SCOPE_GROUPS
    bad = [s for s in items if s not in SCOPE_GROUPS]
    if bad or not items:
        raise ConfigError(
            f"scope {','.join(items) or '(empty)'!r}: unknown group(s) {bad}; choose from "
            f"{', '.join(SCOPE_GROUPS)} or 'all' (comma-separated, e.g. 'layers,embeddings')"
        )
    return tuple(g for g in SCOPE_GROUPS if g in items)


def in_scope(names: Sequence[str], scope: tuple[str, ...]) -> list[str]:
    return [n for n in names if scope_group(n) in scope]


def head_dim_from_config(config: dict[str, Any] | None) -> int | None:
    if not config:
        return None
    hd = config.get("head_dim")
    if isinstance(hd, int) and hd > 0:
        return hd
    hidden = config.get("hidden_size") or config.get("n_embd")
    heads = config.get("num_attention_heads") or config.get("n_head")
    if hidden and heads:
        return int(hidden) // int(heads)
    return None


def head_axes(
    names: Sequence[str], shapes: dict[str, tuple[int, ...]], config: dict[str, Any] | None
) -> tuple[dict[str, int], str]:
    """``{tensor: head axis}`` for attention projections, and where that came from (for metadata)."""
    axes = _head_axes_from_rules(shapes, config)
    if axes is not None:
        return axes
    out = {}
    for n in names:
        for pattern, axis in _HEAD_PATTERNS:
            if pattern.search(n) and len(shapes[n]) >= 2:
                out[n] = axis
                break
    return out, "name-patterns"


def _head_axes_from_rules(shapes, config) -> tuple[dict[str, int], str] | None:
    if not config or not config.get("model_type"):
        return None
    try:  # rules are optional here: the name patterns cover the common layouts
        from trace_transfer.rules import HEAD_AXIS, ModelSpec, find_rules, resolve

        spec = ModelSpec(config, dict(shapes), "probe")
        res = resolve(find_rules(spec), spec)
    except Exception as exc:  # no rule file for this family, or the rules module is unavailable
        logger.info("head axes from name patterns (no usable rule file: %s)", exc)
        return None
    out = {}
    for name in shapes:
        for slot, region in res.slots_of(name):
            if slot.role in HEAD_AXIS and len(shapes[name]) >= 2:
                axis = HEAD_AXIS[slot.role]
                out[name] = 1 - axis if region.transposed else axis
    return out, f"rules:{res.rules.family}"


def unit_layouts(
    names: Sequence[str],
    shapes: dict[str, tuple[int, ...]],
    granularity: str,
    head_dim: int | None = None,
    head_axis: dict[str, int] | None = None,
) -> dict[str, UnitLayout]:
    """The unit layout of every tensor in ``names`` at ``granularity`` (see the module docstring).

    Raises:
        ConfigError: unknown granularity; ``head`` without a head_dim, or a projection whose head axis
            is not a multiple of head_dim (the message names the tensor).
    """
    if granularity not in GRANULARITIES:
        raise ConfigError(f"granularity {granularity!r} is not known; choose one of: {', '.join(GRANULARITIES)}")
    out: dict[str, UnitLayout] = {}
    for n in names:
        shape = shapes[n]
        if granularity == "tensor" or (granularity != "element" and len(shape) < 2):
            out[n] = TENSOR
        elif granularity == "element":
            out[n] = ELEMENT
        elif granularity == "row":
            out[n] = UnitLayout.rows()
        elif granularity == "column":
            out[n] = UnitLayout.columns()
        else:
            axis = (head_axis or {}).get(n)
            if axis is None:
                out[n] = UnitLayout.rows()
                continue
            if not head_dim:
                raise ConfigError(
                    "granularity 'head' needs the attention head size: the probe's model config has no "
                    "head_dim/num_attention_heads; pass --head-dim"
                )
            if shape[axis] % head_dim:
                raise ConfigError(
                    f"tensor {n!r} {list(shape)}: axis {axis} ({shape[axis]}) is not a multiple of head_dim "
                    f"{head_dim}; check --head-dim"
                )
            out[n] = UnitLayout.heads(head_dim, axis)
    return out


def chunk_align(layout: UnitLayout, shape: tuple[int, ...]) -> int:
    """Elements per chunk-boundary step so that no unit straddles two chunks reduced separately:
    a whole number of units along axis 0, or whole rows for other axes (their units span all rows and
    are accumulated across chunks)."""
    if layout.kind != "axis" or not shape:
        return 1
    row = 1
    for d in shape[1:]:
        row *= d
    return row * (layout.group if layout.axis == 0 else 1)


@dataclass(frozen=True)
class Product:
    """An element-wise product to be summed per unit, formed in a reused buffer (a fresh 4 MB
    temporary per chunk fragments the heap: resident memory grew with the checkpoint, measured)."""

    a: torch.Tensor
    b: torch.Tensor


def square(x: torch.Tensor) -> Product:
    return Product(x, x)


def reduce_units(
    sources: Sequence[TensorSource],
    name: str,
    layout: UnitLayout,
    per_element: Callable[[list[torch.Tensor]], list[torch.Tensor | Product]],
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
) -> list[torch.Tensor]:
    """Sum element-wise quantities over each unit of one tensor, streaming chunk by chunk.

    Args:
        sources: where to read the tensor (e.g. Δ and Fisher of one task, or Δ of every task); all
            must hold ``name`` with the same shape.
        per_element: maps the chunks (one per source, float32, flat) to the quantities to sum: tensors,
            or :class:`Product` / :func:`square` for products (e.g. ``[square(Δ), F]``).

    Returns:
        One float64 tensor of per-unit sums per quantity (length = number of units; 1 for ``tensor``).
    """
    shape = tuple(sources[0].shape(name))
    n_units = layout.num_units(shape) if layout.kind != "element" else sources[0].numel(name)
    align = chunk_align(layout, shape)
    sums: list[torch.Tensor] | None = None
    n = sources[0].numel(name)
    step = max(align, chunk_elems // align * align)
    scratch: torch.Tensor | None = None
    for start in range(0, n, step):
        stop = min(n, start + step)
        values = per_element([s.window(name, start, stop) for s in sources])
        if sums is None:
            sums = [torch.zeros(n_units, dtype=torch.float64) for _ in values]
        for acc, v in zip(sums, values):
            if isinstance(v, Product):
                if scratch is None:
                    scratch = torch.empty(min(step, n), dtype=torch.float32)
                v = torch.mul(v.a, v.b, out=scratch[: stop - start])
            _add_unit_sums(acc, v, layout, shape, start, stop)
        del values
    if sums is None:  # an empty tensor
        sums = [torch.zeros(n_units, dtype=torch.float64) for _ in per_element([torch.zeros(0) for _ in sources])]
    return sums


def _add_unit_sums(acc: torch.Tensor, v: torch.Tensor, layout: UnitLayout, shape, start: int, stop: int) -> None:
    # Chunk sums in float32 (pairwise summation, ~1e-7 relative error over a 1M-element chunk), the
    # running totals in float64: converting every element to float64 first costs 3-5x the time.
    if layout.kind == "tensor":
        acc += v.sum().double()
        return
    if layout.kind == "element":
        acc[start:stop] += v.double()
        return
    row = 1
    for d in shape[1:]:
        row *= d
    r0, r1 = start // row, stop // row
    block = v.reshape(r1 - r0, *shape[1:])
    if layout.axis == 0:
        per_row = block.reshape(r1 - r0, -1).sum(1).double()
        g = layout.group
        acc[r0 // g : r1 // g] += per_row.reshape(-1, g).sum(1)
    else:
        dims = [d for d in range(block.dim()) if d != layout.axis]
        per_index = block.sum(dim=dims).double()
        acc += per_index.reshape(-1, layout.group).sum(1)
