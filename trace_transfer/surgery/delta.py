"""Sparse task deltas: store only a task's changed core elements; rebuild tuned or base bit-identically.

A model fine-tuned under a CoreSet differs from its base in the core elements only, so one base model
can serve many tasks, each as a small delta. A delta directory holds:

* ``task_delta.safetensors`` (or shards + index), per touched tensor ``T``:
  ``idx/T`` sorted flat int64 indices of the changed elements, ``new/T`` the tuned values and
  ``old/T`` the base values at those indices (both in the tensor's own dtype, so ``revert`` is exact
  too), and ``base_sha256/T`` / ``tuned_sha256/T`` (32 bytes each) over the whole tensor's bytes;
* a header (``trace_transfer`` metadata) with the base model's fingerprint, every tensor's shape and
  dtype, the CoreSet it was cut with and the provenance (inputs as given; ``fingerprints``: base and
  tuned model paths and names+shapes fingerprints, the CoreSet's file and sha256; parameters; versions);
* ``delta.json``, the same plus per-tensor counts, the size ratio to a full checkpoint and both
  models' ``content_sha256`` (taken while streaming them);
* ``files/{base,tuned}/``: the non-weight files (config, tokenizer, ...) that differ between the two
  model dirs, so ``apply``/``revert`` rebuild the other dir's files too.

"Changed" means a different *bit pattern* (so ``-0.0`` vs ``0.0`` and NaN payloads round-trip).
Changed elements outside the CoreSet mean the model was not trained under that CoreSet: an error
unless ``allow_outside=True``, which keeps them in the delta and reports them. ``apply`` and
``revert`` refuse a model whose tensor names/shapes/dtypes or touched-tensor content hashes differ
from the ones recorded, naming the tensor, and verify their own output against the recorded hashes.

Example:
    >>> extract("base", "ft/math", "cores/math.coreset.safetensors", "deltas/math")
    >>> apply("base", "deltas/math", "rebuilt/math")     # == ft/math, bit for bit
    >>> revert("ft/math", "deltas/math", "rebuilt/base")  # == base, bit for bit
"""

from __future__ import annotations

import copy
import hashlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trace_transfer.checkpoint import (
    DEFAULT_MAX_SHARD_BYTES,
    CheckpointReader,
    ContentHash,
    ShardedWriter,
    atomic_path,
    file_sha256,
    fingerprint_of,
    open_checkpoint,
    read_json_object,
    write_json_atomic,
)
from trace_transfer.coreset import CoreSet
from trace_transfer.errors import ArtifactError, ArtifactNotFoundError, ConfigError, FrozenParameterChanged, ModelMismatchError
from trace_transfer.surgery._modeldir import (
    WEIGHTS_PREFIX,
    check_configs,
    check_same_tensors,
    copy_model_files,
    coreset_record,
    model_files,
    model_record,
    open_model,
    prepare_out_dir,
    provenance,
    write_provenance,
)
from trace_transfer.surgery.transplant import bits

__all__ = ["extract", "apply", "revert", "DeltaReport", "RebuildReport", "read_manifest", "FORMAT", "FORMAT_VERSION"]

FORMAT = "trace-transfer/delta"
FORMAT_VERSION = 1
DELTA_PREFIX = "task_delta"
MANIFEST = "delta.json"
FILES_DIR = "files"

Progress = Callable[[int, int, str], None]


@dataclass
class DeltaReport:
    """Result of :func:`extract`."""

    out_dir: Path
    per_tensor: dict[str, dict[str, Any]]
    delta_bytes: int
    full_bytes: int
    manifest: dict[str, Any]

    @property
    def ratio(self) -> float:
        """Delta size on disk over the tuned checkpoint's size on disk."""
        return self.delta_bytes / self.full_bytes if self.full_bytes else 0.0

    @property
    def changed(self) -> int:
        return sum(r["changed"] for r in self.per_tensor.values())

    @property
    def outside(self) -> int:
        return sum(r["outside"] for r in self.per_tensor.values())


@dataclass
class RebuildReport:
    """Result of :func:`apply` / :func:`revert`."""

    out_dir: Path
    direction: str
    tensors_patched: int
    elements_patched: int
    verified: bool


# --------------------------------------------------------------------------------------------------
# extract
# --------------------------------------------------------------------------------------------------


def extract(
    base: str | Path,
    tuned: str | Path,
    coreset: str | Path | CoreSet,
    out: str | Path,
    *,
    allow_outside: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: Progress | None = None,
) -> DeltaReport:
    """Store the elements where ``tuned`` differs from ``base`` (all inside ``coreset``) as a sparse delta.

    Args:
        base, tuned: model dirs (or safetensors files) with the same tensor names, shapes and dtypes.
        coreset: the CoreSet the tuned model was trained under (file or object).
        out: the delta directory to write.
        allow_outside: keep changed elements outside the CoreSet instead of failing (reported).
        max_shard_bytes: shard size cap of the delta's safetensors.
        progress: ``progress(i, n, tensor)`` after each tensor.

    Returns:
        A :class:`DeltaReport` (per-tensor counts, sizes, ``ratio`` to the full checkpoint).

    Raises:
        ModelMismatchError: names/shapes/dtypes differ, or the CoreSet does not fit the base.
        FrozenParameterChanged: elements outside the CoreSet changed and ``allow_outside`` is False.
    """
    out = prepare_out_dir(out, [base, tuned])
    if any(out.iterdir()) and not (out / MANIFEST).exists():
        raise ConfigError(f"--out {out} is not empty and holds no {MANIFEST}; give a new or an old delta directory")
    check_configs([base, tuned])
    rb, rt = open_model(base, "base model"), open_model(tuned, "tuned model")
    names = check_same_tensors([(f"base ({base})", rb), (f"tuned ({tuned})", rt)])
    for name in names:
        if rb.dtype(name) != rt.dtype(name):
            raise ModelMismatchError(
                f"tensor {name!r} is {rb.dtype(name)} in the base but {rt.dtype(name)} in the tuned model; a delta "
                f"needs both in one dtype: save the tuned model in the base's dtype (or cast the base) first"
            )
    cs = coreset if isinstance(coreset, CoreSet) else CoreSet.load(coreset)
    cs.check_fits(rb)
    core_names = set(cs.names())

    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "base_fingerprint": fingerprint_of(rb),
        "tensors": {n: [list(rb.shape(n)), rb.dtype(n)] for n in names},
        "coreset": {"path": None if isinstance(coreset, CoreSet) else str(coreset), "task": cs.metadata.get("task"),
                    "selected_params": cs.num_selected(), "fingerprint": cs.metadata.get("fingerprint")},
        "allow_outside": allow_outside,
        "provenance": provenance("delta-extract", {"base": str(base), "tuned": str(tuned), "coreset": str(coreset)},
                                 {"allow_outside": allow_outside, "max_shard_bytes": max_shard_bytes},
                                 {"base": model_record(base, rb), "tuned": model_record(tuned, rt),
                                  "coreset": coreset_record(cs)}),
    }
    per_tensor: dict[str, dict[str, Any]] = {}
    offenders: list[tuple[str, int, int]] = []
    hashes = {"base": ContentHash(), "tuned": ContentHash()}
    # The header gets the record as it is now: content hashes exist only once every tensor is read.
    with ShardedWriter(out, DELTA_PREFIX, max_shard_bytes=max_shard_bytes, metadata=copy.deepcopy(header)) as writer:
        for i, (name, b) in enumerate(rb.iter_tensors(), start=1):
            t = rt.get(name)
            hashes["base"].update(name, b)
            hashes["tuned"].update(name, t)
            bb, tb = bits(b).reshape(-1), bits(t).reshape(-1)
            changed = bb != tb
            n_changed = int(changed.sum())
            if n_changed:
                core = cs.mask(name).reshape(-1) if name in core_names else torch.zeros_like(changed)
                outside = changed & ~core
                n_out = int(outside.sum())
                if n_out and not allow_outside:
                    offenders.append((name, n_out, int(outside.nonzero()[0, 0])))
                idx = changed.nonzero().reshape(-1)  # nonzero() is row-major: sorted ascending
                writer.add(f"idx/{name}", idx.to(torch.int64))
                writer.add(f"old/{name}", bb[idx].view(b.dtype))
                writer.add(f"new/{name}", tb[idx].view(t.dtype))
                writer.add(f"base_sha256/{name}", _sha256_tensor(b))
                writer.add(f"tuned_sha256/{name}", _sha256_tensor(t))
                per_tensor[name] = {"changed": n_changed, "outside": n_out, "numel": b.numel(), "dtype": rb.dtype(name)}
            if progress is not None:
                progress(i, len(names), name)
        if offenders:
            total = sum(n for _, n, _ in offenders)
            lines = [f"{n}: {k} elements (first at flat index {first})" for n, k, first in offenders[:10]]
            if len(offenders) > 10:
                lines.append(f"... and {len(offenders) - 10} more tensors")
            raise FrozenParameterChanged(
                f"{total} changed elements of the tuned model lie outside the CoreSet "
                f"({cs.metadata.get('task') or coreset}); was it trained under a different CoreSet? "
                f"Pass --allow-outside (allow_outside=True) to store them anyway:\n  " + "\n  ".join(lines)
            )
    for role, h in hashes.items():
        header["provenance"]["fingerprints"][role]["content_sha256"] = h.hexdigest()
    delta_bytes = sum(f.stat().st_size for f in _delta_files(out))
    files = _store_differing_files(base, tuned, out)
    full_bytes = rt.nbytes()
    manifest = {
        **header,
        "per_tensor": per_tensor,
        "changed_params": sum(r["changed"] for r in per_tensor.values()),
        "outside_params": sum(r["outside"] for r in per_tensor.values()),
        "total_params": sum(_numel(s) for s, _ in header["tensors"].values()),
        "delta_bytes": delta_bytes,
        "full_checkpoint_bytes": full_bytes,
        "size_ratio": delta_bytes / full_bytes if full_bytes else 0.0,
        "files": files,
    }
    write_json_atomic(out / MANIFEST, manifest)
    return DeltaReport(out, per_tensor, delta_bytes, full_bytes, manifest)


# --------------------------------------------------------------------------------------------------
# apply / revert
# --------------------------------------------------------------------------------------------------


def apply(base: str | Path, delta: str | Path, out_dir: str | Path, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
          progress: Progress | None = None) -> RebuildReport:
    """Rebuild the tuned model from ``base`` + ``delta`` into ``out_dir`` (bit-identical to the tuned model).

    Raises:
        ModelMismatchError: ``base`` is not the model the delta was extracted from (names the tensor).
    """
    return _rebuild(base, delta, out_dir, "apply", max_shard_bytes, progress)


def revert(tuned: str | Path, delta: str | Path, out_dir: str | Path, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
           progress: Progress | None = None) -> RebuildReport:
    """Rebuild the base model from ``tuned`` − ``delta`` into ``out_dir`` (bit-identical to the base).

    Raises:
        ModelMismatchError: ``tuned`` is not the model the delta was extracted from (names the tensor).
    """
    return _rebuild(tuned, delta, out_dir, "revert", max_shard_bytes, progress)


def read_manifest(delta: str | Path) -> dict[str, Any]:
    """The delta's ``delta.json`` (counts, sizes, provenance)."""
    path = Path(delta) / MANIFEST
    if not path.exists():
        raise ArtifactNotFoundError(f"{delta} is not a delta directory (no {MANIFEST}); make one with "
                                    f"`trace-transfer delta extract`")
    manifest = read_json_object(path, "the delta is damaged: extract it again")
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not a trace-transfer delta manifest (format {manifest.get('format')!r}); "
                            f"extract the delta again")
    return manifest


def _rebuild(source: str | Path, delta: str | Path, out_dir: str | Path, direction: str, max_shard_bytes: int,
             progress: Progress | None) -> RebuildReport:
    role = "base model" if direction == "apply" else "tuned model"
    have, want = ("base", "tuned") if direction == "apply" else ("tuned", "base")
    put = "new" if direction == "apply" else "old"
    rd, header = _open_delta(delta)
    manifest = read_manifest(delta)
    rs = open_model(source, role)
    _check_recorded_tensors(rs, header["tensors"], role, delta)
    touched = [k[len("idx/"):] for k in rd.names() if k.startswith("idx/")]
    touched_set = set(touched)
    out = prepare_out_dir(out_dir, [source, delta])
    delta_id = {"path": str(Path(delta).resolve()), "manifest_sha256": file_sha256(Path(delta) / MANIFEST)}
    record = provenance(f"delta-{direction}", {have: str(source), "delta": str(delta)},
                        {"max_shard_bytes": max_shard_bytes}, {have: model_record(source, rs), "delta": delta_id})
    elements = 0
    names = rs.names()
    source_hash = ContentHash()
    with ShardedWriter(out, WEIGHTS_PREFIX, max_shard_bytes=max_shard_bytes,
                       metadata={"provenance": copy.deepcopy(record)}) as writer:
        for i, (name, x) in enumerate(rs.iter_tensors(), start=1):
            source_hash.update(name, x)
            if name in touched_set:
                if not torch.equal(_sha256_tensor(x), rd.get(f"{have}_sha256/{name}")):
                    raise ModelMismatchError(
                        f"tensor {name!r} of {role} {source} differs from the {have} model delta {delta} was "
                        f"extracted from (content hash mismatch); use the delta with the {have} model it was made "
                        f"from ({header['provenance']['inputs'].get(have)})"
                    )
                idx = rd.get(f"idx/{name}")
                flat = bits(x).reshape(-1).clone()
                flat[idx] = bits(rd.get(f"{put}/{name}"))
                x = flat.view(x.dtype).reshape(x.shape)
                # Self-check: the result must hash like the model the delta was cut from.
                if not torch.equal(_sha256_tensor(x), rd.get(f"{want}_sha256/{name}")):
                    raise ArtifactError(f"{delta}: rebuilding tensor {name!r} did not reproduce the {want} model's "
                                        f"hash; the delta is corrupted — extract it again")
                elements += idx.numel()
            writer.add(name, x)
            if progress is not None:
                progress(i, len(names), name)
        # The tensors the delta does not patch must match too, or the output is not the model the
        # delta was cut from: compare the whole-model hash recorded at extraction (before publishing).
        recorded = manifest.get("provenance", {}).get("fingerprints", {}).get(have, {}).get("content_sha256")
        if recorded and source_hash.hexdigest() != recorded:
            raise ModelMismatchError(
                f"{role} {source} differs from the {have} model delta {delta} was extracted from (whole-model "
                f"content hash mismatch, in tensors the delta does not patch); use the {have} model it was made "
                f"from ({header['provenance']['inputs'].get(have)})")
    _restore_files(source, delta, out, manifest.get("files", {}), want)
    record["fingerprints"][have]["content_sha256"] = source_hash.hexdigest()
    write_provenance(out, {**record, "tensors_patched": len(touched), "elements_patched": elements, "verified": True})
    return RebuildReport(out, direction, len(touched), elements, True)


def _open_delta(delta: str | Path) -> tuple[CheckpointReader, dict[str, Any]]:
    path = Path(delta)
    if not path.is_dir():
        raise ArtifactNotFoundError(f"delta directory {path} does not exist")
    rd = open_checkpoint(path, prefix=DELTA_PREFIX)
    header = rd.metadata
    if header.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not a trace-transfer delta (format {header.get('format')!r})")
    if int(header.get("format_version", 0)) > FORMAT_VERSION:
        raise ArtifactError(f"{path}: delta format version {header['format_version']} is newer than this "
                            f"trace-transfer supports ({FORMAT_VERSION}); upgrade trace-transfer")
    return rd, header


def _check_recorded_tensors(reader: CheckpointReader, recorded: dict[str, list], role: str, delta: Any) -> None:
    for name, (shape, dtype) in recorded.items():
        if name not in reader:
            raise ModelMismatchError(f"tensor {name!r} recorded in delta {delta} is missing from the {role}; the "
                                     f"delta was made for a different model")
        if list(reader.shape(name)) != list(shape) or reader.dtype(name) != dtype:
            raise ModelMismatchError(
                f"tensor {name!r} is {reader.dtype(name)} {list(reader.shape(name))} in the {role} but "
                f"{dtype} {list(shape)} in delta {delta}; the delta was made for a different model (or dtype)"
            )
    extra = [n for n in reader.names() if n not in recorded]
    if extra:
        raise ModelMismatchError(f"tensor {extra[0]!r} of the {role} is not recorded in delta {delta} "
                                 f"({len(extra)} such tensors); the delta was made for a different model")


# --------------------------------------------------------------------------------------------------
# non-weight files
# --------------------------------------------------------------------------------------------------


def _store_differing_files(base: str | Path, tuned: str | Path, out: Path) -> dict[str, list[str]]:
    b = {f.name: f for f in model_files(base)}
    t = {f.name: f for f in model_files(tuned)}
    files = {"differ": sorted(n for n in b.keys() & t.keys() if b[n].read_bytes() != t[n].read_bytes()),
             "tuned_only": sorted(t.keys() - b.keys()), "base_only": sorted(b.keys() - t.keys())}
    stale = out / FILES_DIR
    if stale.exists():
        shutil.rmtree(stale)
    for side, src, keys in (("tuned", t, files["differ"] + files["tuned_only"]),
                            ("base", b, files["differ"] + files["base_only"])):
        for n in keys:
            dst = out / FILES_DIR / side / n
            dst.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(dst) as tmp:
                shutil.copyfile(src[n], tmp)
    return files


def _restore_files(source: str | Path, delta: str | Path, out: Path, files: dict[str, list[str]], want: str) -> None:
    have_only = files.get("base_only" if want == "tuned" else "tuned_only", [])
    copy_model_files(source, out, skip=have_only)
    for n in files.get("differ", []) + files.get(f"{want}_only", []):
        src = Path(delta) / FILES_DIR / want / n
        with atomic_path(out / n) as tmp:
            shutil.copyfile(src, tmp)
    for n in have_only:  # left over from an earlier run into the same dir
        (out / n).unlink(missing_ok=True)


def _delta_files(out: Path) -> list[Path]:
    return [*out.glob(f"{DELTA_PREFIX}.safetensors"), *out.glob(f"{DELTA_PREFIX}-*-of-*.safetensors"),
            *out.glob(f"{DELTA_PREFIX}.safetensors.index.json")]


def _sha256_tensor(t: torch.Tensor) -> torch.Tensor:
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    return torch.frombuffer(bytearray(hashlib.sha256(raw).digest()), dtype=torch.uint8)


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
