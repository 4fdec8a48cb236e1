"""Streaming merges of model directories: slerp, lerp, transplant (and any registered method).

One tensor at a time is read from every input model, merged and handed to ``ShardedWriter``, so
memory holds one tensor per model, never a whole checkpoint. The output is an HF model dir (sharded
safetensors + index, config/tokenizer copied from the first model, ``surgery.json`` provenance with
a per-tensor report). The provenance names every input (``inputs``: paths as given) and identifies it
(``fingerprints``: per model and base its absolute path, names+shapes fingerprint and — in
``surgery.json``, taken while streaming — ``content_sha256``; per CoreSet its task, counts and, for a
file, path and sha256), with the parameters, package versions and time.

Methods (``register_merge_method`` adds more; each is one function of one tensor):

* ``slerp`` / ``lerp`` — interpolate all models (``t`` for two, ``weights`` for any number). With
  CoreSets, only the elements of their union change (``restrict="inside"``) or only the elements
  outside it (``restrict="outside"``); every other element keeps the first model's value.
* ``transplant`` — CPI-FT step 3: each model's core elements (one CoreSet per model, same order) are
  copied into a backbone; collisions follow ``collision`` (see ``transplant.py``; ``update`` here: the
  model whose element moved furthest from ``base`` wins). What fills the
  non-core elements is ``fill``: ``first`` (the first model), ``base`` (the ``base`` model),
  or ``slerp`` / ``lerp`` of all models over the non-core elements — ``fill="slerp"`` is CPI-FT
  steps 3 and 4 in one pass.

Example:
    >>> merge_models(["ft/math", "ft/code"], "merged", "slerp", options=MergeOptions(t=0.3))
    >>> merge_models(["ft/math", "ft/code"], "merged", "transplant",
    ...              coresets=["cores/math.coreset.safetensors", "cores/code.coreset.safetensors"],
    ...              options=MergeOptions(fill="slerp"))
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from trace_transfer.checkpoint import DEFAULT_MAX_SHARD_BYTES, ContentHash, ShardedWriter
from trace_transfer.coreset import CoreSet
from trace_transfer.errors import ConfigError
from trace_transfer.registry import Registry, must_be_callable
from trace_transfer.surgery._modeldir import (
    WEIGHTS_PREFIX,
    check_configs,
    check_same_tensors,
    copy_model_files,
    coreset_record,
    model_record,
    open_model,
    prepare_out_dir,
    provenance,
    write_provenance,
)
from trace_transfer.surgery.slerp import DOT_THRESHOLD, MULTI_METHODS, lerp_many, normalize_weights, slerp_many
from trace_transfer.surgery.modes import FILL_MODES, MERGE_COLLISION_RULES, RESTRICT_MODES
from trace_transfer.surgery.transplant import bits, expanded_score, transplant_tensor

__all__ = ["merge_models", "MergeOptions", "MergeReport", "TensorJob", "register_merge_method", "merge_methods",
           "MERGE_METHODS", "RESTRICT_MODES", "FILL_MODES", "MERGE_COLLISION_RULES"]



@dataclass
class MergeOptions:
    """Options of a merge; each method reads the ones it needs."""

    t: float | None = field(default=None, metadata={"help": "two models: 0 gives model 1, 1 gives model 2"})
    weights: list[float] | None = field(default=None, metadata={"help": "one non-negative weight per model"})
    per_row: bool = field(default=False, metadata={"help": "SLERP: one angle per row instead of per tensor"})
    multi: str = field(default="pairwise", metadata={"help": "SLERP over >2 models: pairwise | nlerp"})
    restrict: str = field(default="inside", metadata={"help": "with CoreSets: change only inside | outside them"})
    fill: str = field(default="first", metadata={"help": "transplant: non-core from first | base | slerp | lerp"})
    collision: str = field(default="auto", metadata={"help": "transplant collision rule: " + " | ".join(MERGE_COLLISION_RULES)})
    dot_threshold: float = field(default=DOT_THRESHOLD, metadata={"help": "SLERP: |cos| above which to lerp"})

    def __post_init__(self) -> None:
        problems = []
        if self.t is not None and self.weights is not None:
            problems.append("give either t (two models) or weights (one per model), not both")
        if self.t is not None and not 0.0 <= self.t <= 1.0:
            problems.append(f"t={self.t} is outside [0, 1]")
        for key, value, valid in (("multi", self.multi, MULTI_METHODS), ("restrict", self.restrict, RESTRICT_MODES),
                                  ("fill", self.fill, FILL_MODES), ("collision", self.collision, MERGE_COLLISION_RULES)):
            if value not in valid:
                problems.append(f"{key}={value!r} is not one of {', '.join(valid)}")
        if not 0.0 < self.dot_threshold <= 1.0:
            problems.append(f"dot_threshold={self.dot_threshold} must be in (0, 1]")
        if problems:
            raise ConfigError("invalid merge options:", problems)

    def resolved_weights(self, n: int) -> list[float]:
        if self.t is not None:
            if n != 2:
                raise ConfigError(f"t applies to exactly two models, got {n}; give --weight once per model instead")
            return [1.0 - self.t, self.t]
        return normalize_weights(self.weights, n)


@dataclass
class TensorJob:
    """Everything a merge method sees for one tensor."""

    name: str
    tensors: list[torch.Tensor]                  # one per model, in model order
    masks: list[torch.Tensor | None] | None      # per model (full shape), when CoreSets were given
    scores: list[torch.Tensor | None] | None     # per model (full shape), when those CoreSets carry scores
    base: torch.Tensor | None                    # the base model's tensor, when a base was given

    def union_mask(self) -> torch.Tensor | None:
        """Union of the per-model masks; None when no CoreSets were given (no restriction at all),
        all False when CoreSets were given but none has a core element in this tensor."""
        if self.masks is None:
            return None
        out = torch.zeros(self.tensors[0].shape, dtype=torch.bool)
        for m in self.masks:
            if m is not None:
                out |= m
        return out


MergeFn = Callable[[TensorJob, MergeOptions, dict], torch.Tensor]


# info["coresets"]: "optional" (any number restrict what changes) or "per-model" (one per model, in order)
MERGE_METHODS: Registry[MergeFn] = Registry(
    "merge method", cli_hint="METHOD", how_to_add="or register your own with register_merge_method",
    validate=must_be_callable("fn(job, options, stats) -> tensor"))


def register_merge_method(name: str, *, coresets: str = "optional", help: str = "",
                          replace: bool = False) -> Callable[[MergeFn], MergeFn]:
    """Register a merge method: ``fn(job, options, stats) -> tensor`` (``stats``: per-tensor counts to fill).

    ``coresets="per-model"`` makes one CoreSet per model mandatory (as for transplant).

    Raises:
        ConfigError: ``coresets`` is neither value, the name is malformed or taken (``replace=True``
            overrides on purpose), or ``fn`` is not callable.
    """
    if coresets not in ("optional", "per-model"):
        raise ConfigError(f"coresets={coresets!r}: expected 'optional' or 'per-model'")
    return MERGE_METHODS.register(name, description=help, replace=replace, coresets=coresets)


def merge_methods() -> dict[str, str]:
    """``{name: one-line help}`` of the registered merge methods."""
    return MERGE_METHODS.describe()


def _untouched(mask: torch.Tensor | None, opts: MergeOptions) -> bool:
    """True when a CoreSet restriction leaves nothing of this tensor to merge."""
    return mask is not None and opts.restrict == "inside" and not bool(mask.any())


@register_merge_method("slerp", help="spherical interpolation (per tensor or per row), weighted for >2 models")
def _slerp(job: TensorJob, opts: MergeOptions, stats: dict) -> torch.Tensor:
    if _untouched(job.union_mask(), opts):
        return job.tensors[0]
    return slerp_many(job.tensors, opts.resolved_weights(len(job.tensors)), method=opts.multi, per_row=opts.per_row,
                      mask=job.union_mask(), invert_mask=opts.restrict == "outside",
                      dot_threshold=opts.dot_threshold, info=stats)


@register_merge_method("lerp", help="weighted linear average")
def _lerp(job: TensorJob, opts: MergeOptions, stats: dict) -> torch.Tensor:
    if _untouched(job.union_mask(), opts):
        return job.tensors[0]
    return lerp_many(job.tensors, opts.resolved_weights(len(job.tensors)), mask=job.union_mask(),
                     invert_mask=opts.restrict == "outside")


@register_merge_method("transplant", coresets="per-model",
                       help="copy each model's core elements into one backbone (CPI-FT step 3)")
def _transplant(job: TensorJob, opts: MergeOptions, stats: dict) -> torch.Tensor:
    union = job.union_mask()  # never None: transplant requires one CoreSet per model
    if opts.fill == "base":
        backbone = job.base
    elif opts.fill in ("slerp", "lerp") and bool(union.all()):
        backbone = job.tensors[0]  # nothing outside the cores to fuse
    elif opts.fill == "slerp":
        # The non-core elements are fused; the angle is measured on them alone (see slerp.py).
        backbone = slerp_many(job.tensors, opts.resolved_weights(len(job.tensors)), method=opts.multi,
                              per_row=opts.per_row, mask=union, invert_mask=True,
                              dot_threshold=opts.dot_threshold, info=stats)
    elif opts.fill == "lerp":
        backbone = lerp_many(job.tensors, opts.resolved_weights(len(job.tensors)), mask=union, invert_mask=True)
    else:
        backbone = job.tensors[0]
    if not bool(union.any()):
        return backbone  # no model has core elements here
    scores, rule = job.scores, opts.collision
    if rule == "update":  # the donor that moved the element furthest from the base wins
        base = job.base.to(torch.float32)
        scores = [None if m is None else (t.to(torch.float32) - base).abs() for t, m in zip(job.tensors, job.masks)]
        rule = "score"
    out, row = transplant_tensor(backbone, job.tensors, job.masks, scores, rule=rule, name=job.name)
    stats.update(row)
    return out


@dataclass
class MergeReport:
    """What a merge did, per tensor and in total (also written to ``surgery.json``)."""

    out_dir: Path
    method: str
    per_tensor: dict[str, dict[str, Any]]
    record: dict[str, Any]

    def totals(self) -> dict[str, int]:
        keys = ("numel", "changed", "core", "collisions", "conflicts", "rows", "fallback_rows")
        return {k: sum(int(r.get(k) or 0) for r in self.per_tensor.values()) for k in keys}

    def collisions(self) -> dict[str, dict[str, Any]]:
        """Per-tensor rows of the tensors where cores collided."""
        return {n: r for n, r in self.per_tensor.items() if r.get("collisions")}


def merge_models(
    models: Sequence[str | Path],
    out_dir: str | Path,
    method: str = "slerp",
    *,
    coresets: Sequence[str | Path | CoreSet] | None = None,
    base: str | Path | None = None,
    options: MergeOptions | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: Callable[[int, int, str], None] | None = None,
) -> MergeReport:
    """Merge model directories tensor by tensor into ``out_dir`` (an HF model dir).

    Args:
        models: two or more model dirs of one architecture and size; the first is "model A"
            (untouched elements, dtype, config files).
        out_dir: output dir (created; must not be an input).
        method: a registered method: ``slerp``, ``lerp``, ``transplant``.
        coresets: CoreSet files/objects — for slerp/lerp any number (their union restricts what
            changes); for transplant exactly one per model, in model order.
        base: the base model dir: the backbone for ``transplant`` with ``fill="base"``, the reference
            of ``collision="update"``.
        options: :class:`MergeOptions` (t / weights, per_row, restrict, fill, collision, ...).
        max_shard_bytes: shard size cap of the written safetensors.
        progress: called as ``progress(i, n, tensor_name)`` after each tensor.

    Returns:
        A :class:`MergeReport`.

    Raises:
        ConfigError: unknown method, wrong number of CoreSets/weights, bad options.
        ModelMismatchError: the models (or a CoreSet) do not share names and shapes.
    """
    opts = options or MergeOptions()
    spec = MERGE_METHODS.entry(method)  # an unknown method fails here, before any file is read
    loaded = _check_merge_inputs(models, method, spec.info["coresets"], coresets, base, opts)
    out = prepare_out_dir(out_dir, [*models, base])
    inputs = _MergeInputs.open(models, base, loaded)
    params = {"method": method, "options": asdict(opts), "max_shard_bytes": max_shard_bytes}
    given = {"models": [str(m) for m in models], "base": str(base) if base else None,
             "coresets": [str(c) if not isinstance(c, CoreSet) else c.metadata.get("task") for c in (coresets or [])]}
    fingerprints = {"models": [model_record(p, r) for p, (_, r) in zip(models, inputs.readers)],
                    "base": model_record(base, inputs.base_reader) if inputs.base_reader else None,
                    "coresets": [coreset_record(cs) for cs in loaded]}
    record = provenance("merge", given, params, fingerprints)
    hashes = [ContentHash() for _ in inputs.readers] + ([ContentHash()] if inputs.base_reader else [])
    per_tensor: dict[str, dict[str, Any]] = {}
    # The header gets the record as it is now: content hashes exist only once every tensor is read.
    with ShardedWriter(out, WEIGHTS_PREFIX, max_shard_bytes=max_shard_bytes,
                       metadata={"provenance": copy.deepcopy(record)}) as writer:
        for i, name in enumerate(inputs.names, start=1):
            merged, per_tensor[name] = inputs.merge_one(name, spec.obj, opts, hashes)
            writer.add(name, merged)
            if progress is not None:
                progress(i, len(inputs.names), name)
    for rec, h in zip([*fingerprints["models"], fingerprints["base"]], hashes):
        rec["content_sha256"] = h.hexdigest()
    copy_model_files(models[0], out)
    report = MergeReport(out, method, per_tensor, record)
    write_provenance(out, {**record, "totals": report.totals(), "per_tensor": per_tensor})
    return report


def _check_merge_inputs(models, method: str, coreset_rule: str, coresets, base, opts: MergeOptions) -> list[CoreSet]:
    """Every check that needs no tensor, before anything is read or written; returns the loaded CoreSets."""
    if len(models) < 2:
        raise ConfigError(f"merging needs at least two --model, got {len(models)}")
    opts.resolved_weights(len(models))  # fail on bad weights before reading anything
    loaded = [c if isinstance(c, CoreSet) else CoreSet.load(c) for c in (coresets or [])]
    if coreset_rule == "per-model" and len(loaded) != len(models):
        raise ConfigError(f"{method} needs one --coreset per --model (in the same order): got {len(models)} models "
                          f"and {len(loaded)} CoreSets")
    if method == "transplant" and base is None and (opts.fill == "base" or opts.collision == "update"):
        raise ConfigError(f"transplant with {'fill' if opts.fill == 'base' else 'collision'}="
                          f"'{opts.fill if opts.fill == 'base' else opts.collision}' needs the base model (--base DIR)")
    return loaded


@dataclass
class _MergeInputs:
    """The open input models (one tensor read at a time), their shared names and the CoreSets."""

    readers: list[tuple[str, Any]]
    base_reader: Any
    names: list[str]
    loaded: list[CoreSet]
    core_names: list[set[str]]

    @classmethod
    def open(cls, models, base, loaded: list[CoreSet]) -> _MergeInputs:
        check_configs([*models, base])
        readers = [(f"model {i} ({p})", open_model(p, f"model {i}")) for i, p in enumerate(models, start=1)]
        base_reader = open_model(base, "base model") if base is not None else None
        names = check_same_tensors(readers + ([(f"base ({base})", base_reader)] if base_reader else []))
        for cs in loaded:
            cs.check_fits(readers[0][1])
        # A CoreSet absent (None) for a tensor is cheaper than an all-False mask of its full shape.
        return cls(readers, base_reader, names, loaded, [set(cs.names()) for cs in loaded])

    def merge_one(self, name: str, fn: MergeFn, opts: MergeOptions,
                  hashes: list[ContentHash]) -> tuple[torch.Tensor, dict[str, Any]]:
        """Read ``name`` from every input (hashing it on the way), merge it; the tensor and its report row."""
        tensors = [r.get(name) for _, r in self.readers]
        base_t = self.base_reader.get(name) if self.base_reader else None
        for h, t in zip(hashes, [*tensors, base_t]):
            h.update(name, t)
        masks = scores = None
        if self.loaded:
            pairs = list(zip(self.loaded, self.core_names))
            masks = [cs.mask(name) if name in cn else None for cs, cn in pairs]
            scores = [expanded_score(cs, name) if name in cn else None for cs, cn in pairs]
        stats: dict[str, Any] = {}
        merged = fn(TensorJob(name, tensors, masks, scores, base_t), opts, stats)
        stats["numel"] = merged.numel()
        stats["changed"] = int((bits(merged) != bits(tensors[0].to(merged.dtype))).sum())
        return merged, stats
