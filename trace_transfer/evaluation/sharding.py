"""The batch-level split behind distributed evaluation: which rank runs which batch, and the merge.

The metrics' primitives (generation, continuation and label log-likelihoods, program execution) plan
their batches exactly as one process does, then hand them to :func:`map_batches`. Outside a
:func:`sharded` block, or with a world of one, it simply runs every batch. Inside one, rank ``r`` runs
batches ``r, r + W, r + 2W, ...``, the per-item outputs are all-gathered and every rank gets the full
list back in item order.

Why batches and not items: a batch's padding width and composition change the floating-point sums of
its forward pass, so splitting items ``r::W`` would give scores a few ulps off the single-process ones
(and an occasional flipped greedy token). Running the very batches one process would run makes the
merged outputs equal to it bit for bit on the same device kind and dtype. The price: the batch is the
unit of work, so a task with fewer batches than ranks leaves ranks idle (lower ``batch_size`` then).

Every rank must reach the same :func:`map_batches` calls in the same order (all ranks see the same
examples, so they do); a rank whose share fails still joins the gather, carrying its error, and every
rank then raises instead of waiting at the next collective until the process group times out.

This module imports no other evaluation module: ``metrics`` imports it, and ``distributed`` (which
imports ``metrics``) builds on it.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from trace_transfer.errors import TraceTransferError

__all__ = ["Shard", "RankFailed", "sharded", "current_shard", "map_batches", "contiguous_split"]

T = TypeVar("T")


class RankFailed(TraceTransferError, RuntimeError):
    """A rank failed while scoring its share of an evaluation; raised on every other rank."""


@dataclass(frozen=True)
class Shard:
    """This process's place in the evaluation: ``rank`` of ``world`` in process ``group`` (None: default)."""

    rank: int
    world: int
    group: Any = None


_CURRENT: contextvars.ContextVar[Shard | None] = contextvars.ContextVar("trace_transfer_eval_shard", default=None)


def current_shard() -> Shard | None:
    """The shard set by the innermost :func:`sharded` block, or None (single process)."""
    return _CURRENT.get()


@contextlib.contextmanager
def sharded(group: Any = None) -> Iterator[Shard | None]:
    """Spread the evaluation primitives called inside the block over the ranks of ``group``.

    A no-op (yields None) when torch.distributed is unavailable, not initialised, or ``group`` has a
    single rank: the plain single-process path.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) < 2:
        yield None
        return
    shard = Shard(rank=dist.get_rank(group), world=dist.get_world_size(group), group=group)
    token = _CURRENT.set(shard)
    try:
        yield shard
    finally:
        _CURRENT.reset(token)


def contiguous_split(n: int, parts: int) -> list[list[int]]:
    """``range(n)`` in ``parts`` contiguous blocks whose sizes differ by at most one (for work whose
    result does not depend on how it is batched, e.g. running generated programs)."""
    base, extra = divmod(n, max(1, parts))
    blocks, start = [], 0
    for p in range(max(1, parts)):
        size = base + (p < extra)
        blocks.append(list(range(start, start + size)))
        start += size
    return [b for b in blocks if b]


def map_batches(n_items: int, batches: Sequence[Sequence[int]], fn: Callable[[list[int]], list[T]]) -> list[T]:
    """Run ``fn(batch) -> one output per index`` over ``batches`` (a partition of ``range(n_items)``)
    and return the outputs in item order; under :func:`sharded`, each rank runs its share of the batches.

    Raises:
        RankFailed: another rank's share failed (the failing rank re-raises its own error).
    """
    shard = current_shard()
    if shard is None:
        return _place(n_items, [(i, o) for b in batches for i, o in _run(fn, b)])
    import torch.distributed as dist

    mine: list[tuple[int, Any]] = []
    error: BaseException | None = None
    try:
        for b in batches[shard.rank :: shard.world]:
            mine.extend(_run(fn, b))
    except Exception as exc:  # re-raised below, once the other ranks know of it
        error = exc
    gathered: list[Any] = [None] * shard.world
    message = None if error is None else f"{type(error).__name__}: {error}"
    dist.all_gather_object(gathered, (message, mine), group=shard.group)
    if error is not None:
        raise error
    failed = [(r, m) for r, (m, _) in enumerate(gathered) if m is not None]
    if failed:
        r, m = failed[0]
        raise RankFailed(f"evaluation rank {r} of {shard.world} failed while scoring its batches: {m}")
    return _place(n_items, [pair for _, pairs in gathered for pair in pairs])


def _run(fn: Callable[[list[int]], list[T]], batch: Sequence[int]) -> list[tuple[int, T]]:
    batch = list(batch)
    outs = fn(batch)
    if len(outs) != len(batch):  # a programming error in a primitive, not a user error
        raise RuntimeError(f"batch of {len(batch)} items gave {len(outs)} outputs")
    return list(zip(batch, outs))


def _place(n_items: int, pairs: list[tuple[int, T]]) -> list[T]:
    out: list[Any] = [None] * n_items
    seen = 0
    for i, o in pairs:
        out[i] = o
        seen += 1
    if seen != n_items:
        raise RuntimeError(f"the batches covered {seen} of {n_items} items")
    return out
