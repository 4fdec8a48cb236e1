"""What the planner assumes about the machine: GPU type (memory, bf16 peak, HBM bandwidth), how many
per node, how many nodes, host memory, and the model-FLOPs-utilisation range that turns FLOPs into time.

Peaks are NVIDIA's / AMD's published *dense* bf16 tensor-core figures (no 2:4 sparsity); memory is what
``nvidia-smi`` reports as the card's total (an "80 GB" H100 shows 81,559 MiB), not the marketing round number.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from trace_transfer.errors import ConfigError

GiB = 1024**3
MiB = 1024**2


@dataclass(frozen=True)
class GpuSpec:
    """One accelerator model."""

    name: str
    memory: int = field(metadata={"help": "bytes of device memory (nvidia-smi total)"})
    bf16_flops: float = field(metadata={"help": "dense bf16 tensor peak, FLOP/s"})
    hbm_bandwidth: float = field(metadata={"help": "device memory bandwidth, bytes/s"})


GPUS: dict[str, GpuSpec] = {
    "a100-40gb": GpuSpec("A100 40GB SXM", 40_960 * MiB, 312e12, 1.555e12),
    "a100": GpuSpec("A100 80GB SXM", 81_920 * MiB, 312e12, 2.039e12),
    "h100-pcie": GpuSpec("H100 80GB PCIe", 81_559 * MiB, 756e12, 2.0e12),
    "h100": GpuSpec("H100 80GB SXM", 81_559 * MiB, 989e12, 3.35e12),
    "h200": GpuSpec("H200 141GB SXM", 143_771 * MiB, 989e12, 4.8e12),
    "l40s": GpuSpec("L40S 48GB", 46_068 * MiB, 362e12, 0.864e12),
    "b200": GpuSpec("B200 180GB", 183_359 * MiB, 2250e12, 8.0e12),
    "mi300x": GpuSpec("MI300X 192GB", 196_592 * MiB, 1307e12, 5.3e12),
}
DEFAULT_GPU = "h100"


@dataclass(frozen=True)
class Hardware:
    """The cluster a plan is made for.

    ``usable`` is the share of device memory the planner lets an estimate fill: the caching allocator
    fragments, NCCL and cuBLAS keep workspaces, and a plan that needs 99% of a card fails in practice.
    ``overhead`` is the fixed per-process cost on top of tensors (CUDA context, kernels, NCCL buffers).
    """

    gpu: GpuSpec = GPUS[DEFAULT_GPU]
    gpus_per_node: int = 1
    nodes: int = 1
    gpu_memory: int | None = None  # overrides gpu.memory (--gpu-mem)
    host_memory: int = 1024 * GiB  # per node
    mfu: tuple[float, float] = (0.25, 0.50)
    usable: float = 0.90
    overhead: int = 1 * GiB

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def memory(self) -> int:
        return self.gpu_memory or self.gpu.memory

    @property
    def budget(self) -> float:
        """Bytes per GPU an estimate may use and still count as fitting."""
        return self.usable * self.memory

    def with_world(self, gpus: int) -> Hardware:
        """The same machines with ``gpus`` GPUs in all (whole nodes where more than one node is needed)."""
        if gpus <= self.gpus_per_node:
            return replace(self, gpus_per_node=gpus, nodes=1)
        nodes = -(-gpus // self.gpus_per_node)
        return replace(self, nodes=nodes)

    def describe(self) -> str:
        mem = f"{self.memory / GiB:.0f} GiB"
        return (f"{self.nodes} node(s) x {self.gpus_per_node} x {self.gpu.name} ({mem}, "
                f"bf16 peak {self.gpu.bf16_flops / 1e12:.0f} TFLOP/s), host {self.host_memory / GiB:.0f} GiB/node, "
                f"MFU {self.mfu[0]:.0%}-{self.mfu[1]:.0%}, usable {self.usable:.0%} of GPU memory")


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]i?[bB]?|[bB])?\s*$")
_UNITS = {"k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4, "": GiB}


def parse_size(text: str | int | float, what: str = "size") -> int:
    """``"80GiB"`` / ``"80GB"`` / ``"141"`` (GiB) / ``"1.5TiB"`` → bytes. GB means 10^9, GiB 2^30."""
    if isinstance(text, (int, float)):
        return int(text * GiB)
    m = _SIZE.match(str(text))
    if not m:
        raise ConfigError(f"{what} {text!r}: expected a size such as 80GiB, 80GB or 141 (GiB)")
    number, unit = float(m.group(1)), (m.group(2) or "").lower().rstrip("b")
    if (m.group(2) or "").lower() == "b":
        return int(number)
    return int(number * _UNITS[unit])


def gpu_spec(name: str) -> GpuSpec:
    try:
        return GPUS[name.lower()]
    except KeyError:
        raise ConfigError(f"GPU {name!r} is not in the planner's table; choose one of: {', '.join(GPUS)} "
                          "(and --gpu-mem for a different memory size)") from None
