"""Task data: specs (YAML or built-in ``synthetic:<name>``), examples, tokenisation with loss masks.

    >>> from trace_transfer.data import load_task, tokenize_examples, collate
    >>> task = load_task("synthetic:math")
    >>> feats = tokenize_examples(tok, task.train_examples(), seq_len=32)

See :mod:`trace_transfer.data.synthetic` for what each built-in task tests and why.
"""

from trace_transfer.data._example import Example
from trace_transfer.data.batching import IGNORE_INDEX, collate, make_dataloader, pad_id_of, tokenize_examples
from trace_transfer.data.synthetic import available_synthetic
from trace_transfer.data.tasks import (
    DataSpec,
    FieldSpec,
    GenerationSpec,
    MetricSpec,
    SplitSpec,
    Task,
    TaskSpec,
    load_task,
    load_task_spec,
)

__all__ = [
    "Example", "Task", "TaskSpec", "DataSpec", "SplitSpec", "FieldSpec", "MetricSpec", "GenerationSpec",
    "load_task", "load_task_spec", "available_synthetic",
    "tokenize_examples", "collate", "make_dataloader", "pad_id_of", "IGNORE_INDEX",
]
