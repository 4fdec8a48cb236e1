"""Error hierarchy.

Every error the toolkit raises on purpose derives from :class:`TraceTransferError` and also from the
builtin that fits (``ValueError``, ``FileNotFoundError``, ...), so callers can catch either. Messages
repeat the offending input, list valid choices where there are any, and say what to do next.
"""

from __future__ import annotations


class TraceTransferError(Exception):
    """Base class of all deliberate trace-transfer errors."""


class ConfigError(TraceTransferError, ValueError):
    """A user-supplied configuration (YAML, CLI option, task spec) is invalid.

    ``problems`` holds every problem found, so all of them can be reported at once.
    """

    def __init__(self, message: str, problems: list[str] | None = None):
        self.problems = list(problems or [])
        if self.problems:
            message = message + "\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(message)


class ArtifactNotFoundError(TraceTransferError, FileNotFoundError):
    """An input artifact (model dir, probe dir, CoreSet, task file) does not exist."""


class ArtifactError(TraceTransferError, ValueError):
    """An artifact exists but is malformed, of the wrong format version, or corrupted."""


class ModelMismatchError(TraceTransferError, ValueError):
    """An artifact (CoreSet, delta, Fisher) does not fit the model it is applied to."""


class RuleError(ConfigError):
    """An architecture rule file is invalid or does not cover a checkpoint."""


class TaskError(TraceTransferError, ValueError):
    """A task spec or its data is invalid."""


class FrozenParameterChanged(TraceTransferError, AssertionError):
    """An element outside the allowed core sets changed during training."""


class SandboxError(TraceTransferError, RuntimeError):
    """The code-execution sandbox could not be built, so no generated code was run (fail closed)."""
