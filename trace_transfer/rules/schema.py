"""Rule-file schema and role vocabulary (the line-aware YAML loader and the error formatter are the
shared ones in :mod:`trace_transfer.config`).

A rule file describes one architecture family's tensors in a shared *role vocabulary*, so that
``model.layers.3.self_attn.q_proj.weight`` (Llama), ``transformer.h.3.attn.c_attn.weight`` rows
``[0:768]`` (GPT-2) and ``model.layers.3.self_attn.qkv_proj.weight`` rows ``[0:q]`` (Phi-3) all
read as ``(attn_q, weight, layer 3)``. See ``docs/rules.md`` for the authoring guide.

Loading is strict: unknown keys, unknown roles, malformed expressions and inconsistent templates are
all collected and raised as one :class:`~trace_transfer.errors.RuleError` whose lines read
``<file>:<line>: <where>: <problem>; <fix>``.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from trace_transfer.config import StrictModel, line_of, loc_text, parse_yaml, read_text, validation_problems
from trace_transfer.rules.expr import LOOP_NAMES, Expr, ExprError
from trace_transfer.errors import RuleError

# --------------------------------------------------------------------------------------------------
# Role vocabulary (in the spirit of llama.cpp's GGUF tensor names). Transfer matches by role, never
# by list position, which is what breaks across families.
# --------------------------------------------------------------------------------------------------

ROLES: dict[str, str] = {
    "token_embd": "token embedding table [vocab, hidden]",
    "pos_embd": "learned absolute position embedding [positions, hidden]",
    "token_types": "token-type embedding (BERT-style)",
    "token_embd_norm": "norm applied right after the embedding",
    "output": "LM head [vocab, hidden] (often tied to token_embd)",
    "output_norm": "final norm before the LM head",
    "attn_norm": "pre-attention norm",
    "attn_post_norm": "norm on the attention output before the residual add (Gemma 2/3, OLMo 2)",
    "attn_q": "query projection",
    "attn_k": "key projection",
    "attn_v": "value projection",
    "attn_qkv": "fused q/k/v projection (declare its parts under `split:`)",
    "attn_kv": "fused k/v projection (declare its parts under `split:`)",
    "attn_o": "attention output projection",
    "attn_q_norm": "query norm, per head (Qwen3, Gemma 3: [head_dim]) or over the whole projection (OLMo 2: [heads*head_dim])",
    "attn_k_norm": "key norm, per head or over the whole projection (as attn_q_norm)",
    "attn_sinks": "learned attention-sink logits",
    "ffn_norm": "pre-MLP norm",
    "ffn_post_norm": "norm on the MLP output before the residual add (Gemma 2/3, OLMo 2)",
    "ffn_gate": "gated-MLP gate projection",
    "ffn_up": "MLP up projection (or the only input projection of a non-gated MLP)",
    "ffn_down": "MLP down projection",
    "ffn_gate_up": "fused gate/up projection (declare its parts under `split:`)",
    "ffn_router": "MoE router [experts, hidden]",
    "ffn_router_bias": "MoE router score-correction bias",
    "ffn_gate_exp": "per-expert gate projection",
    "ffn_up_exp": "per-expert up projection",
    "ffn_down_exp": "per-expert down projection",
    "ffn_gate_up_exp": "per-expert fused gate/up projection (declare its parts under `split:`)",
    "ffn_shared_gate": "shared-expert gate projection",
    "ffn_shared_up": "shared-expert up projection",
    "ffn_shared_down": "shared-expert down projection",
    "ffn_shared_gate_up": "shared-expert fused gate/up projection",
    "ffn_shared_router": "gate scaling the shared expert's output [1, hidden]",
    "layer_out_norm": "norm at the very end of a block",
}
# Architecture-specific tensors with no shared meaning use `x_<name>`; transfer reports them as having
# no counterpart instead of guessing. `?` is what `rules init` writes when it cannot guess.
CUSTOM_ROLE_PREFIX = "x_"
PLACEHOLDER = "?"

# Roles whose canonical (torch Linear, [out, in]) axis is heads × head_dim; transfer resamples per head
# along it. attn_o takes heads on its input side.
HEAD_AXIS: dict[str, int] = {
    "attn_q": 0, "attn_k": 0, "attn_v": 0, "attn_o": 1, "attn_q_norm": 0, "attn_k_norm": 0,
}

_FIELD_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")
SECTIONS = ("before", "layer", "experts", "after")


def rule_error(message: str, problems: list[str]) -> RuleError:
    """A RuleError whose text lists every problem (and keeps them in ``.problems``)."""
    err = RuleError(message + "".join(f"\n  - {p}" for p in problems))
    err.problems = list(problems)
    return err


def is_valid_role(role: str) -> bool:
    return role in ROLES or (role.startswith(CUSTOM_ROLE_PREFIX) and len(role) > len(CUSTOM_ROLE_PREFIX))


# --------------------------------------------------------------------------------------------------
# Schema (strict: unknown keys are errors, objects are frozen once loaded)
# --------------------------------------------------------------------------------------------------


Size = int | str


class Part(StrictModel):
    """One component of a fused tensor."""

    role: str = Field(description="role of this part, e.g. attn_q")
    size: Size = Field(description="extent along the split axis; for `interleave`, per group (config expression)")


class Split(StrictModel):
    """How a fused tensor divides into parts along one axis."""

    axis: int = Field(0, description="axis of the weight to split (1-D fields such as bias always split along 0)")
    layout: Literal["concat", "interleave"] = Field(
        "concat", description="concat: parts one after another; interleave: [groups, parts...] repeated per group"
    )
    groups: Size | None = Field(None, description="interleave only: number of groups, e.g. num_attention_heads")
    parts: list[Part] = Field(min_length=2)


class TensorRule(StrictModel):
    """One tensor (or one tensor per field / layer / expert) of the checkpoint."""

    role: str
    name: str = Field(description="name template; placeholders {layer}, {expert}, {field}")
    fields: list[str] = Field(default_factory=lambda: ["weight"], min_length=1)
    aliases: list[str] = Field(default_factory=list, description="other names of the same tensor")
    optional: bool = False
    when: bool | str | None = Field(None, description="config condition; the rule applies only where true")
    tied_to: str | None = Field(None, description="role whose tensor this one shares when it is absent")
    transposed: bool = Field(False, description="stored [in, out] (GPT-2 Conv1D) instead of torch's [out, in]")
    split: Split | None = None
    expert_axis: int | None = Field(None, description="experts section: axis stacking all experts in one tensor")
    variant: str | None = Field(None, description="storage variant; a checkpoint uses exactly one variant")


class Match(StrictModel):
    model_type: list[str] = Field(default_factory=list)
    architectures: list[str] = Field(default_factory=list)


class RuleFile(StrictModel):
    format: Literal[1] = 1
    family: str
    description: str = ""
    match: Match
    num_layers: Size = Field(description="config expression for the number of decoder layers")
    num_experts: Size | None = Field(None, description="config expression for experts per MoE layer")
    head_dim: Size | None = Field(None, description="config expression for the attention head size")
    config_defaults: dict[str, Size | bool | None] = Field(default_factory=dict)
    ignore: list[str] = Field(default_factory=list, description="globs (or `re:<regex>`) of tensors to skip")
    expand: dict[str, list[str]] = Field(default_factory=dict, description="companions: role -> roles")
    before: list[TensorRule] = Field(default_factory=list)
    layer: list[TensorRule] = Field(default_factory=list)
    experts: list[TensorRule] = Field(default_factory=list)
    after: list[TensorRule] = Field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# Compiled rules
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompiledRule:
    """A :class:`TensorRule` with its place in the file and its expressions parsed."""

    rule: TensorRule
    section: str
    index: int
    line: int
    when: Expr | None
    part_sizes: tuple[Expr, ...] = ()
    groups: Expr | None = None

    @property
    def where(self) -> str:
        return f"{self.section}[{self.index}] ({self.rule.role})"

    @property
    def templates(self) -> tuple[str, ...]:
        return (self.rule.name, *self.rule.aliases)

    def instantiate(self, template: str, layer: int | None, expert: int | None, field_: str) -> str:
        return template.replace("{layer}", str(layer)).replace("{expert}", str(expert)).replace("{field}", field_)


@dataclass
class RuleSet:
    """One loaded, statically validated rule file (see :func:`trace_transfer.rules.loader.load_rules`)."""

    path: Path
    spec: RuleFile
    rules: list[CompiledRule]
    num_layers: Expr
    num_experts: Expr | None
    head_dim: Expr | None
    defaults: dict[str, Expr]
    ignore: list[tuple[str, re.Pattern]]
    text: str = ""
    origin: str = "user"
    _tree: Any = field(default=None, repr=False)

    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def expand(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in self.spec.expand.items()}

    def where(self, line: int | None) -> str:
        return f"{self.path}:{line}" if line else str(self.path)

    def __repr__(self) -> str:
        return f"RuleSet(family={self.family!r}, path={str(self.path)!r}, rules={len(self.rules)})"


def _glob_to_regex(pattern: str) -> re.Pattern:
    if pattern.startswith("re:"):
        return re.compile(pattern[3:])
    # `*` spans dots on purpose: `*.rotary_emb.inv_freq` should hit every layer's buffer.
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern))


def parse_rule_text(text: str, path: Path, origin: str = "user") -> RuleSet:
    """Parse and statically validate rule-file text; all problems are raised together."""
    tree, problems = parse_yaml(text, path, RuleError)
    if not isinstance(tree, dict):
        raise RuleError(f"{path}: a rule file is a YAML mapping with keys {', '.join(RuleFile.model_fields)}")
    try:
        spec = RuleFile.model_validate(tree)
    except ValidationError as err:
        problems += validation_problems(err, RuleFile, tree, path)
        problems += _raw_problems(tree, path)  # roles and expressions too, so one run shows everything
        raise rule_error(f"invalid rule file {path} ({len(problems)} problem(s)):", problems) from None
    ruleset, more = _compile(spec, tree, path)
    problems += more
    if problems:
        raise rule_error(f"invalid rule file {path} ({len(problems)} problem(s)):", problems)
    ruleset.text, ruleset.origin = text, origin
    return ruleset


def _raw_problems(tree: Any, path: Path) -> list[str]:
    """Role and expression problems found in the raw YAML when the schema check already failed."""
    out: list[str] = []

    def at(*loc: Any) -> str:
        return f"{path}:{line_of(tree, loc)}: {loc_text(loc)}"

    def role(value: Any, *loc: Any) -> None:
        if isinstance(value, str) and value != PLACEHOLDER and not is_valid_role(value):
            close = difflib.get_close_matches(value, list(ROLES), n=3)
            out.append(f"{at(*loc)}: unknown role {value!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))

    def expr(value: Any, kind: str, *loc: Any) -> None:
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            try:
                Expr(value, kind)
            except ExprError as exc:
                out.append(f"{at(*loc)}: {exc}")

    for key in ("num_layers", "num_experts", "head_dim"):
        if key in tree:
            expr(tree[key], "size", key)
    for section in SECTIONS:
        items = tree.get(section)
        if not isinstance(items, list):
            continue
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                continue
            role(item.get("role"), section, i, "role")
            if isinstance(item.get("when"), str):
                expr(item["when"], "condition", section, i, "when")
            split = item.get("split")
            if isinstance(split, dict) and isinstance(split.get("parts"), list):
                for j, part in enumerate(split["parts"]):
                    if isinstance(part, dict):
                        role(part.get("role"), section, i, "split", "parts", j, "role")
                        expr(part.get("size"), "size", section, i, "split", "parts", j, "size")
    return out


def _compile(spec: RuleFile, tree: Any, path: Path) -> tuple[RuleSet, list[str]]:
    problems: list[str] = []

    def at(*loc: Any) -> str:
        line = line_of(tree, loc)
        return f"{path}:{line}" if line else str(path)

    def expr(value: Any, kind: str, *loc: Any) -> Expr | None:
        try:
            e = Expr(value, kind)
        except ExprError as exc:
            problems.append(f"{at(*loc)}: {loc_text(loc)}: {exc}")
            return None
        loops = set(LOOP_NAMES) & e.names
        if loops and not (kind == "condition" and loc[0] in ("layer", "experts")):
            problems.append(f"{at(*loc)}: {loc_text(loc)}: {sorted(loops)[0]!r} is only defined in per-layer `when:` conditions")
        return e

    num_layers = expr(spec.num_layers, "size", "num_layers")
    num_experts = expr(spec.num_experts, "size", "num_experts") if spec.num_experts is not None else None
    head_dim = expr(spec.head_dim, "size", "head_dim") if spec.head_dim is not None else None
    defaults = {}
    for key, value in spec.config_defaults.items():
        if value is None or isinstance(value, bool):
            defaults[key] = Expr(value, "condition") if isinstance(value, bool) else None
        else:
            defaults[key] = expr(value, "size", "config_defaults", key)
    defaults = {k: v for k, v in defaults.items() if v is not None}

    ignore = []
    for i, pat in enumerate(spec.ignore):
        try:
            ignore.append((pat, _glob_to_regex(pat)))
        except re.error as exc:
            problems.append(f"{at('ignore', i)}: ignore[{i}]: bad regex {pat!r}: {exc}")

    def check_role(role: str, *loc: Any) -> None:
        if role == PLACEHOLDER:
            problems.append(f"{at(*loc)}: {loc_text(loc)}: role is the placeholder '?'; pick a role from the vocabulary "
                            f"(`trace-transfer rules list --roles`) or name it {CUSTOM_ROLE_PREFIX}<something>")
        elif not is_valid_role(role):
            close = difflib.get_close_matches(role, list(ROLES), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            problems.append(f"{at(*loc)}: {loc_text(loc)}: unknown role {role!r}{hint} "
                            f"(or use {CUSTOM_ROLE_PREFIX}{role} for an architecture-specific tensor)")

    for role, companions in spec.expand.items():
        check_role(role, "expand", role)
        for j, c in enumerate(companions):
            check_role(c, "expand", role, j)

    compiled: list[CompiledRule] = []
    roles_in_file: set[str] = set()
    seen_templates: dict[tuple[str, str | None], str] = {}
    for section in SECTIONS:
        for i, rule in enumerate(getattr(spec, section)):
            loc = (section, i)
            check_role(rule.role, *loc, "role")
            roles_in_file.add(rule.role)
            for t_idx, template in enumerate((rule.name, *rule.aliases)):
                tloc = (*loc, "name") if t_idx == 0 else (*loc, "aliases", t_idx - 1)
                problems += [f"{at(*tloc)}: {loc_text(tloc)}: {p}" for p in _template_problems(template, section, rule)]
                key = (template, rule.variant)
                if key in seen_templates:
                    problems.append(f"{at(*tloc)}: {loc_text(tloc)}: template {template!r} already used by "
                                    f"{seen_templates[key]}; each tensor must be matched by exactly one rule")
                seen_templates[key] = f"{section}[{i}]"
            for j, f in enumerate(rule.fields):
                if not _FIELD_RE.match(f):
                    problems.append(f"{at(*loc, 'fields', j)}: {loc_text((*loc, 'fields', j))}: field {f!r} is not an identifier (use weight, bias, ...)")
            if rule.tied_to is not None:
                check_role(rule.tied_to, *loc, "tied_to")
            when = expr(rule.when, "condition", *loc, "when") if rule.when is not None else None
            sizes: list[Expr] = []
            groups = None
            if rule.split is not None:
                for j, part in enumerate(rule.split.parts):
                    check_role(part.role, *loc, "split", "parts", j, "role")
                    roles_in_file.add(part.role)
                    e = expr(part.size, "size", *loc, "split", "parts", j, "size")
                    if e is not None:
                        sizes.append(e)
                if rule.split.layout == "interleave":
                    if rule.split.groups is None:
                        problems.append(f"{at(*loc, 'split')}: {loc_text((*loc, 'split'))}: layout interleave needs "
                                        f"`groups:` (e.g. num_attention_heads for GPT-NeoX query_key_value)")
                    else:
                        groups = expr(rule.split.groups, "size", *loc, "split", "groups")
                elif rule.split.groups is not None:
                    problems.append(f"{at(*loc, 'split', 'groups')}: `groups:` only applies to layout interleave")
            if section == "experts":
                has_expert = "{expert}" in rule.name
                if has_expert == (rule.expert_axis is not None):
                    problems.append(f"{at(*loc)}: {loc_text(loc)}: an experts rule either has {{expert}} in its name "
                                    f"(one tensor per expert) or `expert_axis:` (all experts stacked in one tensor), exactly one")
            elif rule.expert_axis is not None:
                problems.append(f"{at(*loc, 'expert_axis')}: `expert_axis:` belongs to rules in the `experts:` section")
            compiled.append(CompiledRule(rule, section, i, line_of(tree, loc) or 0, when, tuple(sizes), groups))
    if spec.experts and spec.num_experts is None:
        problems.append(f"{at('experts')}: experts: rules need a top-level `num_experts:` config expression (e.g. num_experts)")
    for c in compiled:
        if c.rule.tied_to is not None and c.rule.tied_to not in roles_in_file:
            problems.append(f"{at(c.section, c.index, 'tied_to')}: tied_to {c.rule.tied_to!r}: no rule in this file has that role")
    ruleset = RuleSet(path, spec, compiled, num_layers or Expr(0), num_experts, head_dim, defaults, ignore, _tree=tree)
    return ruleset, problems


def _template_problems(template: str, section: str, rule: TensorRule) -> list[str]:
    out = []
    holders = _PLACEHOLDER_RE.findall(template)
    for h in holders:
        if h not in ("layer", "expert", "field"):
            out.append(f"unknown placeholder {{{h}}} in {template!r}; use {{layer}}, {{expert}} or {{field}}")
    if section in ("layer", "experts") and "layer" not in holders:
        out.append(f"{template!r} has no {{layer}}; per-layer rules must contain it (or move the rule to before/after)")
    if section in ("before", "after") and ("layer" in holders or "expert" in holders):
        out.append(f"{template!r} has a layer/expert placeholder; move the rule to the `layer:` or `experts:` section")
    if section == "layer" and "expert" in holders:
        out.append(f"{template!r} has {{expert}}; move the rule to the `experts:` section")
    if "field" not in holders and len(rule.fields) != 1:
        out.append(f"{template!r} has no {{field}} but the rule lists fields {rule.fields}; add .{{field}} to the name")
    if "field" not in holders and rule.fields == ["weight"] and template.endswith(".bias"):
        out.append(f"{template!r} ends in .bias but the rule's field is weight; write `fields: [bias]`")
    return out


def load_rule_file(path: str | Path, origin: str = "user") -> RuleSet:
    path = Path(path)
    if not path.is_file():
        from trace_transfer.errors import ArtifactNotFoundError

        raise ArtifactNotFoundError(f"rule file not found: {path}")
    return parse_rule_text(read_text(path, RuleError), path, origin)
