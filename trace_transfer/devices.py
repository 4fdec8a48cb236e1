"""Where a model runs and in which dtype: the one resolver behind every ``--device`` / ``--dtype``.

``resolve_device("auto")`` is CUDA when a GPU is visible, else the CPU; ``resolve_dtype("auto", device)``
is bf16 on a CUDA device that supports it, else fp32. A device that is not there is one
:class:`~trace_transfer.errors.ConfigError` line, before any model loads.

Training keeps fp32 weights and optimizer state and runs its forward pass under bf16 autocast where
supported (``TrainConfig.precision``); ``dtype`` is the dtype inference steps (evaluation, CKA capture)
load the weights in. Δ, Fisher and CKA accumulate in fp32/fp64 whatever the dtype.

The module imports no torch at import time (the CLI's ``--help`` stays fast); the resolvers do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from trace_transfer.errors import ConfigError

__all__ = ["DeviceConfig", "DTYPES", "resolve_device", "resolve_dtype", "torch_dtype"]

DTYPES = ("auto", "bf16", "fp16", "fp32")
_TORCH_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


@dataclass
class DeviceConfig:
    """The device settings every model-running command and step shares (declared once here)."""

    device: str = field(default="auto", metadata={
        "help": "auto (CUDA when available, else CPU) | cpu | cuda | cuda:<i>"})
    dtype: str = field(default="auto", metadata={
        "help": "Weight dtype for inference (auto = bf16 on a CUDA device that supports it, else fp32); "
                "training keeps fp32 weights with bf16 autocast per --precision", "choices": DTYPES})


def resolve_device(spec: str | None = "auto") -> str:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:<i>`` -> the concrete device string (``cpu``, ``cuda:0``...).

    Raises:
        ConfigError: an unknown spelling, CUDA asked for where none is visible, or an index beyond
            the visible GPUs.
    """
    spec = (spec or "auto").strip().lower()
    if not _DEVICE.match(spec):
        raise ConfigError(f"--device {spec!r}: use auto, cpu, cuda or cuda:<index>")
    import torch

    if spec == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {spec}: no CUDA device is visible here (torch {torch.__version__}, "
                          f"CUDA_VISIBLE_DEVICES={_visible()}); use --device cpu or auto")
    index = int(spec.split(":")[1]) if ":" in spec else 0
    if index >= torch.cuda.device_count():
        raise ConfigError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) are visible "
                          f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return f"cuda:{index}"


def resolve_dtype(spec: str | None, device: str) -> str:
    """``auto`` | ``bf16`` | ``fp16`` | ``fp32`` on a resolved ``device`` -> a torch dtype name
    (``bfloat16``, ``float16``, ``float32``).

    Raises:
        ConfigError: an unknown spelling, or bf16 asked for on a CUDA device without bf16 support.
    """
    spec = (spec or "auto").strip().lower()
    if spec not in DTYPES:
        raise ConfigError(f"--dtype {spec!r}: choose one of {', '.join(DTYPES)}")
    is_cuda = device.startswith("cuda")
    if spec == "auto":
        import torch

        return "bfloat16" if is_cuda and torch.cuda.is_bf16_supported() else "float32"
    if spec == "bf16" and is_cuda:
        import torch

        if not torch.cuda.is_bf16_supported():
            raise ConfigError(f"--dtype bf16: {device} does not support bf16; use --dtype fp16 or fp32")
    return _TORCH_NAMES[spec]


def torch_dtype(name: str):
    """The ``torch.dtype`` of a :func:`resolve_dtype` name."""
    import torch

    return getattr(torch, name)


def _visible() -> str:
    import os

    return os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
