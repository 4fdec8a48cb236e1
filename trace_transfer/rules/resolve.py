"""Apply a rule file to a model: tensor name ↔ (role, field, layer, expert), with fused-part slices.

A model is seen as a :class:`ModelSpec`: its config plus tensor names and shapes, read without
loading weights — from safetensors headers (what the checkpoint files hold) or from the model class
instantiated on the meta device (what ``named_parameters()`` of the loaded model holds). The two can
differ: transformers 5 fuses MoE experts into one stacked tensor in memory but saves one tensor per
expert, which is why rule files can declare storage ``variant``s.
"""

from __future__ import annotations

import difflib
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from trace_transfer.rules.expr import ConfigView, ExprError
from trace_transfer.rules.schema import CompiledRule, RuleSet, rule_error
from trace_transfer.errors import ArtifactError, ArtifactNotFoundError, ConfigError

_MAX_LISTED = 8
# Where tensor names come from: checkpoint (safetensors files), model (the class on the meta device), or
# auto (checkpoint when safetensors files exist, else model). The CLI takes its --layout choices from here.
LAYOUTS = ("auto", "checkpoint", "model")


# --------------------------------------------------------------------------------------------------
# What a model looks like without its weights
# --------------------------------------------------------------------------------------------------


@dataclass
class ModelSpec:
    """A model's config and tensor shapes (no weights).

    ``origin`` says where the names came from: ``checkpoint:<path>`` (safetensors headers),
    ``model`` (a live module's ``named_parameters``), ``meta`` (the class built on the meta device)
    or ``coreset:<path>``.
    """

    config: Any
    shapes: dict[str, tuple[int, ...]]
    origin: str = "given"

    @property
    def model_type(self) -> str | None:
        return _cfg_get(self.config, "model_type")

    @property
    def architectures(self) -> list[str]:
        return list(_cfg_get(self.config, "architectures") or [])

    @property
    def label(self) -> str:
        return f"{self.model_type or 'model'} ({self.origin})"


def _cfg_get(config: Any, key: str) -> Any:
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def load_config(path_or_id: str | Path, trust_remote_code: bool = False) -> Any:
    """``AutoConfig`` for a model dir or hub id; falls back to the raw ``config.json`` dict for model
    types this transformers does not know (so ``rules init`` works on new architectures)."""
    from transformers import AutoConfig

    path = Path(path_or_id)
    if path.exists() and not (path / "config.json").is_file():
        raise ArtifactNotFoundError(f"{path} has no config.json; point at a Hugging Face model directory")
    if path.is_dir():  # an unreadable config.json is named here, not deep inside transformers
        try:
            json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"{path / 'config.json'}: not valid JSON ({exc}); restore the model's config.json") from None
    try:
        return AutoConfig.from_pretrained(str(path_or_id), trust_remote_code=trust_remote_code)
    except (OSError, EnvironmentError) as exc:
        if not path.exists():
            raise ArtifactNotFoundError(
                f"model {str(path_or_id)!r} is neither a local directory nor reachable on the hub ({exc}); "
                f"pass a local model directory"
            ) from None
        raise
    except (ValueError, KeyError):
        if path.is_dir():
            return json.loads((path / "config.json").read_text())
        raise


def model_spec(model: Any, layout: str = "auto", trust_remote_code: bool = False) -> ModelSpec:
    """Describe a model by config + tensor shapes without loading weights.

    Args:
        model: a ``ModelSpec``, an ``nn.Module`` (uses ``named_parameters``), a ``PretrainedConfig``
            (built on the meta device), a local HF model directory or a hub id.
        layout: ``checkpoint`` — the names in the safetensors files; ``model`` — the names of the
            instantiated model's parameters (meta device, no memory); ``auto`` — checkpoint when
            safetensors files exist, else model.

    Raises:
        ArtifactNotFoundError: the directory/hub id does not exist or holds no config.
        ConfigError: ``layout`` is unknown, or the class cannot be built for ``layout="model"``.
    """
    if layout not in LAYOUTS:
        raise ConfigError(f"layout {layout!r}: expected {', '.join(LAYOUTS)}")
    if isinstance(model, ModelSpec):
        return model
    import torch

    if isinstance(model, torch.nn.Module):
        return ModelSpec(model.config, {n: tuple(p.shape) for n, p in model.named_parameters()}, "model")
    if hasattr(model, "to_dict") and hasattr(model, "model_type"):  # a PretrainedConfig
        return ModelSpec(model, _meta_shapes(model, trust_remote_code), "meta")
    ref = str(model)
    config = load_config(ref, trust_remote_code)
    path = Path(ref)
    if layout != "model":
        if path.is_dir():
            if any(path.glob("*.safetensors")):
                from trace_transfer.checkpoint import open_checkpoint

                reader = open_checkpoint(path)
                return ModelSpec(config, reader.shapes(), f"checkpoint:{path}")
            if layout == "checkpoint":
                raise ArtifactNotFoundError(f"{path} holds no *.safetensors files; use layout='model' to read the names "
                                            f"from the model class instead")
        elif not path.exists():
            shapes = _hub_header_shapes(ref)
            if shapes is not None:
                return ModelSpec(config, shapes, f"checkpoint:hub:{ref}")
    if isinstance(config, dict):
        raise ConfigError(f"transformers does not know model_type {config.get('model_type')!r} of {ref}, so the "
                          f"model cannot be built on the meta device; use the checkpoint layout (safetensors files)")
    return ModelSpec(config, _meta_shapes(config, trust_remote_code), f"meta:{ref}")


def _meta_shapes(config: Any, trust_remote_code: bool) -> dict[str, tuple[int, ...]]:
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises many types here; the message is what matters
        raise ConfigError(f"cannot build {getattr(config, 'model_type', '?')} from its config on the meta device: {exc}") from exc
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def _hub_header_shapes(repo_id: str) -> dict[str, tuple[int, ...]] | None:
    """Tensor shapes of a hub repo from its safetensors headers only (a few KB, no weights)."""
    try:
        from huggingface_hub import get_safetensors_metadata

        meta = get_safetensors_metadata(repo_id)
    except Exception:  # offline or no safetensors: the caller falls back to the meta-device model
        return None
    return {n: tuple(t.shape) for fm in meta.files_metadata.values() for n, t in fm.tensors.items()}


# --------------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Slot:
    """One role instance: ``Slot("attn_q", "weight", layer=3)``; ``layer``/``expert`` None for globals."""

    role: str
    field: str = "weight"
    layer: int | None = None
    expert: int | None = None

    def __str__(self) -> str:
        where = "" if self.layer is None else f" L{self.layer}"
        where += "" if self.expert is None else f" E{self.expert}"
        return f"{self.role}.{self.field}{where}"


@dataclass(frozen=True)
class Region:
    """Where a slot lives: a tensor, optionally one expert of a stacked tensor and a part of a fused one.

    ``ranges`` are ``(start, stop)`` intervals along ``split_axis`` in part order (several for an
    interleaved part); None means the whole tensor. ``transposed`` marks ``[in, out]`` storage.
    """

    tensor: str
    shape: tuple[int, ...]
    split_axis: int | None = None
    ranges: tuple[tuple[int, int], ...] | None = None
    expert_axis: int | None = None
    expert: int | None = None
    transposed: bool = False
    tied_from: str | None = None

    @property
    def is_whole(self) -> bool:
        return self.ranges is None and self.expert_axis is None

    def index(self):
        """LongTensor of the split-axis indices (None for a whole axis)."""
        import torch

        if self.ranges is None:
            return None
        return torch.cat([torch.arange(a, b) for a, b in self.ranges])

    def canonical_shape(self) -> tuple[int, ...]:
        """Shape of the slot's own slice in torch ``[out, in]`` order (expert axis removed)."""
        shape = list(self.shape)
        if self.ranges is not None:
            shape[self.split_axis] = sum(b - a for a, b in self.ranges)
        if self.expert_axis is not None:
            del shape[self.expert_axis]
        if self.transposed and len(shape) >= 2:
            shape[-2], shape[-1] = shape[-1], shape[-2]
        return tuple(shape)

    def __str__(self) -> str:
        s = self.tensor
        if self.expert is not None:
            s += f"[expert {self.expert}]"
        if self.ranges is not None:
            span = f"{self.ranges[0][0]}:{self.ranges[0][1]}" if len(self.ranges) == 1 else f"{len(self.ranges)} interleaved blocks"
            s += f"[axis {self.split_axis}: {span}]"
        return s


@dataclass
class TensorMatch:
    name: str
    rule: CompiledRule
    layer: int | None
    expert: int | None
    field: str
    template: str
    slots: tuple[Slot, ...] = ()


@dataclass
class Resolution:
    """The result of applying a :class:`RuleSet` to a :class:`ModelSpec` (see :func:`resolve`)."""

    rules: RuleSet
    spec: ModelSpec
    num_layers: int = 0
    num_experts: int | None = None
    head_dim: int | None = None
    variant: str | None = None
    matches: dict[str, TensorMatch] = field(default_factory=dict)
    slots: dict[Slot, Region] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)
    unmatched: dict[str, str] = field(default_factory=dict)
    unused_rules: list[str] = field(default_factory=list)
    inactive_rules: list[str] = field(default_factory=list)
    unused_ignores: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    # Doubts that do not block (``rules check`` prints them): e.g. a norm's role contradicted by the wiring.
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_for_problems(self) -> Resolution:
        """Raise one RuleError listing every problem; return self when there are none."""
        if self.problems:
            raise rule_error(
                f"rule file {self.rules.path} does not cover {self.spec.label} ({len(self.problems)} problem(s)); "
                f"run `trace-transfer rules check` for the full report:",
                self.problems,
            )
        return self

    def slots_of(self, tensor: str) -> list[tuple[Slot, Region]]:
        """Every slot stored in ``tensor`` (parts of a fused tensor, experts of a stacked one)."""
        return [(s, r) for s, r in self.slots.items() if r.tensor == tensor and r.tied_from is None]

    def summary(self) -> dict[str, Any]:
        return {
            "family": self.rules.family, "rule_file": str(self.rules.path), "model": self.spec.label,
            "tensors": len(self.spec.shapes), "matched": len(self.matches), "ignored": len(self.ignored),
            "unmatched": len(self.unmatched), "unused_rules": len(self.unused_rules), "problems": len(self.problems),
            "num_layers": self.num_layers, "num_experts": self.num_experts, "variant": self.variant,
        }


@dataclass
class _Expected:
    """Every name the rules expect for this config (step 1 of :func:`resolve`)."""

    names: dict[str, tuple] = field(default_factory=dict)  # name -> (rule, layer, expert, field, template)
    inactive: dict[str, CompiledRule] = field(default_factory=dict)  # names of rules whose `when:` is false
    per_rule: dict[int, list[tuple]] = field(default_factory=lambda: defaultdict(list))  # id -> [(layer, expert, field, names)]
    active_somewhere: dict[int, bool] = field(default_factory=dict)


class _Context:
    """What every step of :func:`resolve` shares: the rules, the config view and the result being filled."""

    def __init__(self, rules: RuleSet, spec: ModelSpec):
        self.rules, self.spec = rules, spec
        self.res = Resolution(rules, spec)
        self.cfg = ConfigView(spec.config, rules.defaults)

    def at(self, c: CompiledRule | None) -> str:
        return self.rules.where(c.line if c else None)

    def evaluate(self, expr, where: str, **bound):
        """The expression's value, or None with the problem recorded (resolution never raises)."""
        try:
            return expr.evaluate(self.cfg, **bound)
        except ExprError as exc:
            self.res.problems.append(f"{where}: {exc}")
            return None


def resolve(rules: RuleSet, spec: ModelSpec) -> Resolution:
    """Match every tensor of ``spec`` against ``rules``; collect (never raise) all problems.

    Validation: every tensor matched exactly once or ignored; every required rule present in every
    layer (and expert); fused part sizes add up to the tensor's dimension; no rule unused; at most
    one storage variant in use. Call ``.raise_for_problems()`` to turn problems into a RuleError.
    """
    ctx = _Context(rules, spec)
    res = ctx.res
    res.num_layers = ctx.evaluate(rules.num_layers, f"{rules.where(_top_line(rules, 'num_layers'))}: num_layers") or 0
    if rules.num_experts is not None:
        res.num_experts = ctx.evaluate(rules.num_experts, f"{rules.where(_top_line(rules, 'num_experts'))}: num_experts")
    res.head_dim = _head_dim(rules, ctx.cfg, res)
    expected = _expected_names(ctx)                   # 1. every name the rules expect
    _match_tensors(ctx, expected)                     # 2. the model's tensors against them
    _pick_variant(ctx)                                # 3. a checkpoint uses one storage variant
    tied = _check_required(ctx, expected)             # 4. required tensors, tied tensors, unused rules
    _assign_slots(ctx, tied)                          # 5. slots and fused parts
    res.problems = list(dict.fromkeys(res.problems))  # per-layer evaluation repeats config problems
    return res


def _expected_names(ctx: _Context) -> _Expected:
    """Instantiate every rule's templates for every layer, expert and field where its `when:` holds."""
    res, exp = ctx.res, _Expected()
    for c in ctx.rules.rules:
        layers = [None] if c.section in ("before", "after") else list(range(res.num_layers))
        experts = [None]
        if c.section == "experts" and c.rule.expert_axis is None:
            experts = list(range(res.num_experts or 0))
        exp.active_somewhere[id(c)] = False
        for layer in layers:
            on = True
            if c.when is not None:
                bound = {} if layer is None else {"layer": layer}
                on = bool(ctx.evaluate(c.when, f"{ctx.at(c)}: {c.where}: when {c.rule.when!r}", **bound))
            for expert in experts:
                for f in c.rule.fields:
                    _expect(ctx, exp, c, layer, expert, f, on)
    return exp


def _expect(ctx: _Context, exp: _Expected, c: CompiledRule, layer, expert, f: str, on: bool) -> None:
    names = [c.instantiate(t, layer, expert, f) for t in c.templates]
    if not on:
        for n in names:
            exp.inactive.setdefault(n, c)
        return
    exp.active_somewhere[id(c)] = True
    exp.per_rule[id(c)].append((layer, expert, f, names))
    for t, n in zip(c.templates, names):
        if n in exp.names and exp.names[n][0] is not c:
            other = exp.names[n][0]
            ctx.res.problems.append(f"{ctx.at(c)}: {c.where} and {other.where} (line {other.line}) both claim "
                                    f"tensor {n!r}; make the templates or `when:` conditions exclusive")
            continue
        exp.names[n] = (c, layer, expert, f, t)


def _match_tensors(ctx: _Context, exp: _Expected) -> None:
    """Each tensor is matched by one rule, ignored, or unmatched (with a hint)."""
    rules, res, spec = ctx.rules, ctx.res, ctx.spec
    ignore_hits: dict[str, int] = defaultdict(int)
    for name in spec.shapes:
        hit = exp.names.get(name)
        pattern = next((p for p, rx in rules.ignore if rx.fullmatch(name)), None)
        if pattern is not None:
            ignore_hits[pattern] += 1
        if hit and pattern is not None:
            res.problems.append(f"{ctx.at(hit[0])}: tensor {name!r} is matched by {hit[0].where} and also ignored by "
                                f"{pattern!r}; narrow the ignore pattern")
        if hit:
            c, layer, expert, f, t = hit
            res.matches[name] = TensorMatch(name, c, layer, expert, f, t)
        elif pattern is not None:
            res.ignored[name] = pattern
        else:
            res.unmatched[name] = _unmatched_hint(name, rules, res, exp.inactive, exp.names)
    for name, hint in list(res.unmatched.items())[:_MAX_LISTED]:
        res.problems.append(f"{rules.path}: tensor {name!r} {list(spec.shapes[name])} is not matched by any rule; {hint}")
    if len(res.unmatched) > _MAX_LISTED:
        res.problems.append(f"{rules.path}: ... and {len(res.unmatched) - _MAX_LISTED} more unmatched tensors")
    res.unused_ignores = [p for p, _ in rules.ignore if not ignore_hits[p]]


def _pick_variant(ctx: _Context) -> None:
    rules, res = ctx.rules, ctx.res
    used_variants = sorted({m.rule.rule.variant for m in res.matches.values()} - {None})
    declared = list(dict.fromkeys(c.rule.variant for c in rules.rules if c.rule.variant is not None))
    if len(used_variants) > 1:
        res.problems.append(f"{rules.path}: tensors of several storage variants {used_variants} are present; a "
                            f"checkpoint should use exactly one — check the rules' `variant:` labels")
    res.variant = used_variants[0] if used_variants else (declared[0] if declared else None)


def _check_required(ctx: _Context, exp: _Expected) -> list[tuple[CompiledRule, int | None, int | None, str]]:
    """Report missing required tensors and unused rules; return the absent tensors a `tied_to` stands in for."""
    res = ctx.res
    present = set(res.matches)
    tied: list[tuple[CompiledRule, int | None, int | None, str]] = []
    for c in ctx.rules.rules:
        if c.rule.variant is not None and c.rule.variant != res.variant:
            continue
        if not exp.active_somewhere[id(c)]:
            res.inactive_rules.append(f"{c.where} {c.rule.name!r} (when: {c.rule.when})")
            continue
        missing, hits = _presence(ctx, c, exp.per_rule[id(c)], present, tied)
        if hits == 0 and c.rule.tied_to is None:
            if c.rule.optional:
                res.unused_rules.append(f"{c.where} {c.rule.name!r} (optional)")
            else:
                res.unused_rules.append(f"{c.where} {c.rule.name!r}")
                res.problems.append(f"{ctx.at(c)}: {c.where}: rule {c.rule.name!r} matched no tensor (expected e.g. "
                                    f"{missing[0]!r}); fix the template, mark it `optional: true`, or add a "
                                    f"`when:` condition for the configs that lack it")
                continue
        for n in missing[:_MAX_LISTED]:
            res.problems.append(f"{ctx.at(c)}: {c.where}: required tensor {n!r} is missing; if this model legitimately "
                                f"lacks it, mark the rule `optional: true` or add a `when:` condition")
        if len(missing) > _MAX_LISTED:
            res.problems.append(f"{ctx.at(c)}: {c.where}: ... and {len(missing) - _MAX_LISTED} more missing tensors")
    return tied


def _presence(ctx: _Context, c: CompiledRule, instances: list[tuple], present: set[str],
              tied: list[tuple]) -> tuple[list[str], int]:
    """One rule's missing required names and the number of its instances present (absent tied ones go to ``tied``)."""
    missing, hits = [], 0
    for layer, expert, f, names in instances:
        found = [n for n in names if n in present]
        if len(found) > 1:
            ctx.res.problems.append(f"{ctx.at(c)}: {c.where}: both {found[0]!r} and its alias {found[1]!r} are "
                                    f"present; a tensor may appear under one name only")
        if found:
            hits += 1
        elif c.rule.tied_to is not None:
            tied.append((c, layer, expert, f))
        elif not c.rule.optional:
            missing.append(names[0])
    return missing, hits


def _assign_slots(ctx: _Context, tied: list[tuple[CompiledRule, int | None, int | None, str]]) -> None:
    res = ctx.res
    for name, m in res.matches.items():
        slots = _slots_for(m, ctx.spec.shapes[name], ctx.cfg, res, ctx.at)
        m.slots = tuple(s for s, _ in slots)
        for slot, region in slots:
            if slot in res.slots:
                res.problems.append(f"{ctx.at(m.rule)}: slot {slot} is provided by both {res.slots[slot].tensor!r} "
                                    f"and {name!r}; give one of them a different role")
            res.slots[slot] = region
    for c, layer, expert, f in tied:
        target = Slot(c.rule.tied_to, f, layer, expert)
        if target in res.slots:
            res.slots[Slot(c.rule.role, f, layer, expert)] = replace(res.slots[target], tied_from=c.rule.tied_to)
        else:
            res.problems.append(f"{ctx.at(c)}: {c.where}: {c.rule.name!r} is absent and its tied_to role "
                                f"{c.rule.tied_to!r} has no tensor either")


def _top_line(rules: RuleSet, key: str) -> int | None:
    tree = rules._tree
    return getattr(tree, "key_lines", {}).get(key) if tree is not None else None


def _head_dim(rules: RuleSet, cfg: ConfigView, res: Resolution) -> int | None:
    if rules.head_dim is not None:
        try:
            return rules.head_dim.evaluate(cfg)
        except ExprError as exc:
            res.problems.append(f"{rules.where(_top_line(rules, 'head_dim'))}: head_dim: {exc}")
            return None
    try:
        hd = cfg.lookup("head_dim")
        if isinstance(hd, int) and hd > 0:
            return hd
    except ExprError:
        pass
    try:
        return cfg.lookup("hidden_size") // cfg.lookup("num_attention_heads")
    except (ExprError, TypeError, ZeroDivisionError):
        return None


def _slots_for(m: TensorMatch, shape: tuple[int, ...], cfg: ConfigView, res: Resolution, at) -> list[tuple[Slot, Region]]:
    """The slots one matched tensor provides: one per expert, and per fused part (with its index ranges)."""
    rule = m.rule.rule
    stacked = _stacked_experts(m, shape, res, at)
    if stacked is None:
        return []
    experts, expert_axis = stacked
    base = Region(m.name, tuple(shape), transposed=rule.transposed and len(shape) >= 2, expert_axis=expert_axis)
    if rule.split is None:
        return [(Slot(rule.role, m.field, m.layer, e), replace(base, expert=e)) for e in experts]
    if len(shape) - (expert_axis is not None) <= 1:
        # 1-D fields (bias, or a bias per expert) have a single feature axis: split that one.
        axis = 1 if expert_axis == 0 else 0
    else:
        axis = rule.split.axis % len(shape)
    layout = _part_layout(m, shape, axis, cfg, res, at)
    if layout is None:
        return []
    sizes, groups = layout
    out = []
    offset = 0
    stride = sum(sizes)
    for part, size in zip(rule.split.parts, sizes):
        ranges = tuple((g * stride + offset, g * stride + offset + size) for g in range(groups))
        offset += size
        for e in experts:
            out.append((Slot(part.role, m.field, m.layer, e), replace(base, split_axis=axis, ranges=ranges, expert=e)))
    return out


def _stacked_experts(m: TensorMatch, shape: tuple[int, ...], res: Resolution, at) -> tuple[list, int | None] | None:
    """``(experts, expert_axis)`` of a tensor: its own expert, or all experts stacked along ``expert_axis``
    (None, with the problem recorded, when the stacked axis does not hold ``num_experts``)."""
    rule, c = m.rule.rule, m.rule
    if rule.expert_axis is None:
        return [m.expert], None
    expert_axis = rule.expert_axis % len(shape) if shape else 0
    n = res.num_experts or 0
    if not shape or shape[expert_axis] != n:
        res.problems.append(f"{at(c)}: {c.where}: {m.name!r} has shape {list(shape)} but should stack "
                            f"{n} experts along axis {rule.expert_axis}; fix `expert_axis:` or `num_experts:`")
        return None
    return list(range(n)), expert_axis


def _part_layout(m: TensorMatch, shape: tuple[int, ...], axis: int, cfg: ConfigView, res: Resolution,
                 at) -> tuple[list[int], int] | None:
    """Part sizes and interleave groups of a fused tensor, checked to cover dimension ``axis`` exactly
    (None, with the problem recorded, when an expression fails or the sizes do not add up)."""
    c, split = m.rule, m.rule.rule.split
    sizes, where = [], []
    for part, e in zip(split.parts, c.part_sizes):
        try:
            sizes.append(e.evaluate(cfg))
        except ExprError as exc:
            res.problems.append(f"{at(c)}: {c.where}: part {part.role} size: {exc}")
            return None
        where.append(f"{part.role}={sizes[-1]} ({part.size})")
    groups = 1
    if split.layout == "interleave" and c.groups is not None:
        try:
            groups = c.groups.evaluate(cfg)
        except ExprError as exc:
            res.problems.append(f"{at(c)}: {c.where}: groups: {exc}")
            return None
    total = groups * sum(sizes)
    if not shape or total != shape[axis] or any(s <= 0 for s in sizes):
        got = f"dim {axis} is {shape[axis]}" if shape else "the tensor is a scalar"
        added = f"{groups} groups × {sum(sizes)} = {total}" if groups > 1 else f"{total}"
        res.problems.append(f"{at(c)}: {c.where}: fused tensor {m.name!r} {list(shape)}: parts {', '.join(where)} "
                            f"add up to {added} but {got}; fix the part size expressions "
                            f"(or `axis:`/`groups:`) so they cover the dimension exactly")
        return None
    return sizes, groups


def _unmatched_hint(name: str, rules: RuleSet, res: Resolution, inactive: dict, expected: dict) -> str:
    if name in inactive:
        c = inactive[name]
        return f"{c.where} (line {c.line}) would match it but is off for this config (when: {c.rule.when}); fix the condition"
    for c in rules.rules:
        for t in c.templates:
            rx = re.escape(t).replace(r"\{layer\}", r"(?P<layer>\d+)").replace(r"\{expert\}", r"(?P<expert>\d+)")
            rx = rx.replace(r"\{field\}", r"(?P<field>\w+)")
            m = re.fullmatch(rx, name)
            if not m:
                continue
            gd = m.groupdict()
            if gd.get("layer") is not None and int(gd["layer"]) >= res.num_layers:
                return f"{c.where} matches the pattern but layer {gd['layer']} >= num_layers={res.num_layers}; check `num_layers:`"
            if gd.get("expert") is not None and int(gd["expert"]) >= (res.num_experts or 0):
                return f"{c.where} matches the pattern but expert {gd['expert']} >= num_experts={res.num_experts}; check `num_experts:`"
            if gd.get("field") is not None and gd["field"] not in c.rule.fields:
                return f"{c.where} (line {c.line}) matches the pattern but field {gd['field']!r} is not in fields {c.rule.fields}; add it"
            if c.rule.variant is not None and c.rule.variant != res.variant:
                return f"{c.where} matches it, but belongs to variant {c.rule.variant!r} while {res.variant!r} is in use"
    close = difflib.get_close_matches(name, list(expected), n=1, cutoff=0.75)
    near = f" (closest expected name: {close[0]!r})" if close else ""
    return f"add a rule for it (role, name template) or an `ignore:` pattern{near}"
