"""``rules init``: draft a rule file for an architecture from its tensor names.

The draft recognises the common naming schemes (Llama, GPT-2, GPT-NeoX, Falcon, Mixtral, ...) and
writes what it cannot decide as ``?`` with a ``# TODO`` comment: unknown roles, fused-part sizes and
layouts. ``?`` never loads, so ``rules check`` refuses the draft until every TODO is resolved.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from typing import Any

from trace_transfer.rules.resolve import ModelSpec

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


def _cfg(config: Any, key: str) -> Any:
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def _q(s: str) -> str:
    return '"' + s.replace('"', '\\"') + '"'


def draft(spec: ModelSpec) -> str:
    """YAML text of a draft rule file for ``spec`` (see the module docstring)."""
    cfg = spec.config
    names = list(spec.shapes)
    prefix, n_layers = _layer_prefix(names)
    lines_num_layers = _config_key(cfg, _NUM_LAYER_KEYS, n_layers)

    groups: dict[str, dict[str, Any]] = {}  # module template -> {"fields": [...], "section": ..., "shape": ...}
    expert_counts: set[int] = set()
    layer_rx = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$") if prefix else None
    for name in names:
        m = layer_rx.match(name) if layer_rx else None
        if m:
            rest = m.group(2)
            em = re.match(r"^(.*?)\.(\d+)\.(.+)$", rest)
            section = "layer"
            if em:
                expert_counts.add(int(em.group(2)))
                rest = f"{em.group(1)}.{{expert}}.{em.group(3)}"
                section = "experts"
            template_rest = rest
        else:
            section, template_rest = "global", name
        module, field = _split_field(template_rest)
        key = (section, module)
        g = groups.setdefault(key, {"fields": [], "shape": spec.shapes[name], "full": name})
        if field not in g["fields"]:
            g["fields"].append(field)
            g["fields"].sort(key=lambda f: (f not in _FIELDS, _FIELDS.index(f) if f in _FIELDS else 0, str(f)))

    has_pre_ffn = any("pre_feedforward_layernorm" in mod for (_, mod) in groups)
    hidden = _cfg(cfg, "hidden_size") or _cfg(cfg, "n_embd")
    out: dict[str, list[str]] = {"before": [], "layer": [], "experts": [], "after": []}
    roles_seen: Counter[str] = Counter()
    for (section, module), g in sorted(groups.items(), key=lambda kv: _role_rank(kv[0][1], kv[0][0])):
        guesses = _GLOBAL_GUESSES if section == "global" else _LAYER_GUESSES
        role = next((r for pat, r in guesses if re.search(pat, module)), "?")
        if role == "ffn_norm" and has_pre_ffn and re.search(r"post_attention_layernorm$", module):
            role = "attn_post_norm"  # Gemma-style sandwich norms: this one follows attention
        roles_seen[role] += 1
        if section == "layer" and role.endswith("_exp"):
            section = "experts"  # all experts stacked in one tensor (transformers >= 5 in memory)
            expert_counts.add(g["shape"][0] - 1)
        if section == "global":
            target = "before" if role in _BEFORE_ROLES else "after"
            template = module
        else:
            target = section
            template = f"{prefix}.{{layer}}.{module}"
        fields = g["fields"]
        if fields == [None]:
            name, field_line = template, None
        elif None in fields:
            name, field_line = template, None  # odd mix; leave it to the author
        else:
            name = f"{template}.{{field}}"
            field_line = f"[{', '.join(fields)}]"
        entry = [f"  - role: {_q(role) if role == '?' else role}"]
        if role == "?":
            entry[0] += f"   # TODO: unrecognised tensor {g['full']} {list(g['shape'])}: pick a role (see docs/rules.md) or x_<name>"
        entry.append(f"    name: {_q(name)}")
        if field_line and field_line != "[weight]":
            entry.append(f"    fields: {field_line}")
        shape = g["shape"]
        if role in _EXPANDING and len(shape) == 2 and hidden and shape[0] == hidden and shape[1] != hidden:
            entry.append("    transposed: true   # TODO: verify; the weight looks stored [in, out] (Conv1D-style)")
        if role == "output":
            entry.append("    tied_to: token_embd")
        if section == "experts" and "{expert}" not in module:
            entry.append("    expert_axis: 0   # TODO: verify that axis 0 stacks the experts")
        if role in _FUSED_PARTS:
            axis = 1 if any("transposed" in e for e in entry) else 0
            if any("expert_axis" in e for e in entry):
                axis += 1  # the stacked experts come first
            entry += [
                f"    # TODO: fused tensor {list(shape)}: confirm the axis and layout (concat, or interleave per head",
                f"    #       with groups: num_attention_heads as in GPT-NeoX) and give each part's size as a config",
                f"    #       expression; config: {_config_hint(cfg)}",
                "    split:",
                f"      axis: {axis}",
                "      layout: concat",
                "      parts:",
            ]
            entry += [f'        - {{role: {p}, size: "?"}}   # TODO' for p in _FUSED_PARTS[role]]
        out[target].append("\n".join(entry))

    if "output" not in roles_seen and _cfg(cfg, "tie_word_embeddings"):
        out["after"].append("  # The checkpoint has no LM head: it is tied to the embedding.\n"
                            "  - role: output\n    name: lm_head.weight\n    tied_to: token_embd")
    model_type = spec.model_type or "unknown"
    archs = spec.architectures
    todos = sum(entry.count("# TODO") for section in out.values() for entry in section)
    header = [
        f"# Draft rule file for {model_type}, written by `trace-transfer rules init` from {spec.origin}.",
        f"# Resolve every TODO ({todos} left), then run `trace-transfer rules check MODEL --rules THIS_FILE`.",
        "# Guide: docs/rules.md. Roles: `trace-transfer rules list --roles`.",
        "format: 1",
        f"family: {model_type}",
        f"description: {_q(f'{model_type} (drafted by rules init)')}",
        "match:",
        f"  model_type: [{model_type}]",
        f"  architectures: [{', '.join(archs)}]",
        f"num_layers: {lines_num_layers}" + ("" if lines_num_layers != '"?"' else "   # TODO: the config key holding the layer count"),
    ]
    n_experts = max(expert_counts) + 1 if expert_counts else None
    if n_experts:
        key = _config_key(cfg, _NUM_EXPERT_KEYS, n_experts)
        header.append(f"num_experts: {key}" + ("   # TODO: config key for the expert count" if key == '"?"' else ""))
    if _cfg(cfg, "head_dim") is None and _cfg(cfg, "num_attention_heads"):
        header += ["config_defaults:", "  head_dim: hidden_size // num_attention_heads   # the config has no head_dim"]
    header += ["ignore:", '  - "*.rotary_emb.inv_freq"   # rotary buffer some checkpoints carry']
    body = []
    for section in ("before", "layer", "experts", "after"):
        if out[section]:
            body.append(f"{section}:")
            body += out[section]
    return "\n".join(header + body) + "\n"


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
