"""Task specs (YAML, strict) and ``load_task``: from a file, a hub dataset or a built-in synthetic task
to lists of :class:`Example`.

A task spec names the data, how rows become prompt/response text, which split is evaluated, and the
metric. Example (``tasks/gsm8k.yaml``)::

    name: gsm8k
    data: {path: openai/gsm8k, config: main}      # hub id, or a local .jsonl/.json/.parquet/.csv
    splits: {train: train, eval: test}            # or {train: train, eval_fraction: 0.1, seed: 0}
    fields: {prompt: question, response: answer}
    template: "Question: {question}\\nAnswer:"     # {column} placeholders; default: the prompt field
    metric: {name: exact_match, regex: "#### *(-?[0-9.,]+)"}
    generation: {max_new_tokens: 256}
    max_eval_samples: 500

Chat data: ``fields: {messages: messages}`` — a list of ``{role, content}``; the last assistant turn
is the response, everything before it the prompt, rendered with the tokenizer's chat template when
the task is bound to a tokenizer that has one (``load_task(ref, tokenizer=tok)``), else as a plain
``role: content`` join. Both training and evaluation read ``Example.prompt``, so whichever rendering
a Task uses, they agree.

Validation is strict and complete: unknown keys (with the valid ones listed), wrong types and
cross-field mistakes are collected and raised together as one ``ConfigError`` naming the file,
before any data is read.
"""

from __future__ import annotations

import os
import random
import re
import string
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from trace_transfer.config import StrictModel, located, read_yaml, validation_problems
from trace_transfer.data._example import Example
from trace_transfer.registry import BUILTIN_METRICS, METRICS
from trace_transfer.errors import ArtifactNotFoundError, ConfigError, TaskError

__all__ = ["TaskSpec", "DataSpec", "SplitSpec", "FieldSpec", "MetricSpec", "GenerationSpec", "Task", "load_task",
           "load_task_spec"]

_FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".tsv": "csv"}


class DataSpec(StrictModel):
    """Where the rows come from: exactly one of ``path``, ``files`` or ``synthetic``."""

    path: str | None = Field(None, description="local .jsonl/.json/.parquet/.csv file, or a hub dataset id")
    files: dict[str, str] | None = Field(None, description="split name -> local file, e.g. {train: a.jsonl, eval: b.jsonl}")
    config: str | None = Field(None, description="hub dataset config name (e.g. 'main' for gsm8k)")
    revision: str | None = Field(None, description="hub dataset revision")
    format: Literal["json", "parquet", "csv"] | None = Field(None, description="file format when the suffix does not say")
    synthetic: str | None = Field(None, description="a built-in synthetic task name (see trace_transfer.data.synthetic)")
    params: dict[str, Any] = Field(default_factory=dict, description="synthetic task parameters (n_train, n_eval, seed, skills)")


class SplitSpec(StrictModel):
    """Which split trains and which evaluates; without ``eval``, a seeded held-out fraction of train."""

    train: str = Field("train", description="split used for training")
    eval: str | None = Field(None, description="split used for evaluation; None = hold out eval_fraction of train")
    eval_fraction: float | None = Field(None, gt=0, lt=1, description="held-out share of train (default 0.1 when eval is unset)")
    seed: int = Field(0, description="seed of the held-out draw")


class FieldSpec(StrictModel):
    """Column names in the data."""

    prompt: str | None = Field(None, description="prompt column (default 'prompt' unless template or messages)")
    response: str | None = Field(None, description="response column (default 'response' unless messages)")
    messages: str | None = Field(None, description="chat column: list of {role, content}")
    choices: str | None = Field(None, description="multiple choice: column with the list of choices, or a "
                                "{label: text} mapping (choices in label order)")
    answer: str | None = Field(None, description="gold answer column (choice index/text/label, or final answer)")
    tests: str | None = Field(None, description="code_exec: column with test code")
    entry_point: str | None = Field(None, description="code_exec: column with the function name under test")


class MetricSpec(StrictModel):
    """The metric and its options; options are passed to the metric function by name."""

    name: str = Field(description="exact_match | multiple_choice | code_exec | perplexity | a registered metric")
    regex: str | None = Field(None, description="exact_match: answer-extraction pattern (first group if any)")
    ignore_case: bool | None = Field(None, description="exact_match: compare case-insensitively")
    normalization: Literal["sum", "mean", "char"] | None = Field(None, description="multiple_choice: log-likelihood normalisation")
    timeout: float | None = Field(None, gt=0, description="code_exec: seconds per program")


class GenerationSpec(StrictModel):
    max_new_tokens: int | None = Field(None, ge=1, description="greedy generation budget")
    stop: list[str] | None = Field(None, description="strings that end a generation")


class TaskSpec(StrictModel):
    """A task: data, formatting, split, metric. Parse YAML with :func:`load_task_spec`."""

    name: str = Field(description="task name (keys results and reports)")
    description: str | None = None
    data: DataSpec
    splits: SplitSpec = Field(default_factory=SplitSpec)
    fields: FieldSpec = Field(default_factory=FieldSpec)
    template: str | None = Field(None, description="prompt template with {column} placeholders")
    response_template: str | None = Field(None, description="response template with {column} placeholders")
    metric: MetricSpec
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    max_train_samples: int | None = Field(None, ge=1)
    max_eval_samples: int | None = Field(None, ge=1)

    @field_validator("data", mode="before")
    @classmethod
    def _data_shorthand(cls, v: Any) -> Any:
        return {"path": v} if isinstance(v, str) else v

    @field_validator("metric", mode="before")
    @classmethod
    def _metric_shorthand(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v


# --------------------------------------------------------------------------------------------------
# Validation: every problem at once
# --------------------------------------------------------------------------------------------------


def _template_fields(template: str) -> list[str] | str:
    """Placeholder names of ``template``, or an error message when it does not parse."""
    try:
        return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        return f"{exc} (write literal braces as {{{{ and }}}})"


# Each metric's own options (MetricSpec fields); giving one to another metric is a mistake worth naming.
_METRIC_OPTIONS = {"exact_match": {"regex", "ignore_case"}, "multiple_choice": {"normalization"},
                   "code_exec": {"timeout"}, "perplexity": set()}


def _semantic_problems(raw: dict[str, Any]) -> list[str]:
    """Cross-field rules, checked on the raw mapping so they are reported with type errors too."""
    data = raw.get("data")
    data = {"path": data} if isinstance(data, str) else data if isinstance(data, dict) else {}
    splits = raw.get("splits") if isinstance(raw.get("splits"), dict) else {}
    fields = raw.get("fields") if isinstance(raw.get("fields"), dict) else {}
    return [*_data_problems(raw, data), *_split_problems(data, splits), *_field_problems(raw, fields),
            *_metric_problems(raw.get("metric"), data, fields)]


def _data_problems(raw: dict[str, Any], data: dict[str, Any]) -> list[str]:
    problems = []
    sources = [k for k in ("path", "files", "synthetic") if data.get(k)]
    if len(sources) != 1 and isinstance(raw.get("data"), (dict, str)):
        problems.append(f"data: give exactly one of path, files, synthetic (got {', '.join(sources) or 'none'})")
    if data.get("params") and not data.get("synthetic"):
        problems.append("data.params: only synthetic tasks take params")
    if data.get("synthetic"):
        from trace_transfer.data import synthetic

        try:
            synthetic.check_params(str(data["synthetic"]), dict(data.get("params") or {}))
        except ConfigError as exc:
            problems.extend(f"data.synthetic: {p}" for p in (exc.problems or [str(exc)]))
    return problems


def _split_problems(data: dict[str, Any], splits: dict[str, Any]) -> list[str]:
    problems = []
    if splits.get("eval") and splits.get("eval_fraction"):
        problems.append("splits: give either eval (a split name) or eval_fraction (held out of train), not both")
    files = data.get("files")
    if isinstance(files, dict):
        used = {splits.get("train", "train"), splits.get("eval")}
        problems += [f"data.files.{split}: this split is not used; set splits.train or splits.eval to {split!r}"
                     for split in files if split not in used]
    return problems


def _field_problems(raw: dict[str, Any], fields: dict[str, Any]) -> list[str]:
    problems = []
    if fields.get("messages") and (fields.get("prompt") or fields.get("response") or raw.get("template")):
        problems.append("fields.messages: chat data takes prompt and response from the messages; "
                        "drop fields.prompt/fields.response/template")
    for key in ("template", "response_template"):
        if isinstance(raw.get(key), str):
            parsed = _template_fields(raw[key])
            if isinstance(parsed, str):
                problems.append(f"{key}: {parsed}")
            elif any(not f or not f.isidentifier() for f in parsed):
                problems.append(f"{key}: placeholders must be column names like {{question}}, got {parsed}")
    return problems


def _metric_problems(metric: Any, data: dict[str, Any], fields: dict[str, Any]) -> list[str]:
    mname = metric if isinstance(metric, str) else metric.get("name") if isinstance(metric, dict) else None
    if not isinstance(mname, str):
        return []  # a missing or mistyped name is pydantic's to report
    problems = []
    known = _known_metrics()
    if mname not in known:
        problems.append(f"metric.name: unknown metric {mname!r}; valid: {', '.join(known)}")
    if mname == "multiple_choice" and not data.get("synthetic") and not fields.get("choices"):
        problems.append("fields.choices: multiple_choice needs the column that holds the choices")
    if mname == "code_exec" and not data.get("synthetic") and not fields.get("tests"):
        problems.append("fields.tests: code_exec needs the column that holds the test code")
    regex = metric.get("regex") if isinstance(metric, dict) else None
    if isinstance(regex, str):
        try:  # checked when the spec loads, not first at evaluation after hours of training
            re.compile(regex)
        except re.error as exc:
            problems.append(f"metric.regex: {regex!r} is not a valid regular expression ({exc})")
    allowed = _METRIC_OPTIONS.get(mname)
    if allowed is not None and isinstance(metric, dict):
        problems += [f"metric.{opt}: not an option of {mname} (its options: {', '.join(sorted(allowed)) or 'none'})"
                     for opt in ("regex", "ignore_case", "normalization", "timeout")
                     if metric.get(opt) is not None and opt not in allowed]
    return problems


def _known_metrics() -> list[str]:
    # The built-ins are known before evaluation/ is imported; users' metrics once they are registered.
    return sorted({*BUILTIN_METRICS, *METRICS.names()})


def validate_spec(raw: Any, source: str = "<task spec>", problems: list[str] | None = None) -> TaskSpec:
    """Build a :class:`TaskSpec` from a mapping, raising one ConfigError with every problem.

    ``raw`` from :func:`trace_transfer.config.parse_yaml` gives each problem its ``file:line``;
    ``problems`` found earlier (duplicate keys) are reported with the rest.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a task spec is a mapping with keys {', '.join(TaskSpec.model_fields)}; "
                          f"got {type(raw).__name__}")
    problems = list(problems or [])
    spec = None
    try:
        spec = TaskSpec.model_validate(raw)
    except ValidationError as err:
        problems.extend(validation_problems(err, TaskSpec, raw, source))
    problems.extend(located(p, raw, source) for p in _semantic_problems(raw) if p not in problems)
    if problems:
        raise ConfigError(f"{source}: invalid task spec ({len(problems)} problem{'s' * (len(problems) > 1)})", problems)
    assert spec is not None
    return spec


def load_task_spec(path: str | os.PathLike) -> TaskSpec:
    """Parse and validate a task YAML file. Relative data paths are resolved against the file's dir."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactNotFoundError(f"task file {path} does not exist; pass a YAML task spec or synthetic:<name> "
                                    f"(e.g. synthetic:math)")
    raw, duplicates = read_yaml(path)
    spec = validate_spec(raw, str(path), duplicates)
    return _resolve_paths(spec, path.parent)


def _resolve_paths(spec: TaskSpec, base: Path) -> TaskSpec:
    """Relative local data files are relative to the spec file (so specs can ship next to data)."""

    def fix(p: str) -> str:
        cand = base / p
        return str(cand) if not Path(p).is_absolute() and cand.exists() else p

    data = spec.data
    update: dict[str, Any] = {}
    if data.path:
        update["path"] = fix(data.path)
    if data.files:
        update["files"] = {k: fix(v) for k, v in data.files.items()}
    return spec.model_copy(update={"data": data.model_copy(update=update)}) if update else spec


# --------------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------------


class Task:
    """A loaded task: examples for training and evaluation.

    Rows are read lazily on first use and cached. ``tokenizer`` (optional) is only used to render
    chat messages with its chat template.
    """

    def __init__(self, spec: TaskSpec, ref: str | None = None, tokenizer: Any = None):
        self.spec = spec
        self.ref = ref or spec.name
        self.tokenizer = tokenizer
        self._train: list[Example] | None = None
        self._eval: list[Example] | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def metric(self) -> MetricSpec:
        return self.spec.metric

    def __repr__(self) -> str:
        return f"Task({self.name!r}, ref={self.ref!r}, metric={self.spec.metric.name!r})"

    def bind(self, tokenizer: Any) -> Task:
        """The same task rendering chat prompts with ``tokenizer``'s chat template."""
        return Task(self.spec, self.ref, tokenizer)

    def train_examples(self) -> list[Example]:
        self._load(train=True)
        assert self._train is not None
        return self._train[: self.spec.max_train_samples] if self.spec.max_train_samples else list(self._train)

    def eval_examples(self, limit: int | None = None) -> list[Example]:
        self._load(train=False)
        assert self._eval is not None
        if limit is not None and limit < 0:
            raise ConfigError(f"eval limit {limit}: must be >= 0 (the number of examples to evaluate per task)")
        caps = [c for c in (limit, self.spec.max_eval_samples) if c is not None]
        return self._eval[: min(caps)] if caps else list(self._eval)

    def _load(self, train: bool) -> None:
        if self._eval is not None and (self._train is not None or not train):
            return
        if self.spec.data.synthetic:
            from trace_transfer.data import synthetic

            # Evaluation-only use (the common case for base-skill scores) skips the training draw.
            tr, self._eval = synthetic.generate(self.spec.data.synthetic, dict(self.spec.data.params), train=train)
            if train:
                self._train = tr
        else:
            self._train, self._eval = _load_rows(self.spec, self.tokenizer)


def load_task(ref: str | os.PathLike | Task, tokenizer: Any = None) -> Task:
    """A task from a YAML spec path or ``synthetic:<name>[?n_train=..&n_eval=..&seed=..&skills=..]``.

    Args:
        ref: the reference; a :class:`Task` is returned as is (bound to ``tokenizer`` if given).
        tokenizer: renders chat messages with its chat template (optional).

    Raises:
        ConfigError: unknown synthetic task or parameter, invalid spec (all problems listed).
        ArtifactNotFoundError: the YAML file does not exist.

    Example:
        >>> task = load_task("synthetic:math?n_train=800")
        >>> task.train_examples()[0]
        Example(prompt='sum 3 4=', response='7', meta={'task': 'math', 'skill': 'add'}, ...)
    """
    if isinstance(ref, Task):
        return ref.bind(tokenizer) if tokenizer is not None else ref
    s = os.fspath(ref)
    if s.startswith("lm-eval:"):  # evaluation-only: scored through lm-evaluation-harness
        from trace_transfer.data.lm_eval_ref import LmEvalTask

        return LmEvalTask(s)  # type: ignore[return-value]
    if s.startswith("synthetic:"):
        return Task(_synthetic_spec(s), s, tokenizer)
    return Task(load_task_spec(s), s, tokenizer)


def _synthetic_spec(ref: str) -> TaskSpec:
    from trace_transfer.data import synthetic

    name, params = synthetic.parse_ref(ref)
    return TaskSpec(
        name=synthetic.task_name(name, params),
        description=synthetic.describe(name),
        data=DataSpec(synthetic=name, params=params),
        metric=MetricSpec(name="exact_match"),
        # Answers are at most 5 characters; a small budget keeps evaluation cheap on CPU.
        generation=GenerationSpec(max_new_tokens=8),
    )


# --------------------------------------------------------------------------------------------------
# Reading rows with `datasets`
# --------------------------------------------------------------------------------------------------


def _file_format(path: str, override: str | None) -> str | None:
    if override:
        return override
    name = path.lower().removesuffix(".gz").removesuffix(".bz2").removesuffix(".xz")
    return next((fmt for suf, fmt in _FILE_FORMATS.items() if name.endswith(suf)), None)


def _load_dataset_dict(spec: TaskSpec):
    import datasets

    d = spec.data
    try:
        if d.files:
            missing = [f for f in d.files.values() if not Path(f).exists()]
            if missing:
                raise ArtifactNotFoundError(f"task {spec.name!r}: data file(s) not found: {', '.join(missing)}")
            fmts = {_file_format(f, d.format) for f in d.files.values()}
            if None in fmts or len(fmts) != 1:
                raise TaskError(f"task {spec.name!r}: cannot tell one file format from {list(d.files.values())}; "
                                f"use .jsonl/.json/.parquet/.csv files of one kind or set data.format")
            return datasets.load_dataset(fmts.pop(), data_files=dict(d.files))
        assert d.path is not None
        if Path(d.path).is_dir():  # a folder of data files: datasets infers the format and splits
            if not any(_file_format(f.name, None) for f in Path(d.path).rglob("*") if f.is_file()):
                raise TaskError(f"task {spec.name!r}: data.path {d.path} is a directory with no .jsonl/.json/"
                                f".parquet/.csv files; point data.path at the data file")
            return datasets.load_dataset(d.path, d.config, revision=d.revision)
        local = Path(d.path).exists() or _file_format(d.path, None) is not None or d.path.startswith((".", "/", "~"))
        if local:
            if not Path(d.path).exists():
                raise ArtifactNotFoundError(f"task {spec.name!r}: data file {d.path} does not exist")
            fmt = _file_format(d.path, d.format)
            if fmt is None:
                raise TaskError(f"task {spec.name!r}: cannot tell the format of {d.path}; set data.format "
                                f"to json, parquet or csv")
            if Path(d.path).stat().st_size == 0:
                raise TaskError(f"task {spec.name!r}: data file {d.path} is empty; fill it or point data.path elsewhere")
            _check_utf8(spec, d.path, fmt)
            extra = {"delimiter": "\t"} if d.path.endswith(".tsv") else {}
            return datasets.load_dataset(fmt, data_files={"train": d.path}, **extra)
        return datasets.load_dataset(d.path, d.config, revision=d.revision)
    except (ArtifactNotFoundError, TaskError):
        raise
    except (FileNotFoundError, ConnectionError, OSError) as exc:
        raise ArtifactNotFoundError(
            f"task {spec.name!r}: could not load dataset {d.path or d.files!r} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Hub datasets need network access or a local cache "
            f"(HF_DATASETS_OFFLINE=1); otherwise point data.path at a local file"
        ) from exc
    except ValueError as exc:  # datasets reports missing configs and bad files as ValueError
        raise TaskError(f"task {spec.name!r}: datasets could not read {d.path or d.files!r}: {exc}") from exc
    except Exception as exc:
        # datasets wraps a malformed line (bad JSON, bad encoding) in its own DatasetGenerationError.
        from datasets.exceptions import DatasetGenerationError

        if not isinstance(exc, DatasetGenerationError):
            raise
        cause = exc.__cause__ or exc.__context__ or exc
        raise TaskError(f"task {spec.name!r}: cannot read {d.path or d.files!r} ({type(cause).__name__}: "
                        f"{str(cause).splitlines()[0] if str(cause) else ''}); fix the file (one JSON object "
                        f"per line, UTF-8)") from exc


def _check_utf8(spec: TaskSpec, path: str, fmt: str) -> None:
    """Text data must be UTF-8: pyarrow accepts other bytes and fails only when a row is read."""
    if fmt not in ("json", "csv") or path.endswith((".gz", ".bz2", ".xz")):
        return
    import codecs

    decoder, line = codecs.getincrementaldecoder("utf-8")(), 1
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as exc:
                line += block[: exc.start].count(b"\n")
                raise TaskError(f"task {spec.name!r}: data file {path} line {line} is not UTF-8 text (byte "
                                f"0x{block[exc.start]:02x}); save the file as UTF-8") from None
            line += block.count(b"\n")


def _load_rows(spec: TaskSpec, tokenizer: Any) -> tuple[list[Example], list[Example]]:
    dd = _load_dataset_dict(spec)
    sp = spec.splits
    available = list(dd.keys())
    for role, split in (("train", sp.train), ("eval", sp.eval)):
        if split is not None and split not in dd:
            raise TaskError(f"task {spec.name!r}: splits.{role} = {split!r} is not in the data; available splits: "
                            f"{', '.join(available)}")
    train_rows = [dict(r) for r in dd[sp.train]]
    if sp.eval is not None:
        eval_rows = [dict(r) for r in dd[sp.eval]]
    else:
        # A seeded permutation (not the file order) so the held-out part is not, e.g., the last topic.
        frac = sp.eval_fraction or 0.1
        order = list(range(len(train_rows)))
        random.Random(sp.seed).shuffle(order)
        n_eval = max(1, round(frac * len(order))) if len(order) > 1 else 0
        eval_rows = [train_rows[i] for i in sorted(order[:n_eval])]
        train_rows = [train_rows[i] for i in sorted(order[n_eval:])]
    columns = sorted({k for r in train_rows + eval_rows for k in r})
    _check_columns(spec, columns)
    fmt = _RowFormatter(spec, tokenizer)
    train = [fmt(r, i) for i, r in enumerate(train_rows)]
    ev = [fmt(r, i) for i, r in enumerate(eval_rows)]
    return train, ev


def _check_columns(spec: TaskSpec, columns: list[str]) -> None:
    f = spec.fields
    wanted: dict[str, str] = {}
    if f.messages:
        wanted["fields.messages"] = f.messages
    else:
        if spec.template is None:
            wanted["fields.prompt"] = f.prompt or "prompt"
        if spec.response_template is None:
            wanted["fields.response"] = f.response or "response"
    for key in ("choices", "answer", "tests", "entry_point"):
        if getattr(f, key):
            wanted[f"fields.{key}"] = getattr(f, key)
    for key in ("template", "response_template"):
        tpl = getattr(spec, key)
        if tpl:
            for name in _template_fields(tpl):
                wanted[f"{key} placeholder {{{name}}}"] = name
    problems = [f"{where}: column {col!r} not in the data" for where, col in wanted.items() if col not in columns]
    if problems:
        raise TaskError(f"task {spec.name!r}: the data does not have the columns the spec names (columns: "
                        f"{', '.join(columns)})\n" + "\n".join(f"  - {p}" for p in problems))


class _RowFormatter:
    """Turns one data row into an :class:`Example` according to the spec."""

    def __init__(self, spec: TaskSpec, tokenizer: Any):
        self.spec = spec
        self.tokenizer = tokenizer
        self.chat_template = bool(tokenizer is not None and getattr(tokenizer, "chat_template", None))

    def __call__(self, row: dict[str, Any], index: int) -> Example:
        spec, f = self.spec, self.spec.fields
        meta: dict[str, Any] = {"task": spec.name, "index": index}
        if f.messages:
            prompt, response = self._chat(row[f.messages], index)
            meta["chat_template"] = self.chat_template
        else:
            for col in ([] if spec.template else [f.prompt or "prompt"]) + \
                    ([] if spec.response_template else [f.response or "response"]):
                if row.get(col) is None:  # str(None) would train on the text "None"
                    raise TaskError(f"task {spec.name!r} row {index}: column {col!r} is missing or null; fill it "
                                    f"or drop the row from the data")
            prompt = spec.template.format(**row) if spec.template else str(row[f.prompt or "prompt"])
            response = (spec.response_template.format(**row) if spec.response_template
                        else str(row[f.response or "response"]))
        if f.entry_point:
            meta["entry_point"] = row[f.entry_point]
        choices = None
        answer = row[f.answer] if f.answer else None
        if f.choices:
            choices = row[f.choices]
            if isinstance(choices, dict):  # {label: text}, e.g. MedQA's options {"A": ..., "D": ...}
                labels = [str(k) for k in choices]
                choices = list(choices.values())
                if isinstance(answer, str) and answer in labels:  # the gold label (answer_idx: "C")
                    answer = labels.index(answer)
            if not isinstance(choices, list):
                raise TaskError(f"task {spec.name!r} row {index}: fields.choices column {f.choices!r} must hold a "
                                f"list or a {{label: text}} mapping, got {type(choices).__name__}")
            choices = [str(c) for c in choices]
        return Example(prompt=prompt, response=response, meta=meta, choices=choices,
                       answer=answer, tests=row[f.tests] if f.tests else None)

    def _chat(self, messages: Any, index: int) -> tuple[str, str]:
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                     for m in messages):
            raise TaskError(f"task {self.spec.name!r} row {index}: messages must be a list of {{role, content}}")
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            raise TaskError(f"task {self.spec.name!r} row {index}: no assistant message to use as the response")
        context, response = messages[:last], str(messages[last]["content"])
        if self.chat_template:
            prompt = self.tokenizer.apply_chat_template(context, tokenize=False, add_generation_prompt=True)
            # Templates often spell out BOS; the tokenizer adds it again when encoding the prompt.
            bos, bos_id = getattr(self.tokenizer, "bos_token", None), getattr(self.tokenizer, "bos_token_id", None)
            if bos and prompt.startswith(bos) and self.tokenizer("x")["input_ids"][:1] == [bos_id]:
                prompt = prompt[len(bos):]
            return prompt, response
        return "".join(f"{m['role']}: {m['content']}\n" for m in context) + "assistant: ", response
