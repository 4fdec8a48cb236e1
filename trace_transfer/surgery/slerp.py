"""SLERP and LERP of weight tensors, for two models or weighted over many, optionally restricted by a mask.

Spherical linear interpolation treats a tensor (or each row of it) as one vector and moves along the
great circle between the two models' directions, so the interpolated weights keep a norm close to
their endpoints' instead of shrinking towards the origin as a straight average of two diverging
vectors does. That is why CPI-FT (arXiv 2508.21741, step 4) and model-merging toolkits use it to fuse
the non-core parameters of separately fine-tuned models.

Numerics (the usual recipe, as in mergekit):

* all arithmetic in float32 (float64 inputs stay float64); the result is cast back to ``a``'s dtype;
* the angle comes from the *normalised* vectors, the dot product clamped to [-1, 1] so rounding can
  never push ``acos`` out of its domain;
* when the normalised vectors are nearly (anti)parallel, ``|dot| > dot_threshold`` (0.9995 by default),
  or one of them is zero, ``sin(theta)`` is too small to divide by and the formula falls back to
  linear interpolation — the two agree in that limit anyway;
* the weights ``sin((1-t)θ)/sin θ`` and ``sin(tθ)/sin θ`` are applied to the *unnormalised* tensors,
  so ``t=0`` returns ``a`` and ``t=1`` returns ``b`` exactly.

Granularity: per tensor by default (one angle for the whole tensor); ``per_row=True`` takes one angle
per slice along axis 0 (a 1-D tensor is a single row either way).

More than two models (``slerp_many``): **iterative pairwise SLERP with cumulative weights** is the
default — ``m_1 = x_1``, then ``m_k = slerp(m_{k-1}, x_k, w_k / (w_1 + … + w_k))``. We chose it
because for two models it *is* the standard two-point SLERP (so a two-group CPI-FT merge is exactly
the paper's operation), it reduces to the weighted linear average when all vectors are parallel, and
each step keeps SLERP's constant-angular-speed behaviour. Its cost is order dependence for three or
more non-parallel models (a sphere has no closed-form weighted mean); the order is the order given,
so results are deterministic. ``method="nlerp"`` is the order-independent alternative: direction =
normalised ``Σ w_i x_i/‖x_i‖``, norm = ``Σ w_i ‖x_i‖`` (a one-pass spherical weighted mean that
does *not* reduce to two-point SLERP for intermediate ``t``).

Masks: with ``mask`` only the masked elements change and every other element keeps ``a`` (the first
model) bit for bit; ``invert_mask=True`` changes only the unmasked elements (CPI-FT merges the
*non-core* parameters). The angle is measured on the elements being merged only — they are the
vectors being interpolated — by zeroing the others before the dot products.

Example:
    >>> m = slerp(a, b, t=0.3)                       # per-tensor
    >>> m = slerp(a, b, 0.5, per_row=True, mask=core, invert_mask=True)
    >>> m = slerp_many([x1, x2, x3], weights=[2, 1, 1])
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence

import torch

from trace_transfer.errors import ConfigError, ModelMismatchError
from trace_transfer.surgery.modes import MULTI_METHODS

__all__ = ["slerp", "lerp", "slerp_many", "lerp_many", "normalize_weights", "DOT_THRESHOLD", "MULTI_METHODS"]

DOT_THRESHOLD = 0.9995


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def slerp(
    a: torch.Tensor,
    b: torch.Tensor,
    t: float = 0.5,
    *,
    per_row: bool = False,
    mask: torch.Tensor | None = None,
    invert_mask: bool = False,
    dot_threshold: float = DOT_THRESHOLD,
    info: MutableMapping[str, int] | None = None,
) -> torch.Tensor:
    """Spherical linear interpolation from ``a`` (t=0) to ``b`` (t=1).

    Args:
        a, b: tensors of one shape (any float dtype; ``b`` may differ in dtype).
        t: interpolation factor in [0, 1].
        per_row: one angle per slice along axis 0 instead of one per tensor.
        mask: optional BoolTensor of the full shape restricting which elements change.
        invert_mask: change only the elements *outside* ``mask``.
        dot_threshold: above this |cosine| fall back to linear interpolation.
        info: if given, ``rows`` and ``fallback_rows`` counts are added to it (diagnostics).

    Returns:
        The interpolated tensor in ``a``'s dtype.

    Raises:
        ModelMismatchError: shapes differ. ConfigError: ``t`` outside [0, 1].

    Example:
        >>> slerp(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 0.5)
        tensor([0.7071, 0.7071])
    """
    _check_t(t)
    return slerp_many([a, b], [1.0 - t, t], per_row=per_row, mask=mask, invert_mask=invert_mask,
                      dot_threshold=dot_threshold, info=info)


def lerp(
    a: torch.Tensor,
    b: torch.Tensor,
    t: float = 0.5,
    *,
    mask: torch.Tensor | None = None,
    invert_mask: bool = False,
) -> torch.Tensor:
    """Linear interpolation ``(1-t)·a + t·b`` in float32, cast to ``a``'s dtype; mask as in :func:`slerp`."""
    _check_t(t)
    return lerp_many([a, b], [1.0 - t, t], mask=mask, invert_mask=invert_mask)


def slerp_many(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    *,
    method: str = "pairwise",
    per_row: bool = False,
    mask: torch.Tensor | None = None,
    invert_mask: bool = False,
    dot_threshold: float = DOT_THRESHOLD,
    info: MutableMapping[str, int] | None = None,
) -> torch.Tensor:
    """Weighted spherical merge of any number of tensors (see the module docstring for the method).

    Args:
        tensors: two or more tensors of one shape; the first is "model A" for masking and dtype.
        weights: non-negative, any scale (normalised to sum 1); default equal weights.
        method: ``pairwise`` (iterative SLERP with cumulative weights) or ``nlerp``.
        per_row, mask, invert_mask, dot_threshold, info: as in :func:`slerp`.

    Returns:
        The merged tensor in the first tensor's dtype.
    """
    if method not in MULTI_METHODS:
        raise ConfigError(f"multi-model SLERP method {method!r} is unknown; choose one of {', '.join(MULTI_METHODS)}")
    w = normalize_weights(weights, len(tensors))
    first = tensors[0]
    _check_shapes(tensors, mask)
    if not first.is_floating_point():  # integer buffers (position ids, counters) cannot be interpolated
        return first.clone()
    select = _selection(mask, invert_mask, first.shape)
    rows = [_as_rows(x, per_row, select) for x in tensors]
    if method == "pairwise":
        acc, total = rows[0], w[0]
        for x, wk in zip(rows[1:], w[1:]):
            if wk == 0.0:
                continue
            if total == 0.0:  # nothing accumulated yet: the first weighted tensor is the start point
                acc, total = x, wk
                continue
            total += wk
            acc = _slerp_rows(acc, x, wk / total, dot_threshold, info)
        merged = acc
    else:
        merged = _nlerp_rows(rows, w, info)
    return _finish(merged, first, select)


def lerp_many(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    *,
    mask: torch.Tensor | None = None,
    invert_mask: bool = False,
) -> torch.Tensor:
    """Weighted linear average ``Σ w_i x_i`` (weights normalised), float32, in the first tensor's dtype."""
    w = normalize_weights(weights, len(tensors))
    first = tensors[0]
    _check_shapes(tensors, mask)
    if not first.is_floating_point():
        return first.clone()
    select = _selection(mask, invert_mask, first.shape)
    acc = None
    for x, wk in zip(tensors, w):
        term = _compute(x) * wk
        acc = term if acc is None else acc + term
    return _finish(acc.reshape(1, -1), first, select)


def normalize_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """Check and scale merge weights to sum 1 (``None`` → equal weights).

    Raises:
        ConfigError: wrong count, a negative weight, or all zero.
    """
    if n < 2:
        raise ConfigError(f"merging needs at least two models, got {n}")
    if weights is None:
        return [1.0 / n] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise ConfigError(f"got {len(w)} weights for {n} models; give one weight per model (in model order)")
    bad = [x for x in w if x < 0 or x != x]
    if bad:
        raise ConfigError(f"merge weights must be non-negative numbers, got {w}")
    s = sum(w)
    if s <= 0:
        raise ConfigError(f"merge weights {w} sum to zero; give at least one positive weight")
    return [x / s for x in w]


# --------------------------------------------------------------------------------------------------
# Internals: everything works on a 2-D float view (rows × elements)
# --------------------------------------------------------------------------------------------------


def _check_t(t: float) -> None:
    if not 0.0 <= float(t) <= 1.0:
        raise ConfigError(f"interpolation factor t={t} is outside [0, 1]; t=0 gives model A, t=1 model B")


def _check_shapes(tensors: Sequence[torch.Tensor], mask: torch.Tensor | None) -> None:
    shape = tuple(tensors[0].shape)
    for i, x in enumerate(tensors[1:], start=2):
        if tuple(x.shape) != shape:
            raise ModelMismatchError(f"cannot merge tensors of shapes {list(shape)} (model 1) and {list(x.shape)} (model {i})")
    if mask is not None and tuple(mask.shape) != shape:
        raise ModelMismatchError(f"mask of shape {list(mask.shape)} does not fit a tensor of shape {list(shape)}")


def _compute(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)


def _selection(mask: torch.Tensor | None, invert: bool, shape: torch.Size) -> torch.Tensor | None:
    if mask is None:
        return None
    sel = mask.to(torch.bool)
    return ~sel if invert else sel


def _as_rows(x: torch.Tensor, per_row: bool, select: torch.Tensor | None) -> torch.Tensor:
    v = _compute(x)
    if select is not None:
        # Zeroed elements add nothing to norms or dot products, so the angle is that of the merged part.
        v = torch.where(select, v, torch.zeros((), dtype=v.dtype))
    if per_row and v.dim() >= 2:
        return v.reshape(v.shape[0], -1)
    return v.reshape(1, -1)


def _slerp_rows(a: torch.Tensor, b: torch.Tensor, t: float, threshold: float,
                info: MutableMapping[str, int] | None) -> torch.Tensor:
    na = torch.linalg.vector_norm(a, dim=1, keepdim=True)
    nb = torch.linalg.vector_norm(b, dim=1, keepdim=True)
    degenerate = (na == 0) | (nb == 0)
    # Divide only where the norm is non-zero; degenerate rows take the linear branch below.
    dot = (a * b).sum(dim=1, keepdim=True) / torch.where(degenerate, torch.ones_like(na), na * nb)
    dot = dot.clamp(-1.0, 1.0)
    linear = degenerate | (dot.abs() > threshold)
    theta = torch.arccos(dot)
    sin_theta = torch.sin(theta)
    safe_sin = torch.where(linear, torch.ones_like(sin_theta), sin_theta)
    s0 = torch.where(linear, torch.full_like(theta, 1.0 - t), torch.sin((1.0 - t) * theta) / safe_sin)
    s1 = torch.where(linear, torch.full_like(theta, t), torch.sin(t * theta) / safe_sin)
    if info is not None:
        info["rows"] = info.get("rows", 0) + a.shape[0]
        info["fallback_rows"] = info.get("fallback_rows", 0) + int(linear.sum())
    return s0 * a + s1 * b


def _nlerp_rows(rows: list[torch.Tensor], w: list[float], info: MutableMapping[str, int] | None) -> torch.Tensor:
    direction = torch.zeros_like(rows[0])
    magnitude = torch.zeros(rows[0].shape[0], 1, dtype=rows[0].dtype)
    linear = torch.zeros_like(rows[0])
    for x, wk in zip(rows, w):
        n = torch.linalg.vector_norm(x, dim=1, keepdim=True)
        direction += wk * x / torch.where(n == 0, torch.ones_like(n), n)
        magnitude += wk * n
        linear += wk * x
    dn = torch.linalg.vector_norm(direction, dim=1, keepdim=True)
    # Directions that cancel out have no mean on the sphere: use the linear average there.
    degenerate = dn <= 1e-12 * magnitude.clamp_min(1e-30)
    out = torch.where(degenerate, linear, direction / torch.where(degenerate, torch.ones_like(dn), dn) * magnitude)
    if info is not None:
        info["rows"] = info.get("rows", 0) + rows[0].shape[0]
        info["fallback_rows"] = info.get("fallback_rows", 0) + int(degenerate.sum())
    return out


def _finish(merged_rows: torch.Tensor, first: torch.Tensor, select: torch.Tensor | None) -> torch.Tensor:
    merged = merged_rows.reshape(first.shape).to(first.dtype)
    if select is None:
        return merged
    # Untouched elements are copied from the first model's own storage: bit-identical, no round trip.
    return torch.where(select, merged, first)
