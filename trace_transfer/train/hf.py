"""Hugging Face ``Trainer`` integration of the masking API.

Two ways in:

* :class:`CoreSetTrainer` — a ``Trainer`` that applies the CoreSet in ``__init__`` (before ``train()``
  wraps the model for accelerate/DeepSpeed, so frozen tensors get no optimizer state, also under
  ZeRO-3) and builds its optimizer from :meth:`MaskHandle.param_groups`, so weight decay cannot move a
  frozen element. The recommended path, and the only one that supports ``decay="masked"`` and
  ``weight_decay > 0`` on partly-core tensors.
* :class:`CoreSetCallback` — for trainers you cannot subclass (TRL's ``SFTTrainer``, ...). It applies
  the CoreSet when the trainer finishes ``__init__``; since it cannot choose the trainer's optimizer
  groups, it refuses ``weight_decay > 0`` when some tensor is only partly core.

Example:
    >>> trainer = CoreSetTrainer(model=model, args=TrainingArguments(..., deepspeed="ds_zero3.json"),
    ...                          train_dataset=ds, coreset=CoreSet.load("cores/math.coreset.safetensors"))
    >>> trainer.train()
    >>> trainer.mask_handle.remove()
"""

from __future__ import annotations

from typing import Any

from transformers import Trainer, TrainerCallback

from trace_transfer.coreset import CoreSet
from trace_transfer.errors import ConfigError
from trace_transfer.train.masking import MaskHandle, apply_coreset

__all__ = ["CoreSetTrainer", "CoreSetCallback"]


def _is_factory(optimizer_cls: Any) -> bool:
    try:
        from transformers.trainer_optimizer import is_optimizer_factory
    except ImportError:  # older transformers: no optimizer factories exist
        return False
    return bool(is_optimizer_factory(optimizer_cls))


def _ds_config(args: Any) -> dict[str, Any] | None:
    hf_cfg = getattr(args, "hf_deepspeed_config", None)
    return getattr(hf_cfg, "config", None) if hf_cfg is not None else None


def _check_deepspeed(args: Any, handle: MaskHandle) -> None:
    """DeepSpeed builds its own optimizer from an ``optimizer`` section, with one weight decay for all
    parameters — that would move frozen elements of partly-core tensors."""
    ds = _ds_config(args)
    if ds is None:
        return
    if handle.decay == "masked" and handle.partly_core():
        raise ConfigError(
            "decay='masked' is not supported under DeepSpeed (its optimizer steps fp32 partitions the mask "
            "handle cannot reach); use decay='zero'"
        )
    section = ds.get("optimizer")
    if section and handle.partly_core():
        wd = section.get("params", {}).get("weight_decay", 0.0)
        if wd == "auto":
            wd = args.weight_decay
        if wd:
            raise ConfigError(
                f"the DeepSpeed config's optimizer section decays every parameter (weight_decay={wd}), which "
                f"moves frozen elements (or sparse deltas) of {len(handle.partly_core())} partly-core tensor(s); "
                f"remove the 'optimizer' "
                f"section (the trainer then builds AdamW from the CoreSet's parameter groups) or set its "
                f"weight_decay to 0"
            )


class CoreSetTrainer(Trainer):
    """``transformers.Trainer`` that trains exactly a CoreSet (or, with ``mode="freeze-core"``, its
    complement).

    Args:
        coreset: the CoreSet to train (object or path to a ``*.coreset.safetensors`` file).
        mode: ``"train-core"`` or ``"freeze-core"``.
        decay: ``"zero"`` or ``"masked"`` (see :func:`trace_transfer.train.masking.apply_coreset`).
        masking: ``"auto"``, ``"sparse"`` or ``"dense"``: how partly-core tensors train (sparse deltas
            give gradient and optimizer state only for the core; see ``apply_coreset``).
        *args, **kwargs: passed to ``Trainer``. ``model_init`` is not supported (the CoreSet must be
            applied to the one model the trainer wraps).

    The handle is ``trainer.mask_handle``; call ``trainer.mask_handle.remove()`` when done (on every
    rank under DeepSpeed): it folds sparse deltas into the weights. Checkpoints the trainer writes
    meanwhile hold folded weights too (``state_dict()`` folds; loading one resets the deltas).

    Raises:
        ConfigError: ``model_init`` given, a pre-built optimizer or DeepSpeed optimizer section that
            would decay partly-core tensors, or ``decay="masked"`` under DeepSpeed.
    """

    def __init__(self, *args: Any, coreset: CoreSet | str, mode: str = "train-core", decay: str = "zero",
                 masking: str = "auto", **kwargs: Any):
        if kwargs.get("model_init") is not None:
            raise ConfigError("CoreSetTrainer does not support model_init; pass the model itself")
        super().__init__(*args, **kwargs)
        if not isinstance(coreset, CoreSet):
            coreset = CoreSet.load(coreset)
        self.mask_handle = apply_coreset(self.model, coreset, mode=mode, decay=decay, masking=masking)
        try:
            _check_deepspeed(self.args, self.mask_handle)
            if self.optimizer is not None:  # given through optimizers=(opt, sched)
                self.mask_handle.check_optimizer(self.optimizer)
        except ConfigError:
            self.mask_handle.remove()
            raise

    def create_optimizer(self, model: Any = None) -> Any:
        """The trainer's optimizer class and settings, over the CoreSet's parameter groups (biases
        and norms exempt from decay as ``Trainer`` does)."""
        if self.optimizer is None:
            decay_names = set(self.get_decay_parameter_names(self.model))
            groups = self.mask_handle.param_groups(self.args.weight_decay, no_decay=lambda n: n not in decay_names)
            if self.optimizer_cls_and_kwargs is not None:
                optimizer_cls, kwargs = self.optimizer_cls_and_kwargs
            else:
                optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            kwargs = dict(kwargs)
            if _is_factory(optimizer_cls) or any(k in kwargs for k in ("params", "model", "optimizer_dict")):
                raise ConfigError(
                    f"optimizer {self.args.optim!r} builds its own parameter groups, so the CoreSet's cannot be "
                    f"used; choose an AdamW-family optimizer (e.g. --optim adamw_torch)"
                )
            self.optimizer = optimizer_cls(groups, **kwargs)
        return self.optimizer


class CoreSetCallback(TrainerCallback):
    """Apply a CoreSet from any ``Trainer`` (when it finishes ``__init__``).

    The trainer's default optimizer decays every trainable parameter by ``args.weight_decay``, so this
    callback requires ``weight_decay == 0`` whenever a tensor is only partly core (use
    :class:`CoreSetTrainer` otherwise). ``callback.handle`` is the :class:`MaskHandle`.

    Example:
        >>> trainer = SFTTrainer(model=model, args=args, train_dataset=ds, callbacks=[CoreSetCallback(core)])
    """

    def __init__(self, coreset: CoreSet | str, mode: str = "train-core", masking: str = "auto"):
        self.coreset = coreset if isinstance(coreset, CoreSet) else CoreSet.load(coreset)
        self.mode = mode
        self.masking = masking
        self.handle: MaskHandle | None = None

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ConfigError("CoreSetCallback: the trainer passed no model to on_init_end")
        self.handle = apply_coreset(model, self.coreset, mode=self.mode, masking=self.masking)
        if self.handle.partly_core() and args.weight_decay:
            n = len(self.handle.partly_core())
            self.handle.remove()
            raise ConfigError(
                f"CoreSetCallback with weight_decay={args.weight_decay}: {n} tensor(s) are partly core and the "
                f"trainer's optimizer would decay their frozen elements; set weight_decay=0 or use CoreSetTrainer"
            )
        try:
            _check_deepspeed(args, self.handle)
        except ConfigError:
            self.handle.remove()
            raise
        return control

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        # A last check on the optimizer actually built (not possible under DeepSpeed, whose wrapper
        # holds flat partitions instead of our parameters).
        if optimizer is not None and _ds_config(args) is None and self.handle is not None:
            self.handle.check_optimizer(getattr(optimizer, "optimizer", optimizer))
        return control
