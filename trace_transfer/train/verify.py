"""Check the product's core promise: every element outside the allowed core sets is bit-identical
between a base and a fine-tuned checkpoint.

Checkpoints are streamed tensor by tensor (two tensors alive at a time, never two whole models), and
compared *bitwise* — as integers of the dtype's width — so -0.0 vs 0.0, a NaN payload, or a one-ulp
bf16 change all count, and nothing is hidden by a float tolerance.

Example:
    >>> report = verify_frozen("base", "run/stage_1", ["cores/math.coreset.safetensors"])
    >>> print(report.format())
    >>> report.raise_if_changed()          # FrozenParameterChanged naming the first offender
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from trace_transfer.checkpoint import CheckpointReader, open_checkpoint
from trace_transfer.coreset import CoreSet
from trace_transfer.errors import ConfigError, FrozenParameterChanged, ModelMismatchError

__all__ = ["verify_frozen", "VerifyReport", "TensorChange"]

# Same-width integer views for a bitwise comparison.
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass
class TensorChange:
    """One tensor with changed elements outside the allowed cores."""

    name: str
    shape: list[int]
    dtype: str
    changed: int  # elements outside the cores that differ
    frozen: int  # elements outside the cores in this tensor
    max_abs_diff: float
    first_index: list[int]  # multi-index of the first offending element


@dataclass
class VerifyReport:
    """Outcome of :func:`verify_frozen`. ``ok`` is True when nothing outside the cores changed and
    every tensor could be compared (or ``allow_missing`` excused those present in one side only)."""

    base: str
    tuned: str
    coresets: list[str]
    tensors_checked: int = 0
    elements_checked: int = 0
    elements_allowed: int = 0  # core elements (free to change) among the checked tensors
    changed_in_core: int = 0  # informative: how much the allowed part actually moved
    changed_outside: int = 0
    max_abs_diff: float = 0.0
    offenders: list[TensorChange] = field(default_factory=list)
    only_in_base: list[str] = field(default_factory=list)
    only_in_tuned: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # "name: why" (shape or dtype differs)
    not_in_coresets: list[str] = field(default_factory=list)  # checked as fully frozen
    allow_missing: bool = False

    @property
    def first_offender(self) -> str | None:
        return self.offenders[0].name if self.offenders else None

    @property
    def ok(self) -> bool:
        missing = (self.only_in_base or self.only_in_tuned) and not self.allow_missing
        return self.changed_outside == 0 and not self.mismatched and not missing

    def raise_if_changed(self) -> None:
        """Raise :class:`FrozenParameterChanged` unless :attr:`ok`."""
        if not self.ok:
            raise FrozenParameterChanged(self.format())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        d["first_offender"] = self.first_offender
        return d

    def save(self, path: str | os.PathLike) -> None:
        from trace_transfer.checkpoint import write_json_atomic

        write_json_atomic(path, self.to_dict())

    def format(self, max_rows: int = 20) -> str:
        lines = [
            f"base:     {self.base}",
            f"tuned:    {self.tuned}",
            f"coresets: {', '.join(self.coresets) if self.coresets else '(none: nothing may change)'}",
            f"checked {self.tensors_checked} tensors, {self.elements_checked:,} elements "
            f"({self.elements_allowed:,} in the allowed cores, {self.changed_in_core:,} of them changed)",
        ]
        if self.offenders:
            lines.append(
                f"FAIL: {self.changed_outside:,} element(s) outside the cores changed in "
                f"{len(self.offenders)} tensor(s); max |diff| {self.max_abs_diff:.6g}; "
                f"first offending tensor: {self.first_offender}"
            )
            rows = [["tensor", "dtype", "changed", "of frozen", "max |diff|", "first index"]]
            for t in self.offenders[:max_rows]:
                rows.append([t.name, t.dtype, f"{t.changed:,}", f"{t.frozen:,}", f"{t.max_abs_diff:.6g}",
                             str(t.first_index)])
            lines += _table(rows)
            if len(self.offenders) > max_rows:
                lines.append(f"... and {len(self.offenders) - max_rows} more tensors (see --json)")
        for label, names, hint in (
            ("only in base", self.only_in_base, "not compared"),
            ("only in tuned", self.only_in_tuned, "not compared"),
        ):
            if names:
                excuse = " (allowed by --allow-missing)" if self.allow_missing else (
                    "; a tied weight (lm_head ↔ embeddings) saved by one side only? check it, then pass "
                    "--allow-missing"
                )
                lines.append(f"{label}: {len(names)} tensor(s), {hint}{excuse}: {', '.join(names[:5])}"
                             + (" ..." if len(names) > 5 else ""))
        for m in self.mismatched:
            lines.append(f"cannot compare {m}")
        if self.not_in_coresets:
            lines.append(f"not known to any CoreSet (checked as fully frozen): {', '.join(self.not_in_coresets[:5])}"
                         + (" ..." if len(self.not_in_coresets) > 5 else ""))
        lines.append("OK: every element outside the cores is bit-identical" if self.ok else "RESULT: FAIL")
        return "\n".join(lines)


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    out.insert(1, "  " + "  ".join("-" * w for w in widths))
    return out


class _Source:
    """A checkpoint path, a module or a state dict, read tensor by tensor."""

    def __init__(self, obj: Any):
        self.reader: CheckpointReader | None = None
        self.tensors: Mapping[str, torch.Tensor] | None = None
        if isinstance(obj, (str, os.PathLike)):
            self.label = str(obj)
            self.reader = open_checkpoint(obj)
        elif isinstance(obj, torch.nn.Module):
            self.label = type(obj).__name__
            self.tensors = {n: p.detach() for n, p in obj.state_dict().items()}
        elif isinstance(obj, Mapping):
            self.label = "state dict"
            self.tensors = obj
        else:
            raise ConfigError(f"cannot read a checkpoint from {type(obj).__name__}; give a path, a module or a state dict")

    def names(self) -> list[str]:
        return self.reader.names() if self.reader is not None else list(self.tensors)

    def get(self, name: str) -> torch.Tensor:
        return self.reader.get(name) if self.reader is not None else self.tensors[name].detach().cpu()

    def iter(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        if self.reader is not None:
            yield from self.reader.iter_tensors(names)
        else:
            for n in names:
                yield n, self.get(n)


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    if t.dtype == torch.bool:
        return t.view(torch.uint8)
    return t.view(_INT_VIEW[t.element_size()])


def verify_frozen(
    base: Any,
    tuned: Any,
    coresets: CoreSet | str | os.PathLike | Sequence[CoreSet | str | os.PathLike] = (),
    *,
    allow_missing: bool = False,
    aliases: Mapping[str, str] | None = None,
) -> VerifyReport:
    """Compare ``tuned`` against ``base`` and report every changed element outside the union of
    ``coresets``.

    Args:
        base, tuned: checkpoint paths (``.safetensors`` file, sharded index, HF model dir), modules, or
            state dicts. Paths are streamed tensor by tensor.
        coresets: the CoreSets whose elements were allowed to change (objects or paths). None: nothing
            may change.
        allow_missing: do not fail on tensors present in only one checkpoint (they are still listed).
        aliases: ``{checkpoint name: CoreSet name}`` for tensors the CoreSets know under another name
            (a tied ``lm_head.weight`` saved separately → ``model.embed_tokens.weight``).

    Returns:
        A :class:`VerifyReport` (``.ok``, ``.format()``, ``.raise_if_changed()``, ``.to_dict()``).

    Raises:
        ModelMismatchError: a CoreSet's tensor has a different shape than in the checkpoint.
    """
    if isinstance(coresets, (CoreSet, str, os.PathLike)):
        coresets = [coresets]
    cores = [c if isinstance(c, CoreSet) else CoreSet.load(c) for c in coresets]
    labels = [str(c) if not isinstance(c, CoreSet) else (c.metadata.get("task") or "CoreSet") for c in coresets]
    universes = [set(c.all_names()) for c in cores]
    aliases = dict(aliases or {})
    b, t = _Source(base), _Source(tuned)
    report = VerifyReport(base=b.label, tuned=t.label, coresets=labels, allow_missing=allow_missing)
    base_names, tuned_names = b.names(), set(t.names())
    report.only_in_base = [n for n in base_names if n not in tuned_names]
    report.only_in_tuned = sorted(tuned_names - set(base_names))
    common = [n for n in base_names if n in tuned_names]

    for name, a in b.iter(common):
        z = t.get(name)
        if a.shape != z.shape or a.dtype != z.dtype:
            report.mismatched.append(
                f"{name}: base {list(a.shape)} {str(a.dtype).removeprefix('torch.')}, tuned "
                f"{list(z.shape)} {str(z.dtype).removeprefix('torch.')}"
                + ("; save the tuned model in the base dtype to compare bitwise" if a.dtype != z.dtype else "")
            )
            continue
        allowed = _allowed_mask(cores, universes, aliases.get(name, name), tuple(a.shape))
        if allowed is None:
            if cores:
                report.not_in_coresets.append(name)
            allowed = torch.zeros((), dtype=torch.bool).expand(a.shape)
        changed = _bits(a) != _bits(z)
        report.tensors_checked += 1
        report.elements_checked += a.numel()
        n_allowed = int(allowed.sum())
        report.elements_allowed += n_allowed
        report.changed_in_core += int((changed & allowed).sum())
        outside = changed & ~allowed
        n_out = int(outside.sum())
        if n_out:
            diff = (z[outside].double() - a[outside].double()).abs()
            mx = float(diff.max()) if not torch.isnan(diff).any() else float("nan")
            first = [int(i) for i in outside.nonzero()[0].tolist()] if a.dim() else []
            report.offenders.append(TensorChange(name, list(a.shape), str(a.dtype).removeprefix("torch."), n_out,
                                                 a.numel() - n_allowed, mx, first))
            report.changed_outside += n_out
            if mx != mx or report.max_abs_diff != report.max_abs_diff:  # a NaN anywhere is reported as NaN
                report.max_abs_diff = float("nan")
            else:
                report.max_abs_diff = max(report.max_abs_diff, mx)
    return report


def _allowed_mask(
    cores: list[CoreSet], universes: list[set[str]], name: str, shape: tuple[int, ...]
) -> torch.Tensor | None:
    """Union of the cores' masks for one tensor; None when no CoreSet knows the tensor."""
    mask: torch.Tensor | None = None
    for cs, universe in zip(cores, universes):
        if name not in universe:
            continue
        if tuple(cs.shape(name)) != shape:
            raise ModelMismatchError(
                f"tensor {name!r} has shape {list(cs.shape(name))} in the CoreSet but {list(shape)} in the "
                f"checkpoint; the CoreSet was made for a different model"
            )
        m = cs.mask(name)
        mask = m if mask is None else mask | m
    return mask
