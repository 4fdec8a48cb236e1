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

:func:`evaluate_checkpoint` is the collective the fine-tuning runner calls after each stage: it loads a
saved checkpoint in the evaluation dtype with one of two placements, decided once for all ranks
(:func:`agree_placement`, the rule in :func:`choose_placement`):

* ``replicated``: every rank loads the weights whole on its own GPU and scores a share of every task's
  batches (:func:`evaluate_tasks`). Chosen when the weights in the evaluation dtype, plus the 20 %
  margin of :func:`trace_transfer.models.inference_device_map`, fit the free memory of every rank's
  GPU, and always without CUDA (CPU ranks: host memory is not measured, today's behaviour).
* ``device-map``: rank 0 alone loads the weights with ``device_map="auto"`` across the visible GPUs
  (accelerate, one layer per device) and scores everything; the other ranks wait at one broadcast per
  task and receive its result. For a model larger than one GPU (a 32B target in bf16 is 64 GB). Each
  task is broadcast when it is scored, so no rank waits longer than the load plus one task; that wait
  must stay under the process group's timeout (DeepSpeed's default: 30 minutes).

``TRACE_TRANSFER_EVAL_PLACEMENT=replicated|device-map`` forces a placement (tests force ``device-map``
on CPU ranks, where it runs the rank-0-alone path with the model on the CPU).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from trace_transfer.evaluation.metrics import EvalResult, evaluate
from trace_transfer.evaluation.sharding import RankFailed, Shard, sharded

__all__ = ["evaluate_tasks", "evaluate_checkpoint", "agree_placement", "choose_placement", "local_device",
           "PLACEMENTS", "PLACEMENT_ENV"]

PLACEMENTS = ("replicated", "device-map")
PLACEMENT_ENV = "TRACE_TRANSFER_EVAL_PLACEMENT"


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
            task = _as_task(task)

            def score(task=task) -> EvalResult:
                return evaluate(model, tokenizer, task, limit=limit, batch_size=batch_size, per_example=per_example,
                                **overrides)

            if shard is not None and getattr(task, "backend", None) == "lm-eval":
                results[task.name] = _on_first_rank(shard, score, f"task {task.name!r}")
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
        raise RankFailed(f"evaluation rank 0 failed while scoring {what}: {value}")
    return value


def choose_placement(need_bytes: int | None, free_bytes: Sequence[int] | None, *, forced: str | None = None) -> str:
    """The placement rule, pure (no torch, no GPU): ``replicated`` or ``device-map``.

    Args:
        need_bytes: the weights' bytes in the evaluation dtype (:func:`trace_transfer.models.planned_model_bytes`);
            None when the config could not be read: ``replicated``, and the load reports the real problem.
        free_bytes: the free memory of every rank's GPU; None without CUDA (always ``replicated``).
        forced: ``replicated`` | ``device-map`` | None/empty (decide), e.g. from ``TRACE_TRANSFER_EVAL_PLACEMENT``.

    Returns:
        ``replicated`` when ``need_bytes`` x 1.2 (the margin of ``inference_device_map``) fits the
        smallest free figure, else ``device-map``.

    Raises:
        ConfigError: ``forced`` is not one of :data:`PLACEMENTS`.
    """
    if forced:
        if forced not in PLACEMENTS:
            from trace_transfer.errors import ConfigError

            raise ConfigError(f"{PLACEMENT_ENV}={forced!r}: choose one of {', '.join(PLACEMENTS)} (or unset it)")
        return forced
    if free_bytes is None or need_bytes is None or not free_bytes:
        return "replicated"
    from trace_transfer.models import INFERENCE_OVERHEAD

    return "replicated" if need_bytes * INFERENCE_OVERHEAD <= min(free_bytes) else "device-map"


def agree_placement(checkpoint: str | os.PathLike, dtype: Any = None, group: Any = None) -> str:
    """Collective where a process group is up: the placement of :func:`choose_placement` for
    ``checkpoint`` in ``dtype``, the same on every rank (each rank's free GPU memory is gathered and the
    smallest decides, so no rank loads what does not fit it). Every rank first empties its CUDA cache:
    the training engine it has just released is free memory again."""
    import torch
    import torch.distributed as dist

    forced = os.environ.get(PLACEMENT_ENV, "").strip().lower() or None
    free: int | None = None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        free = torch.cuda.mem_get_info(torch.device(local_device()))[0]
    frees = [free]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        frees = [None] * dist.get_world_size(group)
        dist.all_gather_object(frees, free, group=group)
    if forced or any(f is None for f in frees):
        return choose_placement(None, None, forced=forced)
    from trace_transfer.models import planned_model_bytes

    return choose_placement(planned_model_bytes(checkpoint, dtype), frees)


def evaluate_checkpoint(
    checkpoint: str | os.PathLike, tokenizer, tasks: Sequence[Any], *, dtype: Any = None, limit: int | None = None,
    batch_size: int = 32, placement: str | None = None, group: Any = None, **overrides: Any,
) -> tuple[dict[str, EvalResult], str]:
    """Score the weights saved in ``checkpoint`` on every task, over the ranks of ``group``.

    Call it on every rank (a plain call without a process group works too). The weights are loaded
    in ``dtype`` (a torch dtype or its name; None keeps the checkpoint's) with ``placement``
    (``replicated`` | ``device-map``; None: :func:`agree_placement`), as the module docstring describes.
    Either way every rank returns the same results, equal to one process scoring the same weights on
    the same kind of device.

    Returns:
        ``({task name: EvalResult}, placement)``.

    Raises:
        RankFailed: another rank failed (the failing rank raises its own error).

    Example:
        >>> scores, placement = evaluate_checkpoint("runs/ft/stage_2", tok, tasks, dtype="bfloat16")
    """
    import torch
    import torch.distributed as dist

    from trace_transfer.models import load_model

    placement = placement or agree_placement(checkpoint, dtype, group)
    choose_placement(None, None, forced=placement)  # an unknown spelling is refused here
    tasks = [_as_task(t) for t in tasks]
    if placement == "replicated":
        model = load_model(checkpoint, dtype=dtype, device=local_device())
        return evaluate_tasks(model, tokenizer, tasks, limit=limit, batch_size=batch_size, group=group,
                              **overrides), placement
    spread_map = "auto" if torch.cuda.is_available() else None  # on CPU ranks: the rank-0-alone path only
    loaded: list[Any] = []

    def model():
        if not loaded:  # loaded inside the first task's call: a failed load reaches the other ranks too
            loaded.append(load_model(checkpoint, dtype=dtype, device=local_device(), device_map=spread_map))
        return loaded[0]

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1
    shard = Shard(rank=dist.get_rank(group), world=dist.get_world_size(group), group=group) if distributed else None
    results: dict[str, EvalResult] = {}
    for task in tasks:
        def score(task=task) -> EvalResult:
            # Outside sharded(): rank 0 runs every batch itself, so its primitives make no collective calls.
            return evaluate(model(), tokenizer, task, limit=limit, batch_size=batch_size, **overrides)

        results[task.name] = score() if shard is None else _on_first_rank(shard, score, f"task {task.name!r}")
    return results, placement


def _as_task(task: Any) -> Any:
    if isinstance(task, str):
        from trace_transfer.data import load_task

        return load_task(task)
    return task
