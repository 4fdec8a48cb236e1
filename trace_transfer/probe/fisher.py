"""Diagonal Fisher information from gradients on response tokens.

Two estimators, both accumulated in fp32 (bf16 squares of small gradients underflow to zero):

``batch`` — **TRACE-compatible** (what the official TRACE code computes): square the gradient of each
    mini-batch's mean loss and average over mini-batches, ``F = mean_b (∇L_b)²``. Squaring a mean
    gradient drops the per-sample variance, so this is smaller than the empirical Fisher (by about the
    batch size for uncorrelated samples) and biased; it ranks parameters similarly and costs one
    backward pass per batch.
``per-sample`` — the exact diagonal empirical Fisher, ``F = mean_i (∇ℓ_i)²`` with ``ℓ_i`` the mean
    token loss of sample ``i`` on its response tokens. Computed by a loop over the samples of each
    batch (one backward per sample). A ``torch.func.vmap(grad)`` version would be faster on small
    models but materialises batch × |θ| gradients at once, which is exactly what the probe must not do
    on a large model; the loop keeps memory at model + gradients + accumulators.

Both run the model in eval mode. ``gradient_checkpointing=True`` recomputes the decoder layers'
activations in the backward pass there too (:func:`eval_checkpointing`): HF checkpoints only in train
mode, so without it the Fisher pass would hold every activation even where the warm start did not.

Example:
    >>> acc = accumulate_fisher(model, loader, mode="batch", max_batches=32)
    >>> acc.tensor_mean("model.layers.0.mlp.down_proj.weight")    # mean grad² of one tensor
    >>> for name, f in acc.items(): ...                              # per-element Fisher, fp32
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from trace_transfer.errors import ConfigError
from trace_transfer.probe.config import FISHER_MODES, TRACE_COMPATIBLE_MODE
from trace_transfer.train.loop import autocast_context, causal_lm_loss

__all__ = ["FISHER_MODES", "TRACE_COMPATIBLE_MODE", "FisherAccumulator", "accumulate_fisher", "checkpoint_layers",
           "eval_checkpointing", "has_response_tokens"]


LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]


class FisherAccumulator:
    """Running sums of squared gradients of a model's trainable parameters.

    ``elements=False`` keeps only one float64 sum per tensor (enough for whole-tensor scoring and
    O(number of tensors) memory); ``elements=True`` also keeps an fp32 tensor per parameter, which
    finer granularities (rows, heads, elements) need.
    """

    def __init__(self, named_params: Iterable[tuple[str, torch.nn.Parameter]], elements: bool = True):
        self.params = [(n, p) for n, p in named_params if p.requires_grad]
        self.elements = elements
        self.count = 0
        self._sums = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in self.params} if elements else {}
        # float64 per-tensor sums: a tensor-level mean over billions of squares must not lose precision.
        self._tensor_sums = {n: torch.zeros((), dtype=torch.float64, device=p.device) for n, p in self.params}

    def add_current_grads(self) -> None:
        """Add ``p.grad ** 2`` of every parameter (a missing gradient counts as zero) as one observation."""
        for name, p in self.params:
            if p.grad is None:
                continue
            g = p.grad.detach().float()
            sq = g * g
            if self.elements:
                self._sums[name].add_(sq)
            self._tensor_sums[name].add_(sq.sum(dtype=torch.float64))
        self.count += 1

    def names(self) -> list[str]:
        return [n for n, _ in self.params]

    def tensor_mean(self, name: str) -> float:
        """Mean of the Fisher over the tensor's elements (the TRACE per-tensor Fisher term)."""
        numel = dict(self.params)[name].numel()
        return float(self._tensor_sums[name]) / max(1, self.count) / max(1, numel)

    def tensor_means(self) -> dict[str, float]:
        return {n: self.tensor_mean(n) for n in self.names()}

    def fisher(self, name: str) -> torch.Tensor:
        """Per-element Fisher of one tensor (fp32, on the parameter's device)."""
        if not self.elements:
            raise ConfigError("this Fisher accumulator kept per-tensor sums only (elements=False)")
        return self._sums[name] / max(1, self.count)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names():
            yield name, self.fisher(name)

    def release(self, name: str) -> None:
        """Free one tensor's accumulator once it has been written out."""
        self._sums.pop(name, None)


def has_response_tokens(batch: dict[str, torch.Tensor]) -> bool:
    """True when the (shifted) labels contain at least one supervised token; causal-LM losses shift
    labels by one, so a response token at position 0 is never predicted."""
    labels = batch.get("labels")
    return labels is None or bool((labels[..., 1:] != -100).any())


def checkpoint_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The outermost HF ``GradientCheckpointingLayer`` modules of ``model`` (its decoder layers): what
    :func:`eval_checkpointing` recomputes, the same layers HF's own checkpointing would.

    Raises:
        ConfigError: the model has none (a remote-code model on the pre-4.35 checkpointing format).
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers: list[torch.nn.Module] = []
    inside: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, GradientCheckpointingLayer) and not any(name.startswith(f"{o}.") for o in inside):
            layers.append(module)
            inside.append(name)
    if not layers:
        raise ConfigError(f"gradient_checkpointing is set but {type(model).__name__} has no HF checkpointable layer "
                          f"(transformers' GradientCheckpointingLayer) for the Fisher pass; unset "
                          f"--gradient-checkpointing (probe.gradient_checkpointing: false)")
    return layers


@contextlib.contextmanager
def eval_checkpointing(model: torch.nn.Module, enabled: bool = True):
    """Activation checkpointing of the decoder layers while the model stays in eval mode.

    HF checkpoints a layer only when ``layer.gradient_checkpointing and layer.training``, and the
    Fisher must be that of the deterministic (eval-mode) model. Setting ``training=True`` on the layers
    alone is not enough: 64 of the 565 layer classes of transformers 5.24 (OPT, Falcon, BART, DBRX, ...)
    apply dropout in the layer's own forward from ``self.training``. So each layer's ``forward`` is
    wrapped for the block in a non-reentrant ``torch.utils.checkpoint`` instead, every module staying in
    eval mode: the layer keeps only its inputs and re-runs its forward (HF's wrapper, plain in eval mode)
    in the backward pass. As with HF, ``forward`` rather than ``__call__`` is checkpointed, so module
    hooks on the layer (ZeRO-3's gather/release) run once; its submodules' hooks run again in the
    recompute, as they do when DeepSpeed trains with HF checkpointing. Non-reentrant: it needs no input
    that requires grad and checks that the recompute saved the same tensors.
    """
    if not enabled:
        yield
        return
    from torch.utils.checkpoint import checkpoint

    wrapped: list[tuple[torch.nn.Module, Any]] = []
    try:
        for layer in checkpoint_layers(model):
            own = layer.__dict__.get("forward")  # accelerate's hooks set an instance forward: keep it inside
            inner = layer.forward

            def forward(*args, _inner=inner, **kwargs):
                if not torch.is_grad_enabled():  # no backward to replay it for
                    return _inner(*args, **kwargs)
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

            layer.forward = forward
            wrapped.append((layer, own))
        yield
    finally:
        for layer, own in wrapped:
            if own is None:
                del layer.forward
            else:
                layer.forward = own


def accumulate_fisher(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    mode: str = TRACE_COMPATIBLE_MODE,
    elements: bool = True,
    max_batches: int = 0,
    precision: str = "fp32",
    loss_fn: LossFn = causal_lm_loss,
    on_batch: Callable[[int], None] | None = None,
    gradient_checkpointing: bool = False,
) -> FisherAccumulator:
    """Accumulate the diagonal Fisher of ``model`` over ``batches``.

    The model runs in eval mode (no dropout noise in the gradients); its parameters are not changed
    and its gradients are cleared afterwards.

    Args:
        model: the model (its trainable parameters are the ones measured).
        batches: dicts of tensors as produced by the data loader (``labels`` = -100 off-response).
        mode: ``batch`` (TRACE-compatible) or ``per-sample`` (exact empirical Fisher).
        elements: keep per-element Fisher (needed for row/head/element scoring) or per-tensor sums only.
        max_batches: stop after this many batches; 0 = all of ``batches``.
        precision: autocast precision (``auto`` | ``bf16`` | ``fp32``); accumulation is always fp32.
        loss_fn: ``(model, batch) -> scalar loss`` (default: causal-LM loss on response tokens).
        on_batch: progress callback, called with the number of batches done.
        gradient_checkpointing: recompute each decoder layer's activations in the backward pass
            (:func:`eval_checkpointing`: still eval mode, the same Fisher up to float rounding).

    Returns:
        FisherAccumulator whose ``count`` is the number of batches (batch mode) or samples (per-sample).

    Raises:
        ConfigError: unknown mode, no batch held a response token, or checkpointing asked of a model
            without HF checkpointable layers.
    """
    if mode not in FISHER_MODES:
        raise ConfigError(f"Fisher mode {mode!r} is not known; choose one of: {', '.join(FISHER_MODES)}")
    device = next(model.parameters()).device
    acc = FisherAccumulator(model.named_parameters(), elements=elements)
    was_training = model.training
    model.eval()
    try:
        with eval_checkpointing(model, enabled=gradient_checkpointing):
            done = 0
            for batch in batches:
                if max_batches and done >= max_batches:
                    break
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                if mode == "batch":
                    _observe(model, batch, acc, precision, device, loss_fn)
                else:
                    size = _batch_size(batch)
                    for i in range(size):
                        sample = {k: v[i : i + 1] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in batch.items()}
                        _observe(model, sample, acc, precision, device, loss_fn)
                done += 1
                if on_batch is not None:
                    on_batch(done)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if acc.count == 0:
        raise ConfigError(
            "no Fisher observation: none of the batches held a response token (labels all -100); "
            "check the task's prompt/response fields and that --seq-len does not cut the responses off"
        )
    return acc


def _observe(model, batch, acc: FisherAccumulator, precision: str, device, loss_fn: LossFn) -> None:
    if not has_response_tokens(batch):
        return  # a sample without response tokens has no loss (NaN) and carries no information
    model.zero_grad(set_to_none=True)
    with autocast_context(precision, device):
        loss = loss_fn(model, batch)
    loss.float().backward()
    acc.add_current_grads()


def _batch_size(batch: dict[str, Any]) -> int:
    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    raise ConfigError("batch holds no tensors")
