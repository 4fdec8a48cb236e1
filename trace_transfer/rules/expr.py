"""Config expressions in rule files: a tiny, safe evaluator (no ``eval``).

Rule files compute sizes from the model config (``num_key_value_heads * head_dim``) and switch rules
on and off with conditions (``when: attention_bias``). Both are parsed with :mod:`ast` and walked
over a whitelist of node types, so a rule file can never run code:

* size expressions: integers, config names (dotted for sub-configs: ``text_config.hidden_size``),
  ``+ - * //`` and parentheses. ``/`` is refused because sizes must be integers.
* conditions additionally allow ``%``, comparisons (``== != < <= > >=``, ``in``, ``not in``),
  ``and``/``or``/``not``, and ``true/false/none`` literals. Per-layer rules may use the name
  ``layer`` (e.g. MoE models whose dense layers are listed in ``mlp_only_layers``).
"""

from __future__ import annotations

import ast
import difflib
import operator
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["Expr", "ExprError", "ConfigView"]

_BINOPS_SIZE: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
}
_BINOPS_COND = {**_BINOPS_SIZE, ast.Mod: operator.mod}
_CMPOPS: dict[type, Callable[[Any, Any], bool]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}
# YAML authors write true/false/null; Python spells them differently.
_LITERAL_NAMES = {"true": True, "false": False, "True": True, "False": False, "none": None, "None": None, "null": None}
# Names bound by the resolver rather than read from the config.
LOOP_NAMES = ("layer",)


class ExprError(ValueError):
    """An expression is malformed, uses a forbidden operation, or names a missing config key."""


class ConfigView:
    """Read-only access to a model config (a ``PretrainedConfig`` or a plain dict) with fallbacks.

    ``defaults`` maps a config name to an expression used when the config lacks that name or holds
    ``None`` (Phi-3 configs have no ``head_dim``; Llama configs may leave ``num_key_value_heads``
    unset). Attribute access goes through the config object so its ``attribute_map`` aliases
    (GPT-2's ``n_embd`` ↔ ``hidden_size``) and properties work.
    """

    def __init__(self, config: Any, defaults: Mapping[str, Expr] | None = None):
        self.config = config
        self.defaults = dict(defaults or {})
        self._resolving: set[str] = set()

    def keys(self) -> list[str]:
        if isinstance(self.config, Mapping):
            base = list(self.config)
        elif hasattr(self.config, "to_dict"):
            base = list(self.config.to_dict())
        else:
            base = [k for k in vars(self.config) if not k.startswith("_")]
        return sorted(set(base) | set(self.defaults))

    def lookup(self, dotted: str) -> Any:
        head, *rest = dotted.split(".")
        value = _get(self.config, head)
        if value is None and head in self.defaults:
            if head in self._resolving:
                raise ExprError(f"config_defaults entry {head!r} refers to itself")
            self._resolving.add(head)
            try:
                value = self.defaults[head].evaluate(self)
            finally:
                self._resolving.discard(head)
        if value is None and not _has(self.config, head):
            close = difflib.get_close_matches(head, self.keys(), n=3, cutoff=0.6)
            hint = f" (close: {', '.join(close)})" if close else ""
            raise ExprError(
                f"the model config has no {head!r}{hint}; use a key the config has, or give a fallback "
                f"under `config_defaults:` in the rule file"
            )
        for part in rest:
            if not _has(value, part):
                raise ExprError(f"config {dotted!r}: {part!r} not found")
            value = _get(value, part)
        return value


def _has(obj: Any, key: str) -> bool:
    if isinstance(obj, Mapping):
        return key in obj
    try:
        getattr(obj, key)
    except AttributeError:
        return False
    return True


def _get(obj: Any, key: str) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(key)
    return getattr(obj, key, None)


class Expr:
    """A parsed size expression or condition.

    Example:
        >>> Expr("num_key_value_heads * head_dim").evaluate(ConfigView({"num_key_value_heads": 2, "head_dim": 8}))
        16
    """

    def __init__(self, text: str | int | bool, kind: str = "size"):
        if kind not in ("size", "condition"):
            raise ValueError(f"kind must be 'size' or 'condition', got {kind!r}")
        self.kind = kind
        self.text = text
        self.names: set[str] = set()
        if isinstance(text, bool):
            if kind == "size":
                raise ExprError(f"expected an integer size expression, got {text!r}")
            self._tree: ast.AST = ast.Constant(text)
            return
        if isinstance(text, int):
            self._tree = ast.Constant(text)
            return
        if not isinstance(text, str) or not text.strip():
            raise ExprError(f"expected an expression string, got {text!r}")
        if text.strip() == "?":
            raise ExprError("'?' is a placeholder left by `rules init`; replace it with a config expression "
                            "such as num_key_value_heads * head_dim")
        try:
            self._tree = ast.parse(text.strip(), mode="eval").body
        except SyntaxError as exc:
            raise ExprError(f"cannot parse {text!r}: {exc.msg}") from None
        self._check(self._tree)

    def __repr__(self) -> str:
        return f"Expr({self.text!r})"

    def __str__(self) -> str:
        return str(self.text)

    # -- static check ------------------------------------------------------------------------------

    def _check(self, node: ast.AST) -> None:
        binops = _BINOPS_SIZE if self.kind == "size" else _BINOPS_COND
        if isinstance(node, ast.Constant):
            ok = isinstance(node.value, int) or (self.kind == "condition" and isinstance(node.value, (str, float)))
            if not ok:
                raise ExprError(f"{self.text!r}: literal {node.value!r} not allowed")
        elif isinstance(node, ast.Name):
            if node.id not in _LITERAL_NAMES:
                self.names.add(node.id)
            elif self.kind == "size":
                raise ExprError(f"{self.text!r}: {node.id} is not a size")
        elif isinstance(node, ast.Attribute):
            _dotted(node, self.text)
            self.names.add(_dotted(node, self.text).split(".")[0])
        elif isinstance(node, ast.BinOp):
            if type(node.op) not in binops:
                fix = " (sizes are integers: use //)" if isinstance(node.op, ast.Div) else ""
                allowed = " ".join(_OP_SYMBOLS[t] for t in binops)
                raise ExprError(f"{self.text!r}: operator {_OP_SYMBOLS.get(type(node.op), '?')} not allowed{fix}; allowed: {allowed}")
            self._check(node.left)
            self._check(node.right)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            self._check(node.operand)
        elif self.kind == "condition" and isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            self._check(node.operand)
        elif self.kind == "condition" and isinstance(node, ast.BoolOp):
            for v in node.values:
                self._check(v)
        elif self.kind == "condition" and isinstance(node, ast.Compare):
            if any(type(op) not in _CMPOPS for op in node.ops):
                raise ExprError(f"{self.text!r}: only == != < <= > >= in, not in comparisons are allowed")
            for v in (node.left, *node.comparators):
                self._check(v)
        elif self.kind == "condition" and isinstance(node, (ast.List, ast.Tuple)):
            for v in node.elts:
                self._check(v)
        else:
            what = "+ - * // and parentheses" if self.kind == "size" else "arithmetic, comparisons, and/or/not"
            raise ExprError(f"{self.text!r}: {type(node).__name__} not allowed in a {self.kind} expression (allowed: {what})")

    # -- evaluation --------------------------------------------------------------------------------

    def evaluate(self, config: ConfigView, **bound: Any) -> Any:
        """Evaluate against a config; ``bound`` supplies loop names such as ``layer``."""
        value = self._eval(self._tree, config, bound)
        if self.kind == "size":
            if not isinstance(value, int) or isinstance(value, bool):
                raise ExprError(f"{self.text!r} evaluated to {value!r}, not an integer")
            return value
        return bool(value)

    def _eval(self, node: ast.AST, cfg: ConfigView, bound: dict[str, Any]) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            if node.id in _LITERAL_NAMES:
                return _LITERAL_NAMES[node.id]
            if node.id in bound:
                return bound[node.id]
            return cfg.lookup(node.id)
        if isinstance(node, ast.Attribute):
            return cfg.lookup(_dotted(node, self.text))
        if isinstance(node, ast.BinOp):
            left, right = self._eval(node.left, cfg, bound), self._eval(node.right, cfg, bound)
            if left is None or right is None:
                raise ExprError(f"{self.text!r}: an operand is null in this config")
            try:
                return _BINOPS_COND[type(node.op)](left, right)
            except ZeroDivisionError:
                raise ExprError(f"{self.text!r}: division by zero with this config") from None
        if isinstance(node, ast.UnaryOp):
            v = self._eval(node.operand, cfg, bound)
            return not v if isinstance(node.op, ast.Not) else (-v if isinstance(node.op, ast.USub) else +v)
        if isinstance(node, ast.BoolOp):
            values = (self._eval(v, cfg, bound) for v in node.values)
            return all(values) if isinstance(node.op, ast.And) else any(values)
        if isinstance(node, ast.Compare):
            left = self._eval(node.left, cfg, bound)
            for op, comp in zip(node.ops, node.comparators):
                right = self._eval(comp, cfg, bound)
                if right is None and isinstance(op, (ast.In, ast.NotIn)):
                    right = ()  # configs write `mlp_only_layers: null` for "none"
                if not _CMPOPS[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(node, (ast.List, ast.Tuple)):
            return [self._eval(v, cfg, bound) for v in node.elts]
        raise ExprError(f"{self.text!r}: cannot evaluate {type(node).__name__}")  # unreachable after _check


_OP_SYMBOLS = {
    ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.FloorDiv: "//", ast.Mod: "%", ast.Div: "/", ast.Pow: "**",
    ast.BitAnd: "&", ast.BitOr: "|", ast.BitXor: "^", ast.LShift: "<<", ast.RShift: ">>", ast.MatMult: "@",
}


def _dotted(node: ast.AST, text: Any) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        raise ExprError(f"{text!r}: only dotted config names are allowed (like text_config.hidden_size)")
    parts.append(node.id)
    return ".".join(reversed(parts))
