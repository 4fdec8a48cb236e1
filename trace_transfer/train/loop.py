"""The one training loop every single-process path shares (probe, pretrain, sequential stages).

It reads top to bottom: forward, loss, backward, (masks act through gradient hooks registered by
``trace_transfer.train.masking``), clip, step, schedule. Keeping it in one place means the probe,
the baselines and TRACE stages cannot drift apart in how they train.

``TrainConfig.gradient_checkpointing`` turns on HF activation checkpointing for the duration of
:func:`train` (and, through :func:`enable_gradient_checkpointing`, of ``deepspeed_train``). It is the
non-reentrant kind: it needs no input that requires grad (frozen embeddings, sparse deltas), it
re-runs custom autograd functions such as ``train.sparse``'s element path in the backward pass, and it
checks that the recomputed forward saved the same tensors — so losses and gradients are those of the
plain loop (``tests/train/test_gradient_checkpointing.py``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from trace_transfer.errors import ConfigError, TaskError
from trace_transfer.train.config import TrainConfig  # noqa: F401  (re-exported: its historical home)

logger = logging.getLogger(__name__)


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast where the hardware supports it (CUDA with bf16); plain fp32 otherwise."""
    use_bf16 = precision == "bf16" or (
        precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def total_steps(cfg: TrainConfig, batches_per_epoch: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * batches_per_epoch / cfg.grad_accum))


def make_optimizer(params: Iterable[Any], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over parameter groups (as returned by the masking API) or plain parameters."""
    params = list(params)
    if params and isinstance(params[0], dict):
        groups = [g for g in params if any(p.requires_grad for p in g["params"])]
        for g in groups:
            g["params"] = [p for p in g["params"] if p.requires_grad]
            g.setdefault("weight_decay", cfg.weight_decay)
    else:
        groups = [{"params": [p for p in params if p.requires_grad], "weight_decay": cfg.weight_decay}]
    if not any(g["params"] for g in groups):
        raise ConfigError("no trainable parameters: the CoreSet selects nothing, or every tensor is frozen")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)


def make_scheduler(optimizer: torch.optim.Optimizer, steps: int, cfg: TrainConfig):
    warmup = int(cfg.warmup_ratio * steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, steps - warmup)
        if cfg.scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean token cross-entropy over response tokens (labels == -100 elsewhere).

    ``use_cache=False``: a training forward never reads a KV cache, building one only costs memory, and
    checkpointed layers would refuse it with a warning. Passed per call rather than set on
    ``model.config`` so that saved checkpoints keep generating with their cache.
    """
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"],
                use_cache=False)
    return out.loss


def enable_gradient_checkpointing(model: torch.nn.Module, cfg: TrainConfig) -> bool:
    """Turn on non-reentrant activation checkpointing when ``cfg.gradient_checkpointing`` asks for it.

    Call before DeepSpeed (or any wrapper) takes the module. Returns whether it was turned on.

    Raises:
        ConfigError: it is asked for on a model without HF checkpointing support.
    """
    if not getattr(cfg, "gradient_checkpointing", False):  # duck-typed configs predate the field
        return False
    # transformers 5 renamed gradient_checkpointing_enable to activation_checkpointing_enable (the old
    # name warns); a PeftModel forwards either to the HF model it wraps.
    enable = getattr(model, "activation_checkpointing_enable", None)
    key = "activation_checkpointing_kwargs"
    if enable is None:
        enable, key = getattr(model, "gradient_checkpointing_enable", None), "gradient_checkpointing_kwargs"
    if enable is None or not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"gradient_checkpointing is set but {type(model).__name__} does not support HF activation "
                          f"checkpointing; unset --gradient-checkpointing (training: gradient_checkpointing: false)")
    # Reentrant checkpointing would drop gradients when no layer input requires grad (frozen embeddings)
    # and cannot re-run the sparse deltas' custom autograd functions safely.
    enable(**{key: {"use_reentrant": False}})
    return True


def disable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Undo :func:`enable_gradient_checkpointing` (and its hook making embedding outputs require grad)."""
    disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    disable()
    if getattr(model, "_require_grads_hook", None) is not None:
        model.disable_input_require_grads()


@contextlib.contextmanager
def gradient_checkpointing(model: torch.nn.Module, cfg: TrainConfig):
    """Activation checkpointing for the ``with`` block when ``cfg`` asks for it; off again afterwards."""
    enabled = enable_gradient_checkpointing(model, cfg)
    try:
        yield
    finally:
        if enabled:
            disable_gradient_checkpointing(model)


@dataclass
class TrainResult:
    steps: int
    losses: list[float]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "losses": self.losses, "seconds": self.seconds,
                "first_loss": self.losses[0] if self.losses else None,
                "last_loss": self.losses[-1] if self.losses else None}


def train(
    model: torch.nn.Module,
    batches: Callable[[int], Iterable[dict[str, torch.Tensor]]],
    cfg: TrainConfig,
    params: Iterable[Any] | None = None,
    steps: int | None = None,
    on_step: Callable[[int, float], None] | None = None,
    after_step: Callable[[], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place with a fresh AdamW + schedule.

    Args:
        batches: ``epoch -> iterable of batches`` (so each epoch can reshuffle deterministically).
        params: parameters or parameter groups (from ``MaskHandle.param_groups``); default: all
            parameters with ``requires_grad``.
        steps: optimizer steps; default from ``cfg``.
        on_step: called with ``(step, loss)`` after every optimizer step (progress, logging).
        after_step: called after every optimizer step (e.g. to re-impose masks that decay could move).

    Returns:
        TrainResult with the loss of every optimizer step.
    """
    device = next(model.parameters()).device
    optimizer = make_optimizer(params if params is not None else model.parameters(), cfg)
    if steps is None:
        steps = cfg.max_steps if cfg.max_steps > 0 else None
    if steps is None:
        n_batches = sum(1 for _ in batches(0))
        steps = total_steps(cfg, n_batches)
    scheduler = make_scheduler(optimizer, steps, cfg)
    model.train()
    losses: list[float] = []
    step, micro, epoch, acc_loss = 0, 0, 0, 0.0
    t0 = time.perf_counter()
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    with gradient_checkpointing(model, cfg):
        while step < steps:
            seen_any = False
            for batch in batches(epoch):
                seen_any = True
                batch = {k: v.to(device) for k, v in batch.items()}
                with autocast_context(cfg.precision, device):
                    loss = causal_lm_loss(model, batch)
                (loss / cfg.grad_accum).backward()
                acc_loss += float(loss.detach()) / cfg.grad_accum
                micro += 1
                if micro % cfg.grad_accum:
                    continue
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if after_step is not None:
                    after_step()
                losses.append(acc_loss)
                if on_step is not None:
                    on_step(step, acc_loss)
                acc_loss = 0.0
                step += 1
                if step >= steps:
                    break
            if not seen_any:
                raise TaskError("the training data produced no batches")
            epoch += 1
    model.eval()
    return TrainResult(steps=step, losses=losses, seconds=time.perf_counter() - t0)
