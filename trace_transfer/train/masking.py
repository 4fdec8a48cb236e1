"""Make exactly a CoreSet trainable in any PyTorch training stack (plain loop, HF Trainer, accelerate,
DeepSpeed ZeRO-2/3).

Three mechanisms, chosen per tensor by how much of it is core (``masking`` picks the third's form):

* **no core element** → ``requires_grad=False``. The tensor gets no gradient and, because this is done
  before the optimizer (or ``deepspeed.initialize``) sees the model, no optimizer state either.
* **entirely core** → stays trainable; nothing else to do.
* **partly core** (rows, columns, heads, elements), ``masking="sparse"`` (the default wherever at most
  half of the tensor is core: ``masking="auto"``) → the tensor is frozen and a *sparse delta* δ over
  its core units is trained instead, ``W = W0 + scatter(δ)``, folded back into W by
  :meth:`MaskHandle.remove` — gradient and optimizer state only for the core (see
  :mod:`trace_transfer.train.sparse` for the mechanism and its measured trade-offs).
* **partly core**, ``masking="dense"`` (or more than half core under ``"auto"``) → stays trainable, and a gradient hook zeroes the
  gradient of every non-core element as soon as it lands in ``.grad`` (a post-accumulate-grad hook,
  in place: no second gradient-sized tensor per step — on CPU that copy alone cost ~10% of a step).
  Hooks on one tensor run in registration order, and DeepSpeed, DDP and accelerate register theirs
  when they wrap the model — after ours — so they only ever see masked gradients. If a parameter
  already carries someone else's post-accumulate hook at apply time, the mask goes in front of
  accumulation instead (``register_hook``, out of place). Either hook sees the full-shape gradient,
  also under ZeRO-3 (checked on this project's machines), so the same mask works everywhere. Masks are kept compact: a vector along the sliced axis for rows/columns/heads (broadcast
  in the hook), a bool tensor of the parameter's shape for element layouts (1 byte per element of such
  tensors — the one real memory cost; a 7B model with element masks on every tensor pays ~7 GB per rank).

Why a zeroed gradient is enough to keep an element *bit-identical* under Adam/AdamW: with g = 0 from
the first step, both moments stay exactly 0, so the update m̂/(√v̂ + ε) is exactly 0 whatever ε is.
(A sparse delta has no frozen element to protect: the non-core elements are never written.) Two
things still move such an element and are handled here:

1. **Weight decay.** Decoupled decay multiplies the *whole* tensor by (1 − lr·wd). So
   :meth:`MaskHandle.param_groups` puts partly-core tensors in a group with ``weight_decay=0``. With
   ``decay="zero"`` (the default) they get no decay at all; with ``decay="masked"`` the handle applies
   AdamW's own decoupled decay, ``p ← p·(1 − lr·wd)``, to their core elements only, from an optimizer
   *step pre-hook* — the same arithmetic, in the same order, as AdamW, so core elements follow exactly
   the trajectory AdamW with decay would give them. (Masked decay acts on the module's parameters, so
   it is refused under DeepSpeed, whose optimizer steps on its own fp32 partitions.) A sparse δ sits
   in the same weight-decay-0 group; masked decay moves it as AdamW would move the unit it stands
   for: ``W0[idx] + δ ← (W0[idx] + δ)·(1 − lr·wd)``.
2. **Stale optimizer state.** Adam moments built up while an element was trainable keep moving it
   after its gradient becomes zero. Masks therefore hold only with a **fresh optimizer per stage**
   (per CoreSet) — never carry an optimizer across stages with different cores.

Example:
    >>> handle = apply_coreset(model, CoreSet.load("cores/math.coreset.safetensors"))
    >>> opt = torch.optim.AdamW(handle.param_groups(weight_decay=0.01), lr=2e-5)
    >>> ...train...                       # every non-core element stays bit-identical
    >>> handle.remove()                   # requires_grad restored, hooks gone
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from trace_transfer.coreset import CoreSet
from trace_transfer.errors import ConfigError, ModelMismatchError
from trace_transfer.train import sparse as _sparse
from trace_transfer.train.config import MASKINGS

logger = logging.getLogger(__name__)

__all__ = ["apply_coreset", "combine", "MaskHandle", "MODES", "DECAYS", "ISOLATIONS", "MASKINGS"]

MODES = ("train-core", "freeze-core")
DECAYS = ("zero", "masked")
ISOLATIONS = ("none", "strict")

# Marks a model that already carries an active handle, so two overlapping handles can't silently
# combine their hooks (the product of two masks is their intersection — never what anyone wanted).
_ACTIVE_ATTR = "_trace_transfer_mask_handle"


@dataclass
class _Partial:
    """A partly-core parameter: ``frozen`` is True where the element must not move, in a shape that
    broadcasts against the parameter (a vector along one axis, or the full shape for elements)."""

    name: str
    param: torch.nn.Parameter
    frozen: torch.Tensor
    trainable_elements: int
    _on_device: dict[torch.device, torch.Tensor] = field(default_factory=dict)

    def frozen_on(self, device: torch.device) -> torch.Tensor:
        # Lazily follow the gradient's device: the model may be moved (.to("cuda"), accelerate.prepare)
        # after the handle was made.
        m = self._on_device.get(device)
        if m is None:
            m = self.frozen.to(device)
            self._on_device = {device: m}  # keep one copy only: masks of big models are not small
        return m


def _shape(p: torch.Tensor) -> tuple[int, ...]:
    # Under ZeRO-3 (zero.Init) parameters are already partitioned and p.shape is empty; ds_shape is real.
    return tuple(getattr(p, "ds_shape", p.shape))


def _frozen_mask(coreset: CoreSet, names: Sequence[str]) -> tuple[torch.Tensor, int] | None:
    """Compact "frozen" mask of one parameter (the union of the core over all its tied names), or None
    when the parameter is entirely core. Returns (mask, number of trainable elements)."""
    shape = coreset.shape(names[0])
    layouts = {coreset.layout(n) for n in names}
    if len(layouts) == 1:
        layout = layouts.pop()
        units = coreset.unit_mask(names[0]).clone()
        for n in names[1:]:
            units |= coreset.unit_mask(n)
        if bool(units.all()):
            return None
        if layout.kind == "axis":
            along = units.repeat_interleave(layout.group) if layout.group > 1 else units
            view = [1] * len(shape)
            view[layout.axis] = shape[layout.axis]
            trainable = int(units.sum()) * layout.unit_size(shape)
            return (~along).reshape(view).contiguous(), trainable
        full = layout.expand(units, shape)
    else:  # tied names stored at different granularities meet at element level
        full = coreset.mask(names[0])
        for n in names[1:]:
            full = full | coreset.mask(n)
        if bool(full.all()):
            return None
    full = full.contiguous()
    return ~full, int(full.sum())


class MaskHandle:
    """What :func:`apply_coreset` did to a model, and how to undo it. Not built directly."""

    def __init__(self, model: torch.nn.Module, mode: str, decay: str, masking: str = "auto"):
        self.model = model
        self.mode = mode
        self.decay = decay
        self.masking = masking
        self.full: dict[str, torch.nn.Parameter] = {}  # entirely trainable
        self.partial: dict[str, _Partial] = {}  # partly trainable, gradient-masked
        self.sparse: dict[str, _sparse.SparseDelta] = {}  # partly core, trained as W0 + scatter(δ)
        self._sparse_modules: list[torch.nn.Module] = []
        self.frozen: dict[str, torch.nn.Parameter] = {}  # requires_grad=False
        self._saved_requires_grad: list[tuple[torch.nn.Parameter, bool]] = []
        self._hooks: list[Any] = []
        self._decay_groups: list[tuple[dict[str, Any], float]] = []
        self._opt_hook: Any = None
        self._decayed_since_after_step = False
        self._removed = False

    # -- optimizer ----------------------------------------------------------------------------------

    def param_groups(
        self, weight_decay: float = 0.0, no_decay: Iterable[str] | Callable[[str], bool] = ()
    ) -> list[dict[str, Any]]:
        """Optimizer parameter groups that cannot move a frozen element.

        Entirely-core tensors get ``weight_decay``, except those ``no_decay`` excludes (name substrings
        such as ``("bias", "norm")``, or a predicate on the name). Partly-core tensors (and sparse
        deltas) get ``weight_decay=0``; with
        ``decay="masked"`` their core elements are decayed by the handle instead (see the module
        docstring). Build a *fresh* optimizer from these groups for every stage.

        Returns:
            A list of ``{"params": [...], "weight_decay": float}`` dicts (empty groups left out), to
            pass straight to ``torch.optim.AdamW`` or any torch optimizer.

        Example:
            >>> opt = torch.optim.AdamW(handle.param_groups(0.01, no_decay=("bias", "norm")), lr=1e-4)
        """
        self._check_active()
        if callable(no_decay):
            exempt = no_decay
        else:
            patterns = tuple(no_decay)

            def exempt(name: str) -> bool:
                return any(s in name for s in patterns)

        decayed = [p for n, p in self.full.items() if not exempt(n)]
        plain = [p for n, p in self.full.items() if exempt(n)]
        partial = self._partly_core_params()
        groups: list[dict[str, Any]] = []
        if decayed:
            groups.append({"params": decayed, "weight_decay": float(weight_decay)})
        if plain:
            groups.append({"params": plain, "weight_decay": 0.0})
        if partial:
            group = {"params": partial, "weight_decay": 0.0}
            groups.append(group)
            if self.decay == "masked" and weight_decay:
                # Remember this very dict: torch optimizers keep the dicts they are given, so the
                # step pre-hook can recognise "its" optimizer and read the scheduled lr from it.
                self._decay_groups.append((group, float(weight_decay)))
                self._install_decay_hook()
        return groups

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Raise ConfigError if ``optimizer`` would move a frozen element: a partly-core tensor in a
        group with non-zero weight decay (e.g. an optimizer built by a framework from all trainable
        parameters instead of from :meth:`param_groups`); or if it misses a sparse delta (built
        before :func:`apply_coreset`, so the core would silently not train)."""
        groups = getattr(optimizer, "param_groups", [])
        held = {id(p) for g in groups for p in g["params"]}
        missing = [n for n, e in self.sparse.items() if id(e.delta) not in held]
        if groups and missing:
            raise ConfigError(
                f"the optimizer does not hold the sparse deltas of {len(missing)} partly-core tensor(s) "
                f"(first: {missing[0]!r}), so their core would never train; build it after apply_coreset "
                f"from MaskHandle.param_groups(), or apply the CoreSet with masking='dense'"
            )
        partial = {id(p): n for n, p in zip(self.partly_core(), self._partly_core_params())}
        for g in groups:
            if not g.get("weight_decay"):
                continue
            leaking = [partial[id(p)] for p in g["params"] if id(p) in partial]
            if leaking:
                raise ConfigError(
                    f"the optimizer applies weight decay {g['weight_decay']} to {len(leaking)} partly-core "
                    f"tensor(s) (first: {leaking[0]!r}), which moves their frozen elements (or, for a sparse "
                    f"delta, decays it toward the base weights instead of the unit toward 0); build it from "
                    f"MaskHandle.param_groups(weight_decay) or set weight_decay=0"
                )

    def after_step(self, lr: float | None = None) -> None:
        """Call after every optimizer step (the shared loop does). A no-op unless ``decay="masked"``
        and the optimizer did not run the handle's step pre-hook (e.g. it was built from *copies* of
        the groups): then the masked decay is applied here, with ``lr`` or the group's current lr."""
        if self._removed or not self._decay_groups:
            return
        if self._decayed_since_after_step:
            self._decayed_since_after_step = False
            return
        group, wd = self._decay_groups[-1]
        if lr is None:
            if "lr" not in group:
                raise ConfigError(
                    "MaskHandle.after_step(): masked weight decay needs the learning rate; call "
                    "after_step(lr=...) or build the optimizer from handle.param_groups() directly"
                )
            lr = group["lr"]
        self._apply_masked_decay(self._partly_core_params(), float(lr), wd)

    def _partly_core_params(self) -> list[torch.nn.Parameter]:
        return [e.param for e in self.partial.values()] + [e.delta for e in self.sparse.values()]

    def partly_core(self) -> list[str]:
        """Names of the partly-core tensors (gradient-masked or sparse), in parameter-group order."""
        return list(self.partial) + list(self.sparse)

    def _install_decay_hook(self) -> None:
        if self._opt_hook is not None:
            return
        partial_ids = {id(p) for p in self._partly_core_params()}

        def pre_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            for g in optimizer.param_groups:
                for mine, wd in self._decay_groups:
                    if g is mine:
                        params = [p for p in g["params"] if id(p) in partial_ids]
                        self._apply_masked_decay(params, float(g["lr"]), wd)
                        self._decayed_since_after_step = True

        from torch.optim.optimizer import register_optimizer_step_pre_hook

        self._opt_hook = register_optimizer_step_pre_hook(pre_step)

    @torch.no_grad()
    def _apply_masked_decay(self, params: list[torch.Tensor], lr: float, wd: float) -> None:
        by_id: dict[int, Any] = {id(e.param): e for e in self.partial.values()}
        by_id.update({id(e.delta): e for e in self.sparse.values()})
        factor = 1 - lr * wd  # AdamW's own expression, so core elements match AdamW bit for bit
        for p in params:
            entry = by_id[id(p)]
            if p.numel() == 0 or (isinstance(entry, _sparse.SparseDelta) and entry.param.numel() == 0):
                raise ConfigError(
                    f"masked weight decay on {entry.name!r}: the parameter is partitioned (DeepSpeed ZeRO-3); "
                    f"use decay='zero' under DeepSpeed"
                )
            if isinstance(entry, _sparse.SparseDelta):
                base = entry.core_values().to(p.dtype)
                p.copy_((base + p) * factor - base)  # the unit W0 + δ decays, δ carries the change
            else:
                p.copy_(torch.where(entry.frozen_on(p.device), p, p * factor))

    # -- queries ------------------------------------------------------------------------------------

    def trainable_params(self) -> list[torch.nn.Parameter]:
        """Parameters the optimizer must see (entirely or partly core, sparse deltas), each once."""
        return list(self.full.values()) + self._partly_core_params()

    def named_trainable_params(self) -> list[tuple[str, torch.nn.Parameter]]:
        return (list(self.full.items()) + [(n, e.param) for n, e in self.partial.items()]
                + [(n + _sparse.DELTA_SUFFIX, e.delta) for n, e in self.sparse.items()])

    def num_trainable(self) -> int:
        """Trainable *elements* (the effective number of parameters that can change)."""
        return (sum(_numel(_shape(p)) for p in self.full.values())
                + sum(e.trainable_elements for e in self.partial.values())
                + sum(e.trainable_elements for e in self.sparse.values()))

    def num_total(self) -> int:
        """Elements of the model's own parameters (sparse deltas not counted)."""
        deltas = {id(e.delta) for e in self.sparse.values()}
        params = {id(p): p for p in self.model.parameters() if id(p) not in deltas}
        return sum(_numel(_shape(p)) for p in params.values())

    def mask_bytes(self) -> int:
        """Memory held by gradient masks and sparse-delta indices (per device copy)."""
        return (sum(e.frozen.numel() * e.frozen.element_size() for e in self.partial.values())
                + sum(e.index.numel() * e.index.element_size() for e in self.sparse.values()))

    def delta_bytes(self) -> int:
        """Memory held by the sparse deltas themselves (their gradients and optimizer state scale alike)."""
        return sum(e.delta.numel() * e.delta.element_size() for e in self.sparse.values())

    def summary(self) -> dict[str, Any]:
        total = self.num_total()
        trainable = self.num_trainable()
        return {
            "mode": self.mode,
            "decay": self.decay,
            "masking": self.masking,
            "trainable_params": trainable,
            "total_params": total,
            "trainable_share": trainable / total if total else 0.0,
            "full_tensors": len(self.full),
            "partial_tensors": len(self.partial) + len(self.sparse),
            "sparse_tensors": len(self.sparse),
            "frozen_tensors": len(self.frozen),
            "mask_bytes": self.mask_bytes(),
        }

    # -- teardown -----------------------------------------------------------------------------------

    def remove(self) -> None:
        """Fold sparse deltas into their tensors; remove the gradient hooks and the optimizer hook;
        restore every ``requires_grad``. Idempotent. Parameters keep their (trained) values. Under
        ZeRO-3 every rank must call it (folding gathers the partitions)."""
        if self._removed:
            return
        _sparse.detach(list(self.sparse.values()), self._sparse_modules)
        self._sparse_modules = []
        for h in self._hooks:
            h.remove()
        if self._opt_hook is not None:
            self._opt_hook.remove()
        for p, flag in self._saved_requires_grad:
            p.requires_grad_(flag)
        if getattr(self.model, _ACTIVE_ATTR, None) is self:
            delattr(self.model, _ACTIVE_ATTR)
        self._hooks, self._decay_groups, self._opt_hook = [], [], None
        for e in self.partial.values():
            e._on_device.clear()
        self._removed = True

    def __enter__(self) -> MaskHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def _check_active(self) -> None:
        if self._removed:
            raise ConfigError("this MaskHandle was removed; call apply_coreset() again")

    def __repr__(self) -> str:
        s = self.summary()
        return (
            f"MaskHandle(mode={self.mode!r}, trainable={s['trainable_params']:,}/{s['total_params']:,}, "
            f"full={s['full_tensors']}, partial={s['partial_tensors']} ({s['sparse_tensors']} sparse), "
            f"frozen={s['frozen_tensors']}"
            f"{', removed' if self._removed else ''})"
        )


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _resolve(model: torch.nn.Module, coreset: CoreSet) -> dict[int, tuple[torch.nn.Parameter, list[str], list[str]]]:
    """Map each distinct parameter to (param, all its names, its names known to the CoreSet).

    Tied weights (``lm_head.weight`` is ``model.embed_tokens.weight``) have several names; the CoreSet
    may know either, or both (then their cores are united)."""
    by_id: dict[int, tuple[torch.nn.Parameter, list[str], list[str]]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), (p, [], []))[1].append(name)
    universe = set(coreset.all_names())
    name_to_param = {n: p for p, names, _ in by_id.values() for n in names}
    source = coreset.metadata.get("task") or "CoreSet"
    for name in coreset.all_names():
        if name not in name_to_param:
            hint = ""
            if any(n.endswith("." + name) for n in name_to_param):
                hint = " (apply the CoreSet before wrapping the model: DDP/accelerate/PEFT add name prefixes)"
            raise ModelMismatchError(
                f"{source}: tensor {name!r} of the CoreSet is not a parameter of the model{hint}; "
                f"the CoreSet was made for a different model (use `trace-transfer transfer` to map it)"
            )
        got = _shape(name_to_param[name])
        if got != coreset.shape(name):
            raise ModelMismatchError(
                f"{source}: tensor {name!r} has shape {list(coreset.shape(name))} in the CoreSet but "
                f"{list(got)} in the model; the CoreSet was made for a different model size"
            )
    for p, names, known in by_id.values():
        known.extend(n for n in names if n in universe)
        if not known:
            raise ModelMismatchError(
                f"{source}: model parameter {names[0]!r} is not in the CoreSet's universe; "
                f"the CoreSet was made for a different model"
            )
    return by_id


def apply_coreset(
    model: torch.nn.Module, coreset: CoreSet, *, mode: str = "train-core", decay: str = "zero",
    masking: str = "auto",
) -> MaskHandle:
    """Make exactly ``coreset`` trainable (``mode="train-core"``), or exactly its complement
    (``mode="freeze-core"``: general-core protection — the core is what must not change).

    Call it on the bare model, *before* building the optimizer and before ``deepspeed.initialize`` /
    ``accelerator.prepare`` / ``Trainer`` wrapping, so frozen tensors never get optimizer state.

    Args:
        model: the module to train (parameter names must match the CoreSet's; tied names are resolved).
        coreset: the CoreSet (see :mod:`trace_transfer.coreset.format`).
        mode: ``"train-core"`` or ``"freeze-core"``.
        decay: how partly-core tensors are weight-decayed: ``"zero"`` (not at all) or ``"masked"``
            (decoupled decay on their core elements only, applied by the handle).
        masking: how partly-core tensors train: ``"sparse"`` (frozen tensor + trainable delta over
            the core units: state proportional to the core), ``"dense"`` (whole tensor trainable,
            gradient masked), or ``"auto"`` (sparse where at most half of a tensor is core — smaller
            and faster there — dense above that, e.g. for ``freeze-core`` complements).

    Returns:
        A :class:`MaskHandle`: ``.param_groups(weight_decay)``, ``.after_step()``, ``.remove()``,
        ``.trainable_params()``, ``.summary()``.

    Raises:
        ConfigError: unknown mode/decay/masking, nothing left to train, or the model already has an
            active handle.
        ModelMismatchError: the CoreSet does not fit the model (names the first offending tensor).

    Example:
        >>> with apply_coreset(model, core) as h:
        ...     train(model, batches, cfg, params=h.param_groups(cfg.weight_decay), after_step=h.after_step)
    """
    if mode not in MODES:
        raise ConfigError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
    if decay not in DECAYS:
        raise ConfigError(f"decay {decay!r}: expected one of {', '.join(DECAYS)}")
    if masking not in MASKINGS:
        raise ConfigError(f"masking {masking!r}: expected one of {', '.join(MASKINGS)}")
    existing = getattr(model, _ACTIVE_ATTR, None)
    if existing is not None and not existing._removed:
        raise ConfigError(
            "the model already has an active CoreSet mask; call handle.remove() first, or combine the "
            "CoreSets with trace_transfer.train.masking.combine() and apply the result once"
        )
    by_id = _resolve(model, coreset)
    core = coreset.complement() if mode == "freeze-core" else coreset

    handle = MaskHandle(model, mode, decay, masking)
    owners: dict[int, list[tuple[torch.nn.Module, str]]] = {}
    if masking != "dense":
        for module in model.modules():
            for attr, q in module._parameters.items():
                if q is not None:
                    owners.setdefault(id(q), []).append((module, attr))
    for p, names, known in by_id.values():
        handle._saved_requires_grad.append((p, p.requires_grad))
        name = known[0]
        if not any(core.num_selected(n) for n in known):
            p.requires_grad_(False)
            handle.frozen[name] = p
            continue
        p.requires_grad_(True)
        mask = _frozen_mask(core, known)
        if mask is None:
            handle.full[name] = p
            continue
        frozen, trainable = mask
        if masking == "sparse" or (masking == "auto" and trainable <= _sparse.MAX_SPARSE_SHARE * _numel(_shape(p))):
            keep, axis = _sparse_layout(frozen, _shape(p))
            handle.sparse[name] = _sparse.attach(model, name, p, keep, axis, owners[id(p)])
            continue
        if p.device.type != "meta":
            frozen = frozen.to(p.device)
        entry = _Partial(name, p, frozen, trainable)
        handle.partial[name] = entry
        if getattr(p, "_post_accumulate_grad_hooks", None):
            # Another post-accumulate hook (e.g. a DeepSpeed engine built before this call) would see
            # the gradient before ours: mask it before it is accumulated at all.
            handle._hooks.append(p.register_hook(_pre_accumulate_hook(entry)))
        else:
            handle._hooks.append(p.register_post_accumulate_grad_hook(_post_accumulate_hook(entry)))
    handle._sparse_modules = _sparse.install(list(handle.sparse.values()))
    if not handle.full and not handle.partial and not handle.sparse:
        handle.remove()
        what = "the complement of the CoreSet is empty" if mode == "freeze-core" else "the CoreSet selects nothing"
        raise ConfigError(f"apply_coreset: no trainable parameter ({what}; {coreset!r})")
    setattr(model, _ACTIVE_ATTR, handle)
    logger.info("CoreSet applied: %s", handle)
    return handle


def _sparse_layout(frozen: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, int | None]:
    """The trainable positions of a compact frozen mask: flat over the elements (axis None) for an
    element-shaped mask, else the vector along the one axis the mask spans."""
    keep = ~frozen.reshape(-1)
    if frozen.numel() == _numel(shape):
        return keep, None
    return keep, next(d for d, n in enumerate(frozen.shape) if n != 1)


# masked_fill, not multiplication by the mask: 0 * inf/nan would leak a NaN into a frozen element.


def _post_accumulate_hook(entry: _Partial):
    def hook(param: torch.Tensor) -> None:
        if param.grad is not None:
            param.grad.masked_fill_(entry.frozen_on(param.grad.device), 0)

    return hook


def _pre_accumulate_hook(entry: _Partial):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        # out of place: autograd may still use the incoming gradient elsewhere
        return grad.masked_fill(entry.frozen_on(grad.device), 0)

    return hook


def combine(
    coresets: CoreSet | Sequence[CoreSet], *, isolation: str = "none", previous: Sequence[CoreSet] = ()
) -> CoreSet:
    """The core a sequential stage trains.

    ``coresets``: the stage's CoreSet (or several, united). ``isolation="none"`` (TRACE as published):
    that core, re-training any overlap with earlier stages. ``isolation="strict"``: the core minus the
    union of ``previous`` (earlier stages' cores), so no stage can modify what an earlier one learned.

    Raises:
        ConfigError: unknown isolation, or no CoreSet given.
    """
    if isolation not in ISOLATIONS:
        raise ConfigError(f"isolation {isolation!r}: expected one of {', '.join(ISOLATIONS)}")
    current = [coresets] if isinstance(coresets, CoreSet) else list(coresets)
    if not current:
        raise ConfigError("combine(): no CoreSet given for the current stage")
    core = current[0]
    for c in current[1:]:
        core = core | c
    if isolation == "strict" and previous:
        earlier = previous[0]
        for c in previous[1:]:
            earlier = earlier | c
        core = core - earlier
    return core
