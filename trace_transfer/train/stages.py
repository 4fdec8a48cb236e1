"""Stage specs: the ``TASK[:CORESET]`` strings that name one stage of a stream (``finetune --stage``)."""

from __future__ import annotations

from pathlib import Path

from trace_transfer.coreset import SUFFIX
from trace_transfer.errors import ArtifactNotFoundError, ConfigError
from trace_transfer.train.methods import Stage

__all__ = ["parse_stage"]


def parse_stage(spec: str) -> Stage:
    """``TASK[:CORESET]`` -> :class:`Stage`. A TASK may itself contain colons (``synthetic:math``).

    The CoreSet is what follows the *last* colon when that names an existing file, or when it ends
    with ``.coreset.safetensors`` (then a missing file is an error rather than a silent task name).
    A spec that is itself an existing file (``odd:name.yaml``) is a task file.

    Raises:
        ArtifactNotFoundError: the part after the last colon ends with ``.coreset.safetensors`` but
            no such file exists.
        ConfigError: the spec is empty, or has nothing before the CoreSet.

    Example:
        >>> parse_stage("synthetic:math:cores/math.coreset.safetensors")
        Stage(task='synthetic:math', coreset='cores/math.coreset.safetensors')
    """
    spec = spec.strip()
    if not spec:
        raise ConfigError("empty --stage; expected TASK or TASK:CORESET")
    if Path(spec).is_file() or ":" not in spec:
        return Stage(spec)
    task, tail = spec.rsplit(":", 1)
    if not task:
        raise ConfigError(f"--stage {spec!r}: no task before the CoreSet; expected TASK:CORESET")
    if tail.endswith(SUFFIX):
        if not Path(tail).is_file():
            raise ArtifactNotFoundError(
                f"--stage {spec!r}: CoreSet file {tail!r} not found; create it with `trace-transfer score` "
                f"or fix the path"
            )
        return Stage(task, tail)
    if tail and Path(tail).is_file():
        return Stage(task, tail)
    return Stage(spec)
