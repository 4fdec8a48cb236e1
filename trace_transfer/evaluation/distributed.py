"""Evaluation spread over the ranks of a torchrun/DeepSpeed job: every rank scores a share, all merge.

:func:`evaluate_tasks` scores a list of tasks the way :func:`~trace_transfer.evaluation.metrics.evaluate`
does, called on every rank with the same model (each rank loads the same checkpoint on its own
device, :func:`local_device`). Inside, the metrics' batches are shared out rank by rank and the per-item
outputs gathered (:mod:`trace_transfer.evaluation.sharding`), so every rank returns the same
:class:`EvalResult` per task, equal to the single-process one: same batches, same padding, same sums.
Without an initialised process group (or with one rank) it is the plain single-process loop.

Shared out: every built-in metric (``exact_match``, ``multiple_choice``, ``code_exec`` — generation and
program runs — and ``perplexity``), and any registered metric built on ``generate`` or the
log-likelihood helpers. A metric doing its own forward passes still gives the right score, computed in
full on every rank.

``lm-eval:<task>`` references run on rank 0 alone and the result is broadcast: lm-evaluation-harness
drives its own request loop and batching behind its ``HFLM`` wrapper, and sharding its requests would
mean re-implementing that loop. They are not the per-stage tasks of a fine-tuning run in practice.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from trace_transfer.evaluation.metrics import EvalResult, evaluate
from trace_transfer.evaluation.sharding import RankFailed, Shard, sharded

__all__ = ["evaluate_tasks", "local_device"]


def local_device() -> str:
    """Where this rank evaluates: its ``LOCAL_RANK`` GPU when CUDA is visible (made the current device,
    which NCCL's object collectives need), else the CPU."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return f"cuda:{index}"


def evaluate_tasks(
    model, tokenizer, tasks: Sequence[Any], *, limit: int | None = None, batch_size: int = 32,
    per_example: bool = False, group: Any = None, **overrides: Any,
) -> dict[str, EvalResult]:
    """Score ``model`` on every task, the work spread over the ranks of ``group`` (default: the world).

    Call it on every rank, with the same tasks and the same weights. Each task's result is the one a
    single process would get (scores and per-example outputs alike), and every rank returns it.

    Args:
        tasks: :class:`trace_transfer.data.Task` objects or task references, as for ``evaluate``.
        limit, batch_size, per_example, overrides: as for ``evaluate``. ``batch_size`` is also the unit
            of work shared out: a task with fewer batches than ranks leaves ranks idle.
        group: a ``torch.distributed`` process group; None is the default group.

    Returns:
        ``{task name: EvalResult}`` in the order of ``tasks``.

    Raises:
        RankFailed: another rank failed while scoring its share (the failing rank raises its own error).

    Example:
        >>> # torchrun --nproc_per_node=8 score.py
        >>> model = load_model(ckpt, device=local_device())
        >>> scores = evaluate_tasks(model, load_tokenizer(ckpt), ["synthetic:math", "synthetic:code"])
    """
    results: dict[str, EvalResult] = {}
    with sharded(group) as shard:
        for task in tasks:
            if isinstance(task, str):
                from trace_transfer.data import load_task

                task = load_task(task)

            def score(task=task) -> EvalResult:
                return evaluate(model, tokenizer, task, limit=limit, batch_size=batch_size, per_example=per_example,
                                **overrides)

            if shard is not None and getattr(task, "backend", None) == "lm-eval":
                results[task.name] = _on_first_rank(shard, score, task.name)
            else:
                results[task.name] = score()
    return results


def _on_first_rank(shard: Shard, fn, what: str) -> EvalResult:
    """``fn()`` on the group's first rank, its result (or its failure) broadcast to every rank."""
    import torch.distributed as dist

    payload: list[Any] = [None]
    error: BaseException | None = None
    if shard.rank == 0:
        try:
            payload[0] = ("ok", fn())
        except Exception as exc:  # re-raised below, once the other ranks know of it
            error = exc
            payload[0] = ("error", f"{type(exc).__name__}: {exc}")
    src = dist.get_global_rank(shard.group, 0) if shard.group is not None else 0
    dist.broadcast_object_list(payload, src=src, group=shard.group)
    if error is not None:
        raise error
    status, value = payload[0]
    if status == "error":
        raise RankFailed(f"evaluation rank 0 failed while scoring task {what!r}: {value}")
    return value
