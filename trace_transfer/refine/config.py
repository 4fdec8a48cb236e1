"""Settings of ``refine`` (torch-free, so the CLI's ``--help`` can read the help texts)."""

from __future__ import annotations

from dataclasses import dataclass, field

from trace_transfer.config import field_problems
from trace_transfer.errors import ConfigError

__all__ = ["RefineConfig", "SIGNALS"]

# ``scoring.GRANULARITIES`` without ``head`` (head units need the rule-derived head axes that ``score``
# finds from a probe's model config); spelled out here because importing scoring would import torch.
GRANULARITIES = ("tensor", "row", "column", "element")

SIGNALS = {
    "fisher": "one-shot diagonal Fisher at the base weights (K batches, no optimizer)",
    "saliency": "|W ⊙ g| at the base weights (RMS gradient over K batches)",
    "microprobe": "S optimizer steps, then K Fisher batches; LF combination of Δ and Fisher",
}


@dataclass
class RefineConfig:
    """Settings of the cheap target pass."""

    # microprobe with S=4, K=4 is the measured best per target pass (bench/transfer_frontier.py, demo pair, 3 seeds:
    # budgets + microprobe 33.6 ± 0.8 at 8 passes vs fisher 29.2 ± 0.4 and saliency 31.0 ± 0.4 at 16).
    signal: str = field(default="microprobe", metadata={
        "help": "fisher | saliency | microprobe (the default: the best measured per target pass)", "choices": tuple(SIGNALS)})
    batches: int = field(default=4, metadata={
        "help": "Fisher batches K (forward+backward passes; the one-shot signals were measured with 16)", "ge": 1})
    steps: int = field(default=4, metadata={"help": "optimizer steps S before the Fisher (microprobe only)", "ge": 0})
    lr: float = field(default=3e-4, metadata={"help": "learning rate of the micro-probe's steps", "gt": 0})
    batch_size: int = field(default=32, metadata={"help": "examples per batch", "ge": 1})
    seq_len: int = field(default=256, metadata={"help": "max tokens per example", "ge": 1})
    ratio: float = field(default=0.05, metadata={"help": "without budgets: share of the parameters in scope", "gt": 0, "le": 1})
    granularity: str = field(default="row", metadata={"help": "without budgets: unit granularity", "choices": GRANULARITIES})
    scope: str = field(default="layers", metadata={"help": "without budgets: tensors that compete (as in `score`)"})
    max_examples: int = field(default=0, metadata={"help": "use only the first N training examples; 0 = all", "ge": 0})
    precision: str = field(default="fp32", metadata={"help": "autocast precision of the passes (accumulation is fp32)"})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available) | cpu | cuda[:i]"})
    seed: int = field(default=0, metadata={"help": "seed of the data order"})

    def __post_init__(self) -> None:
        problems = field_problems(self)
        if problems:
            raise ConfigError("invalid refine configuration:", problems)
