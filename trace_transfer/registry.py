"""One registry shape for every pluggable part: scoring strategies, training methods, layer mappers,
merge methods and metrics.

A :class:`Registry` maps a lower-case name to an object plus a one-line description. Registering is
one call (or a decorator) in the file that defines the part, as plugins do in PEFT's
``register_peft_method``; looking up an unknown name raises a :class:`ConfigError` that lists the
valid names and suggests the closest one.

    >>> STRATEGIES = Registry("scoring strategy", cli_hint="--strategy")
    >>> @STRATEGIES.register("lf", description="TRACE-LF: L2 of Δ + Fisher")
    ... class LF: ...
    >>> STRATEGIES.get("lf") is LF
    True
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

    def __init__(self, kind: str, *, cli_hint: str | None = None) -> None:
        self.kind = kind
        self.cli_hint = cli_hint
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, obj: T | None = None, *, description: str = "", replace: bool = False,
                 **info: Any) -> Any:
        """Register ``obj`` as ``name``; without ``obj``, return a decorator.

        Raises:
            ConfigError: the name is malformed, or taken (pass ``replace=True`` to override on purpose).
        """

        def add(o: T) -> T:
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                raise ConfigError(f"{self.kind} name {name!r}: use lower-case letters, digits, '-', '_', '.' or ':'")
            if name in self._entries and not replace:
                raise ConfigError(f"{self.kind} {name!r} is already registered; pick another name "
                                  f"or pass replace=True")
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
        """The error text for an unknown name: the valid ones and the closest match."""
        close = difflib.get_close_matches(str(name), list(self._entries), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        flag = f" ({self.cli_hint})" if self.cli_hint else ""
        return f"unknown {self.kind}{flag} {name!r}{hint} Choose one of: {', '.join(self._entries) or '(none registered)'}"

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


# Metric names are part of a task spec's vocabulary, so data/ validates them; the metrics themselves
# live in evaluation/, which registers them here. Defining the registry at this level keeps data/ from
# importing evaluation/ (which imports data/).
METRICS: Registry[Callable[..., Any]] = Registry("metric", cli_hint="metric:")
BUILTIN_METRICS = ("exact_match", "multiple_choice", "code_exec", "perplexity")
