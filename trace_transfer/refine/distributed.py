"""``refine`` on many GPUs: the micro-probe under DeepSpeed ZeRO-1/2/3, every rank calling it.

The single-process pass holds the whole target in fp32 plus its AdamW state on one device (16 bytes
per parameter: 512 GB for a 32B target). Here the micro-probe is :func:`~trace_transfer.probe.
distributed.probe_deepspeed` itself — S optimizer steps from θ0 at a constant learning rate (no
warm-up), then the batch Fisher over K global batches, each rank accumulating its own gradient
partition — written into a temporary probe directory; rank 0 then scores the units from that
directory's Δ and Fisher, read streaming one window at a time (the scoring module's
``load_probe``), selects them exactly as the single-process pass does, and removes the directory.

``RefineConfig.batch_size`` stays the *global* batch: each of the W ranks takes ``batch_size / W``
examples per micro-batch, so the same seed gives the same batches as one process (refused when W does
not divide it). Only the ``microprobe`` signal runs here: the distributed probe always trains at least
one step, so the base-weight signals (``fisher``, ``saliency``) and ``steps=0`` are refused.

Example (2 GPUs)::

    torchrun --nproc_per_node=2 -m trace_transfer refine --budgets cores/math.budgets.json \\
        --model M --task synthetic:math --out cores/math.M.coreset.safetensors \\
        --deepspeed examples/deepspeed/ds_zero3.json
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from trace_transfer.coreset import CoreSet
from trace_transfer.errors import ConfigError, TraceTransferError
from trace_transfer.refine.config import SIGNALS, RefineConfig
from trace_transfer.refine.select import (_peak_memory_mb, load_budgets, native_probe_cost, pass_cost, select_coreset,
                                          units_in_play)
from trace_transfer.refine.signals import SignalCost, probe_unit_scores
from trace_transfer.transfer.budgets import SlotBudgets

__all__ = ["refine_deepspeed", "check_deepspeed_settings"]


def check_deepspeed_settings(cfg: RefineConfig, world: int) -> None:
    """Refuse what the distributed micro-probe cannot do, before any process group is joined.

    Raises:
        ConfigError: a signal other than microprobe, ``steps`` 0, or a batch the ranks do not divide.
    """
    if cfg.signal != "microprobe":
        raise ConfigError(f"signal {cfg.signal!r} under --deepspeed: the distributed probe always trains at least one "
                          f"step, so a base-weight signal would pay for a warm start it throws away; use "
                          f"--signal microprobe (the default) or run {cfg.signal} in one process")
    if cfg.steps < 1:
        raise ConfigError("--steps 0 under --deepspeed: the distributed micro-probe trains at least one step; "
                          "give --steps >= 1 or run the pass in one process")
    if cfg.batch_size % world:
        raise ConfigError(f"--batch-size {cfg.batch_size} does not divide over the {world} ranks: under --deepspeed it "
                          f"is the global batch, each rank taking batch_size / {world}; use a multiple of {world}")


def refine_deepspeed(
    model: Any,
    task: Any,
    budgets: SlotBudgets | str | Path | None = None,
    config: RefineConfig | None = None,
    *,
    ds_config: str | os.PathLike | dict[str, Any],
    tokenizer: Any = None,
    native: Any = None,
    work_dir: str | Path | None = None,
) -> tuple[CoreSet | None, dict[str, Any]]:
    """The micro-probe ``refine`` under DeepSpeed; every rank calls it (see the module docstring).

    Args: as :func:`~trace_transfer.refine.refine`; ``ds_config`` is the DeepSpeed JSON (path or dict,
    ``"auto"`` values filled from the settings), ``work_dir`` the folder of the temporary probe
    directory (None: the system's temp folder; only rank 0 writes there).

    Returns:
        ``(CoreSet, cost)`` on rank 0, ``(None, cost)`` on the others. ``cost`` adds ``world_size``,
        ``deepspeed`` (stage, micro and global batch) and ``peak_memory_mb_per_rank``; its
        ``forward_backward`` counts global batches, as one process counts its batches.

    Raises:
        ConfigError: see :func:`check_deepspeed_settings`, and the DeepSpeed config's own problems.
        ModelMismatchError: the budgets are for another model (checked before the pass for a local
            model directory). TaskError: the task yields no example.
    """
    from trace_transfer.scoring.granularity import parse_scope

    cfg = config or RefineConfig()
    t0 = time.perf_counter()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_deepspeed_settings(cfg, world)  # before DeepSpeed is imported or a process group joined
    budgets, budgets_path = load_budgets(budgets)
    parse_scope(cfg.scope)  # a bad scope fails now, not after the pass
    _check_budgets_early(model, budgets)

    import deepspeed
    import torch.distributed as dist

    from trace_transfer.probe import ProbeConfig
    from trace_transfer.probe.distributed import _on_rank0, probe_deepspeed
    from trace_transfer.scoring import load_probe
    from trace_transfer.train.loop import TrainConfig

    probe_cfg = ProbeConfig(
        # As the single-process micro-probe's TrainConfig: constant lr, no warm-up; batch_size per rank.
        train=TrainConfig(lr=cfg.lr, max_steps=cfg.steps, batch_size=cfg.batch_size // world, seq_len=cfg.seq_len,
                          warmup_ratio=0.0, scheduler="constant", precision=cfg.precision, seed=cfg.seed),
        fisher="batch", fisher_at="probe", fisher_batches=cfg.batches, fisher_elements=True,
        max_examples=cfg.max_examples)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=None if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank()
    cuda = _on_cuda()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    where = [tempfile.mkdtemp(prefix=".refine-probe-", dir=work_dir) if rank == 0 else None]
    dist.broadcast_object_list(where, src=0)  # one directory, rank 0's: only rank 0 reads and writes it
    probe_dir = Path(where[0])
    out: list[Any] = [None]
    try:
        t_signal = time.perf_counter()
        res = probe_deepspeed(model, task, probe_dir, probe_cfg, ds_config=ds_config, tokenizer=tokenizer)
        signal_seconds = time.perf_counter() - t_signal
        peaks: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(peaks, _peak_memory_mb(torch.device("cuda", torch.cuda.current_device()) if cuda
                                                        else torch.device("cpu")))
        info = res.info
        work = SignalCost(forward_backward=info["train"]["steps"] * probe_cfg.train.grad_accum
                          + info["fisher"]["observations"], optimizer_steps=info["train"]["steps"])
        ds = info["deepspeed"]
        extra = {"peak_memory_mb": max(peaks), "peak_memory_mb_per_rank": peaks,
                 "peak_memory_kind": "cuda allocated" if cuda else "process max RSS",
                 "device": f"deepspeed ZeRO-{ds['stage']} x {ds['world_size']}", "world_size": ds["world_size"],
                 "deepspeed": ds}

        def select() -> None:  # rank 0: score from the probe directory, select as one process does
            probe = load_probe(probe_dir)
            shapes = {n: tuple(probe.delta.shape(n)) for n in info["tensors"]}  # model order: the tie-break
            names, layouts = units_in_play(shapes, budgets, cfg)
            scores, note = probe_unit_scores(probe, names, shapes, layouts, 0.5, 0.5)
            probe.delta.close()
            probe.fisher.close()
            cost = pass_cost(work, native_probe_cost(native, info["data"]["examples"]), signal_seconds=signal_seconds,
                             seconds=time.perf_counter() - t0, **extra)
            note = {**note, "signal": "microprobe", "description": SIGNALS["microprobe"]}
            out[0] = select_coreset(scores, note, shapes, names, layouts, budgets, budgets_path, cfg, cost=cost,
                                    model_ref=info["model"], task=info["task"]), cost

        _on_rank0(rank, select)  # the others wait here; a failure on rank 0 stops them too
    finally:
        if rank == 0:
            shutil.rmtree(probe_dir, ignore_errors=True)
    if rank == 0:
        return out[0]
    return None, pass_cost(work, None, signal_seconds=signal_seconds, seconds=time.perf_counter() - t0, **extra)


def _check_budgets_early(model: Any, budgets: SlotBudgets | None) -> None:
    """Budgets against a local model directory's checkpoint header, before the pass: a shape that
    differs fails now (the pass itself checks them against the probe's tensors again, for hub ids and
    model objects too)."""
    if budgets is None or isinstance(model, torch.nn.Module) or not Path(str(model)).is_dir():
        return
    from trace_transfer.checkpoint import open_checkpoint

    try:
        reader = open_checkpoint(model)
    except TraceTransferError:  # no safetensors there: the check after the pass still applies
        return
    # Only the tensors the header names: a checkpoint may spell tied or renamed weights otherwise than
    # the model's parameters, which the check after the pass uses.
    header = {n: tuple(reader.shape(n)) for n in reader.names() if n in budgets.shapes}
    budgets.check_fits({**budgets.shapes, **header})


def _on_cuda() -> bool:
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda"
