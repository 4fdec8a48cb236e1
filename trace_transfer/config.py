"""Settings, declared once: the strict base for user YAML, its one error formatter, and the helpers that
derive pipeline specs and checks from the library's config dataclasses.

Two kinds of configuration, one source of truth each:

- **User-facing YAML** (pipelines, task specs, rule files) parses into :class:`StrictModel` subclasses:
  unknown keys are errors, objects are frozen once loaded. :func:`validate_tree` reports *every*
  problem at once as one :class:`~trace_transfer.errors.ConfigError` whose lines read
  ``<file>:<line>: <where>: <problem>`` and suggest the closest key for a misspelled one
  (``unknown key 'ratoi'; did you mean 'ratio'?``). :func:`parse_yaml` keeps the line of every key so
  that a schema error can point at it.
- **Library settings** are dataclasses whose fields carry their help text (and, where it applies,
  ``choices`` and numeric bounds) in ``field(metadata=...)``, PEFT-style. :func:`field_problems`
  checks a dataclass instance against that metadata, and :func:`spec_model` generates the pipeline's
  pydantic spec from the same fields, and :func:`click_options` the CLI options, so names, defaults,
  choices and help cannot drift apart.

This module sits at the bottom of the package (only ``errors`` below it) and imports no torch: the
CLI's ``--help`` and YAML validation stay fast.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from trace_transfer.errors import ConfigError

__all__ = ["StrictModel", "parse_yaml", "read_yaml", "line_of", "loc_text", "located", "validation_problems", "validate_tree",
           "help_of", "field_problems", "spec_model", "click_options", "click_args"]


class StrictModel(BaseModel):
    """Base of every user-facing YAML schema: unknown keys are errors; loaded objects are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------------------
# YAML with line numbers
# --------------------------------------------------------------------------------------------------


class _LDict(dict):
    line: int = 0
    key_lines: dict[str, int]


class _LList(list):
    line: int = 0
    item_lines: list[int]


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that remembers where every mapping key and list item was (1-based lines)."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self.duplicates: list[tuple[int, str]] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> _LDict:  # type: ignore[override]
        self.flatten_mapping(node)
        out = _LDict()
        out.line, out.key_lines = node.start_mark.line + 1, {}
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in out:  # plain YAML silently keeps the last one; in a config that hides a mistake
                self.duplicates.append((key_node.start_mark.line + 1, str(key)))
            out[key] = self.construct_object(value_node, deep=True)
            out.key_lines[key] = key_node.start_mark.line + 1
        return out

    def construct_sequence(self, node: yaml.SequenceNode, deep: bool = False) -> _LList:  # type: ignore[override]
        out = _LList(self.construct_object(child, deep=True) for child in node.value)
        out.line, out.item_lines = node.start_mark.line + 1, [c.start_mark.line + 1 for c in node.value]
        return out


_LineLoader.add_constructor("tag:yaml.org,2002:map", _LineLoader.construct_mapping)
_LineLoader.add_constructor("tag:yaml.org,2002:seq", _LineLoader.construct_sequence)


def parse_yaml(text: str, source: str | Path, error: type[ConfigError] = ConfigError) -> tuple[Any, list[str]]:
    """Parse YAML text keeping the line of every key and item.

    Returns ``(tree, problems)``: the loaded data (dicts and lists that also carry line numbers, so
    :func:`line_of` can find them) and one problem per duplicated key, which plain YAML would silently
    drop. Raises ``error`` naming ``source:line`` when the text is not YAML at all.
    """
    loader = _LineLoader(text)
    try:
        tree = loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise error(f"{source}{line}: not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    finally:
        loader.dispose()
    problems = [f"{source}:{line}: duplicate key {key!r}; YAML keeps only the last one — remove one"
                for line, key in loader.duplicates]
    return tree, problems


def read_yaml(path: str | Path, error: type[ConfigError] = ConfigError) -> tuple[Any, list[str]]:
    """:func:`parse_yaml` of a file (UTF-8)."""
    return parse_yaml(read_text(path, error), path, error)


def read_text(path: str | Path, error: type[ConfigError] = ConfigError) -> str:
    """A config file's text (UTF-8); raises ``error`` naming the file (and the line of a non-UTF-8
    byte) when it cannot be read, instead of a UnicodeDecodeError or OSError traceback."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = Path(path).read_bytes()[: exc.start].count(b"\n") + 1
        raise error(f"{path}:{line}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x}); save the file as UTF-8") from None
    except IsADirectoryError:
        raise error(f"{path} is a directory; pass a YAML file") from None
    except OSError as exc:
        raise error(f"{path}: cannot read it ({exc.strerror}); check the path and its permissions") from None
    return text


def line_of(tree: Any, loc: tuple) -> int | None:
    """Line of the deepest element of ``loc`` (keys and list indices) found in a :func:`parse_yaml` tree."""
    line, node = getattr(tree, "line", None), tree
    for key in loc:
        if isinstance(node, _LDict) and key in node:
            line, node = node.key_lines.get(key, line), node[key]
        elif isinstance(node, _LList) and isinstance(key, int) and 0 <= key < len(node):
            line, node = node.item_lines[key], node[key]
        else:
            break
    return line


def loc_text(loc: tuple) -> str:
    """``("layer", 1, "name")`` -> ``layer[1].name``; the empty location is ``<top>``."""
    out = ""
    for k in loc:
        out += f"[{k}]" if isinstance(k, int) else (f".{k}" if out else str(k))
    return out or "<top>"


# --------------------------------------------------------------------------------------------------
# One formatter for every pydantic ValidationError
# --------------------------------------------------------------------------------------------------


def _existing_prefix(tree: Any, loc: tuple) -> tuple:
    """The part of ``loc`` that exists in the input (pydantic appends union member names to locations)."""
    node, out = tree, []
    for key in loc:
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and isinstance(key, int) and 0 <= key < len(node):
            node = node[key]
        else:
            break
        out.append(key)
    return tuple(out)


def _inner_model(ann: Any) -> type[BaseModel] | None:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in typing.get_args(ann):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def _model_at(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The schema class that owns the key at ``loc`` (for listing valid keys)."""
    model: type[BaseModel] | None = root
    for key in loc:
        if isinstance(key, int):
            continue
        if model is None or key not in model.model_fields:
            return model
        model = _inner_model(model.model_fields[key].annotation)
    return model


def _where(source: str | Path | None, line: int | None) -> str:
    if source is None:
        return ""
    return f"{source}:{line}: " if line else f"{source}: "


def located(problem: str, tree: Any, source: str | Path | None) -> str:
    """Prefix a ``"<dotted.key>: <message>"`` problem found outside the schema (a cross-field check)
    with ``<source>:<line>:`` of that key, so every problem of a YAML file points at its line."""
    key = problem.split(":", 1)[0]
    if not key or " " in key:  # prose, not a key path: name the file only
        return _where(source, None) + problem
    loc = tuple(int(k) if k.isdigit() else k for k in key.split("."))
    return _where(source, line_of(tree, loc)) + problem


def validation_problems(err: ValidationError, model: type[BaseModel], tree: Any = None,
                        source: str | Path | None = None) -> list[str]:
    """Every error of ``err`` as one line: ``<source>:<line>: <where>: <problem>``.

    Args:
        err: the error raised by ``model.model_validate(tree)``.
        model: the root schema (to list the valid keys and suggest the closest one).
        tree: the validated input; from :func:`parse_yaml` it also gives each problem its line.
        source: the file (or another name of the input) that starts each line; None: no prefix.
    """
    out: list[str] = []
    for e in err.errors():
        # Validators wrapping a field add `function-...` steps to the location; they are not keys.
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith(("function-", "tagged-union["))))
        where = _where(source, line_of(tree, loc))
        if e["type"] == "extra_forbidden":
            owner = _model_at(model, loc[:-1])
            valid = list(owner.model_fields) if owner else []
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "."
            out.append(f"{where}{loc_text(loc[:-1])}: unknown key {loc[-1]!r}{hint} Valid keys: {', '.join(valid)}")
        elif e["type"] == "missing":
            out.append(f"{where}{loc_text(loc[:-1])}: required key {loc[-1]!r} is missing; add it")
        else:
            # Union types report one error per member, with the member's type name appended to the
            # location; keep the first one per real location.
            key = f"{loc_text(_existing_prefix(tree, loc) if tree is not None else loc)}: "
            if any(p.startswith(where + key) for p in out):
                continue
            out.append(f"{where}{key}{e['msg']} (got {e.get('input')!r})")
    return out


M = typing.TypeVar("M", bound=BaseModel)


def validate_tree(model: type[M], tree: Any, source: str | Path | None = None, *, what: str = "config",
                  problems: list[str] | None = None, error: type[ConfigError] = ConfigError) -> M:
    """``model.model_validate(tree)``, or one ``error`` listing every problem (plus ``problems`` found
    earlier, e.g. duplicate keys from :func:`parse_yaml`)."""
    problems = list(problems or [])
    if not isinstance(tree, dict):
        raise error(f"{source or what}: a {what} is a mapping with keys {', '.join(model.model_fields)}; "
                    f"got {type(tree).__name__}")
    try:
        obj = model.model_validate(tree)
    except ValidationError as err:
        problems += validation_problems(err, model, tree, source)
        obj = None
    if problems:
        raise error(f"invalid {what}{f' {source}' if source else ''} ({len(problems)} problem(s)):", problems)
    assert obj is not None
    return obj


# --------------------------------------------------------------------------------------------------
# Library config dataclasses: per-field help, choices and bounds in the field metadata
# --------------------------------------------------------------------------------------------------

_BOUNDS = {"ge": (lambda v, b: v >= b, ">="), "gt": (lambda v, b: v > b, ">"),
           "le": (lambda v, b: v <= b, "<="), "lt": (lambda v, b: v < b, "<")}


def _field(cls: Any, name: str) -> dataclasses.Field:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def help_of(cls: Any, name: str) -> str:
    """The help text of dataclass field ``name`` (what the CLI and the pipeline spec show)."""
    return _field(cls, name).metadata["help"]


def field_problems(obj: Any) -> list[str]:
    """Check a config dataclass instance against its fields' ``choices`` and bounds (ge/gt/le/lt)."""
    problems = []
    for f in dataclasses.fields(obj):
        value, meta = getattr(obj, f.name), f.metadata
        if "choices" in meta and value not in meta["choices"]:
            problems.append(f"{f.name}={value!r}: choose one of {', '.join(map(str, meta['choices']))}")
        for key, (ok, op) in _BOUNDS.items():
            if key in meta and isinstance(value, (int, float)) and not ok(value, meta[key]):
                problems.append(f"{f.name}={value!r}: must be {op} {meta[key]}")
    return problems


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise ValueError(f"field {f.name!r} has no default")


def spec_model(name: str, sources: list[tuple[Any, list[str]]], *, defaults: dict[str, Any] | None = None,
               doc: str | None = None, extra: dict[str, Any] | None = None) -> type[StrictModel]:
    """A :class:`StrictModel` whose fields are taken from config dataclasses.

    Each field keeps its dataclass type, default, help text (as the description), ``choices`` (as a
    ``Literal``) and bounds, so a pipeline key cannot drift from the library setting it feeds.

    Args:
        name: class name of the generated model.
        sources: ``[(dataclass, [field names])]`` in the order the keys should appear.
        defaults: per-name default overrides, where the pipeline deliberately differs (e.g. more
            epochs for fine-tuning than for the probe); the type, help and checks stay the dataclass's.
        doc: the model's docstring.
        extra: further pydantic field definitions ``{name: (type, FieldInfo)}`` with no dataclass.
    """
    fields: dict[str, Any] = {}
    for cls, names in sources:
        hints = typing.get_type_hints(cls)
        for n in names:
            f = _field(cls, n)
            meta = f.metadata
            ann: Any = Literal[tuple(meta["choices"])] if "choices" in meta else hints[n]
            default = (defaults or {}).get(n, _default(f))
            bounds = {k: meta[k] for k in _BOUNDS if k in meta}
            fields[n] = (ann, Field(default, description=meta["help"], **bounds))
    fields.update(extra or {})
    caller = sys._getframe(1).f_globals.get("__name__")  # the module that declares it, for repr and docs
    model = create_model(name, __base__=StrictModel, __module__=caller, **fields)
    model.__doc__ = doc
    return model


def _sentence(text: str) -> str:
    return text if text.endswith((".", "?")) else text + "."


def click_options(cls: Any, names: list[str], *, defaults: dict[str, Any] | None = None) -> Any:
    """A decorator adding one click option per config-dataclass field, in the order given.

    ``max_steps`` becomes ``--max-steps``; the option's type follows the field's (a bool becomes a
    ``--x/--no-x`` switch), ``choices`` become a ``click.Choice``, and its default and help are the
    field's, so the CLI cannot drift from the library. ``defaults`` overrides a default where the
    command deliberately differs (e.g. 3 epochs per fine-tuning stage).
    """
    import click  # here, not at the top: the library itself needs no click

    hints = typing.get_type_hints(cls)
    made = []
    for n in names:
        f = _field(cls, n)
        meta, default = f.metadata, (defaults or {}).get(n, _default(f))
        flag = "--" + n.replace("_", "-")
        kw: dict[str, Any] = {"default": default, "show_default": True, "help": _sentence(meta["help"])}
        if "choices" in meta:
            kw["type"] = click.Choice([str(c) for c in meta["choices"]])
        elif hints[n] is bool:
            flag = f"{flag}/--no-{flag[2:]}"
        elif hints[n] in (int, float) and any(b in meta for b in ("ge", "gt", "le", "lt")):
            # The field's bounds are the option's: -3 steps is refused as a usage error, not sliced.
            rng = click.IntRange if hints[n] is int else click.FloatRange
            kw["type"] = rng(min=meta.get("ge", meta.get("gt")), max=meta.get("le", meta.get("lt")),
                             min_open="gt" in meta, max_open="lt" in meta)
        elif hints[n] in (int, float, str):
            kw["type"] = hints[n]
        made.append(click.option(flag, n, **kw))

    def decorate(fn: Any) -> Any:
        for option in reversed(made):  # click lists options in decorator order, top first
            fn = option(fn)
        return fn

    return decorate


def click_args(values: dict[str, Any]) -> list[str]:
    """The command-line arguments that the options of :func:`click_options` parse back into ``values``
    (field name -> value): ``--max-steps 5``, a bool as ``--x`` / ``--no-x``. A launched command gets its
    settings this way, so they are spelt once, as the dataclass fields, on both sides."""
    args: list[str] = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else f"--no-{flag[2:]}")
        elif value is not None:
            args += [flag, repr(value) if isinstance(value, float) else str(value)]
    return args
