"""``refine``: choose the units of a target CoreSet on the target itself, from a cheap signal.

With per-slot budgets (from ``transfer``), the units inside every slot are the slot's top units by the
signal, exactly ``budget`` of them (ties: lower unit index first); companions are taken whole. Without
budgets, the top ``ratio`` of the parameters in scope by the same signal, selected exactly as
``score`` selects (the source-free control: what a user gets without any source model).

The CoreSet's provenance records what the pass cost *on the target* — forward+backward passes,
optimizer steps, peak memory, wall time — next to what a native probe of the same task costs, so the
cost–accuracy trade-off can be read off the artifact.

In one process the whole target sits on one device in fp32 with its AdamW state (16 bytes per
parameter for the micro-probe). With ``deepspeed_config`` every rank of a torchrun launch calls
``refine`` and the micro-probe runs sharded under ZeRO-2/3 (:mod:`.distributed`): the same units as
one process with the same seed and global batch, rank 0 returning the CoreSet.

Example:
    >>> cs, cost = refine("tiny-qwen3", "synthetic:math", budgets="math.budgets.json", signal="fisher", batches=16)
    >>> cs.save("math.qwen3.coreset.safetensors"); cost["relative_to_native"]
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from trace_transfer.coreset import CoreSet
from trace_transfer.errors import ConfigError, TaskError
from trace_transfer.refine.config import SIGNALS, RefineConfig
from trace_transfer.refine.select import (_peak_memory_mb, load_budgets, native_probe_cost, pass_cost, select_coreset,
                                          select_in_budgets, units_in_play)
from trace_transfer.refine.signals import compute_signal
from trace_transfer.train.loop import TrainConfig
from trace_transfer.transfer.budgets import SlotBudgets

__all__ = ["RefineConfig", "refine", "native_probe_cost", "select_in_budgets", "SIGNALS"]


def refine(
    model: Any,
    task: Any,
    budgets: SlotBudgets | str | Path | None = None,
    config: RefineConfig | None = None,
    *,
    tokenizer: Any = None,
    native: Any = None,
    deepspeed_config: str | Path | dict[str, Any] | None = None,
    work_dir: str | Path | None = None,
) -> tuple[CoreSet | None, dict[str, Any]]:
    """Pick a target CoreSet's units from a cheap signal, inside per-slot budgets or globally.

    Args:
        model: the target: hub id or local dir (loaded in fp32), or a ``PreTrainedModel`` (copied; pass
            ``tokenizer``).
        task: task reference (``synthetic:math``, a task YAML) or a loaded ``Task``.
        budgets: :class:`SlotBudgets` or its ``.budgets.json`` from ``transfer``; None = source-free
            (top ``config.ratio`` of the parameters in ``config.scope`` at ``config.granularity``).
        config: :class:`RefineConfig`.
        native: what a native probe of this task costs, for the provenance: a probe directory or a
            ``ProbeConfig`` (None: not recorded).
        deepspeed_config: DeepSpeed ZeRO-1/2/3 JSON (path or dict): the micro-probe runs on every rank
            of a torchrun / deepspeed launch (every rank calls ``refine``), see
            :func:`~trace_transfer.refine.distributed.refine_deepspeed`; ``config.batch_size`` stays the
            global batch.
        work_dir: with ``deepspeed_config``: the folder that holds the temporary probe directory
            (removed afterwards; the CLI uses ``--out``'s folder); None = the system's temp folder.

    Returns:
        ``(CoreSet, cost)``; ``cost`` (also in ``metadata["cost"]``) holds ``forward_backward``,
        ``optimizer_steps``, ``peak_memory_mb``, ``seconds``, ``native`` and ``relative_to_native``.
        Under DeepSpeed the ranks other than 0 get ``(None, cost)``.

    Raises:
        ConfigError: invalid settings. ModelMismatchError: the budgets are for another model.
        TaskError: the task yields no trainable example.
    """
    if deepspeed_config is not None:
        from trace_transfer.refine.distributed import refine_deepspeed

        return refine_deepspeed(model, task, budgets, config, ds_config=deepspeed_config, tokenizer=tokenizer,
                                native=native, work_dir=work_dir)
    import copy

    from trace_transfer.data import load_task, make_dataloader
    from trace_transfer.devices import resolve_device
    from trace_transfer.models import load_model, load_tokenizer

    cfg = config or RefineConfig()
    t0 = time.perf_counter()
    device = torch.device(resolve_device(cfg.device))  # a missing GPU is one ConfigError line
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(cfg.seed)
    if isinstance(model, torch.nn.Module):
        if tokenizer is None:
            raise ConfigError("refine() got a model object but no tokenizer; pass tokenizer=...")
        net, model_ref = copy.deepcopy(model).to(device=device, dtype=torch.float32), type(model).__name__
    else:
        model_ref = str(model)
        net = load_model(model_ref, dtype=torch.float32, device=str(device))
        tokenizer = tokenizer or load_tokenizer(model_ref)
    shapes = {n: tuple(p.shape) for n, p in net.named_parameters()}
    budgets, budgets_path = load_budgets(budgets)
    names, layouts = units_in_play(shapes, budgets, cfg)

    task_obj = load_task(task) if isinstance(task, (str, Path)) else task
    examples = list(task_obj.train_examples())[: cfg.max_examples or None]
    loader = make_dataloader(tokenizer, examples, cfg.seq_len, cfg.batch_size, shuffle=True, seed=cfg.seed)
    if not len(loader.dataset):
        raise TaskError(f"task {task_obj.name!r} yields no training example (check its data and seq_len {cfg.seq_len})")
    train_cfg = TrainConfig(lr=cfg.lr, max_steps=max(1, cfg.steps), batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                            warmup_ratio=0.0, scheduler="constant", precision=cfg.precision, seed=cfg.seed)
    t_signal = time.perf_counter()
    scores, note, work = compute_signal(
        net, cfg.signal, lambda: make_dataloader(tokenizer, examples, cfg.seq_len, cfg.batch_size, shuffle=True, seed=cfg.seed),
        lambda epoch: loader, names, shapes, layouts, batches=cfg.batches, steps=cfg.steps, train_cfg=train_cfg,
        precision=cfg.precision, task=task_obj.name)
    signal_seconds = time.perf_counter() - t_signal

    cost = pass_cost(work, native_probe_cost(native, len(examples)), peak_memory_mb=_peak_memory_mb(device),
                     peak_memory_kind="cuda allocated" if device.type == "cuda" else "process max RSS",
                     signal_seconds=signal_seconds, seconds=time.perf_counter() - t0, device=str(device))
    cs = select_coreset(scores, note, shapes, names, layouts, budgets, budgets_path, cfg, cost=cost,
                        model_ref=model_ref, task=task_obj.name)
    return cs, cost
