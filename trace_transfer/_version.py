"""Version strings recorded in every artifact's provenance."""

from __future__ import annotations

import platform
import sys

__version__ = "0.1.0"


def versions() -> dict[str, str]:
    """Versions of the toolkit and the libraries that influence numerical results."""
    from importlib import metadata  # here, not at the top: it costs ~0.1 s that `--help` need not pay

    out = {"trace_transfer": __version__, "python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("torch", "transformers", "tokenizers", "safetensors", "deepspeed", "peft", "accelerate", "datasets", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out
