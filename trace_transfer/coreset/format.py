"""CoreSet: which parameters of a model are a task's core, at a chosen granularity.

The CoreSet is the interchange format between every stage (score → transfer → finetune → surgery)
and with users' own code. A file ``*.coreset.safetensors`` stores, per tensor, a *unit layout*
(whole tensor, slices along one axis such as rows/columns/heads, or single elements), a boolean per
unit and optionally a float32 score per unit. Element masks are stored as packed bits. Full-shape
masks are only materialised on request (``mask(name)``), one tensor at a time.

Example:
    >>> cs = CoreSet.load("cores/math.coreset.safetensors")
    >>> cs.check_fits(model)
    >>> m = cs.mask("model.layers.3.mlp.down_proj.weight")   # BoolTensor, full shape
    >>> both = cs & CoreSet.load("cores/code.coreset.safetensors")
    >>> overlap_stats(cs, other)["overall"]["jaccard"]
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from trace_transfer._version import __version__
from trace_transfer.checkpoint import (
    METADATA_KEY,
    atomic_path,
    file_sha256,
    fingerprint_of,
    named_shapes,
    save_safetensors_atomic,
)
from trace_transfer.errors import ArtifactError, ArtifactNotFoundError, ModelMismatchError

FORMAT = "trace-transfer/coreset"
FORMAT_VERSION = 1
SUFFIX = ".coreset.safetensors"

__all__ = ["CoreSet", "UnitLayout", "FORMAT_VERSION", "SUFFIX"]


@dataclass(frozen=True)
class UnitLayout:
    """How a tensor is divided into selectable units.

    ``kind="tensor"``: one unit. ``kind="axis"``: ``shape[axis] // group`` units, each a slab of
    ``group`` consecutive indices along ``axis`` (rows: axis 0, group 1; columns: axis 1; attention
    heads: axis 0 with group = head_dim). ``kind="element"``: every element is a unit.
    """

    kind: str = "tensor"
    axis: int = 0
    group: int = 1

    def __post_init__(self) -> None:
        if self.kind not in ("tensor", "axis", "element"):
            raise ValueError(f"unit layout kind {self.kind!r}: expected 'tensor', 'axis' or 'element'")
        if self.group < 1:
            raise ValueError(f"unit layout group must be >= 1, got {self.group}")

    @staticmethod
    def rows() -> UnitLayout:
        return UnitLayout("axis", 0, 1)

    @staticmethod
    def columns() -> UnitLayout:
        return UnitLayout("axis", 1, 1)

    @staticmethod
    def heads(head_dim: int, axis: int = 0) -> UnitLayout:
        return UnitLayout("axis", axis, head_dim)

    def num_units(self, shape: tuple[int, ...]) -> int:
        if self.kind == "tensor":
            return 1
        if self.kind == "element":
            return _numel(shape)
        if self.axis >= len(shape):
            raise ValueError(f"axis {self.axis} out of range for shape {tuple(shape)}")
        if shape[self.axis] % self.group:
            raise ValueError(f"dim {shape[self.axis]} of shape {tuple(shape)} is not divisible by group {self.group}")
        return shape[self.axis] // self.group

    def unit_size(self, shape: tuple[int, ...]) -> int:
        """Elements per unit."""
        return _numel(shape) // self.num_units(shape) if _numel(shape) else 0

    def expand(self, unit_values: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Broadcast per-unit values (mask or score) to the full tensor shape (a view where possible)."""
        shape = tuple(shape)
        if self.kind == "tensor":
            return unit_values.reshape(()).expand(shape)
        if self.kind == "element":
            return unit_values.reshape(shape)
        along = unit_values.repeat_interleave(self.group) if self.group > 1 else unit_values
        view = [1] * len(shape)
        view[self.axis] = shape[self.axis]
        return along.reshape(view).expand(shape)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "axis": self.axis, "group": self.group}

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> UnitLayout:
        return UnitLayout(d.get("kind", "tensor"), int(d.get("axis", 0)), int(d.get("group", 1)))


ELEMENT = UnitLayout("element")
TENSOR = UnitLayout("tensor")


def _stat(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _pack(bits: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(bits.reshape(-1).numpy().astype(np.uint8), bitorder="little"))


def _mask_digest(entry: Mapping[str, Any], mask: Any) -> str:
    """sha256 over a tensor's layout, shape and stored mask bytes (so a swapped layout changes it too)."""
    import hashlib

    h = hashlib.sha256(json.dumps([entry["layout"], list(entry["shape"])], sort_keys=True).encode())
    data = mask.numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask, dtype=np.uint8)
    data = data.reshape(-1)
    for i in range(0, data.size, 64 << 20):  # bounded copies out of a memory map
        h.update(data[i : i + (64 << 20)].tobytes())
    return h.hexdigest()


def _unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=n, bitorder="little").astype(bool))


class CoreSet:
    """Per-tensor unit masks (and optional scores) over a model's full set of tensors.

    The *universe* is every tensor of the model (names and shapes); tensors without an entry have no
    core element. Build one with :meth:`from_unit_masks` or :meth:`from_masks`, or :meth:`load` a file.
    """

    def __init__(
        self,
        shapes: Mapping[str, tuple[int, ...]],
        layouts: Mapping[str, UnitLayout],
        unit_masks: Mapping[str, torch.Tensor] | None = None,
        scores: Mapping[str, torch.Tensor] | None = None,
        metadata: Mapping[str, Any] | None = None,
        _lazy_file: Path | None = None,
    ):
        self._shapes = {n: tuple(int(d) for d in s) for n, s in shapes.items()}
        self._layouts = dict(layouts)
        self._masks: dict[str, torch.Tensor] = {}
        self._scores: dict[str, torch.Tensor] = {}
        self._file = _lazy_file
        self._file_stat: tuple[int, int, int] | None = None  # set by load()
        self._sha256: str | None = None
        # Inputs of a set-algebra result whose file hash is taken when the result is saved, so that
        # overlap statistics (which use the algebra) never hash anything.
        self._hash_on_save: list[tuple[dict[str, Any], CoreSet]] = []
        self._stored_masks: set[str] = set()
        self._stored_scores: set[str] = set()
        self._stored_counts: dict[str, int] = {}
        self.metadata: dict[str, Any] = dict(metadata or {})
        unknown = [n for n in self._layouts if n not in self._shapes]
        if unknown:
            raise ModelMismatchError(f"layout given for tensor {unknown[0]!r}, which is not in the model's tensors")
        for name, m in (unit_masks or {}).items():
            self._masks[name] = self._validated(name, m.to(torch.bool), "mask")
        for name, s in (scores or {}).items():
            self._scores[name] = self._validated(name, s.to(torch.float32), "score")

    # -- construction -----------------------------------------------------------------------------

    @classmethod
    def from_unit_masks(
        cls,
        masks: Mapping[str, torch.Tensor],
        layouts: Mapping[str, UnitLayout],
        shapes: Any,
        scores: Mapping[str, torch.Tensor] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> CoreSet:
        """Build from per-unit boolean masks.

        Args:
            masks: ``{name: BoolTensor[num_units]}``; tensors left out have no core element.
            layouts: ``{name: UnitLayout}`` for the tensors in ``masks`` (others default to whole-tensor).
            shapes: the universe — a model, a state dict, a CheckpointReader or ``{name: shape}``.
            scores: optional per-unit float scores, same keys/shapes as ``masks``.
            metadata: provenance (strategy, task, ratio, ...); counts and fingerprint are added.
        """
        universe = {n: s for n, (s, _) in named_shapes(shapes).items()}
        cs = cls(universe, layouts, masks, scores, metadata)
        cs.metadata.setdefault("fingerprint", fingerprint_of(universe))
        return cs

    @classmethod
    def from_masks(
        cls, masks: Mapping[str, torch.Tensor], shapes: Any, metadata: Mapping[str, Any] | None = None
    ) -> CoreSet:
        """Build from full-shape boolean masks (element granularity; whole-True/False tensors are
        stored compactly as whole-tensor units)."""
        layouts, unit = {}, {}
        for name, m in masks.items():
            m = m.to(torch.bool)
            if bool(m.all()) or not bool(m.any()):
                layouts[name], unit[name] = TENSOR, m.reshape(-1)[:1].clone()
            else:
                layouts[name], unit[name] = ELEMENT, m.reshape(-1).clone()
        return cls.from_unit_masks(unit, layouts, shapes, metadata=metadata)

    # -- persistence --------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> CoreSet:
        """Open a ``*.coreset.safetensors`` file; masks are read lazily, tensor by tensor.

        Raises:
            ArtifactNotFoundError: the file does not exist.
            ArtifactError: the file is not a CoreSet or of a newer format version.
        """
        path = Path(path)
        if not path.exists():
            raise ArtifactNotFoundError(f"CoreSet file not found: {path}")
        stat = _stat(path)  # before the header is read: a file replaced in between reads as changed
        try:
            with safe_open(str(path), framework="pt") as fh:
                raw = (fh.metadata() or {}).get(METADATA_KEY)
                keys = set(fh.keys())
        except Exception as exc:  # safetensors raises its own error types
            raise ArtifactError(f"{path}: not a safetensors file ({exc})") from exc
        if raw is None:
            raise ArtifactError(f"{path}: no '{METADATA_KEY}' header; was it written by CoreSet.save()?")
        try:
            header = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"{path}: the CoreSet header is not valid JSON ({exc}); the file is corrupt: "
                                f"re-create it (e.g. `trace-transfer score`)") from exc
        if not isinstance(header, dict):
            raise ArtifactError(f"{path}: the CoreSet header is not a JSON object; re-create the file")
        if header.get("format") != FORMAT:
            raise ArtifactError(f"{path}: format {header.get('format')!r} is not {FORMAT!r}")
        if int(header.get("format_version", 0)) > FORMAT_VERSION:
            raise ArtifactError(
                f"{path}: CoreSet format version {header['format_version']} is newer than this "
                f"trace-transfer supports ({FORMAT_VERSION}); upgrade trace-transfer"
            )
        tensors = header.pop("tensors", None)
        if not isinstance(tensors, dict):
            raise ArtifactError(f"{path}: the CoreSet header has no 'tensors' table; the file is corrupt: re-create it")
        try:
            shapes = {n: tuple(int(d) for d in t["shape"]) for n, t in tensors.items()}
            layouts = {n: UnitLayout.from_json(t["layout"]) for n, t in tensors.items() if "layout" in t}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ArtifactError(f"{path}: a tensor entry of the CoreSet header is malformed ({exc}); the file is "
                                f"corrupt: re-create it") from exc
        for key in ("format", "format_version"):
            header.pop(key, None)
        try:
            cs = cls(shapes, layouts, metadata=header, _lazy_file=path)
        except ArtifactError as exc:
            raise ArtifactError(f"{path}: {exc}") from exc
        cs._file_stat = stat
        cs._stored_masks = {k[len("mask/") :] for k in keys if k.startswith("mask/")}
        cs._stored_scores = {k[len("score/") :] for k in keys if k.startswith("score/")}
        # Per-tensor counts from the header answer names()/num_selected() without unpacking masks
        # (billions of element bits for a large model).
        cs._stored_counts = {n: int(t["selected"]) for n, t in tensors.items() if "selected" in t}
        cs._verify(tensors)
        return cs

    def _verify(self, entries: Mapping[str, Any]) -> None:
        """Check every stored mask against the header: its size against the layout, its count against
        ``selected`` (which answers num_selected() without unpacking) and its content hash (which
        also catches a row/column layout swapped on a square tensor). One read of the mask bytes."""
        path = self._file
        with safe_open(str(path), framework="pt") as fh:
            for name in self._stored_masks:
                if name not in self._shapes:
                    raise ArtifactError(f"{path}: mask of tensor {name!r}, which the header does not list; re-create the file")
                raw = fh.get_tensor(f"mask/{name}")
                entry = entries[name]
                digest = entry.get("sha256")
                if digest is not None and digest != _mask_digest(entry, raw):
                    raise ArtifactError(f"{path}: the mask of tensor {name!r} does not match its recorded hash; the "
                                        f"file was modified or is corrupt: re-create it")
                layout = self.layout(name)
                n_units = layout.num_units(self._shapes[name])
                want = (n_units + 7) // 8 if layout.kind == "element" else n_units
                if raw.numel() != want:
                    raise ArtifactError(f"{path}: mask of tensor {name!r} has {raw.numel()} entries but its layout "
                                        f"{layout} over shape {list(self._shapes[name])} needs {want}; the file is "
                                        f"corrupt (rows and columns swapped?): re-create it")
                units = (_unpack(raw, n_units).sum() if layout.kind == "element" else int(torch.count_nonzero(raw)))
                count = int(units) * layout.unit_size(self._shapes[name])
                if name in self._stored_counts and self._stored_counts[name] != count:
                    raise ArtifactError(f"{path}: header says tensor {name!r} has {self._stored_counts[name]} core "
                                        f"elements but its mask holds {count}; the file is corrupt: re-create it")
            for name, n in self._stored_counts.items():
                if n and name not in self._stored_masks:
                    raise ArtifactError(f"{path}: header says tensor {name!r} has {n} core elements but the file "
                                        f"stores no mask for it; the file is corrupt: re-create it")

    def save(self, path: str | Path) -> Path:
        """Write atomically to ``path`` (``.coreset.safetensors`` is appended if missing).

        A set-algebra result records the sha256 of its input files here (see :meth:`union`).
        """
        for ref, src in self._hash_on_save:
            ref["sha256"] = src.file_sha256()
        self._hash_on_save = []
        path = Path(path)
        if not path.name.endswith(SUFFIX):
            path = path.with_name(path.name.removesuffix(".safetensors") + SUFFIX)
        tensors: dict[str, torch.Tensor] = {}
        entries: dict[str, Any] = {}
        for name, shape in self._shapes.items():
            entry: dict[str, Any] = {"shape": list(shape)}
            if name in self._layouts or self._has_mask(name):
                layout = self.layout(name)
                entry["layout"] = layout.to_json()
                um = self.unit_mask(name)
                entry["selected"] = self._count(name, um)
                if bool(um.any()):
                    tensors[f"mask/{name}"] = _pack(um) if layout.kind == "element" else um.to(torch.uint8)
                    entry["sha256"] = _mask_digest(entry, tensors[f"mask/{name}"])
                s = self.score(name)
                if s is not None:
                    tensors[f"score/{name}"] = s.to(torch.float32)
            entries[name] = entry
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **self.metadata,
            "selected_params": self.num_selected(),
            "total_params": self.num_total(),
            "tool_version": self.metadata.get("tool_version", __version__),
            "tensors": entries,
        }
        meta.setdefault("fingerprint", fingerprint_of(self._shapes))
        save_safetensors_atomic(tensors, path, meta)
        return path

    @staticmethod
    def save_packed_element_masks(
        path: str | Path,
        shapes: Any,
        packed: Mapping[str, Any],
        selected: Mapping[str, int],
        metadata: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write a CoreSet of element masks that are already packed (little bit order), streaming one
        tensor at a time — for masks over billions of elements that must never be unpacked in memory
        at once. ``CoreSet.load`` reads the result like any other CoreSet file.

        Args:
            shapes: the universe (model, reader or ``{name: shape}``).
            packed: ``{name: uint8 array-like of ceil(numel/8) bytes}`` (e.g. memory maps); these
                tensors get the element layout, all others have no core element.
            selected: ``{name: number of set bits}`` for the header.
        """
        path = Path(path)
        if not path.name.endswith(SUFFIX):
            path = path.with_name(path.name.removesuffix(".safetensors") + SUFFIX)
        universe = {n: tuple(int(d) for d in s) for n, (s, _) in named_shapes(shapes).items()}
        entries: dict[str, Any] = {}
        stored: list[tuple[str, int]] = []
        for name, shape in universe.items():
            entry: dict[str, Any] = {"shape": list(shape)}
            if name in packed:
                entry["layout"] = ELEMENT.to_json()
                entry["selected"] = int(selected.get(name, 0))
                if entry["selected"]:
                    stored.append((name, (_numel(shape) + 7) // 8))
            entries[name] = entry
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **dict(metadata or {}),
            "selected_params": int(sum(entries[n].get("selected", 0) for n in entries)),
            "total_params": sum(_numel(s) for s in universe.values()),
            "tool_version": (metadata or {}).get("tool_version", __version__),
            "tensors": entries,
        }
        meta.setdefault("fingerprint", fingerprint_of(universe))
        for name, _ in stored:
            data = np.asarray(packed[name], dtype=np.uint8).reshape(-1)
            entries[name]["sha256"] = _mask_digest(entries[name], data)
        header: dict[str, Any] = {"__metadata__": {METADATA_KEY: json.dumps(meta, default=str)}}
        offset = 0
        for name, nbytes in stored:
            header[f"mask/{name}"] = {"dtype": "U8", "shape": [nbytes], "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            fh.write(len(raw).to_bytes(8, "little"))
            fh.write(raw)
            for name, nbytes in stored:
                data = np.asarray(packed[name], dtype=np.uint8).reshape(-1)
                if data.size != nbytes:
                    raise ArtifactError(f"packed mask of {name!r} has {data.size} bytes, expected {nbytes}")
                for i in range(0, nbytes, 64 << 20):  # bounded copies out of a memory map
                    fh.write(data[i : i + (64 << 20)].tobytes())
        return path

    # -- queries -------------------------------------------------------------------------------------

    @property
    def source(self) -> Path | None:
        """The file this CoreSet was loaded from (None when built in memory)."""
        return self._file

    def file_sha256(self) -> str | None:
        """sha256 of the file this CoreSet was loaded from (computed once; None when built in memory).

        Raises:
            ArtifactError: the file was replaced or modified since it was loaded.
        """
        if self._file is None:
            return None
        if self._sha256 is None:
            if _stat(self._file) != self._file_stat:
                raise ArtifactError(f"{self._file} changed since this CoreSet was loaded from it, so its content "
                                    f"hash would not describe the loaded masks; load it again")
            self._sha256 = file_sha256(self._file)
        return self._sha256

    def all_names(self) -> list[str]:
        """Every tensor of the model (the universe), in model order."""
        return list(self._shapes)

    def names(self) -> list[str]:
        """Tensors holding at least one core element."""
        return [n for n in self._shapes if self._has_mask(n) and self._selected_count(n) > 0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[self._known(name)]

    def layout(self, name: str) -> UnitLayout:
        return self._layouts.get(self._known(name), TENSOR)

    def granularity(self, name: str) -> str:
        """Human name of a tensor's layout: tensor, row, column, head(<group>), element."""
        lay = self.layout(name)
        if lay.kind != "axis":
            return lay.kind
        if lay.group > 1:
            return f"head({lay.group})"
        return "row" if lay.axis == 0 else "column" if lay.axis == 1 else f"axis{lay.axis}"

    def unit_mask(self, name: str) -> torch.Tensor:
        """Per-unit BoolTensor (length = number of units of the tensor's layout)."""
        self._known(name)
        if name not in self._masks:
            n_units = self.layout(name).num_units(self._shapes[name])
            if self._file is not None and name in self._stored_masks:
                with safe_open(str(self._file), framework="pt") as fh:
                    raw = fh.get_tensor(f"mask/{name}")
                m = _unpack(raw, n_units) if self.layout(name).kind == "element" else raw.to(torch.bool)
                self._masks[name] = self._validated(name, m, "mask")
            else:
                return torch.zeros(n_units, dtype=torch.bool)
        return self._masks[name]

    def mask(self, name: str, device: torch.device | str | None = None) -> torch.Tensor:
        """Full-shape BoolTensor of the tensor's core elements (all False if it has none)."""
        m = self.layout(name).expand(self.unit_mask(name), self._shapes[name]).contiguous()
        return m.to(device) if device is not None else m

    def score(self, name: str) -> torch.Tensor | None:
        """Per-unit float32 scores, or None when none were stored for this tensor."""
        self._known(name)
        if name not in self._scores and self._file is not None and name in self._stored_scores:
            with safe_open(str(self._file), framework="pt") as fh:
                self._scores[name] = self._validated(name, fh.get_tensor(f"score/{name}"), "score")
        return self._scores.get(name)

    def num_selected(self, name: str | None = None) -> int:
        """Number of core *elements* (parameters), in one tensor or overall."""
        if name is not None:
            return self._selected_count(name)
        return sum(self._selected_count(n) for n in self._shapes if self._has_mask(n))

    def _selected_count(self, name: str) -> int:
        if name not in self._masks and name in self._stored_counts:
            return self._stored_counts[name]
        return self._count(name, self.unit_mask(name))

    def num_total(self) -> int:
        return sum(_numel(s) for s in self._shapes.values())

    def ratio(self) -> float:
        total = self.num_total()
        return self.num_selected() / total if total else 0.0

    def check_fits(self, model_or_shapes: Any) -> None:
        """Raise ModelMismatchError naming the first tensor whose name or shape does not match."""
        if isinstance(model_or_shapes, torch.nn.Module):
            # ds_shape: a model loaded partitioned (ZeRO-3) has empty placeholders with the real shape aside.
            other = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in model_or_shapes.named_parameters()}
        else:
            other = {n: s for n, (s, _) in named_shapes(model_or_shapes).items()}
        source = self._file or self.metadata.get("task") or "CoreSet"
        for name, shape in self._shapes.items():
            if name not in other:
                raise ModelMismatchError(
                    f"{source}: tensor {name!r} of the CoreSet is not in the model; the CoreSet was made for "
                    f"a different architecture (use `trace-transfer transfer` to map it)"
                )
            if tuple(other[name]) != shape:
                raise ModelMismatchError(
                    f"{source}: tensor {name!r} has shape {list(shape)} in the CoreSet but "
                    f"{list(other[name])} in the model; the CoreSet was made for a different model size"
                )
        extra = [n for n in other if n not in self._shapes]
        if extra:
            raise ModelMismatchError(
                f"{source}: model tensor {extra[0]!r} is not in the CoreSet ({len(extra)} such tensors); "
                f"the CoreSet was made for a different model"
            )

    # -- algebra -------------------------------------------------------------------------------------

    def _binary(self, other: CoreSet, op: str) -> CoreSet:
        if self._shapes != other._shapes:
            diff = next(
                (n for n in {**self._shapes, **other._shapes} if self._shapes.get(n) != other._shapes.get(n)), None
            )
            raise ModelMismatchError(f"CoreSets are over different models; first differing tensor: {diff!r}")
        layouts, masks, scores = {}, {}, {}
        for name in self._shapes:
            if not (self._has_mask(name) or other._has_mask(name)):
                continue
            la, lb = self.layout(name), other.layout(name)
            if la == lb:
                a, b = self.unit_mask(name), other.unit_mask(name)
                layout = la
            else:  # different granularities meet at element level
                a, b = self.mask(name).reshape(-1), other.mask(name).reshape(-1)
                layout = ELEMENT
            m = {"or": a | b, "and": a & b, "sub": a & ~b}[op]
            layouts[name], masks[name] = layout, m
            if la == lb:
                sa, sb = self.score(name), other.score(name)
                if sa is not None and sb is not None and op == "or":
                    scores[name] = torch.maximum(sa, sb)
                elif sa is not None:
                    scores[name] = sa
        return self._derived({"or": "union", "and": "intersection", "sub": "difference"}[op], [self, other],
                             layouts, masks, scores)

    def union(self, other: CoreSet) -> CoreSet:
        """Elements core in either. The result's metadata records its provenance: ``operation``,
        ``inputs`` (per input: task, strategy, selected parameters and — for an input loaded from a
        file — its absolute path and sha256, taken when the result is saved; an unsaved algebra result
        as input nests its own ``operation``/``inputs``, or is flattened into the same associative
        operation, so ``a | b | c`` lists three inputs), ``tool_version`` and ``created`` (UTC)."""
        return self._binary(other, "or")

    def intersection(self, other: CoreSet) -> CoreSet:
        """Elements core in both (provenance as for :meth:`union`)."""
        return self._binary(other, "and")

    def difference(self, other: CoreSet) -> CoreSet:
        """Elements core in this CoreSet but not in ``other`` (provenance as for :meth:`union`)."""
        return self._binary(other, "sub")

    def complement(self) -> CoreSet:
        """Every element of the model that is *not* core (tensors without entries become fully core)."""
        layouts, masks = {}, {}
        for name, shape in self._shapes.items():
            layout = self.layout(name)
            layouts[name], masks[name] = layout, ~self.unit_mask(name)
        return self._derived("complement", [self], layouts, masks, None)

    def _derived(self, op: str, operands: list[CoreSet], layouts, masks, scores) -> CoreSet:
        inputs: list[dict[str, Any]] = []
        hash_on_save: list[tuple[dict[str, Any], CoreSet]] = []
        for cs in operands:
            m = cs.metadata
            hash_on_save += cs._hash_on_save
            if cs._file is None and op in ("union", "intersection") and m.get("operation") == op:
                inputs += m["inputs"]  # the same dicts, so the hashes still to take land in them
                continue
            ref: dict[str, Any] = {k: m[k] for k in ("task", "strategy") if m.get(k) is not None}
            ref["selected_params"] = cs.num_selected()
            if cs._file is not None:
                ref.update(file=str(cs._file.resolve()), sha256=cs._sha256)
                if cs._sha256 is None:
                    hash_on_save.append((ref, cs))
            elif m.get("operation"):
                ref.update(operation=m["operation"], inputs=m.get("inputs", []))
            inputs.append(ref)
        meta = {
            "strategy": op,
            "operation": op,
            "inputs": inputs,
            "operands": [ref.get("task") for ref in inputs],
            "fingerprint": self.metadata.get("fingerprint") or fingerprint_of(self._shapes),
            "tool_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(),
        }
        out = CoreSet(self._shapes, layouts, masks, scores, meta)
        out._hash_on_save = hash_on_save
        return out

    __or__ = union
    __and__ = intersection
    __sub__ = difference
    __invert__ = complement

    def jaccard(self, other: CoreSet) -> float:
        inter = self.intersection(other).num_selected()
        union = self.union(other).num_selected()
        return inter / union if union else 0.0

    def __repr__(self) -> str:
        return (
            f"CoreSet(task={self.metadata.get('task')!r}, strategy={self.metadata.get('strategy')!r}, "
            f"selected={self.num_selected():,}/{self.num_total():,} ({100 * self.ratio():.2f}%), "
            f"tensors={len(self.names())}/{len(self._shapes)})"
        )

    # -- internals -----------------------------------------------------------------------------------

    def _known(self, name: str) -> str:
        if name not in self._shapes:
            raise KeyError(f"tensor {name!r} is not in this CoreSet's model ({len(self._shapes)} tensors)")
        return name

    def _has_mask(self, name: str) -> bool:
        return name in self._masks or name in self._stored_masks

    def _count(self, name: str, unit_mask: torch.Tensor) -> int:
        return int(torch.count_nonzero(unit_mask)) * self.layout(name).unit_size(self._shapes[name])

    def _validated(self, name: str, values: torch.Tensor, what: str) -> torch.Tensor:
        self._known(name)
        n = self.layout(name).num_units(self._shapes[name])
        if values.numel() != n:
            raise ArtifactError(
                f"{what} of tensor {name!r} has {values.numel()} entries; its layout "
                f"{self.layout(name)} over shape {list(self._shapes[name])} has {n} units"
            )
        return values.reshape(n)
