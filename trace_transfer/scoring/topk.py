"""Exact top-k over billions of streamed scores, in bounded memory, with deterministic ties.

Sorting every element score of a large model is out of the question (8B fp32 scores = 32 GB). For
non-negative float32 scores the bit pattern read as an integer orders like the value, so the k-th
largest score can be located by counting bit patterns while streaming, then resolved exactly:

1. **Locate** the threshold. Fast path: read one block of 1,024 scores in 32 (``pread``, not the
   whole file) and histogram them by their top 20 bits; the sample's quantiles give a bracket
   ``[lo, hi)`` of bit patterns holding the k-th largest score with a wide safety margin (5 standard
   errors, counting 256 neighbouring samples as one draw because rows of a tensor share their
   scale). Exact path (small inputs, or when the bracket misses): histogram *all* scores by their
   top 16 bits and take the bin holding the k-th.
2. **Emit**: one more pass writes the packed mask bits of every score ``>= hi`` and gathers the few
   scores inside ``[lo, hi)`` with their global positions. If the number above ``hi`` is at most k and
   the candidates make up the rest, a selection among the candidates by (score desc, position) gives
   the exact remaining picks, whose bits are set in the written masks. Otherwise (the bracket missed; rare) the
   exact path runs. A bin holding more than ``max_candidates`` scores (a mass of exactly equal scores)
   gets one more histogram pass over its low 16 bits, which pins the threshold score exactly; the emit
   pass then takes its ties in stream order.

So a typical selection costs one full pass plus reading 1/32 of the data.
Ties are broken by position: tensor order, then element index — the same rule as for coarser units.
Scores must be bit-identical across passes, so callers compute each chunk the same way every time
(same chunk boundaries, same operations).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from trace_transfer.scoring.stream import DEFAULT_CHUNK_ELEMS
from trace_transfer.errors import ArtifactError

__all__ = ["PackedMasks", "streaming_topk"]

ScoreFn = Callable[[str, int, int], torch.Tensor]
DEFAULT_MAX_CANDIDATES = 16 * 1024 * 1024  # × 12 bytes (score + position) ≈ 200 MB at most


class PackedMasks:
    """Per-tensor element masks as packed bits (little bit order, as CoreSet stores them).

    Held in memory while they are small (one bit per parameter: 256 MB covers 2B parameters) and in
    a temp file beyond that, so masks of any model size never sit unpacked — or, for huge models, at
    all — in memory. In memory avoids writing through the page cache twice, which other processes'
    writeback can throttle on a busy machine.
    """

    def __init__(self, path: Path, items: Sequence[tuple[str, int]], max_memory_bytes: int = 256 << 20):
        self.path = Path(path)
        self.items = list(items)
        self.offsets: dict[str, int] = {}
        self.nbytes: dict[str, int] = {}
        off = 0
        for name, numel in self.items:
            self.offsets[name], self.nbytes[name] = off, (numel + 7) // 8
            off += self.nbytes[name]
        self.total_bytes = off
        self.in_memory = off <= max_memory_bytes
        self.selected: dict[str, int] = {name: 0 for name, _ in self.items}
        self._mem = np.zeros(off, dtype=np.uint8) if self.in_memory else None
        self._fill = 0
        self._fh = None if self.in_memory else open(self.path, "wb")

    def append(self, packed: np.ndarray) -> None:
        if self._mem is not None:
            self._mem[self._fill : self._fill + packed.size] = packed
            self._fill += packed.size
        else:
            self._fh.write(packed)

    def reset(self) -> None:
        """Forget everything written (a pass that has to be redone)."""
        if self._mem is not None:
            self._fill = 0
        else:
            self._fh.close()
            self._fh = open(self.path, "wb")
        self.selected = {name: 0 for name, _ in self.items}

    def finish_writing(self) -> None:
        if self._mem is not None:
            size = self._fill
        else:
            self._fh.close()
            size = self.path.stat().st_size
        if size != self.total_bytes:
            raise ArtifactError(f"internal: packed masks are {size} bytes, expected {self.total_bytes}")

    def set_bits(self, tensor_idx: np.ndarray, elem_idx: np.ndarray, window_bytes: int = 64 << 20) -> None:
        """Set extra mask bits at positions sorted by (tensor, element), one mapped window at a time."""
        if len(elem_idx) == 0:
            return
        byte_pos = np.array([self.offsets[self.items[t][0]] for t in range(len(self.items))], dtype=np.int64)[tensor_idx]
        byte_pos = byte_pos + elem_idx // 8
        bits = (np.uint8(1) << (elem_idx % 8).astype(np.uint8)).astype(np.uint8)
        if self._mem is not None:
            np.bitwise_or.at(self._mem, byte_pos, bits)
        else:
            start = 0
            while start < len(byte_pos):
                lo = int(byte_pos[start]) - int(byte_pos[start]) % 4096
                hi = min(self.total_bytes, lo + window_bytes)
                stop = int(np.searchsorted(byte_pos, hi, side="left"))
                mm = np.memmap(self.path, dtype=np.uint8, mode="r+", offset=lo, shape=(hi - lo,))
                np.bitwise_or.at(mm, byte_pos[start:stop] - lo, bits[start:stop])
                mm.flush()
                del mm
                start = stop
        for t, count in zip(*np.unique(tensor_idx, return_counts=True)):
            self.selected[self.items[int(t)][0]] += int(count)

    def read(self, name: str) -> np.ndarray:
        """The packed mask of one tensor (a view, or a read-only memory map of the temp file)."""
        n = self.nbytes[name]
        if self._mem is not None:
            return self._mem[self.offsets[name] : self.offsets[name] + n]
        if n == 0:
            return np.zeros(0, dtype=np.uint8)
        return np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.offsets[name], shape=(n,))

    def remove(self) -> None:
        if self._fh is not None and not self._fh.closed:
            self._fh.close()
        self._mem = None
        self.path.unlink(missing_ok=True)


def _chunks(items: Sequence[tuple[str, int]], chunk_elems: int) -> Iterator[tuple[int, str, int, int, int]]:
    """(tensor index, name, start, stop, global offset of start); boundaries are multiples of 8 so
    packed chunks concatenate into the packed tensor."""
    chunk_elems = max(8, chunk_elems // 8 * 8)
    offset = 0
    for t, (name, numel) in enumerate(items):
        for start in range(0, numel, chunk_elems):
            yield t, name, start, min(numel, start + chunk_elems), offset + start
        offset += numel


def _validated(scores: torch.Tensor, name: str) -> torch.Tensor:
    if scores.numel():
        lo, hi = torch.aminmax(scores)
        if not (bool(torch.isfinite(hi)) and float(lo) >= 0.0):
            raise ArtifactError(
                f"tensor {name!r}: element scores must be finite and >= 0 (got min {float(lo)}, max {float(hi)}); "
                f"the Δ or Fisher file holds NaN/inf values — re-run the probe"
            )
    return scores


def _bits(scores: torch.Tensor) -> torch.Tensor:
    # Scores are validated >= 0; callers never produce -0.0 (its bit pattern is negative as int32).
    return scores.view(torch.int32)


_INF_BITS = 0x7F800000  # bit pattern of +inf; NaNs lie above it


class _Overflow(Exception):
    """The bracket missed: too many candidates, or the k-th score lies outside it."""


SAMPLE_STRIDE = 32  # the sample pass reads one block in 32
SAMPLE_BLOCK = 1024  # elements per sampled block (one 4 KB page of fp32)
SAMPLE_BITS = 20  # sample histogram resolution: bins 1/2048 of an octave wide
SAMPLE_DESIGN = 256  # sampled scores counted as one independent draw (neighbours share a row's scale)
MIN_SAMPLED_TOTAL = 1 << 24  # below ~16M elements the exact histogram pass is cheap anyway
_FLUSH = 1 << 22  # sampled bit patterns buffered before one bincount (its output is 8 MB to zero)


def _sample_bracket(hist: torch.Tensor, k: int, total: int, max_candidates: int) -> tuple[int, int] | None:
    """Bit-pattern bracket ``[lo, hi)`` holding the k-th largest score, from a histogram of sampled
    blocks. Every SAMPLE_DESIGN neighbouring scores count as a single draw (a row shares its scale),
    and the margin is 5 standard errors of that, so a miss is rare — and only costs the exact path."""
    m = int(hist.sum())
    if m == 0:
        return None
    p = k / total
    want = p * m
    margin = 5.0 * (p * (1 - p) * m * SAMPLE_DESIGN) ** 0.5 + SAMPLE_BLOCK
    above = torch.cumsum(hist.flip(0), 0).flip(0)  # above[b] = sampled scores in bins >= b
    shift = 32 - SAMPLE_BITS
    hi_ok = torch.nonzero(above <= want - margin).reshape(-1)
    hi_bin = int(hi_ok.min()) if hi_ok.numel() else len(hist)  # nothing is certain above the sample
    lo_ok = torch.nonzero(above >= want + margin).reshape(-1)
    if not lo_ok.numel():
        return None  # k reaches into the bottom of the distribution: the exact path handles it
    lo_bin = int(lo_ok.max())
    expected = (int(above[lo_bin]) - (int(above[hi_bin]) if hi_bin < len(hist) else 0)) * total / m
    if expected > max_candidates / 2:
        return None
    # 2**31 - 1 lies above every finite float's bit pattern: "nothing is certain"
    return lo_bin << shift, min(hi_bin << shift, 2**31 - 1)


def streaming_topk(
    items: Sequence[tuple[str, int]],
    score_fn: ScoreFn,
    k: int,
    out: PackedMasks,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    max_candidates: int = DEFAULT_MAX_CANDIDATES,
    on_pass: Callable[[str], None] | None = None,
    on_chunk: Callable[[int], None] | None = None,
    sample_fn: ScoreFn | None = None,
    sample: bool = True,
) -> dict[str, int]:
    """Select exactly the ``k`` largest scores among all elements of ``items``; write packed masks.

    Args:
        items: ``(tensor name, numel)`` in tie-break order.
        score_fn: ``(name, start, stop) -> float32 scores`` of elements ``[start, stop)``; called with
            the same chunks on every pass and must return bit-identical values each time (>= 0 and
            never -0.0). The result may be a reused buffer, valid until the next call.
        k: number of elements to select (clamped to [0, total]).
        out: where the packed masks go (written in ``items`` order).
        on_pass / on_chunk: progress callbacks (pass name; elements done in the pass).
        sample_fn: ``(name, start, stop) -> scores of every SAMPLE_STRIDE-th block of SAMPLE_BLOCK
            elements`` of the chunk, computed without touching the other blocks (default: all scores
            of the chunk, strided).
        sample: allow the sampled-bracket fast path (the result is identical either way).

    Returns:
        ``{name: number of selected elements}``.
    """
    total = sum(n for _, n in items)
    k = max(0, min(int(k), total))
    say = on_pass or (lambda _s: None)
    tick = on_chunk or (lambda _n: None)
    if k in (0, total):
        say("select")
        for _, name, start, stop, _ in _chunks(items, chunk_elems):
            sel = torch.full((stop - start,), k == total, dtype=torch.bool)
            out.selected[name] += int(torch.count_nonzero(sel))
            out.append(np.packbits(sel.numpy(), bitorder="little"))
            tick(stop - start)
        out.finish_writing()
        return dict(out.selected)

    if sample and total >= MIN_SAMPLED_TOTAL:
        say("sample")
        sampler = sample_fn or (lambda n, a, b: _strided_blocks(score_fn(n, a, b)))
        hist = _Histogram(SAMPLE_BITS)
        for _, name, start, stop, _ in _chunks(items, chunk_elems):
            hist.add(_bits(sampler(name, start, stop).contiguous()) >> (32 - SAMPLE_BITS))
            tick(stop - start)
        bracket = _sample_bracket(hist.counts(), k, total, max_candidates)
        if bracket is not None:
            try:
                say("select")
                return _emit(items, score_fn, k, out, chunk_elems, bracket, max_candidates, tick)
            except _Overflow:
                out.reset()  # the bracket missed: fall back to the exact path

    say("histogram")
    acc = _Histogram(16)
    for _, name, start, stop, _ in _chunks(items, chunk_elems):
        acc.add(_bits(_validated(score_fn(name, start, stop), name)) >> 16)
        tick(stop - start)
    hist = acc.counts()
    above = torch.cumsum(hist.flip(0), 0).flip(0)  # above[b] = count of scores in bins >= b
    b = int(torch.nonzero(above >= k).max())
    need = k - (int(above[b + 1]) if b + 1 < len(above) else 0)
    if int(hist[b]) <= max_candidates:
        say("select")
        return _emit(items, score_fn, k, out, chunk_elems, (b << 16, (b + 1) << 16), max_candidates, tick)

    say("refine")
    acc = _Histogram(16)
    for _, name, start, stop, _ in _chunks(items, chunk_elems):
        bits = _bits(score_fn(name, start, stop))
        acc.add(bits[(bits >> 16) == b] & 0xFFFF)
        tick(stop - start)
    low_hist = acc.counts()
    low_above = torch.cumsum(low_hist.flip(0), 0).flip(0)
    lb = int(torch.nonzero(low_above >= need).max())
    ties = need - (int(low_above[lb + 1]) if lb + 1 < len(low_above) else 0)
    exact = (b << 16) | lb

    say("select")
    for _, name, start, stop, _ in _chunks(items, chunk_elems):
        bits = _bits(score_fn(name, start, stop))
        sel = bits > exact
        if ties > 0:
            eq = torch.nonzero(bits == exact).reshape(-1)[:ties]
            sel[eq] = True
            ties -= eq.numel()
        out.selected[name] += int(torch.count_nonzero(sel))
        out.append(np.packbits(sel.numpy(), bitorder="little"))
        tick(stop - start)
    out.finish_writing()
    return dict(out.selected)


class _Histogram:
    """Counts of non-negative integers below 2**bits, fed chunk by chunk. Values are buffered and
    counted a few million at a time: a bincount per small chunk would spend its time zeroing and
    adding the (up to 8 MB) output."""

    def __init__(self, bits: int):
        self.hist = torch.zeros(1 << bits, dtype=torch.int64)
        self.pending: list[torch.Tensor] = []
        self.n = 0

    def add(self, values: torch.Tensor) -> None:
        if values.numel():
            self.pending.append(values)  # callers pass fresh tensors (results of >> or &)
            self.n += values.numel()
        if self.n >= _FLUSH:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            self.hist += torch.bincount(torch.cat(self.pending), minlength=len(self.hist))
        self.pending, self.n = [], 0

    def counts(self) -> torch.Tensor:
        self._flush()
        return self.hist


def _strided_blocks(x: torch.Tensor) -> torch.Tensor:
    """Every SAMPLE_STRIDE-th block of SAMPLE_BLOCK elements (all of a chunk shorter than a block)."""
    n = x.numel() // SAMPLE_BLOCK * SAMPLE_BLOCK
    if n == 0:
        return x
    return x[:n].view(-1, SAMPLE_BLOCK)[::SAMPLE_STRIDE].reshape(-1)


def _emit(items, score_fn: ScoreFn, k: int, out: PackedMasks, chunk_elems: int, bracket: tuple[int, int],
          max_candidates: int, tick) -> dict[str, int]:
    """Write masks of scores >= hi; resolve the rest exactly among the candidates in [lo, hi)."""
    lo, hi = bracket
    cand_bits: list[np.ndarray] = []
    cand_pos: list[np.ndarray] = []
    n_cand = above = 0
    # numpy for the integer work: its compares against an int32 scalar and its nonzero on a sparse
    # mask run 4-70x faster than torch's on one shared core (measured; see bench/scoring.py).
    sel_buf = np.empty(chunk_elems, dtype=bool)  # reused: fresh 1 MB temporaries page-fault
    ge_buf = np.empty(chunk_elems, dtype=bool)
    lo32, hi32 = np.int32(lo), np.int32(min(hi, 2**31 - 1))
    for _, name, start, stop, gstart in _chunks(items, chunk_elems):
        n = stop - start
        bits = _bits(score_fn(name, start, stop)).numpy()
        if n and (bits.max() >= _INF_BITS or bits.min() < 0):  # NaN/inf sort high, negatives low
            _validated(torch.from_numpy(bits).view(torch.float32), name)
        sel = np.greater_equal(bits, hi32, out=sel_buf[:n])
        in_bracket = np.greater_equal(bits, lo32, out=ge_buf[:n])
        in_bracket ^= sel  # lo <= bits < hi
        cand = np.flatnonzero(in_bracket)  # sparse (~1%): the cheap case for nonzero
        if cand.size:
            n_cand += cand.size
            if n_cand > max_candidates:
                raise _Overflow
            cand_bits.append(bits[cand])
            cand_pos.append(cand + gstart)
        count = int(np.count_nonzero(sel))
        above += count
        if above > k:
            raise _Overflow
        out.selected[name] += count
        out.append(np.packbits(sel, bitorder="little"))
        tick(n)
    need = k - above
    if need > n_cand:
        raise _Overflow
    out.finish_writing()
    if need > 0:
        cb = np.concatenate(cand_bits)
        cp = np.concatenate(cand_pos)  # in stream order: tensor order, then element index
        t = np.partition(cb, cb.size - need)[cb.size - need]  # the need-th largest candidate
        take = cb > t
        ties = np.flatnonzero(cb == t)[: need - int(np.count_nonzero(take))]  # earliest positions first
        take[ties] = True
        chosen = cp[take]  # a mask keeps stream order: sorted by position
        starts = np.cumsum([0] + [n for _, n in items])
        tensor_idx = np.searchsorted(starts, chosen, side="right") - 1
        out.set_bits(tensor_idx, chosen - starts[tensor_idx])
    return dict(out.selected)
