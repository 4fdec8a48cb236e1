"""Optimisation settings shared by every training path (probe warm start, pretraining, stages, CPI-FT),
and the runner methods' own settings (:class:`MethodOptions`; the methods live in ``train.methods``).

Kept apart from :mod:`trace_transfer.train.loop` so that the settings (and the pipeline schema and CLI
options derived from them) load without torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from trace_transfer.config import field_problems
from trace_transfer.errors import ConfigError

__all__ = ["TrainConfig", "MethodOptions", "SCHEDULERS", "PRECISIONS", "MASKINGS"]

SCHEDULERS = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "bf16", "fp32")
# How masked methods hold their cores (trace_transfer.train.masking.apply_coreset).
MASKINGS = ("auto", "sparse", "dense")


@dataclass
class TrainConfig:
    """Optimisation settings. Defaults follow the TRACE paper's training setup (AdamW, cosine)."""

    lr: float = field(default=2e-5, metadata={"help": "Peak learning rate (AdamW; paper: 2e-5)", "gt": 0})
    epochs: float = field(default=1.0, metadata={"help": "Passes over the data; ignored when max_steps > 0", "ge": 0})
    max_steps: int = field(default=0, metadata={"help": "Optimizer steps; 0 = derive from epochs", "ge": 0})
    batch_size: int = field(default=8, metadata={"help": "Examples per micro-batch", "ge": 1})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches per optimizer step", "ge": 1})
    seq_len: int = field(default=1024, metadata={"help": "Max tokens per example (paper: 1024)", "ge": 1})
    warmup_ratio: float = field(default=0.03, metadata={"help": "Share of steps with linear warm-up", "ge": 0, "lt": 1})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decoupled weight decay (masked training never applies it to frozen elements)", "ge": 0})
    scheduler: str = field(default="cosine", metadata={"help": "Learning-rate schedule after warm-up",
                                                       "choices": SCHEDULERS})
    precision: str = field(default="auto", metadata={
        "help": "auto = bf16 autocast where the hardware supports it (weights stay fp32)", "choices": PRECISIONS})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping; 0 disables", "ge": 0})
    seed: int = field(default=0, metadata={"help": "Seed for data order and initialisation"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "Recompute each decoder layer's activations in the backward pass instead of keeping them "
                "(HF models, non-reentrant): activation memory of about one layer for ~1/3 more compute; "
                "losses and gradients unchanged", "execution_only": True})

    def __post_init__(self) -> None:
        problems = field_problems(self)
        if problems:
            raise ConfigError("invalid training configuration:", problems)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def execution_only(cls) -> frozenset[str]:
        """Fields that change how training runs, not what it computes (``execution_only`` in their
        metadata): left out of run identities and step hashes, so switching one (checkpointing to fit a
        smaller GPU) resumes a run instead of refusing it, and runs from before the field stay valid."""
        return frozenset(f.name for f in fields(cls) if f.metadata.get("execution_only"))

    def identity(self) -> dict[str, Any]:
        """:meth:`to_dict` without the :meth:`execution_only` fields: what a resumed run must match."""
        return {k: v for k, v in asdict(self).items() if k not in self.execution_only()}


@dataclass
class MethodOptions:
    """Method-specific settings (ignored by methods that do not use them)."""

    isolation: str = field(default="none", metadata={"help": "trace: none | strict (freeze earlier stages' cores)",
                                                     "choices": ("none", "strict")})
    replay_share: float = field(default=0.1, metadata={"help": "replay: share of each earlier task's data mixed in",
                                                       "ge": 0.0, "le": 1.0})
    general_coreset: str | None = field(default=None, metadata={"help": "general-core: CoreSet to freeze"})
    lora_r: int = field(default=8, metadata={"help": "lora: rank (paper: 8)"})
    lora_alpha: int = field(default=16, metadata={"help": "lora: alpha (paper: 16)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "lora: dropout on the adapter input"})
    lisa_layers: int = field(default=1, metadata={"help": "lisa: transformer layers trained at a time (gamma; "
                                                          "LMFlow's run_finetune_with_lisa.sh: 1)", "ge": 1})
    lisa_interval: int = field(default=20, metadata={"help": "lisa: optimizer steps between layer resamplings (K; "
                                                             "LMFlow's run_finetune_with_lisa.sh: 20)", "ge": 1})
    masking: str = field(default="auto", metadata={
        "help": "masked methods: sparse (train a delta over the core only: state ∝ core) | dense (gradient "
                "masks on whole tensors) | auto (sparse where at most half of a tensor is core)",
        "choices": MASKINGS})

    def __post_init__(self) -> None:
        problems = []
        if self.isolation not in ("none", "strict"):
            problems.append(f"isolation {self.isolation!r}: expected 'none' or 'strict'")
        if not 0.0 <= self.replay_share <= 1.0:
            problems.append(f"replay_share {self.replay_share}: expected a share in [0, 1]")
        if self.lora_r < 1:
            problems.append(f"lora_r {self.lora_r}: expected >= 1")
        if self.lisa_layers < 1 or self.lisa_interval < 1:
            problems.append(f"lisa_layers {self.lisa_layers}, lisa_interval {self.lisa_interval}: expected >= 1")
        if self.masking not in MASKINGS:
            problems.append(f"masking {self.masking!r}: expected one of {', '.join(MASKINGS)}")
        if problems:
            raise ConfigError("invalid method options", problems)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
