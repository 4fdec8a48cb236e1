"""The warm-start probe on several GPUs: warm start under DeepSpeed ZeRO-2/3, Fisher on each rank's
gradient partition, Δ gathered one tensor at a time. Same outputs as :func:`~.warmstart.probe`.

Every rank calls :func:`probe_deepspeed` (under ``torchrun`` / ``deepspeed``). How it accumulates:

- **Warm start**: :func:`trace_transfer.train.ds.deepspeed_train` — rank r takes micro-batches
  r, r+W, ..., so one optimizer step sees ``W × batch_size × grad_accum`` examples (``batch_size`` is
  the micro-batch per rank). Each micro-step's loss is weighted by the global response-token count,
  as below, so it equals the single-process global-batch mean even for answers of different lengths.
- **Batch Fisher**: one Fisher batch is W consecutive micro-batches, one per rank (the global batch).
  Each rank backpropagates ``Σ token losses × W / N`` (N = the global batch's response tokens, summed
  over ranks), so DeepSpeed's averaged, reduce-scattered gradient is exactly the gradient of the global
  batch's mean token loss, as ``fisher_mode='batch'`` takes it in one process. Each rank squares and
  sums, in fp32, only its own partition of that gradient (ZeRO-3: its slice of every parameter;
  ZeRO-1/2: its fragments of the flat fp32 buffer); the per-tensor sums are float64, as in one process.
  At the end each tensor's partitions are reduced onto rank 0 (zeros elsewhere: exact) and written.
- **Δ**: θ0 is snapshotted to ``OUT/.theta0`` by rank 0 before the warm start; afterwards each
  parameter's fp32 master is gathered (one tensor at a time) and rank 0 writes ``θ* − θ0``.

Under ZeRO-3 no rank holds more than its partition plus about two tensors, from loading (a model
directory is built under ``zero.Init`` and streamed in tensor by tensor, rank 0 reading each from
disk: :func:`trace_transfer.train.ds.load_partitioned`) through training, Fisher and Δ; the shards are
released afterwards (``deepspeed_train(unshard=False)``).
Under ZeRO-1/2 the parameters are replicated on every rank, as those stages do; gradients, optimizer
state and the Fisher accumulators are partitioned. A model object is deep-copied whole on every rank.

Example (2 GPUs)::

    torchrun --nproc_per_node=2 -m trace_transfer probe --model M --task synthetic:math \\
        --out probes/math --deepspeed examples/deepspeed/ds_zero3.json
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from trace_transfer.checkpoint import DEFAULT_MAX_SHARD_BYTES, ShardedWriter, fingerprint_of, open_checkpoint, write_json_atomic
from trace_transfer.errors import ConfigError, TaskError, TraceTransferError
from trace_transfer.probe.config import ProbeConfig
from trace_transfer.probe.fisher import FisherAccumulator, checkpoint_layers, eval_checkpointing
from trace_transfer.probe.warmstart import Progress, ProbeResult, _config_dict, _probe_record, _write_tensor_stats
from trace_transfer.train.ds import response_tokens as _response_tokens

__all__ = ["probe_deepspeed", "require_single_process"]

IGNORE = -100


def probe_deepspeed(
    model: Any,
    task: Any,
    out_dir: str | Path,
    config: ProbeConfig | None = None,
    *,
    ds_config: str | os.PathLike | dict[str, Any],
    tokenizer: Any = None,
    progress: Progress | None = None,
    force: bool | None = None,
) -> ProbeResult:
    """Warm-start probe of ``model`` on ``task`` under DeepSpeed ZeRO-1/2/3; every rank calls it.

    Writes the same directory as :func:`~trace_transfer.probe.probe` (``delta``, ``fisher``,
    ``fisher_tensor.json``, ``probe.json`` with ``deepspeed: {stage, world_size}`` added), from rank 0.
    ``config.train.batch_size`` is the micro-batch per rank: the same seed with ``W × batch_size`` as
    the single-process batch size gives the same batches (see the module docstring for the Fisher).

    Args:
        model: hub id or local model directory (loaded in fp32), or a ``PreTrainedModel`` (deep-copied;
            pass ``tokenizer`` too).
        task: a task reference or a loaded ``Task``.
        out_dir: the probe directory (created by rank 0).
        config: :class:`ProbeConfig`; only ``fisher='batch'`` (a per-sample Fisher would need one
            reduction per sample); ``device`` is ignored (DeepSpeed places each rank).
        ds_config: DeepSpeed JSON config (path or dict); ``"auto"`` values come from ``config.train``.
        progress: ``(stage, done, total)`` callback, called on rank 0.
        force: when not None, rank 0 first applies the CLI's output rule (refuse an existing non-empty
            ``out_dir`` unless ``force``), and every rank stops if it refuses.

    Returns:
        ProbeResult on every rank (``info`` is ``probe.json``).

    Raises:
        ConfigError: per-sample Fisher, ZeRO stage 0, a DeepSpeed config that contradicts the settings.
        TaskError: the task yields no example.
    """
    import deepspeed
    import torch.distributed as dist

    from trace_transfer.data import load_task, make_dataloader
    from trace_transfer.models import load_model, load_tokenizer
    from trace_transfer.train.ds import deepspeed_train, load_ds_config, load_partitioned

    cfg = config or ProbeConfig()
    if cfg.fisher != "batch":
        raise ConfigError(f"fisher={cfg.fisher!r} is not supported under DeepSpeed: the engine reduces gradients "
                          f"over the ranks' samples together; use fisher='batch' or probe in one process")
    # Checked before joining the process group: a bad config fails fast instead of hanging the peers.
    conf = load_ds_config(ds_config, cfg.train, int(os.environ.get("WORLD_SIZE", "1")))
    stage = int(conf.get("zero_optimization", {}).get("stage", 0))
    if stage not in (1, 2, 3):
        raise ConfigError(f"DeepSpeed config has ZeRO stage {stage}: the distributed probe reads gradient "
                          f"partitions, which ZeRO stages 1-3 keep; set zero_optimization.stage to 2 or 3")
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=None if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    t_start = time.time()
    out = Path(out_dir)
    tick = progress if (progress is not None and rank == 0) else (lambda *_: None)
    shard_bytes = cfg.max_shard_bytes or DEFAULT_MAX_SHARD_BYTES
    _on_rank0(rank, lambda: _claim(out, force))
    torch.manual_seed(cfg.train.seed)

    if isinstance(model, torch.nn.Module):
        if tokenizer is None:
            raise ConfigError("probe_deepspeed() got a model object but no tokenizer; pass tokenizer=...")
        model_ref, model_path = getattr(model.config, "_name_or_path", None) or type(model).__name__, None
    else:
        model_ref = str(model)
        model_path = str(Path(model).resolve()) if Path(model).exists() else None
        tokenizer = tokenizer or load_tokenizer(model_ref)

    def bare_model() -> torch.nn.Module:  # fp32: the master weights must hold lr-2e-5 updates
        if isinstance(model, torch.nn.Module):
            return copy.deepcopy(model).to(dtype=torch.float32)
        if stage != 3:
            return load_model(model_ref, dtype=torch.float32, device="cpu")
        # Built under deepspeed.zero.Init, each tensor streamed straight into its partitions: no rank
        # ever holds the whole model (zero.Init's dtype is fp32 unless the config enables bf16/fp16).
        return load_partitioned(model_ref, conf)

    net = bare_model()
    if cfg.train.gradient_checkpointing:
        checkpoint_layers(net)  # a model the Fisher pass cannot checkpoint fails now, not after the warm start
    task_obj = load_task(task) if isinstance(task, (str, Path)) else task
    examples = list(task_obj.train_examples())[: cfg.max_examples or None]
    micro = cfg.train.batch_size

    def loader():  # same seed, same order on every rank; each rank takes its own micro-batches from it
        return make_dataloader(tokenizer, examples, cfg.train.seq_len, micro, shuffle=True, seed=cfg.train.seed)

    train_loader = loader()
    features = train_loader.dataset
    if not len(features):
        raise TaskError(f"task {task_obj.name!r} yields no training example (check its data and --seq-len {cfg.train.seq_len})")
    n_global = math.ceil(len(features) / micro) // world  # a trailing partial group would leave ranks idle
    if n_global == 0:
        raise ConfigError(f"{len(features)} sequences make fewer micro-batches of {micro} than the {world} ranks; "
                          f"lower --batch-size or add examples")
    fisher_n = min(cfg.fisher_batches, n_global) if cfg.fisher_batches else n_global
    params = [(n, p) for n, p in net.named_parameters()]
    meta = {"task": task_obj.name, "model": model_ref}
    # ds_shape: a parameter built under zero.Init is an empty placeholder with its real shape aside.
    shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in params}
    stats: dict[str, dict[str, Any]] = {n: {"shape": list(s), "numel": math.prod(s)} for n, s in shapes.items()}
    model_config, fingerprint = _config_dict(net), fingerprint_of({n: (s, "") for n, s in shapes.items()})

    snap = out / ".theta0"  # θ0 on disk, written by rank 0 one (gathered) tensor at a time
    with ShardedWriter(snap, "theta0", shard_bytes) if rank == 0 else nullcontext() as w:
        for name, p in params:
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None, enabled=hasattr(p, "ds_id")):
                if rank == 0:
                    w.add(name, p.detach().cpu())
    dist.barrier()

    fisher_obs: list[int] = []

    def fisher_then(write_delta: bool):
        def on_engine(engine) -> None:
            acc, pieces = _partition_fisher(engine, loader(), fisher_n, cfg.fisher_elements,
                                            lambda i: tick("fisher (batch, per partition)", i, fisher_n),
                                            gradient_checkpointing=cfg.train.gradient_checkpointing)
            fisher_obs.append(acc.count)
            _write_fisher(acc, pieces, engine, out, cfg, meta, stats, rank)
            if write_delta:
                _write_delta(engine, snap, out, shard_bytes, meta, stats, rank, tick)
        return on_engine

    # unshard=False: the engine releases every rank's shard afterwards instead of gathering the model
    # whole on each rank; all that is needed from it has been written by then.
    if cfg.fisher_at == "base":  # a zero-step engine on θ0, then a fresh model for the warm start
        deepspeed_train(net, lambda e: train_loader, cfg.train, conf, steps=0, on_engine=fisher_then(False),
                        unshard=False)
        net = bare_model()
    steps = cfg.train.max_steps if cfg.train.max_steps > 0 else \
        max(1, math.ceil(cfg.train.epochs * n_global / cfg.train.grad_accum))
    result = deepspeed_train(net, lambda e: train_loader, cfg.train, conf, steps=steps,
                             on_step=lambda s, loss: tick("warm start", s + 1, steps),
                             on_engine=fisher_then(True) if cfg.fisher_at == "probe" else
                             (lambda engine: _write_delta(engine, snap, out, shard_bytes, meta, stats, rank, tick)),
                             unshard=False)
    del net

    info = _probe_record(
        out, cfg, task_obj=task_obj, task=task, model_ref=model_ref, model_path=model_path,
        model_config=model_config, device="deepspeed", autocast="bf16" if conf.get("bf16", {}).get("enabled") else "fp32",
        extra={"deepspeed": {"stage": stage, "world_size": world, "micro_batch": micro,
                             "global_batch": micro * world, "grad_accum": cfg.train.grad_accum}},
        examples=examples, features=features, batches_per_epoch=n_global, train=result,
        fisher_batches=fisher_n, fisher_observations=fisher_obs[0], accumulation="float32, per rank partition",
        tensors=[name for name, _ in params], fingerprint=fingerprint, t_start=t_start)

    def finish() -> None:
        shutil.rmtree(snap, ignore_errors=True)
        _write_tensor_stats(out, task_obj.name, cfg, stats)
        write_json_atomic(out / "probe.json", info)  # last: its presence marks a complete probe

    _on_rank0(rank, finish)
    return ProbeResult(out, task_obj.name, result.steps, result.losses, info)


def require_single_process() -> None:
    """Refuse a multi-process launch of the single-process probe, as the training runner does: every
    rank would train its own copy and write the same files.

    Raises:
        ConfigError: ``WORLD_SIZE`` (torchrun / deepspeed) or the process group says more than one.
    """
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else \
        int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise ConfigError(f"launched as {world} processes (torchrun/deepspeed) without a DeepSpeed config: the "
                          f"single-process probe would run once per rank and write the same files; pass "
                          f"--deepspeed CONFIG (probe_deepspeed) or run one process")


class _Slot:
    """This rank's piece of one parameter, shaped as :class:`FisherAccumulator` reads a parameter, so
    the partition Fisher is accumulated by the same code (fp32 elements, float64 per-tensor sums)."""

    requires_grad = True

    def __init__(self, numel: int, device: torch.device):
        self.shape = (numel,)
        self.device = device
        self.grad: torch.Tensor | None = None

    def numel(self) -> int:
        return self.shape[0]


def _local_piece(p: torch.nn.Parameter, rank: int) -> tuple[int, int]:
    """``(start, numel)`` of this rank's partition within the flattened parameter."""
    if hasattr(p, "ds_id"):  # ZeRO-3: rank r holds elements [r·part, (r+1)·part), the last one padded
        part = p.ds_tensor.numel()
        start = min(rank * part, p.ds_numel)
        return start, max(0, min(part, p.ds_numel - start))
    mapping = getattr(p, "_hp_mapping", None)  # ZeRO-1/2: a fragment of the flat fp32 partition, or nothing
    if mapping is None:
        return 0, 0
    return mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel


def _local_grad(p: torch.nn.Parameter, start: int, numel: int) -> torch.Tensor | None:
    """This rank's piece of the reduced gradient, flat, in the accumulation dtype."""
    if numel == 0:
        return None
    if hasattr(p, "ds_id"):
        from deepspeed.utils import safe_get_local_grad

        return safe_get_local_grad(p)[:numel]
    g = p._hp_mapping.get_lp_grad_fragment(p._index_in_param_group).flatten()
    if g.numel() == p.numel():  # bf16 keeps a full accumulation buffer per rank; the fragment is ours
        g = g.narrow(0, start, numel)
    return g


def _partition_fisher(engine, micro_batches, n_batches: int, elements: bool, on_batch,
                      gradient_checkpointing: bool = False) -> tuple[FisherAccumulator, dict]:
    """Batch Fisher over ``n_batches`` global batches, each rank keeping its own gradient partition.

    With ``gradient_checkpointing`` the layers recompute their activations in eval mode
    (:func:`~.fisher.eval_checkpointing`): HF's checkpointing, on since the warm start, applies only in
    train mode, and this pass is the launched probe's memory peak (every engine state is still held)."""
    import torch.distributed as dist
    import torch.nn.functional as F

    rank, world = dist.get_rank(), dist.get_world_size()
    device = engine.device
    params = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    pieces = {n: _local_piece(p, rank) for n, p in params}
    slots = {n: _Slot(pieces[n][1], device) for n, _ in params}
    acc = FisherAccumulator(list(slots.items()), elements=elements)
    # Micro-batch b·W + r of the seeded order is rank r's share of global batch b.
    mine = itertools.islice(micro_batches, rank, n_batches * world, world)
    engine.eval()  # as in one process: no dropout noise in the gradients
    engine.optimizer.zero_grad()
    with eval_checkpointing(engine.module, enabled=gradient_checkpointing):
        for b, batch in enumerate(mine):
            batch = {k: v.to(device) for k, v in batch.items()}
            total = torch.tensor([_response_tokens(batch)], dtype=torch.float64, device=device)
            dist.all_reduce(total)
            if float(total) == 0:
                continue  # no response token in the whole global batch: skipped on every rank alike
            # Every micro-batch is a gradient-accumulation boundary here: one reduction per global batch.
            engine.set_gradient_accumulation_boundary(True)
            logits = engine(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                            use_cache=False).logits.float()
            token_sum = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                                        ignore_index=IGNORE, reduction="sum")
            # × W / N: DeepSpeed averages over ranks, so the reduced gradient is that of the global token mean.
            engine.backward(token_sum * (world / float(total)), scale_wrt_gas=False)
            for name, p in params:
                slots[name].grad = _local_grad(p, *pieces[name])
            acc.add_current_grads()
            for slot in slots.values():
                slot.grad = None
            engine.optimizer.zero_grad()
            on_batch(b + 1)
    engine.set_gradient_accumulation_boundary(None)
    if acc.count == 0:  # the same on every rank: the skip above is decided on the global count
        raise ConfigError(
            "no Fisher observation: none of the batches held a response token (labels all -100); "
            "check the task's prompt/response fields and that --seq-len does not cut the responses off"
        )
    return acc, pieces


def _write_fisher(acc: FisherAccumulator, pieces: dict, engine, out: Path, cfg: ProbeConfig, meta: dict,
                  stats: dict, rank: int) -> None:
    """Per-tensor means (float64 sums all-reduced) everywhere; per-element tensors reduced onto rank 0
    one at a time and written there."""
    import torch.distributed as dist

    sums = torch.stack([acc._tensor_sums[n].cpu() for n in acc.names()]).to(engine.device)
    dist.all_reduce(sums)
    for name, total in zip(acc.names(), sums.tolist()):
        stats[name]["fisher_mean"] = total / acc.count / max(1, stats[name]["numel"])
    if not cfg.fisher_elements:
        if rank == 0:
            for stale in [*out.glob("fisher-*-of-*.safetensors"), out / "fisher.safetensors",
                          out / "fisher.safetensors.index.json"]:
                stale.unlink(missing_ok=True)  # a per-element Fisher from an earlier run would no longer match Δ
        return
    shard_bytes = cfg.max_shard_bytes or DEFAULT_MAX_SHARD_BYTES
    writer = ShardedWriter(out, "fisher", shard_bytes, metadata={**meta, "kind": "fisher", "mode": cfg.fisher,
                                                                  "at": cfg.fisher_at}) if rank == 0 else nullcontext()
    with writer:
        for name in acc.names():
            start, numel = pieces[name]
            full = torch.zeros(stats[name]["numel"], dtype=torch.float32, device=engine.device)
            if numel:
                full[start:start + numel] = acc.fisher(name)
            acc.release(name)
            dist.reduce(full, dst=0)  # the other ranks add zeros outside their piece: exact
            if rank == 0:
                f = full.cpu().view(stats[name]["shape"])
                stats[name].update(fisher_min=float(f.min()) if f.numel() else 0.0,
                                   fisher_max=float(f.max()) if f.numel() else 0.0)
                writer.add(name, f)
            del full


def _write_delta(engine, snap: Path, out: Path, shard_bytes: int, meta: dict, stats: dict, rank: int, tick) -> None:
    """Δ = θ* − θ0, one gathered fp32 master tensor at a time, written by rank 0."""
    from deepspeed.utils import safe_get_full_fp32_param

    params = list(engine.module.named_parameters())
    theta0 = open_checkpoint(snap, prefix="theta0") if rank == 0 else None
    writer = ShardedWriter(out, "delta", shard_bytes, metadata={**meta, "kind": "delta", "dtype": "float32"}) \
        if rank == 0 else nullcontext()
    with writer:
        for i, (name, p) in enumerate(params):
            full = safe_get_full_fp32_param(p)  # the probe trains every tensor: each has an fp32 master
            if rank != 0:
                del full
                continue
            d = full.detach().float().cpu().view(stats[name]["shape"]) - theta0.get(name).float()
            dd = d.double()
            absd = d.abs()
            stats[name].update(delta_l2=float(dd.norm()), delta_rms=float(dd.norm()) / math.sqrt(max(1, d.numel())),
                               delta_absmin=float(absd.min()) if d.numel() else 0.0,
                               delta_absmax=float(absd.max()) if d.numel() else 0.0)
            writer.add(name, d)
            tick("delta", i + 1, len(params))


def _claim(out: Path, force: bool | None) -> None:
    if force is not None:
        from trace_transfer.checkpoint import check_output

        check_output(out, force, "probe directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").unlink(missing_ok=True)  # an interrupted re-run must not look complete


def _on_rank0(rank: int, fn) -> None:
    """Run ``fn`` on rank 0 and hold the others until it is done; its failure stops every rank (the
    others would otherwise wait at the next collective until the process group times out)."""
    import torch.distributed as dist

    error: list[Any] = [None]
    if rank == 0:
        try:
            fn()
        except BaseException as exc:
            error[0] = f"{type(exc).__name__}: {exc}"
            dist.broadcast_object_list(error, src=0)
            raise
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise TraceTransferError(f"rank 0 stopped: {error[0]}")
