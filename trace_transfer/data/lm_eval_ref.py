"""``lm-eval:<task>`` task references: an lm-evaluation-harness task (or a local lm-eval task YAML)
in a task list, a stage's ``monitor:`` list or ``eval --task``.

The reference only names the task; ``trace_transfer.evaluation.lm_eval_backend`` evaluates it (this
module imports no lm_eval, so task lists parse without the optional extra installed). Syntax:

    lm-eval:gsm8k
    lm-eval:mmlu?metric=acc&num_fewshot=5
    lm-eval:path/to/my_task.yaml?metric=exact_match&filter=strict-match

Options: ``metric`` and ``filter`` pick the result (default: the task's first metric, filter ``none``
when the task has it, else its first filter); ``num_fewshot`` overrides the task's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from trace_transfer.errors import ConfigError, TaskError

__all__ = ["PREFIX", "LmEvalTask", "is_lm_eval_ref"]

PREFIX = "lm-eval:"
_OPTIONS = ("metric", "filter", "num_fewshot")


def is_lm_eval_ref(ref: Any) -> bool:
    return isinstance(ref, str) and ref.startswith(PREFIX)


class LmEvalTask:
    """An lm-eval task named by a reference; evaluation only (``train_examples`` refuses)."""

    backend = "lm-eval"
    metric = "lm-eval"  # what code that reads ``task.metric`` (consent checks, reports) sees
    spec = None

    def __init__(self, ref: str):
        body, _, query = ref[len(PREFIX):].partition("?")
        if not body:
            raise ConfigError(f"task reference {ref!r} names no lm-eval task; e.g. lm-eval:gsm8k or lm-eval:my_task.yaml")
        self.ref = ref
        self.options: dict[str, Any] = {}
        for key, value in parse_qsl(query, keep_blank_values=True):
            if key not in _OPTIONS:
                raise ConfigError(f"task reference {ref!r}: unknown option {key!r}; valid: {', '.join(_OPTIONS)}")
            self.options[key] = int(value) if key == "num_fewshot" else value
        self.yaml: Path | None = None
        if body.endswith((".yaml", ".yml")):
            self.yaml = Path(body)
            if not self.yaml.is_file():
                raise ConfigError(f"lm-eval task file {body} (from {ref!r}) does not exist")
            import yaml

            self.task = str((yaml.safe_load(self.yaml.read_text()) or {}).get("task") or "")
            if not self.task:
                raise ConfigError(f"lm-eval task file {body} has no `task:` name")
        else:
            self.task = body
        self.name = f"{PREFIX}{self.task}"

    def bind(self, tokenizer: Any) -> LmEvalTask:
        return self

    def _refuse(self, *_: Any, **__: Any):
        raise TaskError(f"{self.ref} is an lm-evaluation-harness task: it can be evaluated (eval --task, monitor:) "
                        f"but not trained on or probed; give a task YAML or synthetic:<name> for training")

    train_examples = _refuse
    eval_examples = _refuse

    def __repr__(self) -> str:
        return f"LmEvalTask({self.ref!r})"
