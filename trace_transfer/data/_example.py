"""The unit of task data every module exchanges: one prompt, one reference response."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Example:
    """One task example.

    Attributes:
        prompt: text the model is conditioned on (no loss on it).
        response: reference continuation (the loss is on it; exact-match compares against it).
        meta: free-form provenance, e.g. ``{"task": "math", "skill": "add"}`` for synthetic tasks or
            ``{"entry_point": "f"}`` for code execution.
        choices: candidate continuations for ``multiple_choice`` (scored by log-likelihood).
        answer: the gold choice (index or text) for multiple choice, or the gold answer string when it
            differs from ``response`` (e.g. a final number inside a worked solution).
        tests: test code for ``code_exec``.
    """

    prompt: str
    response: str
    meta: dict[str, Any] = field(default_factory=dict)
    choices: list[str] | None = None
    answer: Any = None
    tests: str | None = None
