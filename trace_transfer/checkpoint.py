"""Streaming safetensors I/O: read sharded checkpoints one shard at a time, write atomically.

Why: Δ, Fisher and model checkpoints of real targets are tens of GB. Every stage of the pipeline
reads them tensor by tensor (never two full checkpoints in memory) and writes through a temp file
that is renamed only once complete, so an interrupted run never leaves a truncated artifact that a
later run would trust.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from trace_transfer.errors import ArtifactError, ArtifactNotFoundError

METADATA_KEY = "trace_transfer"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


# --------------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path in the same directory; rename it onto ``path`` only if the block succeeds.

    Example:
        >>> with atomic_path("out/x.safetensors") as tmp:
        ...     save_file(tensors, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _publish(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def check_output(path: str | os.PathLike, force: bool = False, what: str = "output") -> Path:
    """Refuse an output path that already holds something (unless ``force``) or cannot be written.

    Called before any work, so a command never overwrites what it did not create and never fails
    only after the work is done. An empty existing directory counts as free.

    Raises:
        ArtifactError: ``path`` exists (and ``force`` is off), lies under a file, or is not writable.
    """
    path = Path(path)
    if path.exists() and not force and (path.is_file() or any(path.iterdir())):
        raise ArtifactError(f"{what} {path} already exists; pass --force to overwrite it or choose another path")
    parent = path if path.is_dir() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ArtifactError(f"cannot write {what} {path}: {parent} is a file, not a directory; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ArtifactError(f"cannot write {what} {path}: {parent} is not writable; choose another path")
    return path


@contextlib.contextmanager
def output_dir(path: str | os.PathLike, force: bool = False, what: str = "output directory") -> Iterator[Path]:
    """:func:`check_output`, then create ``path``; remove the directories created here if the block fails.

    A failed command thus leaves no empty output directory behind, and never removes one it did not
    create (nor anything in it).
    """
    path = Path(check_output(path, force, what))
    created = []
    p = path
    while not p.exists():
        created.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        if created:  # the outermost directory made here, with whatever the failed command wrote into it
            import shutil

            shutil.rmtree(created[-1], ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(tmp: Path, target: Path) -> None:
    """Rename a finished temp file onto its target with ordinary permissions (mkstemp makes 0600)."""
    if tmp.exists():
        os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, target)


def read_json_object(path: str | os.PathLike, fix: str) -> dict[str, Any]:
    """A JSON object from an artifact file; a damaged file is an ArtifactError naming it and ``fix``
    (the next step, e.g. "re-run `trace-transfer probe`"), not a JSONDecodeError traceback."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc}); {fix}") from None
    if not isinstance(obj, dict):
        raise ArtifactError(f"{path}: expected a JSON object, got {type(obj).__name__}; {fix}")
    return obj


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON through a temp file."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def save_safetensors_atomic(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, Any] | None = None
) -> None:
    """``safetensors.torch.save_file`` through a temp file; ``metadata`` is stored as JSON."""
    header = {METADATA_KEY: json.dumps(metadata, default=_json_default)} if metadata is not None else None
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata=header)


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


class CheckpointReader:
    """Lazy view over one safetensors file or a sharded set with an index.

    Only tensor headers are read at construction; ``get`` opens the shard holding a tensor.
    ``iter_tensors`` walks shard by shard so each file is opened once.
    """

    def __init__(self, files: list[Path], weight_map: dict[str, Path] | None = None):
        if not files:
            raise ArtifactNotFoundError("no .safetensors files given")
        self.files = files
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, str] = {}
        self._where: dict[str, Path] = {}
        self.metadata: dict[str, Any] = {}
        for f in files:
            with open_safetensors(f) as fh:
                meta = fh.metadata() or {}
                if METADATA_KEY in meta and not self.metadata:
                    try:
                        self.metadata = json.loads(meta[METADATA_KEY])
                    except json.JSONDecodeError as exc:
                        raise ArtifactError(f"{f}: metadata '{METADATA_KEY}' is not valid JSON: {exc}") from exc
                for name in fh.keys():
                    if name in self._where:
                        raise ArtifactError(f"tensor {name!r} appears in both {self._where[name]} and {f}")
                    sl = fh.get_slice(name)
                    self._shapes[name] = tuple(sl.get_shape())
                    self._dtypes[name] = sl.get_dtype()
                    self._where[name] = f
        if weight_map is not None:
            missing = [n for n in weight_map if n not in self._where]
            if missing:
                raise ArtifactError(f"index lists tensors missing from the shards, first: {missing[0]!r}")

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[self._check(name)]

    def dtype(self, name: str) -> str:
        return self._dtypes[self._check(name)]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def get(self, name: str) -> torch.Tensor:
        with open_safetensors(self._where[self._check(name)]) as fh:
            return fh.get_tensor(name)

    def iter_tensors(self, names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` shard by shard (file order), one tensor alive at a time."""
        wanted = set(names) if names is not None else None
        for f in self.files:
            with open_safetensors(f) as fh:
                for name in fh.keys():
                    if wanted is None or name in wanted:
                        yield name, fh.get_tensor(name)

    def _check(self, name: str) -> str:
        if name not in self._where:
            raise KeyError(f"tensor {name!r} not in checkpoint {self.files[0].parent} ({len(self)} tensors)")
        return name


def open_safetensors(path: str | os.PathLike, framework: str = "pt"):
    """``safe_open`` whose failure (truncated or foreign file: safetensors' own error types) is an ArtifactError."""
    try:
        return safe_open(str(path), framework=framework)
    except Exception as exc:
        raise ArtifactError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                            f"it is truncated or corrupt: rewrite it with the command that made it") from exc


def open_checkpoint(path: str | os.PathLike, prefix: str | None = None) -> CheckpointReader:
    """Open a safetensors file, a sharded set (``*.safetensors.index.json``) or a directory of them.

    Args:
        path: a ``.safetensors`` file, an index json, or a directory (an HF model dir, a probe dir).
        prefix: in a directory holding several artifacts (``delta``, ``fisher``), which one to open.

    Raises:
        ArtifactNotFoundError: nothing matching exists.
    """
    path = Path(path)
    if not path.exists():
        raise ArtifactNotFoundError(f"checkpoint not found: {path}")
    if path.is_file():
        if path.name.endswith(".index.json"):
            return _from_index(path)
        return CheckpointReader([path])
    candidates = [prefix] if prefix else ["model", "delta", "fisher"]
    for stem in candidates:
        index = path / f"{stem}.safetensors.index.json"
        if index.exists():
            return _from_index(index)
        single = path / f"{stem}.safetensors"
        if single.exists():
            return CheckpointReader([single])
        shards = sorted(path.glob(f"{stem}-*-of-*.safetensors"))
        if shards:
            return CheckpointReader(shards)
    if prefix is None:
        files = sorted(path.glob("*.safetensors"))
        if files:
            return CheckpointReader(files)
    what = f"'{prefix}.safetensors' or its shards" if prefix else "*.safetensors files"
    raise ArtifactNotFoundError(f"no {what} in {path}")


def _from_index(index_path: Path) -> CheckpointReader:
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise ArtifactError(f"{index_path}: not a safetensors index (needs a 'weight_map'): {exc}") from exc
    files = sorted({index_path.parent / f for f in weight_map.values()})
    missing = [f for f in files if not f.exists()]
    if missing:
        raise ArtifactNotFoundError(f"{index_path} names shard {missing[0].name}, which does not exist")
    return CheckpointReader(files, {k: index_path.parent / v for k, v in weight_map.items()})


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


class ShardedWriter:
    """Write tensors one by one into size-capped shards, atomically, with an HF-style index.

    A single shard is written as ``{prefix}.safetensors`` (no index); several as
    ``{prefix}-00001-of-00003.safetensors`` plus ``{prefix}.safetensors.index.json``. Files become
    visible only on ``close()``; an exception inside the ``with`` block leaves nothing behind.

    Example:
        >>> with ShardedWriter(out_dir, "delta", metadata={"task": "math"}) as w:
        ...     for name, t in tensors:
        ...         w.add(name, t)
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        prefix: str,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        metadata: Mapping[str, Any] | None = None,
    ):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.max_shard_bytes = max_shard_bytes
        self.metadata = dict(metadata or {})
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._tmp_shards: list[tuple[Path, list[str]]] = []
        self._names: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ArtifactError(f"tensor {name!r} written twice to {self.prefix}")
        self._names.add(name)
        t = tensor.detach().contiguous().cpu()
        size = t.numel() * t.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = t
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        if not self._pending:
            return
        fd, tmp = tempfile.mkstemp(prefix=f".{self.prefix}.", suffix=".tmp", dir=self.out_dir)
        os.close(fd)
        header = {METADATA_KEY: json.dumps(self.metadata, default=_json_default)}
        save_file(self._pending, tmp, metadata=header)
        self._tmp_shards.append((Path(tmp), list(self._pending)))
        self._pending = {}
        self._pending_bytes = 0

    def close(self) -> list[Path]:
        self._flush()
        if not self._tmp_shards:  # an empty artifact is still a valid file
            self._pending = {}
            fd, tmp = tempfile.mkstemp(prefix=f".{self.prefix}.", suffix=".tmp", dir=self.out_dir)
            os.close(fd)
            save_file({}, tmp, metadata={METADATA_KEY: json.dumps(self.metadata, default=_json_default)})
            self._tmp_shards.append((Path(tmp), []))
        n = len(self._tmp_shards)
        # Remove stale outputs of an earlier run under the same prefix so readers never mix them.
        for old in self.out_dir.glob(f"{self.prefix}-*-of-*.safetensors"):
            old.unlink()
        final: list[Path] = []
        if n == 1:
            target = self.out_dir / f"{self.prefix}.safetensors"
            _publish(self._tmp_shards[0][0], target)
            stale_index = self.out_dir / f"{self.prefix}.safetensors.index.json"
            if stale_index.exists():
                stale_index.unlink()
            final.append(target)
        else:
            weight_map = {}
            for i, (tmp, names) in enumerate(self._tmp_shards, start=1):
                target = self.out_dir / f"{self.prefix}-{i:05d}-of-{n:05d}.safetensors"
                _publish(tmp, target)
                final.append(target)
                weight_map.update({name: target.name for name in names})
            single = self.out_dir / f"{self.prefix}.safetensors"
            if single.exists():
                single.unlink()
            write_json_atomic(
                self.out_dir / f"{self.prefix}.safetensors.index.json",
                {"metadata": {"total_size": self.total_bytes, METADATA_KEY: self.metadata}, "weight_map": weight_map},
            )
        self._tmp_shards = []
        return final

    def abort(self) -> None:
        for tmp, _ in self._tmp_shards:
            tmp.unlink(missing_ok=True)
        self._tmp_shards = []
        self._pending = {}

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# safetensors dtype codes (the format's own names), for writers that lay out a file before its tensors exist
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", **({torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
                           if hasattr(torch, "float8_e5m2") else {}),
}


class StreamingShardWriter:
    """Safetensors shards laid out up front from names, shapes and dtypes, so every tensor goes to disk
    the moment it is added and the writer never holds one: memory stays at the caller's one tensor,
    whatever the checkpoint's size (a ZeRO-3 save gathers one parameter at a time and hands it here).

    Same file names as :class:`ShardedWriter` and HF ``save_pretrained`` (``{prefix}.safetensors``, or
    ``{prefix}-00001-of-0000N.safetensors`` + ``{prefix}.safetensors.index.json``), shards filled in
    ``layout`` order up to ``max_shard_bytes``. Tensors may be added in any order, each exactly once;
    files become visible only on ``close()``, and an exception inside the ``with`` block leaves nothing.

    Example:
        >>> layout = [(n, p.shape, p.dtype) for n, p in model.named_parameters()]
        >>> with StreamingShardWriter(out_dir, "model", layout, header={"format": "pt"}) as w:
        ...     for name, p in model.named_parameters():
        ...         w.add(name, p)
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        prefix: str,
        layout: list[tuple[str, Any, torch.dtype]],
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        header: Mapping[str, str] | None = None,
    ):
        import sys

        if sys.byteorder != "little":  # safetensors is little-endian; the raw bytes are written as they are
            raise ArtifactError("StreamingShardWriter writes raw tensor bytes and needs a little-endian host")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.header = {str(k): str(v) for k, v in (header or {}).items()}
        self._where: dict[str, tuple[int, int, int, tuple[int, ...], torch.dtype]] = {}  # shard, start, end
        shards: list[list[str]] = [[]]
        size = 0
        for name, shape, dtype in layout:
            if name in self._where:
                raise ArtifactError(f"tensor {name!r} appears twice in the layout of {prefix}")
            if dtype not in SAFETENSORS_DTYPES:
                raise ArtifactError(f"tensor {name!r}: dtype {dtype} has no safetensors code")
            shape = tuple(int(d) for d in shape)
            nbytes = _numel(shape) * torch.empty((), dtype=dtype).element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            self._where[name] = (len(shards) - 1, size, size + nbytes, shape, dtype)
            shards[-1].append(name)
            size += nbytes
        self.total_bytes = sum(end - start for _, start, end, _, _ in self._where.values())
        self._shards = shards
        self._written: set[str] = set()
        self._files: list[tuple[Path, Any, int]] = []  # temp path, open file, offset of the data section
        try:
            for names in shards:
                self._files.append(self._open_shard(names))
        except BaseException:
            self.abort()
            raise

    def _open_shard(self, names: list[str]) -> tuple[Path, Any, int]:
        head: dict[str, Any] = {"__metadata__": self.header} if self.header else {}
        for name in names:
            _, start, end, shape, dtype = self._where[name]
            head[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [start, end]}
        text = json.dumps(head, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
        fd, tmp = tempfile.mkstemp(prefix=f".{self.prefix}.", suffix=".tmp", dir=self.out_dir)
        f = os.fdopen(fd, "wb")
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        data_start = 8 + len(text)
        f.truncate(data_start + (self._where[names[-1]][2] if names else 0))
        return Path(tmp), f, data_start

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor`` at its place in its shard; nothing of it is kept."""
        if name not in self._where:
            raise ArtifactError(f"tensor {name!r} is not in the layout of {self.prefix}")
        if name in self._written:
            raise ArtifactError(f"tensor {name!r} written twice to {self.prefix}")
        shard, start, end, shape, dtype = self._where[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ArtifactError(f"tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}, but the layout of "
                                f"{self.prefix} says {shape} {dtype}")
        _, f, data_start = self._files[shard]
        if end > start:
            t = tensor.detach().to("cpu").contiguous()
            f.seek(data_start + start)
            f.write(t.reshape(-1).view(torch.uint8).numpy())  # the tensor's own bytes: no copy
        self._written.add(name)

    def close(self) -> list[Path]:
        missing = [n for n in self._where if n not in self._written]
        if missing:
            self.abort()
            raise ArtifactError(f"{self.prefix}: {len(missing)} tensor(s) of the layout were never written "
                                f"(first: {missing[0]!r}); nothing was saved")
        for _, f, _ in self._files:
            f.flush()
            os.fsync(f.fileno())
            f.close()
        n = len(self._files)
        for old in self.out_dir.glob(f"{self.prefix}-*-of-*.safetensors"):
            old.unlink()
        final: list[Path] = []
        single = self.out_dir / f"{self.prefix}.safetensors"
        index = self.out_dir / f"{self.prefix}.safetensors.index.json"
        if n == 1:
            _publish(self._files[0][0], single)
            index.unlink(missing_ok=True)
            final.append(single)
        else:
            weight_map = {}
            for i, ((tmp, _, _), names) in enumerate(zip(self._files, self._shards), start=1):
                target = self.out_dir / f"{self.prefix}-{i:05d}-of-{n:05d}.safetensors"
                _publish(tmp, target)
                final.append(target)
                weight_map.update({name: target.name for name in names})
            single.unlink(missing_ok=True)
            write_json_atomic(index, {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map})
        self._files = []
        return final

    def abort(self) -> None:
        for tmp, f, _ in self._files:
            f.close()
            tmp.unlink(missing_ok=True)
        self._files = []

    # ShardedWriter's context protocol: close() when the block succeeds, abort() when it raises
    __enter__ = ShardedWriter.__enter__
    __exit__ = ShardedWriter.__exit__


# --------------------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------------------


def named_shapes(source: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, dtype)}`` of a model (its parameters), a state dict, a reader or a shapes dict."""
    if isinstance(source, torch.nn.Module):
        return {n: (tuple(p.shape), _dtype_name(p.dtype)) for n, p in source.named_parameters()}
    if isinstance(source, CheckpointReader):
        return {n: (source.shape(n), source.dtype(n).lower()) for n in source.names()}
    out = {}
    for name, value in dict(source).items():
        if isinstance(value, torch.Tensor):
            out[name] = (tuple(value.shape), _dtype_name(value.dtype))
        elif isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[1], str):
            out[name] = (tuple(value[0]), value[1])
        else:
            out[name] = (tuple(value), "")
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def fingerprint_of(source: Any) -> dict[str, Any]:
    """Names + shapes of a model's tensors and a sha256 over them (dtype-agnostic: a bf16 and an fp32
    copy of one model share a fingerprint, since masks and deltas address the same elements)."""
    shapes = {n: list(s) for n, (s, _) in named_shapes(source).items()}
    digest = hashlib.sha256(json.dumps(sorted(shapes.items())).encode()).hexdigest()
    return {"hash": digest, "num_tensors": len(shapes), "num_params": sum(_numel(s) for s in shapes.values())}


class ContentHash:
    """A model's content hash, taken while a verb streams its tensors anyway (no extra read).

    sha256 over the name-sorted list of ``[name, dtype, shape, sha256 of the tensor's bytes]``, so it
    does not depend on the order the tensors are read in nor on how the checkpoint is sharded: every
    verb that streams the same model records the same hash.

    Example:
        >>> h = ContentHash()
        >>> for name, t in reader.iter_tensors():
        ...     h.update(name, t)
        >>> h.hexdigest()
    """

    def __init__(self) -> None:
        self._rows: dict[str, list[Any]] = {}

    def update(self, name: str, tensor: torch.Tensor) -> None:
        raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._rows[name] = [name, _dtype_name(tensor.dtype), list(tensor.shape), hashlib.sha256(raw).hexdigest()]

    def hexdigest(self) -> str:
        return hashlib.sha256(json.dumps(sorted(self._rows.values())).encode()).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file's bytes, read in 16 MiB blocks: the content hash provenance records."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(16 << 20):
            h.update(block)
    return h.hexdigest()


def _numel(shape: list[int] | tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
