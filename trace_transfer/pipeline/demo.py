"""The shipped pipeline presets (``presets/*.yaml``) that ``trace-transfer demo`` and the reproduction
benchmark run: the built-in tiny models and task stream, end to end, offline.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from trace_transfer.errors import ArtifactNotFoundError
from trace_transfer.pipeline.config import PipelineConfig, load_pipeline

__all__ = ["presets", "preset_path", "load_preset"]


def presets() -> list[str]:
    """Names of the shipped presets (``demo``, ``demo-quick``, ...)."""
    return sorted(p.name.removesuffix(".yaml") for p in _presets_dir().glob("*.yaml"))


def preset_path(name: str) -> Path:
    """Path of a pipeline preset shipped in the package.

    Raises:
        ArtifactNotFoundError: no preset of that name; the message lists the shipped ones.
    """
    path = _presets_dir() / f"{name}.yaml"
    if not path.is_file():
        raise ArtifactNotFoundError(f"no pipeline preset {name!r}; shipped presets: {', '.join(presets())}")
    return path


def load_preset(name: str, seeds: Sequence[int] | None = None) -> PipelineConfig:
    """The validated config of preset ``name``, with its training seeds replaced by ``seeds`` if given.

    Example:
        >>> cfg = load_preset("demo-quick", seeds=[0, 1])
        >>> run_pipeline(cfg, "runs/demo-quick")
    """
    cfg = load_pipeline(preset_path(name))
    return cfg.model_copy(update={"seeds": list(seeds)}) if seeds else cfg


def _presets_dir() -> Path:
    return Path(str(resources.files("trace_transfer.pipeline") / "presets"))
