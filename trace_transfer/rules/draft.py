"""``rules init``: draft a rule file for an architecture from its tensor names.

The draft recognises the common naming schemes (Llama, GPT-2, GPT-NeoX, Falcon, Mixtral, ...) and
writes what it cannot decide as ``?`` with a ``# TODO`` comment: unknown roles, fused-part sizes and
layouts. ``?`` never loads, so ``rules check`` refuses the draft until every TODO is resolved.

A familiar name is not enough for a norm: ``post_attention_layernorm`` is the pre-MLP norm in Llama
and the attention-output norm in OLMo 2. Every norm whose role depends on the layer's wiring is
therefore decided by evidence, and written as a ``?`` TODO where there is none:

* the family's known layout: a rule file on the search path for this ``model_type``;
* the wiring itself: one forward pass on the meta device, tracing what feeds each norm and what it
  feeds (:mod:`trace_transfer.rules.wiring`);
* the config, for q/k norms: whether the weight spans one head, every head or the whole projection.

Each decided role carries a comment with its evidence; q/k norms get their companions (``expand``).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from trace_transfer.rules.resolve import ModelSpec, resolve
from trace_transfer.rules.schema import RuleSet
from trace_transfer.rules.wiring import WIRING_ROLES, WiringTrace, classify, module_of, norm_scope, trace_wiring

_FIELDS = ("weight", "bias")
_NUM_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_NUM_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")

# (pattern on the module path relative to the layer, role). First match wins; order matters.
_LAYER_GUESSES: list[tuple[str, str]] = [
    (r"(^|\.)(qkv_proj|query_key_value|c_attn|Wqkv|qkv|wqkv)$", "attn_qkv"),
    (r"(^|\.)(q_proj|query|wq|q_lin)$", "attn_q"),
    (r"(^|\.)(k_proj|key|wk|k_lin)$", "attn_k"),
    (r"(^|\.)(v_proj|value|wv|v_lin)$", "attn_v"),
    (r"(attn|attention|self_attn|self_attention)\.(o_proj|out_proj|dense|c_proj|wo|proj|out_lin)$", "attn_o"),
    (r"(^|\.)(q_norm|q_layernorm)$", "attn_q_norm"),
    (r"(^|\.)(k_norm|k_layernorm)$", "attn_k_norm"),
    (r"experts\.\{expert\}\.(gate_proj|w1)$", "ffn_gate_exp"),
    (r"experts\.\{expert\}\.(up_proj|w3)$", "ffn_up_exp"),
    (r"experts\.\{expert\}\.(down_proj|w2)$", "ffn_down_exp"),
    (r"experts\.gate_up_proj$", "ffn_gate_up_exp"),
    (r"experts\.down_proj$", "ffn_down_exp"),
    (r"shared_experts?\.(gate_proj|w1)$", "ffn_shared_gate"),
    (r"shared_experts?\.(up_proj|w3)$", "ffn_shared_up"),
    (r"shared_experts?\.(down_proj|w2)$", "ffn_shared_down"),
    (r"shared_expert_gate$", "ffn_shared_router"),
    (r"(mlp|block_sparse_moe|moe)\.(gate|router)$", "ffn_router"),
    (r"(^|\.)gate_up_proj$", "ffn_gate_up"),
    (r"(mlp|feed_forward|ffn)\.(gate_proj|w1)$", "ffn_gate"),
    (r"(mlp|feed_forward|ffn)\.(up_proj|w3|c_fc|dense_h_to_4h|fc1|fc_in)$", "ffn_up"),
    (r"(mlp|feed_forward|ffn)\.(down_proj|w2|c_proj|dense_4h_to_h|fc2|fc_out)$", "ffn_down"),
    (r"(^|\.)(input_layernorm|ln_1|attention_norm|attn_norm|norm1|ln_attn|pre_attention_layernorm)$", "attn_norm"),
    (r"(^|\.)pre_feedforward_layernorm$", "ffn_norm"),
    (r"(^|\.)post_feedforward_layernorm$", "ffn_post_norm"),
    (r"(^|\.)(post_attention_layernorm|ln_2|ffn_norm|norm2|ln_mlp)$", "ffn_norm"),
]
_GLOBAL_GUESSES: list[tuple[str, str]] = [
    (r"(^|\.)(embed_tokens|wte|word_embeddings|embed_in|tok_embeddings)$", "token_embd"),
    (r"(^|\.)(wpe|position_embeddings|embed_positions)$", "pos_embd"),
    (r"(^|\.)(norm|ln_f|final_layer_norm|norm_f|final_layernorm|final_norm)$", "output_norm"),
    (r"(^|\.)(lm_head|embed_out|output)$", "output"),
]
_BEFORE_ROLES = {"token_embd", "pos_embd", "token_types", "token_embd_norm"}
_FUSED_PARTS = {
    "attn_qkv": ("attn_q", "attn_k", "attn_v"),
    "ffn_gate_up": ("ffn_gate", "ffn_up"),
    "ffn_gate_up_exp": ("ffn_gate_exp", "ffn_up_exp"),
}
# Roles whose torch-Linear weight is [out = wide, in = hidden]; a stored [hidden, wide] hints at [in, out].
_EXPANDING = {"ffn_up", "ffn_gate", "attn_qkv", "ffn_gate_up"}
# What a norm of each role could be instead: the TODO names the alternatives a reader must tell apart.
_ALTERNATIVES = {
    "attn_norm": "attn_norm (before attention; in a parallel block, shared with the MLP) or layer_out_norm",
    "ffn_norm": "ffn_norm (before the MLP, as Llama's post_attention_layernorm) or attn_post_norm (on the "
                "attention output, as OLMo 2's and Gemma's post_attention_layernorm)",
    "attn_post_norm": "attn_post_norm (on the attention output) or ffn_norm (before the MLP)",
    "ffn_post_norm": "ffn_post_norm (on the MLP output) or layer_out_norm (end of the block)",
    "layer_out_norm": "layer_out_norm (end of the block) or ffn_post_norm (on the MLP output)",
}
_SCOPES = {"head": "normalises each head: one [head_dim] weight shared by all heads, as in Qwen3",
           "heads": "normalises each head with its own weights: [heads, head_dim], as in Cohere",
           "projection": "normalises the whole projection: [heads * head_dim], as in OLMo 2"}


def _cfg(config: Any, key: str) -> Any:
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def _q(s: str) -> str:
    return '"' + s.replace('"', '\\"') + '"'


@dataclass
class _Group:
    """The tensors of one module template (all layers, all fields)."""

    section: str  # global | layer | experts
    module: str  # path relative to the layer (or the full path for globals)
    shape: tuple[int, ...]
    full: str  # one real tensor name, for messages
    fields: list[str | None] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)  # the real module paths (every layer)


def draft(spec: ModelSpec, wiring: bool = True, family: RuleSet | None = None) -> str:
    """YAML text of a draft rule file for ``spec`` (see the module docstring).

    Args:
        spec: the model's config and tensor shapes.
        wiring: trace the forward pass for evidence on norms (False: only a known family rule counts).
        family: a rule file already covering this model_type (``rules init`` passes the one it finds):
            its roles are evidence too.
    """
    cfg = spec.config
    prefix, n_layers = _layer_prefix(list(spec.shapes))
    groups, expert_counts = _collect_groups(spec, prefix)
    guesses = {key: _guess_role(g, groups) for key, g in groups.items()}
    evidence = _Evidence.gather(spec, groups, guesses, wiring, family)
    out: dict[str, list[str]] = {"before": [], "layer": [], "experts": [], "after": []}
    roles_seen: Counter[str] = Counter()
    for key, g in sorted(groups.items(), key=lambda kv: _role_rank(kv[1].module, kv[1].section)):
        role, notes = evidence.decide(g, guesses[key], cfg)
        roles_seen[role] += 1
        target, lines = _entry(g, role, prefix, cfg, expert_counts, explained=any("TODO" in n for n in notes))
        out[target].append("\n".join([f"  # {n}" for n in notes] + lines))
    if "output" not in roles_seen and _cfg(cfg, "tie_word_embeddings"):
        out["after"].append("  # The checkpoint has no LM head: it is tied to the embedding.\n"
                            "  - role: output\n    name: lm_head.weight\n    tied_to: token_embd")
    body = []
    for section in ("before", "layer", "experts", "after"):
        if out[section]:
            body.append(f"{section}:")
            body += out[section]
    settings = _settings(spec, n_layers, expert_counts) + evidence.expand(roles_seen)
    # Counted as `rules init` reports them: every line that carries a TODO.
    todos = sum("# TODO" in line for line in "\n".join(settings + body).splitlines())
    return "\n".join(_header(spec, todos, evidence) + settings + body) + "\n"


def _collect_groups(spec: ModelSpec, prefix: str | None) -> tuple[dict[tuple[str, str], _Group], set[int]]:
    """Tensors grouped by module template (``{layer}``/``{expert}`` in place of indices), with their fields."""
    groups: dict[tuple[str, str], _Group] = {}
    expert_counts: set[int] = set()
    layer_rx = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$") if prefix else None
    for name in spec.shapes:
        m = layer_rx.match(name) if layer_rx else None
        section, rest = "global", name
        if m:
            section, rest = "layer", m.group(2)
            em = re.match(r"^(.*?)\.(\d+)\.(.+)$", rest)
            if em:
                expert_counts.add(int(em.group(2)))
                rest = f"{em.group(1)}.{{expert}}.{em.group(3)}"
                section = "experts"
        module, fld = _split_field(rest)
        g = groups.setdefault((section, module), _Group(section, module, spec.shapes[name], name))
        g.modules.append(module_of(name) if fld else name)
        if fld not in g.fields:
            g.fields.append(fld)
            g.fields.sort(key=lambda f: (f not in _FIELDS, _FIELDS.index(f) if f in _FIELDS else 0, str(f)))
    return groups, expert_counts


def _guess_role(g: _Group, groups: dict[tuple[str, str], _Group]) -> str:
    """The role the name suggests (``?`` when it suggests none)."""
    guesses = _GLOBAL_GUESSES if g.section == "global" else _LAYER_GUESSES
    role = next((r for pat, r in guesses if re.search(pat, g.module)), "?")
    has_pre_ffn = any("pre_feedforward_layernorm" in mod for (_, mod) in groups)
    if role == "ffn_norm" and has_pre_ffn and re.search(r"post_attention_layernorm$", g.module):
        role = "attn_post_norm"  # Gemma-style sandwich norms: this one follows attention
    return role


@dataclass
class _Evidence:
    """What is known about the norms beyond their names: a family rule's roles and the traced wiring."""

    family: dict[str, set[str]]  # real module path -> roles a known rule file gives it
    family_file: str | None
    trace: WiringTrace
    roles: dict[str, str]  # real module path -> guessed role (what classify needs)
    confirmed: set[str] = field(default_factory=set)  # q/k-norm roles whose input the trace saw come from q/k

    @classmethod
    def gather(cls, spec: ModelSpec, groups: dict, guesses: dict, wiring: bool, rules: RuleSet | None) -> _Evidence:
        family, family_file = _family_roles(spec, rules)
        trace = trace_wiring(spec.config) if wiring else WiringTrace(error="wiring=False")
        roles = {mod: guesses[key] for key, g in groups.items() for mod in g.modules if guesses[key] != "?"}
        return cls(family, family_file, trace, roles)

    def decide(self, g: _Group, guess: str, config: Any) -> tuple[str, list[str]]:
        """The role to write and the comment lines above the entry (evidence, or a TODO)."""
        if g.section != "layer" or guess not in WIRING_ROLES:
            return guess, []
        known = {r for mod in g.modules for r in self.family.get(mod, ())}
        traced = [classify(mod, self.trace, self.roles) for mod in g.modules]
        traced_roles = {e.role for e in traced}
        seen: list[tuple[str, str]] = []
        if len(known) == 1:
            seen.append((next(iter(known)), f"the family's rule file {self.family_file} says so"))
        if self.trace.ok and len(traced_roles) == 1 and None not in traced_roles:
            seen.append((traced[0].role, f"traced: {traced[0].why}"))
        if guess in ("attn_q_norm", "attn_k_norm"):
            return self._qk_norm(g, guess, config, seen)
        if seen and len({r for r, _ in seen}) == 1:
            role = seen[0][0]
            named = "" if role == guess else f" (the name alone suggests {guess})"
            return role, [f"{g.module}: {role}{named}: {why}" for _, why in seen]
        return "?", [self._todo(g, guess, seen, traced_roles)]

    def _qk_norm(self, g: _Group, guess: str, config: Any, seen: list[tuple[str, str]]) -> tuple[str, list[str]]:
        roles = {r for r, _ in seen}
        if roles - {guess}:
            return "?", [self._todo(g, guess, seen, roles)]
        notes = [f"{g.module}: {guess}: {why}" for _, why in seen]
        if any(why.startswith("traced") for _, why in seen):
            self.confirmed.add(guess)
        scope = norm_scope(guess, g.shape, config)
        if scope is None:
            return "?", notes + [f"TODO: {g.full} {list(g.shape)} fits neither head_dim, [heads, head_dim] nor "
                                 f"heads * head_dim of the config: read the attention's forward and pick the role"]
        return guess, notes + [f"{g.module} {list(g.shape)} {_SCOPES[scope]} (from its shape and the config)"]

    def _todo(self, g: _Group, guess: str, seen: list[tuple[str, str]], traced_roles: set) -> str:
        if seen:
            why = "the evidence disagrees: " + "; ".join(f"{r} ({w})" for r, w in seen)
        elif self.trace.ok:
            why = "the traced forward pass is not conclusive" + (
                f" (it differs across layers: {sorted(r for r in traced_roles if r)})" if len(traced_roles) > 1 else "")
        else:
            why = f"no family rule and no functional check ({self.trace.error})"
        return (f"TODO: {g.full}: the name suggests {guess}, but the role depends on the layer's wiring, "
                f"{_ALTERNATIVES.get(guess, guess)}; {why}. Read the decoder layer's forward() and pick one")

    def expand(self, roles_seen: Counter[str]) -> list[str]:
        """``expand:`` companions for q/k norms (they rescale their projection's output)."""
        pairs = [(p, n) for p, n in (("attn_q", "attn_q_norm"), ("attn_k", "attn_k_norm")) if roles_seen[n]]
        if not pairs:
            return []
        if all(n in self.confirmed for _, n in pairs):
            lines = ["# q/k norms rescale their projection's output (traced): a core q/k projection trains its norm"]
            return lines + ["expand:"] + [f"  {p}: [{n}]" for p, n in pairs]
        return ["expand:"] + [f"  {p}: [{n}]   # TODO: confirm that {n} rescales {p}'s output (read the "
                              f"attention's forward); then its norm is trained with a core {p}" for p, n in pairs]


def _family_roles(spec: ModelSpec, rules: RuleSet | None) -> tuple[dict[str, set[str]], str | None]:
    """Module path -> roles, from a rule file that already covers this model_type (a known layout)."""
    if rules is None:
        return {}, None
    res = resolve(rules, spec)
    roles: dict[str, set[str]] = defaultdict(set)
    for name, m in res.matches.items():
        roles[module_of(name, m.field)].add(m.rule.rule.role)
    return dict(roles), str(rules.path)


def _entry(g: _Group, role: str, prefix: str | None, cfg: Any, expert_counts: set[int],
           explained: bool = False) -> tuple[str, list[str]]:
    """The section an entry goes to and its YAML lines (``explained``: a TODO note above says why it is ``?``)."""
    section = g.section
    if section == "layer" and role.endswith("_exp"):
        section = "experts"  # all experts stacked in one tensor (transformers >= 5 in memory)
        expert_counts.add(g.shape[0] - 1)
    if section == "global":
        target, template = ("before" if role in _BEFORE_ROLES else "after"), g.module
    else:
        target, template = section, f"{prefix}.{{layer}}.{g.module}"
    entry = [f"  - role: {_q(role) if role == '?' else role}"]
    if role == "?" and not explained:
        entry[0] += f"   # TODO: unrecognised tensor {g.full} {list(g.shape)}: pick a role (see docs/rules.md) or x_<name>"
    if None in g.fields:  # no field suffix (or an odd mix): the name is the tensor
        entry.append(f"    name: {_q(template)}")
    else:
        entry.append(f"    name: {_q(template + '.{field}')}")
        if g.fields != ["weight"]:
            entry.append(f"    fields: [{', '.join(g.fields)}]")
    entry += _storage_lines(g, role, section, cfg)
    if role in _FUSED_PARTS:
        entry += _split_lines(role, g.shape, entry, cfg)
    return target, entry


def _storage_lines(g: _Group, role: str, section: str, cfg: Any) -> list[str]:
    """Transposed storage, ties and stacked experts: what the shape and the role suggest, marked to verify."""
    lines = []
    hidden = _cfg(cfg, "hidden_size") or _cfg(cfg, "n_embd")
    if role in _EXPANDING and len(g.shape) == 2 and hidden and g.shape[0] == hidden and g.shape[1] != hidden:
        lines.append("    transposed: true   # TODO: verify; the weight looks stored [in, out] (Conv1D-style)")
    if role == "output":
        lines.append("    tied_to: token_embd")
    if section == "experts" and "{expert}" not in g.module:
        lines.append("    expert_axis: 0   # TODO: verify that axis 0 stacks the experts")
    return lines


def _split_lines(role: str, shape: tuple[int, ...], entry: list[str], cfg: Any) -> list[str]:
    axis = 1 if any("transposed" in e for e in entry) else 0
    if any("expert_axis" in e for e in entry):
        axis += 1  # the stacked experts come first
    return [
        f"    # TODO: fused tensor {list(shape)}: confirm the axis and layout (concat, or interleave per head",
        f"    #       with groups: num_attention_heads as in GPT-NeoX) and give each part's size as a config",
        f"    #       expression; config: {_config_hint(cfg)}",
        "    split:",
        f"      axis: {axis}",
        "      layout: concat",
        "      parts:",
    ] + [f'        - {{role: {p}, size: "?"}}   # TODO' for p in _FUSED_PARTS[role]]


def _header(spec: ModelSpec, todos: int, evidence: _Evidence) -> list[str]:
    model_type = spec.model_type or "unknown"
    if evidence.trace.ok:
        how = "# Norm roles come from a traced forward pass (meta device); each carries its evidence."
    else:
        how = (f"# No functional check ran ({evidence.trace.error}); norms whose role depends on the wiring "
               f"are TODOs.")
    return [
        f"# Draft rule file for {model_type}, written by `trace-transfer rules init` from {spec.origin}.",
        f"# Resolve every TODO ({todos} left), then run `trace-transfer rules check MODEL --rules THIS_FILE`.",
        how,
        "# Guide: docs/rules.md. Roles: `trace-transfer rules list --roles`.",
    ]


def _settings(spec: ModelSpec, n_layers: int, expert_counts: set[int]) -> list[str]:
    cfg = spec.config
    model_type = spec.model_type or "unknown"
    num_layers = _config_key(cfg, _NUM_LAYER_KEYS, n_layers)
    lines = [
        "format: 1",
        f"family: {model_type}",
        f"description: {_q(f'{model_type} (drafted by rules init)')}",
        "match:",
        f"  model_type: [{model_type}]",
        f"  architectures: [{', '.join(spec.architectures)}]",
        f"num_layers: {num_layers}" + ("" if num_layers != '"?"' else "   # TODO: the config key holding the layer count"),
    ]
    n_experts = max(expert_counts) + 1 if expert_counts else None
    if n_experts:
        key = _config_key(cfg, _NUM_EXPERT_KEYS, n_experts)
        lines.append(f"num_experts: {key}" + ("   # TODO: config key for the expert count" if key == '"?"' else ""))
    if _cfg(cfg, "head_dim") is None and _cfg(cfg, "num_attention_heads"):
        lines += ["config_defaults:", "  head_dim: hidden_size // num_attention_heads   # the config has no head_dim"]
    return lines + ["ignore:", '  - "*.rotary_emb.inv_freq"   # rotary buffer some checkpoints carry']


def _role_rank(module: str, section: str) -> tuple[int, int, str]:
    """Sort key: block order of the guessed role (vocabulary order), unknown roles last."""
    from trace_transfer.rules.schema import ROLES

    guesses = _GLOBAL_GUESSES if section == "global" else _LAYER_GUESSES
    role = next((r for pat, r in guesses if re.search(pat, module)), None)
    order = list(ROLES)
    return (0 if section == "global" else 1, order.index(role) if role in order else len(order), module)


def _split_field(rest: str) -> tuple[str, str | None]:
    head, _, last = rest.rpartition(".")
    if head and last in _FIELDS:
        return head, last
    return rest, None


def _layer_prefix(names: list[str]) -> tuple[str | None, int]:
    """The path before the layer index (``model.layers``) and the number of layers seen."""
    seen: dict[str, set[int]] = defaultdict(set)
    for n in names:
        m = re.match(r"^(.*?)\.(\d+)\.", n)
        if m:
            seen[m.group(1)].add(int(m.group(2)))
    if not seen:
        return None, 0
    prefix = max(seen, key=lambda p: len(seen[p]))
    return prefix, max(seen[prefix]) + 1


def _config_key(cfg: Any, keys: tuple[str, ...], value: int | None) -> str:
    for k in keys:
        if value is not None and _cfg(cfg, k) == value:
            return k
    return '"?"'


def _config_hint(cfg: Any) -> str:
    keys = ("hidden_size", "num_attention_heads", "num_key_value_heads", "num_kv_heads", "head_dim",
            "intermediate_size", "moe_intermediate_size", "multi_query", "new_decoder_architecture")
    parts = [f"{k}={_cfg(cfg, k)}" for k in keys if _cfg(cfg, k) is not None]
    return ", ".join(parts) or "(no size keys found)"
