"""Which sub-block a norm serves, read off a forward pass: evidence for the roles a name cannot settle.

The same tensor name means different things in different families: ``post_attention_layernorm`` is
the norm *before the MLP* in Llama (``ffn_norm``) and the norm on the attention *output* in OLMo 2 and
Gemma 2 (``attn_post_norm``); ``q_norm`` normalises each head in Qwen3 and the whole query projection
in OLMo 2. Coverage checks cannot see this, so ``rules init`` and ``rules check`` run the model instead.

:func:`trace_wiring` builds the model from its config on the meta device (no memory, any size), runs
one forward pass with a hook on every module, and records for each module which module produced its
input and which modules consume its output, following views (``.view``, ``.transpose``, ``split``)
and parameterless modules (dropout). :func:`classify` turns that into a role with the reason:

* the input comes from the query (key) projection -> ``attn_q_norm`` (``attn_k_norm``);
* the output feeds the LM head -> ``output_norm``;
* the output feeds the attention (MLP) projections -> ``attn_norm`` (``ffn_norm``); both at once is a
  parallel block (GPT-J, Falcon, Cohere), whose one shared norm is ``attn_norm``;
* else, the input is the attention (MLP) block's output -> ``attn_post_norm`` (``ffn_post_norm``).

Example:
    >>> trace = trace_wiring(AutoConfig.from_pretrained("tiny-olmo2"))
    >>> classify("model.layers.0.post_attention_layernorm", trace, roles)
    Evidence(role='attn_post_norm', why='its input is the output of self_attn.o_proj (attn_o)')
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

__all__ = ["WIRING_ROLES", "Wiring", "WiringTrace", "Evidence", "trace_wiring", "classify", "check_wiring",
           "module_of", "norm_scope"]

# Roles a name alone cannot settle: which sub-block a norm serves depends on how the layer is wired.
WIRING_ROLES = ("attn_norm", "ffn_norm", "attn_post_norm", "ffn_post_norm", "layer_out_norm",
                "attn_q_norm", "attn_k_norm")
_ATTN_IN = {"attn_q", "attn_k", "attn_v", "attn_qkv", "attn_kv"}
_NORMS = set(WIRING_ROLES) | {"output_norm", "token_embd_norm"}
_cache: dict[str, WiringTrace] = {}
_CPU_FALLBACK_PARAMS = 50_000_000  # ~0.2 GB in fp32 and a second or two of random init


@dataclass(frozen=True)
class Wiring:
    """One module in the traced forward pass."""

    producer: str | None  # the module whose output is this module's (first) input
    consumers: tuple[str, ...]  # the modules that take this module's output as an input


@dataclass
class WiringTrace:
    """The traced modules by name; ``error`` says why there are none (the model could not be run)."""

    modules: dict[str, Wiring] = field(default_factory=dict)
    error: str | None = None
    head: str | None = None  # the module that produced the logits (the LM head, tied or not)

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Evidence:
    """The role the wiring shows (None: it shows none) and the observation behind it."""

    role: str | None
    why: str


def module_of(tensor: str, field_name: str | None = None) -> str:
    """The module path of a parameter name (``a.b.weight`` -> ``a.b``)."""
    head, _, last = tensor.rpartition(".")
    return head if head and (field_name is None or last == field_name) else tensor


def trace_wiring(config: Any, trust_remote_code: bool = False) -> WiringTrace:
    """Run ``config``'s model once on the meta device and record who feeds whom (see the module docstring).

    Never raises: a model that cannot be built or run gives a trace with ``error`` set, and callers
    then treat every wiring-dependent role as unverified.
    """
    if isinstance(config, dict) or not hasattr(config, "to_dict"):
        return WiringTrace(error="transformers does not know this model_type, so the model cannot be run")
    try:
        key = json.dumps(config.to_dict(), sort_keys=True, default=str)
    except (TypeError, ValueError):
        key = None
    if key is not None and key in _cache:
        return _cache[key]
    trace = _trace(config, trust_remote_code)
    if key is not None:
        _cache[key] = trace
    return trace


def _trace(config: Any, trust_remote_code: bool) -> WiringTrace:
    """On the meta device; a model whose forward needs real values there (MoE routing calls ``nonzero``)
    is run on the CPU instead when it is small enough to build in a moment (a tiny model from a config)."""
    try:
        model = _build(config, trust_remote_code, "meta")
    except Exception as exc:  # any failure to build means "no evidence", never a crash of `rules init`
        return WiringTrace(error=f"the model cannot be built from its config ({type(exc).__name__}: {exc})"[:300])
    try:
        return WiringTrace(*_run_hooked(model, "meta"))
    except Exception as exc:
        failure = f"the forward pass on the meta device failed ({type(exc).__name__}: {exc})"[:300]
    if sum(p.numel() for p in model.parameters()) > _CPU_FALLBACK_PARAMS:
        return WiringTrace(error=failure)
    try:
        return WiringTrace(*_run_hooked(_build(config, trust_remote_code, "cpu"), "cpu"))
    except Exception as exc:
        return WiringTrace(error=f"{failure}; on the CPU too ({type(exc).__name__}: {exc})"[:400])


def _build(config: Any, trust_remote_code: bool, device: str):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code,
                                                 attn_implementation="eager")
    return model.eval()


def _run_hooked(model: Any, device: str) -> tuple[dict[str, Wiring], None, str | None]:
    import torch

    producer: dict[int, str] = {}  # id(tensor) -> the innermost module that returned it
    alias: dict[int, Any] = {}  # a parameterless module's output -> its input (dropout passes data through)
    inputs: dict[str, list[Any]] = {}
    keep: list[Any] = []  # holds every seen tensor so that no id() is reused during the pass

    def hook(name, module, args, kwargs, output):
        ins = [t for t in (*args, *kwargs.values()) if torch.is_tensor(t) and t.is_floating_point()]
        out = _first_tensor(output)
        keep.extend(ins)
        inputs.setdefault(name, []).extend(ins)
        if out is None:
            return
        keep.append(out)
        leaf = next(module.children(), None) is None
        if leaf and next(module.parameters(), None) is None and ins and ins[0] is not out:
            alias.setdefault(id(out), ins[0])
        else:
            producer.setdefault(id(out), name)  # inner hooks fire first: the innermost module wins

    handles = [m.register_forward_hook(lambda mod, a, k, o, n=n: hook(n, mod, a, k, o), with_kwargs=True)
               for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            logits = _first_tensor(model(input_ids=torch.zeros(1, 4, dtype=torch.long, device=device)))
    finally:
        for h in handles:
            h.remove()

    def origin(t):
        for _ in range(1000):  # a chain of views and pass-through modules; never a cycle, but be safe
            if id(t) in alias:
                t = alias[id(t)]
            elif getattr(t, "_base", None) is not None:
                t = t._base
            else:
                break
        return producer.get(id(t))

    consumers: dict[str, list[str]] = {}
    for name, ins in inputs.items():
        for src in dict.fromkeys(origin(t) for t in ins):
            if src is not None and src != name and not name.startswith(src + "."):
                consumers.setdefault(src, []).append(name)
    modules = {name: Wiring(origin(ins[0]) if ins else None, tuple(consumers.get(name, ())))
               for name, ins in inputs.items()}
    return modules, None, origin(logits) if logits is not None else None


def _first_tensor(output: Any):
    import torch

    if torch.is_tensor(output):
        return output
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    return next((v for v in values if torch.is_tensor(v)), None)


def _block(module: str | None, roles: dict[str, str]) -> str | None:
    """``attn`` or ``ffn``: the sub-block whose tensors live under ``module`` (None: neither or both)."""
    if module is None:
        return None
    inside = {r for m, r in roles.items() if (m == module or m.startswith(module + ".")) and r not in _NORMS}
    attn = any(r.startswith("attn_") for r in inside)
    ffn = any(r.startswith("ffn_") for r in inside)
    return "attn" if attn and not ffn else "ffn" if ffn and not attn else None


def classify(module: str, trace: WiringTrace, roles: dict[str, str]) -> Evidence:
    """The role the traced wiring shows for ``module`` (a norm), given the roles of the other modules.

    Args:
        module: the norm's module path (``model.layers.0.post_attention_layernorm``).
        trace: from :func:`trace_wiring`.
        roles: module path -> role of the tensors it holds (projections above all; norms are ignored).
    """
    if not trace.ok:
        return Evidence(None, f"no functional check: {trace.error}")
    w = trace.modules.get(module)
    if w is None:
        return Evidence(None, "the module was not called in the traced forward pass")
    short = _shorten(module)
    src_role = roles.get(w.producer or "")
    if src_role in ("attn_q", "attn_k"):
        return Evidence(f"{src_role}_norm", f"its input is the output of {short(w.producer)} ({src_role})")
    # What a norm feeds decides first: in BLOOM the attention module adds the residual itself, so the
    # pre-MLP norm's input is "the attention block's output" too; only a norm whose output goes to no
    # projection is a post-norm.
    return _by_consumers(w, trace, roles, short) or _by_producer(w, roles, short) or Evidence(
        None, "the traced forward pass shows neither what feeds it nor what it feeds")


def _by_consumers(w: Wiring, trace: WiringTrace, roles: dict[str, str], short) -> Evidence | None:
    fed = {c: roles.get(c) or _block(c, roles) for c in w.consumers}
    if "output" in fed.values() or (trace.head is not None and trace.head in w.consumers):
        return Evidence("output_norm", "its output feeds the LM head")
    blocks = {"attn" if (r == "attn" or r in _ATTN_IN) else "ffn" if r and r.startswith("ffn") else None
              for r in fed.values()} - {None}
    names = ", ".join(short(c) for c, r in fed.items() if r in _ATTN_IN or (r and r.startswith("ffn_")))
    if blocks == {"attn", "ffn"}:
        return Evidence("attn_norm", f"its output feeds both attention and the MLP ({names}): a parallel block")
    if blocks == {"attn"}:
        return Evidence("attn_norm", f"its output feeds the attention projections ({names})")
    if blocks == {"ffn"}:
        return Evidence("ffn_norm", f"its output feeds the MLP ({names})")
    return None


def _by_producer(w: Wiring, roles: dict[str, str], short) -> Evidence | None:
    src_role, src_block = roles.get(w.producer or ""), _block(w.producer, roles)
    if src_role == "attn_o" or src_block == "attn":
        return Evidence("attn_post_norm", f"its input is the output of {short(w.producer)} (the attention block) "
                                          f"and its output feeds no projection")
    if src_role in ("ffn_down", "ffn_down_exp", "ffn_shared_down") or src_block == "ffn":
        return Evidence("ffn_post_norm", f"its input is the output of {short(w.producer)} (the MLP block) "
                                         f"and its output feeds no projection")
    return None


def _shorten(module: str):
    """Names relative to the module's parent block (``self_attn.o_proj`` rather than the full path)."""
    parent = module.rsplit(".", 1)[0] + "." if "." in module else ""

    def short(name: str | None) -> str:
        return "?" if name is None else name[len(parent):] if name.startswith(parent) else name

    return short


def norm_scope(role: str, shape: tuple[int, ...], config: Any) -> str | None:
    """What a q/k norm's weight spans, from its shape and the config: ``head`` (one head_dim vector shared by
    all heads), ``heads`` (a vector per head) or ``projection`` (the whole projection); None if it fits none."""
    def get(key):
        return config.get(key) if isinstance(config, dict) else getattr(config, key, None)

    heads = get("num_attention_heads") if role == "attn_q_norm" else (get("num_key_value_heads") or get("num_attention_heads"))
    head_dim = get("head_dim") or (get("hidden_size") // get("num_attention_heads")
                                   if get("hidden_size") and get("num_attention_heads") else None)
    if not heads or not head_dim:
        return None
    if tuple(shape) == (head_dim,):
        return "head"
    if tuple(shape) == (heads, head_dim):
        return "heads"
    if tuple(shape) == (heads * head_dim,):
        return "projection"
    return None


def check_wiring(res: Any) -> list[str]:
    """Warnings where a resolved rule file contradicts the model's traced wiring (``rules check``).

    Each norm declared with a wiring-dependent role is classified from the forward pass; a different
    role is reported once per rule, with the rule's line, the evidence and the fix. q/k norms that are
    not companions of their projection (``expand``) are reported too.
    """
    from trace_transfer.rules.schema import ROLES

    declared = {module_of(n, m.field): m.rule.rule.role for n, m in res.matches.items()}
    wiring_rules = [(n, m) for n, m in res.matches.items() if m.rule.rule.role in WIRING_ROLES]
    if not wiring_rules:
        return []
    trace = trace_wiring(res.spec.config)
    if not trace.ok:
        return [f"the roles of norms were not checked against the model's wiring: {trace.error}"]
    wrong: dict[int, tuple[Any, Evidence, list[str]]] = {}
    for name, m in wiring_rules:
        ev = classify(module_of(name, m.field), trace, declared)
        if ev.role is not None and ev.role != m.rule.rule.role:
            wrong.setdefault(id(m.rule), (m, ev, []))[2].append(name)
    out = []
    for m, ev, names in wrong.values():
        role, more = m.rule.rule.role, f" (and {len(names) - 1} more)" if len(names) > 1 else ""
        out.append(f"{res.rules.where(m.rule.line)}: {m.rule.where}: {names[0]!r}{more} is declared {role} "
                   f"({ROLES.get(role, role)}), but the model's forward pass shows {ev.why}: that is {ev.role} "
                   f"({ROLES.get(ev.role, ev.role)}); fix the role")
    expand = res.rules.expand
    for proj, norm in (("attn_q", "attn_q_norm"), ("attn_k", "attn_k_norm")):
        if any(r.role == norm for r in res.slots) and norm not in expand.get(proj, []):
            out.append(f"{res.rules.path}: {norm} rescales {proj}'s output, but `expand:` does not make it a companion "
                       f"of {proj}; add `expand: {{{proj}: [{norm}]}}` so a core {proj} trains its norm too")
    return out
