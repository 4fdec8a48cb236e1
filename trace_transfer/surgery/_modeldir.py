"""Shared plumbing of the surgery verbs: open model dirs, check they line up, write output model dirs.

Output model dirs are real HF model directories: the weights go through ``ShardedWriter`` (sharded
safetensors + index, atomic), the small non-weight files (config, generation config, tokenizer) are
copied from an input dir, and ``surgery.json`` records what was done, from what, with which versions.
"""

from __future__ import annotations

import datetime as _dt
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from trace_transfer._version import versions
from trace_transfer.checkpoint import CheckpointReader, atomic_path, fingerprint_of, open_checkpoint, write_json_atomic
from trace_transfer.errors import ArtifactError, ArtifactNotFoundError, ConfigError, ModelMismatchError

PROVENANCE_FILE = "surgery.json"
WEIGHTS_PREFIX = "model"
# Files that hold weights (any framework) are never copied: the verb writes its own weights.
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth",
                    ".ckpt", ".h5", ".msgpack", ".gguf", ".tmp")
# Records this toolkit writes next to weights (runner stages, builds, surgery): they describe the
# input dir, not the output, so they are never carried over.
_RUN_RECORDS = frozenset({"stage.json", "eval.json", "COMPLETE", "run.json", "results.json", "results.md",
                          "probe.json", "delta.json", "trace_transfer.json", PROVENANCE_FILE})


def open_model(path: str | Path, role: str = "model") -> CheckpointReader:
    """Open a model dir (or safetensors file) for streaming; the error says what is missing and why."""
    path = Path(path)
    if not path.exists():
        raise ArtifactNotFoundError(f"{role} {path} does not exist")
    if path.is_dir() and (path / "config.json").exists():
        # Outputs copy their config from here: a damaged one is named now, not copied along.
        from trace_transfer.models import read_model_config

        read_model_config(path)
    try:
        return open_checkpoint(path, prefix=WEIGHTS_PREFIX if path.is_dir() and _has_prefix(path) else None)
    except ArtifactNotFoundError as exc:
        raise ArtifactNotFoundError(
            f"{role} {path}: {exc}. The surgery verbs stream safetensors; re-save the model with "
            f"`model.save_pretrained(dir)` (safetensors is the default) and pass that dir"
        ) from None


def check_configs(paths: Sequence[str | Path | None]) -> None:
    """Refuse model dirs of which some have a config.json and some not: the output takes its config from
    the first, so a missing one would give a model dir nothing can load (or the wrong config).

    Raises:
        ArtifactError: naming the directory without config.json.
    """
    dirs = [Path(p) for p in paths if p is not None and Path(p).is_dir()]
    have = [d for d in dirs if (d / "config.json").is_file()]
    lacking = [d for d in dirs if d not in have]
    if have and lacking:
        raise ArtifactError(f"{lacking[0]} has no config.json but {have[0]} has one; restore {lacking[0] / 'config.json'} "
                            f"(the inputs must all be model directories written by save_pretrained)")


def _has_prefix(path: Path) -> bool:
    return any(path.glob(f"{WEIGHTS_PREFIX}.safetensors*")) or any(path.glob(f"{WEIGHTS_PREFIX}-*-of-*.safetensors"))


def check_same_tensors(readers: Sequence[tuple[str, CheckpointReader]]) -> list[str]:
    """Raise ModelMismatchError unless every reader has the first one's tensor names and shapes.

    Returns:
        The tensor names in the first reader's order.
    """
    label0, ref = readers[0]
    names = ref.names()
    for label, r in readers[1:]:
        for name in names:
            if name not in r:
                raise ModelMismatchError(f"tensor {name!r} of {label0} is missing from {label}; the models must "
                                         f"share one architecture and size")
            if r.shape(name) != ref.shape(name):
                raise ModelMismatchError(f"tensor {name!r} has shape {list(ref.shape(name))} in {label0} but "
                                         f"{list(r.shape(name))} in {label}; the models must share one size")
        extra = [n for n in r.names() if n not in set(names)]
        if extra:
            raise ModelMismatchError(f"tensor {extra[0]!r} of {label} is not in {label0} ({len(extra)} such tensors)")
    return names


def model_files(src: str | Path) -> list[Path]:
    """Top-level non-weight files of a model dir (config, tokenizer, generation config, ...)."""
    src = Path(src)
    if not src.is_dir():
        return []
    return sorted(p for p in src.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.name not in _RUN_RECORDS and not p.name.endswith(_WEIGHT_SUFFIXES))


def copy_model_files(src: str | Path, dst: str | Path, skip: Iterable[str] = ()) -> list[str]:
    """Copy ``model_files(src)`` into ``dst`` (atomically each); returns the names copied."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    skip = set(skip)
    copied = []
    for f in model_files(src):
        if f.name in skip:
            continue
        with atomic_path(dst / f.name) as tmp:
            shutil.copyfile(f, tmp)
        copied.append(f.name)
    return copied


def prepare_out_dir(out_dir: str | Path, inputs: Iterable[str | Path]) -> Path:
    """Create ``out_dir``; refuse to write into one of the inputs (it is being read while written)."""
    out = Path(out_dir)
    for p in inputs:
        if p is not None and Path(p).exists() and out.exists() and out.resolve() == Path(p).resolve():
            raise ConfigError(f"--out {out} is also an input; write to a new directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


def provenance(verb: str, inputs: dict[str, Any], params: dict[str, Any],
               fingerprints: dict[str, Any] | None = None) -> dict[str, Any]:
    """The provenance block every surgery artifact carries.

    ``inputs`` names each input as given (paths); ``fingerprints`` identifies it: per role a
    :func:`model_record` / :func:`coreset_record` (or a list of them).
    """
    record = {
        "verb": verb,
        "inputs": {k: (str(v) if isinstance(v, Path) else v) for k, v in inputs.items()},
        "params": params,
        "versions": versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if fingerprints is not None:
        record["fingerprints"] = fingerprints
    return record


def model_record(path: str | Path, reader: CheckpointReader) -> dict[str, Any]:
    """An input model's identity: absolute path and fingerprint (tensor names + shapes). The verb adds
    ``content_sha256`` (a :class:`~trace_transfer.checkpoint.ContentHash`) once it has streamed the
    tensors, in the JSON record it writes at the end."""
    return {"path": str(Path(path).resolve()), "fingerprint": fingerprint_of(reader)}


def coreset_record(cs: Any) -> dict[str, Any]:
    """An input CoreSet's identity: task, strategy, selected parameters, model fingerprint and — when
    it was loaded from a file — the file's absolute path and sha256."""
    m = cs.metadata
    rec = {"task": m.get("task"), "strategy": m.get("strategy"), "selected_params": cs.num_selected(),
           "fingerprint": m.get("fingerprint")}
    if cs.source is not None:
        rec.update(path=str(Path(cs.source).resolve()), sha256=cs.file_sha256())
    return rec


def write_provenance(out_dir: str | Path, record: dict[str, Any]) -> Path:
    path = Path(out_dir) / PROVENANCE_FILE
    write_json_atomic(path, record)
    return path


def parse_size(text: str | int) -> int:
    """``"2GB"``, ``"500MB"``, ``"1.5GiB"`` or a byte count → bytes (decimal and binary units)."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace(" ", "")
    units = {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4,
             "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4, "B": 1}
    for unit, factor in units.items():
        if s.endswith(unit):
            number = s[: -len(unit)]
            break
    else:
        number, factor = s, 1
    try:
        value = float(number)
    except ValueError:
        raise ConfigError(f"size {text!r} is not understood; write e.g. 2GB, 500MB, 1.5GiB or a byte count") from None
    if value <= 0:
        raise ConfigError(f"size {text!r} must be positive")
    return int(value * factor)
