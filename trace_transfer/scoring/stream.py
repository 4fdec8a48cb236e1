"""Zero-copy, bounded-memory windows over the tensors of safetensors checkpoints.

Scoring walks Δ and Fisher files several times (normalisation, threshold search, masks). Reading
through ``read()`` copies every byte from the page cache into a buffer; mapping a window of the file
and viewing it as a tensor reads the page-cache pages in place (about 4x faster on a warm cache,
measured in ``bench/scoring.py``). Each window is a separate small mapping released as soon as its
tensor is dropped, so resident memory stays at a few windows whatever the checkpoint size — mapping
whole files would count every touched page of a multi-GB file in the process's RSS.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct
from collections.abc import Iterator
from collections.abc import Iterator as _Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trace_transfer.checkpoint import CheckpointReader
from trace_transfer.errors import ArtifactError

__all__ = ["TensorSource", "DEFAULT_CHUNK_ELEMS", "single_threaded"]

# 1M elements (4 MB of fp32): large enough to amortise per-call overhead, small enough that the
# few temporaries of a scoring step stay in the CPU caches.
DEFAULT_CHUNK_ELEMS = 1 << 20

_NP_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.int16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


@contextlib.contextmanager
def single_threaded() -> _Iterator[None]:
    """Run torch ops on one thread inside the block. Streaming work is a long series of small,
    cache-sized ops where intra-op threads spend more on synchronisation than they gain; on a shared
    machine they collapse (measured: 4 MB windows summed at 3.5 GB/s with 2 threads under load vs
    13 GB/s with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the first element in the file
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def _read_header(path: Path) -> dict[str, _Entry]:
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        out[name] = _Entry(path, info["dtype"], tuple(info["shape"]), base + a, b - a)
    return out


class TensorSource:
    """Windows (flat element ranges) of a checkpoint's tensors as float32 CPU tensors.

    Example:
        >>> src = TensorSource(open_checkpoint(probe_dir, prefix="delta"))
        >>> for start, stop, x in src.chunks("model.layers.0.mlp.up_proj.weight"):
        ...     total += x.square().sum()
    """

    def __init__(self, reader: CheckpointReader, nonnegative: bool = False):
        self.reader = reader
        # Values are checked once per tensor, on first read: a NaN or Inf in Δ (or a negative Fisher)
        # would otherwise become a score of 0 or a wrong rank and silently skew every task's core.
        self.nonnegative = nonnegative
        self._checked: set[str] = set()
        self._entries: dict[str, _Entry] = {}
        for f in reader.files:
            for name, e in _read_header(Path(f)).items():
                if name in self._entries:
                    raise ArtifactError(f"tensor {name!r} appears in both {self._entries[name].file} and {f}")
                if e.dtype not in _NP_DTYPES:
                    raise ArtifactError(f"{f}: tensor {name!r} has dtype {e.dtype}, which scoring cannot read")
                self._entries[name] = e
        self._fds: dict[Path, int] = {}

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def numel(self, name: str) -> int:
        return self._entry(name).numel

    def nbytes(self, names: list[str] | None = None) -> int:
        return sum(self._entries[n].nbytes for n in (names if names is not None else self._entries))

    def window(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements ``[start, stop)`` of the flattened tensor, as float32 (a view of the page cache
        when the file is fp32; a converted copy otherwise)."""
        e = self._entry(name)
        if name not in self._checked:
            self._check_values(name)
        if not 0 <= start <= stop <= e.numel:
            raise IndexError(f"window [{start}, {stop}) out of range for {name!r} with {e.numel} elements")
        if stop == start:
            return torch.zeros(0, dtype=torch.float32)
        np_dtype = _NP_DTYPES[e.dtype]
        item = np.dtype(np_dtype).itemsize
        lo = e.start + start * item
        hi = e.start + stop * item
        aligned = lo - lo % mmap.ALLOCATIONGRANULARITY
        # ACCESS_COPY (a private mapping) gives numpy a writable buffer without copying anything
        # until a page is written, which we never do.
        mm = mmap.mmap(self._fd(e.file), hi - aligned, access=mmap.ACCESS_COPY, offset=aligned)
        arr = np.frombuffer(mm, dtype=np_dtype, count=stop - start, offset=lo - aligned)
        t = torch.from_numpy(arr)
        if e.dtype == "BF16":
            t = t.view(torch.bfloat16)
        return t if t.dtype == torch.float32 else t.float()

    def strided_blocks(self, name: str, start: int, stop: int, block: int, stride: int) -> torch.Tensor:
        """Every ``stride``-th block of ``block`` elements in ``[start, stop)`` (float32, concatenated).

        Read with ``pread`` rather than a mapping: touching one page in 16 of a mapping still makes
        the kernel map its neighbours (fault-around, 64 KB), which costs nearly a full pass.
        """
        e = self._entry(name)
        if name not in self._checked:
            self._check_values(name)
        np_dtype = _NP_DTYPES[e.dtype]
        item = np.dtype(np_dtype).itemsize
        starts = range(start, stop - block + 1, block * stride)
        out = np.empty(len(starts) * block, dtype=np_dtype)
        raw = memoryview(out).cast("B")
        fd = self._fd(e.file)
        size = block * item
        for j, s in enumerate(starts):
            if os.preadv(fd, [raw[j * size : (j + 1) * size]], e.start + s * item) != size:
                raise ArtifactError(f"{e.file}: short read in tensor {name!r}; is the file truncated?")
        t = torch.from_numpy(out)
        if e.dtype == "BF16":
            t = t.view(torch.bfloat16)
        return t if t.dtype == torch.float32 else t.float()

    def chunks(self, name: str, chunk_elems: int = DEFAULT_CHUNK_ELEMS, align: int = 1) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Yield ``(start, stop, window)`` covering the tensor; every chunk boundary but the last is a
        multiple of ``align`` elements (e.g. a whole number of rows)."""
        n = self.numel(name)
        step = max(align, chunk_elems // align * align)
        for start in range(0, n, step):
            stop = min(n, start + step)
            yield start, stop, self.window(name, start, stop)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # best effort: file descriptors are a limited resource
        try:
            self.close()
        except Exception:
            pass

    def _check_values(self, name: str) -> None:
        """Raise ArtifactError if the tensor holds NaN/Inf (or, for a Fisher, negative values)."""
        self._checked.add(name)  # before reading: window() below must not recurse
        e = self._entries[name]
        if e.file.stat().st_size < e.start + e.nbytes:
            raise ArtifactError(f"{e.file}: tensor {name!r} ends past the end of the file; the file is truncated: "
                                f"re-run the command that wrote it")
        for start, _, x in self.chunks(name):
            bad = ~torch.isfinite(x)
            what = "NaN or Inf"
            if not bool(bad.any()) and self.nonnegative:
                bad, what = x < 0, "negative"
            if bool(bad.any()):
                first = start + int(torch.nonzero(bad)[0])
                self._checked.discard(name)
                raise ArtifactError(
                    f"{e.file}: tensor {name!r} holds {what} values (first at flat index {first}); "
                    + ("a Fisher diagonal is a mean of squares and cannot be negative" if what == "negative"
                       else "the probe diverged or the file is corrupt")
                    + ": re-run `trace-transfer probe` (e.g. with a lower --lr)")

    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} not in {self.reader.files[0].parent}") from None
