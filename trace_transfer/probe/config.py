"""Warm-start probe settings: :class:`ProbeConfig` holds a :class:`~trace_transfer.train.TrainConfig`
for the warm start (the same settings every training path uses) plus what only the probe has: the
Fisher estimator, where it is taken, and storage. Torch-free, so the CLI and pipeline schema derived
from it load fast.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from trace_transfer.config import field_problems
from trace_transfer.errors import ConfigError
from trace_transfer.train.config import TrainConfig

__all__ = ["ProbeConfig", "FISHER_MODES", "TRACE_COMPATIBLE_MODE", "FISHER_AT"]

FISHER_MODES = {
    "batch": "squared mini-batch gradients (the official TRACE code; biased low)",
    "per-sample": "mean of per-sample squared gradients (exact diagonal empirical Fisher)",
}
TRACE_COMPATIBLE_MODE = "batch"
FISHER_AT = ("probe", "base")
_TRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))


@dataclass
class ProbeConfig:
    """Warm-start and Fisher settings. Defaults follow the TRACE paper: 1 epoch, lr 2e-5, AdamW,
    cosine schedule, bf16 autocast where the hardware supports it, Fisher from squared mini-batch
    gradients at the warm-started model.

    Example:
        >>> ProbeConfig(train=TrainConfig(max_steps=50, batch_size=8), fisher="per-sample")
        >>> ProbeConfig.from_flat(max_steps=50, batch_size=8, fisher="per-sample")  # the same
    """

    train: TrainConfig = field(default_factory=TrainConfig, metadata={
        "help": "Warm-start optimisation; its batch_size is also the Fisher batch, its seed the data order"})
    fisher: str = field(default=TRACE_COMPATIBLE_MODE, metadata={
        "help": "batch = squared mini-batch gradients (TRACE-compatible); per-sample = exact empirical Fisher",
        "choices": tuple(FISHER_MODES)})
    fisher_at: str = field(default="probe", metadata={
        "help": "Take the Fisher at the warm-started model (probe, the paper) or at the base model (base)",
        "choices": FISHER_AT})
    fisher_batches: int = field(default=0, metadata={
        "help": "Mini-batches for the Fisher; 0 = one pass over the probe data", "ge": 0})
    fisher_elements: bool = field(default=True, metadata={
        "help": "Store the per-element Fisher (row/column/head/element scoring need it); else per-tensor only"})
    max_examples: int = field(default=0, metadata={
        "help": "Probe on the first N training examples; 0 = all (cap it for large sets)", "ge": 0})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available) | cpu | cuda[:i]"})
    # 0 rather than checkpoint.DEFAULT_MAX_SHARD_BYTES itself: checkpoint imports torch, this module must not.
    max_shard_bytes: int = field(default=0, metadata={
        "help": "Shard size of the delta/fisher files; 0 = trace_transfer.checkpoint.DEFAULT_MAX_SHARD_BYTES", "ge": 0})

    def __post_init__(self) -> None:
        problems = field_problems(self)
        if self.train.epochs <= 0 and self.train.max_steps <= 0:
            problems.append("train: give epochs > 0 or max_steps > 0")
        if problems:
            raise ConfigError("invalid probe configuration:", problems)

    @classmethod
    def from_flat(cls, **kwargs: Any) -> ProbeConfig:
        """Build from one flat set of keywords (``lr=..., max_steps=..., fisher=...``), as the config
        was spelt before it held a :class:`TrainConfig`; problems in both parts are reported together."""
        train_kw = {k: kwargs.pop(k) for k in list(kwargs) if k in _TRAIN_FIELDS}
        problems: list[str] = []
        try:
            train = TrainConfig(**train_kw)
        except ConfigError as exc:
            problems += exc.problems
            train = TrainConfig()
        try:
            cfg = cls(train=train, **kwargs)
        except ConfigError as exc:
            problems += exc.problems
        if problems:
            raise ConfigError("invalid probe configuration:", problems)
        return cfg
