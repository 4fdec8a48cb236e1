"""Sparse trainable deltas: training memory proportional to the core, not to the tensors it touches.

A partly-core tensor W (a row, column, head or element core) trains as ``W = W0 + scatter(δ)``:

* ``W0`` is the parameter itself, frozen (``requires_grad=False``): no gradient, no optimizer state —
  under ZeRO-3 it stays partitioned and frozen like any other frozen tensor;
* ``δ`` is a new ``nn.Parameter`` holding only the core units — the selected slices along one axis
  (``[k, d]`` for rows and heads on axis 0, ``[d, k]`` for columns) or the selected values ``[k]`` of an
  element core, with int32 indices (int64 past 2³¹ elements). It is registered on the module that owns
  W (as ``<attr>_sparse_delta``), so DeepSpeed, accelerate and the HF ``Trainer`` see and partition it
  like any parameter, and it must exist before they wrap the model;
* when the stage ends (:meth:`SparseDelta.fold`, called by ``MaskHandle.remove()``) δ is added into W
  with ``index_add_`` and unregistered. Elements outside the core are never written: they are
  bit-identical by construction, not by a zeroed gradient. ``state_dict()`` of a model with live
  deltas returns folded weights (and no δ keys), and loading a folded state dict resets δ to zero, so
  checkpoints written mid-stage hold plain, folded weights.

How the forward pass sees ``W0 + scatter(δ)`` — the mechanism, chosen by measurement:

* **``nn.Linear`` with a row/head/column core** (the bulk of an LLM's partly-core tensors): no
  effective weight is built. Rows: ``y = x·W0ᵀ + b``, then ``y[..., idx] += x·δᵀ`` (``index_add``);
  columns: ``y += x[..., idx]·δᵀ``. Autograd then never forms the full ``[out, in]`` weight gradient
  — ``∂δ`` costs ``k/out`` of it — which is why a 5 % row core steps *faster* than full FT (and than
  dense gradient masking, which computes the full gradient and zeroes 95 % of it).
* **``nn.Linear`` with an element core**: a custom autograd function works through W a block of rows
  (~1M elements) at a time: forward builds ``W0 + scatter(δ)`` per block, backward rebuilds it per
  block for ``∂x`` and gathers ``∂δ`` from each block's weight gradient as it is made. No
  weight-sized tensor exists at any point (figures below), for the same matmul flops. Under ZeRO-3 (parameters with ``ds_id``) the
  effective weight is built once and kept instead, so backward does not depend on W0 being
  re-gathered.
* **any other module** (embeddings, norms, GPT-2 ``Conv1D``, custom layers): the module's own forward
  runs with ``W0 + scatter(δ)`` swapped into its ``_parameters`` for the duration of the call. Works
  for every module that reads its weight as ``self.<attr>``; the effective weight is a full copy.

Alternatives considered: ``torch.nn.utils.parametrize`` renames every parameter
(``…parametrizations.weight.original``), which breaks CoreSet names, HF ``save_pretrained`` and
DeepSpeed's consolidated state dicts; a plain forward pre-hook runs *before* DeepSpeed's gather hook
when registered first, so it would see an empty ZeRO-3 partition. Replacing ``forward`` on the module
instance runs inside ``__call__``, after every pre-hook (DeepSpeed's gather included) — no ordering
to get wrong. The Linear fast path is pure tensor code, so ``torch.compile`` traces it; the generic
swap mutates ``_parameters`` and may graph-break there.

Measured (``bench/masked_training.py``, 58M Llama, fp32, 1 CPU thread, random 5 % cores, ratios to full
FT in the same run, process CPU time, best of 2 on a shared machine): trainable state (δ + gradient +
Adam + indices) 0.067× rows / 0.081× heads / 0.083× elements (dense masking: 1.00× / 1.08×); peak
RSS 0.72× / 0.68× / 0.71× (dense: 0.98× / 1.06×); step time 0.72× / 0.74× / 0.89× (dense: 1.03× /
1.04×; the element figure ranged 0.89–1.16× between repeats); LoRA r=8 0.011× state, 0.66× RSS,
0.64× time. The element path pays two copies of each weight block per step (forward and backward)
and still computes every block's weight gradient; rows/heads/columns compute only ``k/out`` of it.
Within the element path, keeping the effective weight for backward peaked at 1,262 MiB RSS,
rebuilding it under ``torch.utils.checkpoint`` at 1,106 MiB, blockwise at 1,059 MiB.

Numerics: ``x·W0ᵀ + x·δᵀ`` rounds differently from ``x·(W0+δ)ᵀ``, so sparse and dense masking agree to
float tolerance, not bit for bit, on the *core*; non-core elements are bit-identical in both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["SparseDelta", "attach", "install", "detach", "owners_of", "MAX_SPARSE_SHARE", "DELTA_SUFFIX"]

# Above this share of trainable elements, a tensor trains faster with dense gradient masking: the extra
# matmul on δ approaches the cost of the full one (and δ plus its indices the size of the tensor).
MAX_SPARSE_SHARE = 0.5
DELTA_SUFFIX = "_sparse_delta"


def _shape(p: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(p, "ds_shape", p.shape))


def _index_dtype(n: int) -> torch.dtype:
    return torch.int32 if n < 2**31 else torch.int64


@dataclass
class SparseDelta:
    """One partly-core parameter trained as ``param + scatter(delta)``.

    ``axis`` is the sliced dimension (rows 0, columns 1, heads either), or None for an element core
    whose ``index`` holds flat positions. ``owners`` are ``(module, attribute)`` pairs that hold the
    parameter (several when weights are tied); δ is registered on each of them."""

    name: str
    param: torch.nn.Parameter
    delta: torch.nn.Parameter
    axis: int | None
    index: torch.Tensor
    owners: list[tuple[torch.nn.Module, str]]
    _on_device: dict[torch.device, torch.Tensor] = field(default_factory=dict)
    _blocks: list[tuple[int, int, int, int]] | None = None

    @property
    def delta_attr(self) -> str:
        return self.owners[0][1] + DELTA_SUFFIX

    @property
    def trainable_elements(self) -> int:
        return int(torch.Size(_shape(self.delta)).numel())

    def index_on(self, device: torch.device) -> torch.Tensor:
        idx = self._on_device.get(device)
        if idx is None:
            idx = self.index.to(device)
            self._on_device = {device: idx}  # one copy: the model may move after the deltas were made
        return idx

    def blocks(self) -> list[tuple[int, int, int, int]]:
        """Row blocks of an element core's weight, with the slice of ``index`` each one holds —
        computed once (on the CPU copy of the index: no device sync in the forward pass)."""
        if self._blocks is None:
            self._blocks = _row_blocks(torch.Size(_shape(self.param)), self.index)
        return self._blocks

    def effective(self, base: torch.Tensor | None = None, delta: torch.Tensor | None = None) -> torch.Tensor:
        """``base + scatter(δ)`` (defaults: the parameter and the live δ), differentiable in δ."""
        w = self.param if base is None else base
        d = (self.delta if delta is None else delta).to(w.dtype)
        idx = self.index_on(w.device)
        if self.axis is None:
            return w.reshape(-1).index_add(0, idx, d.reshape(-1)).view_as(w)
        return w.index_add(self.axis, idx, d)

    def core_values(self, base: torch.Tensor | None = None) -> torch.Tensor:
        """The base weight's values at the core positions, in δ's shape."""
        w = self.param if base is None else base
        idx = self.index_on(w.device)
        if self.axis is None:
            return w.reshape(-1).index_select(0, idx)
        return w.index_select(self.axis, idx)

    @torch.no_grad()
    def fold(self) -> None:
        """Add δ into the parameter in place (gathering both first under ZeRO-3)."""
        with _gathered([self.param, self.delta], modify=True):
            w, d = self.param.data, self.delta.data.to(self.param.dtype)
            idx = self.index_on(w.device)
            if self.axis is None:
                w.view(-1).index_add_(0, idx, d.reshape(-1))
            else:
                w.index_add_(self.axis, idx, d)


def _gathered(params: list[torch.Tensor], modify: bool):
    import contextlib

    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed  # only reached when DeepSpeed partitioned the parameters

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)


def owners_of(model: torch.nn.Module, param: torch.nn.Parameter) -> list[tuple[torch.nn.Module, str]]:
    return [(m, attr) for m in model.modules() for attr, p in m._parameters.items() if p is param]


def attach(
    model: torch.nn.Module, name: str, param: torch.nn.Parameter, keep: torch.Tensor, axis: int | None,
    owners: list[tuple[torch.nn.Module, str]] | None = None,
) -> SparseDelta:
    """Freeze ``param`` and give it a zero δ over the core positions.

    Args:
        keep: bool, the trainable positions — a vector along ``axis``, or flat over all elements
            (``axis=None``).
        owners: the ``(module, attribute)`` pairs holding ``param`` (found in ``model`` if None).

    Install the forward wrappers afterwards with :func:`install`.
    """
    owners = owners if owners is not None else owners_of(model, param)
    shape = _shape(param)
    positions = keep.reshape(-1).nonzero().squeeze(1)
    index = positions.to(_index_dtype(torch.Size(shape).numel()))
    if axis is None:
        dshape: tuple[int, ...] = (len(index),)
    else:
        dshape = tuple(len(index) if d == axis else s for d, s in enumerate(shape))
    delta = torch.nn.Parameter(torch.zeros(dshape, dtype=param.dtype, device=param.device))
    param.requires_grad_(False)
    entry = SparseDelta(name, param, delta, axis, index, owners)
    for module, attr in owners:
        module.register_parameter(attr + DELTA_SUFFIX, delta)
    return entry


# -- forward wrappers ------------------------------------------------------------------------------


_WRAPPED_ATTR = "_trace_transfer_sparse_forward"


def install(entries: list[SparseDelta]) -> list[torch.nn.Module]:
    """Make every owning module compute with ``W0 + scatter(δ)``; returns the wrapped modules."""
    per_module: dict[int, tuple[torch.nn.Module, dict[str, SparseDelta]]] = {}
    for e in entries:
        for module, attr in e.owners:
            per_module.setdefault(id(module), (module, {}))[1][attr] = e
    wrapped = []
    for module, mine in per_module.values():
        _wrap(module, mine)
        wrapped.append(module)
    return wrapped


def _wrap(module: torch.nn.Module, mine: dict[str, SparseDelta]) -> None:
    own_forward = module.__dict__.get("forward")  # an instance-level forward (accelerate hooks, ...)
    orig = module.forward
    fast = own_forward is None and type(module).forward is torch.nn.Linear.forward and "weight" in mine
    if fast:
        def forward(input: torch.Tensor) -> torch.Tensor:
            return _linear(module, mine, input)
    else:
        def forward(*args: Any, **kwargs: Any) -> Any:
            saved = {attr: module._parameters[attr] for attr in mine}
            try:
                for attr, e in mine.items():
                    module._parameters[attr] = e.effective(saved[attr])
                return orig(*args, **kwargs)
            finally:
                module._parameters.update(saved)

    module.forward = forward
    sd_hook = module._register_state_dict_hook(_fold_state_dict_hook(mine))
    load_hook = module._register_load_state_dict_pre_hook(_reset_on_load_hook(mine))
    setattr(module, _WRAPPED_ATTR, (own_forward, mine, sd_hook, load_hook))


def _linear(module: torch.nn.Module, mine: dict[str, SparseDelta], input: torch.Tensor) -> torch.Tensor:
    w = mine["weight"]
    b = mine.get("bias")
    bias = b.effective() if b is not None else module.bias
    weight = module.weight
    if w.axis is None:
        if hasattr(weight, "ds_id"):
            return F.linear(input, w.effective(weight), bias)
        return _ElementLinear.apply(input, weight, w.delta, bias, w.index_on(input.device), w.blocks())
    idx = w.index_on(input.device)
    delta = w.delta
    y = F.linear(input, weight, bias)
    if w.axis == 0:
        extra = F.linear(input, delta)
        return y.index_add(-1, idx, extra.to(y.dtype))
    return y + F.linear(input.index_select(-1, idx), delta).to(y.dtype)


# Rows of W processed per block by the element-core linear: ~1M elements (4 MB in fp32), so no
# weight-sized tensor is ever formed, and each block is still a matmul large enough to run at speed.
_BLOCK_ELEMENTS = 1 << 20


class _ElementLinear(torch.autograd.Function):
    """``y = x·(W0 + scatter(δ))ᵀ + b`` for an element core, one block of W's rows at a time.

    The effective weight exists only a block at a time (forward and backward), and ``∂δ`` is gathered
    from each block's weight gradient as it is made — memory is O(block), not O(W) per layer. ``index``
    holds flat positions in ascending order (``nonzero`` order), so each block's core positions are a
    contiguous slice of it."""

    @staticmethod
    def forward(ctx, x, w0, delta, bias, index, blocks=None):
        blocks = blocks if blocks is not None else _row_blocks(w0.shape, index)
        ys = [F.linear(x, _block(w0, delta, index, b), None if bias is None else bias[b[0]:b[1]]) for b in blocks]
        ctx.save_for_backward(x, w0, delta, index)
        ctx.blocks, ctx.has_bias = blocks, bias is not None
        return torch.cat(ys, dim=-1) if len(ys) > 1 else ys[0]

    @staticmethod
    def backward(ctx, gy):
        x, w0, delta, index = ctx.saved_tensors
        dt = gy.dtype
        gy2, x2 = gy.reshape(-1, gy.shape[-1]), x.reshape(-1, x.shape[-1]).to(dt)
        # ∂x sums over blocks: accumulate in fp32 when the matmuls run in bf16/fp16 (autocast)
        acc = torch.promote_types(dt, torch.float32)
        gx = torch.zeros(x2.shape, dtype=acc, device=x2.device) if ctx.needs_input_grad[0] else None
        gd = torch.empty(delta.shape, dtype=dt, device=delta.device) if ctx.needs_input_grad[2] else None
        cols = w0.shape[1]
        for r0, r1, lo, hi in ctx.blocks:
            g = gy2[:, r0:r1]
            if gx is not None:
                part = g @ _block(w0, delta, index, (r0, r1, lo, hi)).to(dt)
                gx += part if part.dtype == acc else part.to(acc)
            if gd is not None and hi > lo:
                gd[lo:hi] = (g.t() @ x2).reshape(-1).index_select(0, index[lo:hi] - r0 * cols)
        gb = gy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        gx = gx.reshape(x.shape).to(x.dtype) if gx is not None else None
        return gx, None, None if gd is None else gd.to(delta.dtype), gb, None, None


def _row_blocks(shape: torch.Size, index: torch.Tensor) -> list[tuple[int, int, int, int]]:
    rows, cols = shape
    step = max(1, _BLOCK_ELEMENTS // max(1, cols))
    starts = list(range(0, rows, step))
    bounds = torch.tensor([r * cols for r in starts[1:]], dtype=index.dtype, device=index.device)
    cuts = [0] + torch.searchsorted(index, bounds).tolist() + [len(index)]
    return [(r, min(r + step, rows), cuts[i], cuts[i + 1]) for i, r in enumerate(starts)]


def _block(w0: torch.Tensor, delta: torch.Tensor, index: torch.Tensor, b: tuple[int, int, int, int]) -> torch.Tensor:
    r0, r1, lo, hi = b
    w = w0[r0:r1].clone()
    if hi > lo:
        w.view(-1).index_add_(0, index[lo:hi] - r0 * w0.shape[1], delta[lo:hi].to(w.dtype))
    return w


def _fold_state_dict_hook(mine: dict[str, SparseDelta]):
    def hook(module, state_dict, prefix, local_metadata):
        for attr, e in mine.items():
            d = state_dict.pop(prefix + attr + DELTA_SUFFIX, None)
            key = prefix + attr
            if d is None or key not in state_dict:
                continue
            w = state_dict[key]
            if w.numel() == 0:  # a ZeRO-3 partition: nothing to fold here (consolidation folds)
                continue
            state_dict[key] = e.effective(w.detach(), d.detach()).detach()
        return state_dict

    return hook


def _reset_on_load_hook(mine: dict[str, SparseDelta]):
    # A folded checkpoint loaded into W0 already contains δ: loading must zero δ, not add it twice.
    def hook(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        for attr, e in mine.items():
            dkey = prefix + attr + DELTA_SUFFIX
            if prefix + attr in state_dict and dkey not in state_dict:
                state_dict[dkey] = torch.zeros_like(e.delta)

    return hook


def detach(entries: list[SparseDelta], modules: list[torch.nn.Module]) -> None:
    """Fold every δ into its parameter, unregister it and restore the modules' forward."""
    for e in entries:
        e.fold()
    for module in modules:
        own_forward, mine, sd_hook, load_hook = getattr(module, _WRAPPED_ATTR)
        sd_hook.remove()
        load_hook.remove()
        if own_forward is None:
            del module.forward
        else:
            module.forward = own_forward
        delattr(module, _WRAPPED_ATTR)
    for e in entries:
        for module, attr in e.owners:
            module._parameters.pop(attr + DELTA_SUFFIX, None)
        e._on_device.clear()
