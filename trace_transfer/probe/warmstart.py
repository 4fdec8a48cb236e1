"""Warm-start probe: a short fine-tune of a copy of the model on one task, then Δ and Fisher.

``probe(model, task, out_dir)`` writes into ``out_dir``:

- ``delta.safetensors`` — Δ = θ* − θ0 in fp32 (a bf16 Δ would round away most of a 2e-5-lr update),
  keyed by the model's parameter names, written tensor by tensor (sharded with an index above
  ``max_shard_bytes``);
- ``fisher.safetensors`` — the diagonal Fisher, accumulated in fp32 on response tokens (only when
  ``fisher_elements``; finer-than-tensor scoring needs it);
- ``fisher_tensor.json`` — per-tensor reductions, always: mean Fisher (the TRACE Fisher term), RMS of
  Δ (the TRACE L2 term), and the element-level ranges that element-granularity scoring normalises by;
- ``probe.json`` — provenance, written last (its presence marks a complete probe).

Memory stays at model + gradients + Fisher accumulators (+ optimizer state while training) +
activations: θ0 is snapshotted to a temporary file in ``out_dir`` instead of a second in-memory copy of
the model, and Δ is formed one tensor at a time against it. ``train.gradient_checkpointing`` recomputes
activations in the warm start and in the Fisher pass alike.

Example:
    >>> res = probe("tiny-llama", "synthetic:math", "probes/math", ProbeConfig(TrainConfig(max_steps=50, batch_size=8)))
    >>> res.final_loss
"""

from __future__ import annotations

import copy
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from trace_transfer._version import versions
from trace_transfer.checkpoint import DEFAULT_MAX_SHARD_BYTES, ShardedWriter, fingerprint_of, open_checkpoint, write_json_atomic
from trace_transfer.errors import ConfigError, TaskError
from trace_transfer.probe.config import FISHER_AT, FISHER_MODES, TRACE_COMPATIBLE_MODE, ProbeConfig
from trace_transfer.probe.fisher import FisherAccumulator, accumulate_fisher, checkpoint_layers
from trace_transfer.train.loop import train

__all__ = ["ProbeConfig", "ProbeResult", "probe", "FISHER_AT"]

FORMAT = "trace-transfer/probe"
FORMAT_VERSION = 1
Progress = Callable[[str, int, int], None]


@dataclass
class ProbeResult:
    """What a probe wrote, and how the warm start went."""

    out_dir: Path
    task: str
    steps: int
    losses: list[float]
    info: dict[str, Any]

    @property
    def first_loss(self) -> float | None:
        return self.losses[0] if self.losses else None

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None


def probe(
    model: Any,
    task: Any,
    out_dir: str | Path,
    config: ProbeConfig | None = None,
    *,
    tokenizer: Any = None,
    progress: Progress | None = None,
) -> ProbeResult:
    """Warm-start fine-tune a copy of ``model`` on ``task`` and write Δ, Fisher and provenance.

    Args:
        model: hub id or local model directory (loaded in fp32: the master weights must hold
            lr-2e-5 updates), or a ``PreTrainedModel`` (deep-copied; pass ``tokenizer`` too).
        task: a task reference (``synthetic:math``, a task YAML path) or a loaded ``Task``.
        out_dir: the probe directory (created).
        config: :class:`ProbeConfig` (paper defaults when None).
        progress: ``(stage, done, total)`` callback for the CLI.

    Returns:
        ProbeResult (``info`` is the content of ``probe.json``).

    Raises:
        ConfigError: invalid settings. TaskError: the task yields no trainable example.
        ArtifactNotFoundError: the model or task does not exist.
    """
    from trace_transfer.data import load_task, make_dataloader
    from trace_transfer.models import load_model, load_tokenizer

    cfg = config or ProbeConfig()
    shard_bytes = cfg.max_shard_bytes or DEFAULT_MAX_SHARD_BYTES
    t_start = time.time()
    device = _device(cfg.device)  # before OUT is created: a missing GPU leaves nothing behind
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").unlink(missing_ok=True)  # an interrupted re-run must not look complete
    tick = progress or (lambda *_: None)
    torch.manual_seed(cfg.train.seed)

    if isinstance(model, torch.nn.Module):
        if tokenizer is None:
            raise ConfigError("probe() got a model object but no tokenizer; pass tokenizer=...")
        net = copy.deepcopy(model).to(device=device, dtype=torch.float32)
        model_ref, model_path = getattr(model.config, "_name_or_path", None) or type(model).__name__, None
    else:
        model_ref = str(model)
        model_path = str(Path(model).resolve()) if Path(model).exists() else None
        net = load_model(model_ref, dtype=torch.float32, device=str(device))
        tokenizer = tokenizer or load_tokenizer(model_ref)
    task_obj = load_task(task) if isinstance(task, (str, Path)) else task
    examples = list(task_obj.train_examples())
    if cfg.max_examples:
        examples = examples[: cfg.max_examples]
    # One loader for training (each pass over it draws the next seeded permutation) and a fresh one,
    # same seed, for the Fisher, so the Fisher batches do not depend on how long training ran.
    train_loader = make_dataloader(tokenizer, examples, cfg.train.seq_len, cfg.train.batch_size, shuffle=True, seed=cfg.train.seed)
    features = train_loader.dataset
    if not len(features):
        raise TaskError(f"task {task_obj.name!r} yields no training example (check its data and --seq-len {cfg.train.seq_len})")

    def batches(epoch: int):
        return train_loader

    def fisher_batches():
        return make_dataloader(tokenizer, examples, cfg.train.seq_len, cfg.train.batch_size, shuffle=True, seed=cfg.train.seed)

    n_batches = math.ceil(len(features) / cfg.train.batch_size)
    fisher_n = min(cfg.fisher_batches, n_batches) if cfg.fisher_batches else n_batches
    params = list(net.named_parameters())
    meta = {"task": task_obj.name, "model": model_ref}
    if cfg.train.gradient_checkpointing:
        checkpoint_layers(net)  # a model the Fisher pass cannot checkpoint fails now, not after the warm start

    # θ0 on disk, not in memory: the model is the only full copy we hold.
    snap = out / ".theta0"
    with ShardedWriter(snap, "theta0", shard_bytes) as w:
        for name, p in params:
            w.add(name, p.detach())

    def run_fisher() -> FisherAccumulator:
        # train() turns HF checkpointing off again, and HF's never applies in eval mode anyway: the Fisher
        # pass checkpoints its layers itself when the warm start does (fisher.eval_checkpointing).
        return accumulate_fisher(net, fisher_batches(), mode=cfg.fisher, elements=cfg.fisher_elements, max_batches=fisher_n,
                                 precision=cfg.train.precision, on_batch=lambda i: tick(f"fisher ({cfg.fisher})", i, fisher_n),
                                 gradient_checkpointing=cfg.train.gradient_checkpointing)

    stats: dict[str, dict[str, Any]] = {name: {"shape": list(p.shape), "numel": p.numel()} for name, p in params}
    fisher_obs = 0
    if cfg.fisher_at == "base":
        acc = run_fisher()
        fisher_obs = acc.count
        _write_fisher(acc, out, cfg, meta, stats)
        del acc
    steps = cfg.train.max_steps if cfg.train.max_steps > 0 else max(1, math.ceil(cfg.train.epochs * n_batches / cfg.train.grad_accum))
    result = train(net, batches, cfg.train, steps=steps, on_step=lambda s, loss: tick("warm start", s + 1, steps))
    if cfg.fisher_at == "probe":
        acc = run_fisher()
        fisher_obs = acc.count
        _write_fisher(acc, out, cfg, meta, stats)
        del acc

    theta0 = open_checkpoint(snap, prefix="theta0")
    with ShardedWriter(out, "delta", shard_bytes, metadata={**meta, "kind": "delta", "dtype": "float32"}) as w:
        for i, (name, p) in enumerate(params):
            d = p.detach().float().cpu() - theta0.get(name).float()
            dd = d.double()
            absd = d.abs()
            stats[name].update(delta_l2=float(dd.norm()), delta_rms=float(dd.norm()) / math.sqrt(max(1, d.numel())),
                               delta_absmin=float(absd.min()) if d.numel() else 0.0,
                               delta_absmax=float(absd.max()) if d.numel() else 0.0)
            w.add(name, d)
            tick("delta", i + 1, len(params))
    shutil.rmtree(snap, ignore_errors=True)
    _write_tensor_stats(out, task_obj.name, cfg, stats)
    info = _probe_record(
        out, cfg, task_obj=task_obj, task=task, model_ref=model_ref, model_path=model_path,
        model_config=_config_dict(net), device=str(device),
        autocast="bf16" if _bf16_active(cfg.train.precision, device) else "fp32", extra={},
        examples=examples, features=features, batches_per_epoch=n_batches, train=result,
        fisher_batches=fisher_n, fisher_observations=fisher_obs, accumulation="float32",
        tensors=[name for name, _ in params], fingerprint=fingerprint_of(net), t_start=t_start)
    write_json_atomic(out / "probe.json", info)
    return ProbeResult(out, task_obj.name, result.steps, result.losses, info)


def _write_fisher(acc: FisherAccumulator, out: Path, cfg: ProbeConfig, meta: dict, stats: dict) -> None:
    shard_bytes = cfg.max_shard_bytes or DEFAULT_MAX_SHARD_BYTES
    for name, mean in acc.tensor_means().items():
        stats[name]["fisher_mean"] = mean
    if not cfg.fisher_elements:
        for stale in [*out.glob("fisher-*-of-*.safetensors"), out / "fisher.safetensors", out / "fisher.safetensors.index.json"]:
            stale.unlink(missing_ok=True)  # a per-element Fisher from an earlier run would no longer match Δ
        return
    with ShardedWriter(out, "fisher", shard_bytes,
                       metadata={**meta, "kind": "fisher", "mode": cfg.fisher, "at": cfg.fisher_at}) as w:
        for name in acc.names():
            f = acc.fisher(name).cpu()
            acc.release(name)
            stats[name].update(fisher_min=float(f.min()) if f.numel() else 0.0,
                               fisher_max=float(f.max()) if f.numel() else 0.0)
            w.add(name, f)


def _write_tensor_stats(out: Path, task_name: str, cfg: ProbeConfig, stats: dict) -> None:
    write_json_atomic(out / "fisher_tensor.json", {
        "format": "trace-transfer/tensor-stats", "task": task_name, "fisher_mode": cfg.fisher,
        "fisher_at": cfg.fisher_at, "tensors": stats})


def _probe_record(out: Path, cfg: ProbeConfig, *, task_obj, task, model_ref, model_path, model_config,
                  device: str, autocast: str, extra: dict, examples, features, batches_per_epoch: int, train,
                  fisher_batches: int, fisher_observations: int, accumulation: str, tensors: list[str],
                  fingerprint, t_start: float) -> dict[str, Any]:
    """The ``probe.json`` record, once the outputs are written (the caller writes it last: its presence
    marks a complete probe). Shared by the single-process and the DeepSpeed probe, whose records differ
    only in ``device``/``autocast``, ``extra`` keys and how the Fisher was accumulated."""
    n_response = sum(int((torch.as_tensor(f["labels"])[1:] != -100).sum()) for f in features)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "task": task_obj.name,
        "task_ref": str(task) if isinstance(task, (str, Path)) else task_obj.name,
        "model": model_ref,
        "model_path": model_path,
        "model_config": model_config,
        "config": asdict(cfg),
        "seed": cfg.train.seed,
        "device": device,
        "autocast": autocast,
        **extra,
        "data": {"examples": len(examples), "sequences": len(features), "response_tokens": n_response,
                 "batches_per_epoch": batches_per_epoch},
        "train": train.to_dict(),
        "fisher": {"mode": cfg.fisher, "at": cfg.fisher_at, "estimator": FISHER_MODES[cfg.fisher],
                   "trace_compatible": cfg.fisher == TRACE_COMPATIBLE_MODE, "batches": fisher_batches,
                   "observations": fisher_observations, "elements": cfg.fisher_elements,
                   "accumulation": accumulation},
        "artifacts": {"delta": _artifact_name(out, "delta"),
                      "fisher": _artifact_name(out, "fisher") if cfg.fisher_elements else None,
                      "tensor_stats": "fisher_tensor.json"},
        "tensors": tensors,  # model order: scoring breaks ties by it
        "fingerprint": fingerprint,
        "versions": versions(),
        "created": datetime.now(timezone.utc).isoformat(),
        "seconds": round(time.time() - t_start, 3),
    }


def _artifact_name(out: Path, prefix: str) -> str:
    return f"{prefix}.safetensors.index.json" if (out / f"{prefix}.safetensors.index.json").exists() else f"{prefix}.safetensors"


def _device(spec: str) -> torch.device:
    from trace_transfer.devices import resolve_device

    return torch.device(resolve_device(spec))  # a missing GPU is one ConfigError line


def _bf16_active(precision: str, device: torch.device) -> bool:
    return precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())


def _config_dict(model: torch.nn.Module) -> dict[str, Any] | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: v for k, v in d.items() if isinstance(v, (str, int, float, bool, list, dict, type(None)))}
