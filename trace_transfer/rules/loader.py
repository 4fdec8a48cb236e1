"""Architecture rules: which tensor of a checkpoint plays which role.

Architecture knowledge is data. A rule file (``rules/<family>.yaml``) names every tensor of a family
in a shared role vocabulary (``attn_q``, ``ffn_down``, ``token_embd``, ...), declares fused tensors'
parts with sizes computed from the config, and lists companions (``expand``). Transfer maps CoreSets
between architectures by role through these files; ``trace-transfer rules`` checks and drafts them.

Rule files are found by the model's ``model_type`` (then ``architectures``) on a search path:
directories passed to :func:`register_rules_dir`, then ``$TRACE_TRANSFER_RULES_PATH``
(``os.pathsep``-separated), then the files shipped in the package. An explicit file always wins.

Example:
    >>> from trace_transfer.rules.loader import find_rules, model_spec, resolve
    >>> spec = model_spec("tiny-qwen3")                 # config + safetensors header, no weights
    >>> res = resolve(find_rules(spec), spec).raise_for_problems()
    >>> res.matches["model.layers.0.self_attn.q_norm.weight"].slots
    (Slot(role='attn_q_norm', field='weight', layer=0, expert=None),)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from trace_transfer.rules.expr import ConfigView, Expr, ExprError
from trace_transfer.rules.resolve import (
    ModelSpec,
    Region,
    Resolution,
    Slot,
    TensorMatch,
    load_config,
    model_spec,
    resolve,
)
from trace_transfer.rules.schema import (
    CUSTOM_ROLE_PREFIX,
    HEAD_AXIS,
    ROLES,
    RuleFile,
    RuleSet,
    TensorRule,
    is_valid_role,
    load_rule_file,
    parse_rule_text,
)
from trace_transfer.errors import ArtifactNotFoundError, RuleError

__all__ = [
    "ROLES", "HEAD_AXIS", "CUSTOM_ROLE_PREFIX", "is_valid_role",
    "RuleFile", "TensorRule", "RuleSet", "ModelSpec", "Slot", "Region", "TensorMatch", "Resolution",
    "Expr", "ExprError", "ConfigView",
    "BUILTIN_RULES_DIR", "ENV_VAR", "register_rules_dir", "rules_search_path", "load_rules", "parse_rule_text",
    "available_rules", "find_rules", "get_rules", "model_spec", "load_config", "resolve", "check_model", "draft_rules",
]

BUILTIN_RULES_DIR = Path(__file__).parent / "families"
ENV_VAR = "TRACE_TRANSFER_RULES_PATH"
_registered: list[Path] = []
_cache: dict[tuple[str, int], RuleSet] = {}


def register_rules_dir(path: str | Path) -> None:
    """Search ``path`` for rule files before the env var and the shipped rules (last registered first)."""
    p = Path(path)
    if not p.is_dir():
        raise ArtifactNotFoundError(f"rules directory not found: {p}")
    if p in _registered:
        _registered.remove(p)
    _registered.insert(0, p)


def rules_search_path() -> list[Path]:
    """Directories searched for ``*.yaml`` rule files, highest precedence first."""
    env = [Path(p) for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]
    return [*_registered, *env, BUILTIN_RULES_DIR]


def load_rules(path: str | Path) -> RuleSet:
    """Load and statically validate one rule file (cached until the file changes).

    Raises:
        ArtifactNotFoundError: no such file.
        RuleError: every problem in the file at once, each with ``file:line`` and the fix.
    """
    p = Path(path).resolve()
    if not p.is_file():
        raise ArtifactNotFoundError(f"rule file not found: {path}")
    key = (str(p), p.stat().st_mtime_ns)
    if key not in _cache:
        origin = "builtin" if p.parent == BUILTIN_RULES_DIR.resolve() else "user"
        _cache[key] = load_rule_file(p, origin)
    return _cache[key]


def available_rules(extra: str | Path | None = None) -> list[RuleSet]:
    """Every rule file on the search path (``extra`` — a file or directory — first), in precedence order.

    A family may appear more than once; the first occurrence is the one :func:`find_rules` uses.
    """
    out: list[RuleSet] = []
    dirs = list(rules_search_path())
    if extra is not None:
        e = Path(extra)
        if e.is_file():
            out.append(load_rules(e))
        elif e.is_dir():
            dirs.insert(0, e)
        else:
            raise ArtifactNotFoundError(f"--rules {extra}: no such file or directory")
    for d in dirs:
        if d.is_dir():
            out.extend(load_rules(f) for f in sorted([*d.glob("*.yaml"), *d.glob("*.yml")]))
    return out


def find_rules(model: Any, rules: Any = None, must_match: bool = False) -> RuleSet:
    """The rule file for a model (``ModelSpec``, config, module or path), by ``model_type`` then ``architectures``.

    Args:
        model: anything with a config: ``ModelSpec``, ``PretrainedConfig``, ``nn.Module``, config dict.
        rules: extra rules searched before the search path: a ``RuleSet``, a rule file, a directory,
            or a list of these. A single file or RuleSet is used as is unless ``must_match``.
        must_match: only return a file whose ``match:`` lists the model's model_type/architectures.

    Raises:
        RuleError: no rule file matches; the message says how to draft one.
    """
    extras = list(rules) if isinstance(rules, (list, tuple)) else ([] if rules is None else [rules])
    if len(extras) == 1 and not must_match:
        if isinstance(extras[0], RuleSet):
            return extras[0]
        if Path(extras[0]).is_file():
            return load_rules(extras[0])
    candidates: list[RuleSet] = []
    for e in extras:
        if isinstance(e, RuleSet):
            candidates.append(e)
        elif Path(e).is_file():
            candidates.append(load_rules(e))
        elif Path(e).is_dir():
            candidates += [load_rules(f) for f in sorted([*Path(e).glob("*.yaml"), *Path(e).glob("*.yml")])]
        else:
            raise ArtifactNotFoundError(f"rules {e}: no such file or directory")
    candidates += available_rules()
    config = _config_of(model)
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    archs = list((config.get("architectures") if isinstance(config, dict) else getattr(config, "architectures", None)) or [])
    for rs in candidates:
        if model_type and model_type in rs.spec.match.model_type:
            return rs
    for rs in candidates:
        if set(archs) & set(rs.spec.match.architectures):
            return rs
    raise RuleError(
        f"no rule file for model_type {model_type!r} (architectures {archs}); searched "
        f"{', '.join(str(d) for d in rules_search_path())}. Draft one with `trace-transfer rules init MODEL "
        f"--out my_rules/{model_type or 'arch'}.yaml`, fix its TODOs, then pass `--rules FILE` or add the "
        f"directory to ${ENV_VAR}"
    )


def get_rules(name: str, rules: str | Path | None = None) -> RuleSet:
    """A rule file by family name, model_type, architecture class or path (for ``rules show``)."""
    if Path(name).is_file():
        return load_rules(name)
    candidates = available_rules(rules)
    for key in ("family", "model_type", "architectures"):
        for rs in candidates:
            values = [rs.family] if key == "family" else getattr(rs.spec.match, key)
            if name in values:
                return rs
    known = sorted({rs.family for rs in candidates})
    raise RuleError(f"no rule file named {name!r}; known families: {', '.join(known)}")


def check_model(model: Any, rules: str | Path | RuleSet | None = None, layout: str = "auto",
                wiring: bool = True) -> Resolution:
    """Resolve a model against its rule file and return the coverage (does not raise on gaps).

    With ``wiring``, norms are also checked against a traced forward pass (meta device): a role the
    wiring contradicts lands in ``.warnings`` (see :mod:`trace_transfer.rules.wiring`).

    Example:
        >>> res = check_model("path/to/model")
        >>> res.ok, res.summary(), res.warnings
    """
    spec = model_spec(model, layout=layout)
    res = resolve(find_rules(spec, rules), spec)
    if wiring:
        from trace_transfer.rules.wiring import check_wiring

        res.warnings += check_wiring(res)
    return res


def draft_rules(model: Any, layout: str = "auto", wiring: bool = True) -> str:
    """Draft a rule file (YAML text) for an architecture from its tensor names; see ``rules init``.

    Norm roles need evidence: a traced forward pass (``wiring``) or a rule file on the search path
    that already covers the model_type (passed to the draft as the family's known layout).
    """
    from trace_transfer.rules.draft import draft

    spec = model_spec(model, layout=layout)
    try:
        family = find_rules(spec, must_match=True)
    except RuleError:
        family = None
    return draft(spec, wiring=wiring, family=family)


def _config_of(model: Any) -> Any:
    if isinstance(model, ModelSpec):
        return model.config
    if isinstance(model, dict):
        return model
    if hasattr(model, "config") and not hasattr(model, "model_type"):
        return model.config
    if hasattr(model, "model_type"):
        return model
    return load_config(model)
