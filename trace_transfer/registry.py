"""One registry shape for every pluggable part: scoring strategies, training methods, layer mappers,
merge methods, metrics and the pipeline's methods.

A :class:`Registry` maps a lower-case name to an object plus a one-line description and free-form
facts (``info``). Registering is one call (or a decorator) in the file that defines the part, as
plugins do in PEFT's ``register_peft_method``; looking up an unknown name raises a
:class:`ConfigError` that lists the valid names and suggests the closest one. Each concept keeps its
public ``register_*`` function as a thin wrapper that checks the object's shape and calls
:meth:`Registry.register`.

    >>> STRATEGIES = Registry("scoring strategy", cli_hint="--strategy")
    >>> @STRATEGIES.register("lf", description="TRACE-LF: L2 of Δ + Fisher")
    ... class LF: ...
    >>> STRATEGIES.get("lf") is LF
    True
    >>> STRATEGIES.get("lff")
    Traceback (most recent call last):
    ...
    trace_transfer.errors.ConfigError: unknown scoring strategy 'lff' (--strategy); did you mean 'lf'? choose one of: lf
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from trace_transfer.errors import ConfigError

T = TypeVar("T")
_NAME = re.compile(r"[a-z][a-z0-9_.:-]*")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    description: str = ""
    info: dict[str, Any] = field(default_factory=dict)  # free-form facts a caller may need (e.g. "kind")


class Registry(Generic[T]):
    """Named plugins of one kind. Iteration yields names in registration order."""

    def __init__(self, kind: str, *, cli_hint: str | None = None, how_to_add: str | None = None,
                 validate: Callable[[str, T], None] | None = None) -> None:
        """``kind`` names the plugins in errors ("scoring strategy"); ``cli_hint`` is the option or key
        a user types the name into ("--strategy"); ``how_to_add`` ends the unknown-name error (e.g.
        "or register your own with register_layer_mapper"); ``validate(name, obj)`` raises
        ConfigError when ``obj`` lacks what this kind of plugin must have, so a broken plugin fails
        where it is registered rather than deep inside a run."""
        self.kind = kind
        self.cli_hint = cli_hint
        self.how_to_add = how_to_add
        self.validate = validate
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, obj: T | None = None, *, description: str = "", replace: bool = False,
                 **info: Any) -> Any:
        """Register ``obj`` as ``name``; without ``obj``, return a decorator.

        Raises:
            ConfigError: the name is malformed, taken (pass ``replace=True`` to override on purpose),
                or ``obj`` fails the registry's ``validate``.
        """

        def add(o: T) -> T:
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                raise ConfigError(f"{self.kind} name {name!r}: use lower-case letters, digits, '-', '_', '.' or ':'")
            if name in self._entries and not replace:
                raise ConfigError(f"{self.kind} {name!r} is already registered; pick another name "
                                  f"or pass replace=True")
            if self.validate is not None:
                self.validate(name, o)
            desc = description or (getattr(o, "__doc__", None) or "").strip().split("\n")[0]
            self._entries[name] = Entry(name, o, desc, dict(info))
            return o

        return add(obj) if obj is not None else add

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def entry(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(self.unknown(name)) from None

    def unknown(self, name: Any) -> str:
        """The error text for an unknown name: the closest match and the valid ones."""
        flag = f" ({self.cli_hint})" if self.cli_hint else ""
        close = difflib.get_close_matches(str(name), list(self._entries), n=1)
        guess = f"did you mean {close[0]!r}? " if close else ""
        add = f"; {self.how_to_add}" if self.how_to_add else ""
        return (f"unknown {self.kind} {name!r}{flag}; {guess}choose one of: "
                f"{', '.join(self._entries) or '(none registered)'}{add}")

    def unregister(self, name: str) -> T:
        """Remove ``name`` and return its object (a test's or plugin's clean-up; built-ins stay put).

        Raises:
            ConfigError: ``name`` is not registered.
        """
        obj = self.get(name)
        del self._entries[name]
        return obj

    def names(self) -> list[str]:
        return list(self._entries)

    def describe(self) -> dict[str, str]:
        return {n: e.description for n, e in self._entries.items()}

    def items(self) -> list[tuple[str, T]]:
        return [(n, e.obj) for n, e in self._entries.items()]

    def where(self, predicate: Callable[[Entry[T]], bool]) -> list[str]:
        return [n for n, e in self._entries.items() if predicate(e)]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


def must_be_callable(signature: str) -> Callable[[str, Any], None]:
    """A ``validate`` for registries of plain functions; ``signature`` shows the call they must accept."""

    def validate(name: str, obj: Any) -> None:
        if not callable(obj):
            raise ConfigError(f"{name!r} must be a function {signature}, got {type(obj).__name__} {obj!r}")

    return validate


# Metric names are part of a task spec's vocabulary, so data/ validates them; the metrics themselves
# live in evaluation/, which registers them here. Defining the registry at this level keeps data/ from
# importing evaluation/ (which imports data/).
METRICS: Registry[Callable[..., Any]] = Registry(
    "metric", cli_hint="metric:", how_to_add="or register your own with register_metric",
    validate=must_be_callable("fn(model, tokenizer, examples, *, batch_size, **options) -> EvalResult"))
BUILTIN_METRICS = ("exact_match", "multiple_choice", "code_exec", "perplexity")
