"""Architecture rules: which tensor of a checkpoint plays which role (architecture knowledge as data).

``loader`` finds and loads rule files (``families/*.yaml``, registered dirs, ``$TRACE_TRANSFER_RULES_PATH``);
``schema`` parses and validates them; ``expr`` evaluates their config expressions; ``resolve`` matches a
rule set against a model's tensors; ``draft`` writes a first rule file for a new family.
"""

from trace_transfer.rules.loader import (
    BUILTIN_RULES_DIR,
    CUSTOM_ROLE_PREFIX,
    ENV_VAR,
    HEAD_AXIS,
    ROLES,
    ConfigView,
    Expr,
    ExprError,
    ModelSpec,
    Region,
    Resolution,
    RuleFile,
    RuleSet,
    Slot,
    TensorMatch,
    TensorRule,
    available_rules,
    check_model,
    draft_rules,
    find_rules,
    get_rules,
    is_valid_role,
    load_config,
    load_rules,
    model_spec,
    parse_rule_text,
    register_rules_dir,
    resolve,
    rules_search_path,
)

__all__ = [
    "ROLES", "HEAD_AXIS", "CUSTOM_ROLE_PREFIX", "is_valid_role",
    "RuleFile", "TensorRule", "RuleSet", "ModelSpec", "Slot", "Region", "TensorMatch", "Resolution",
    "Expr", "ExprError", "ConfigView",
    "BUILTIN_RULES_DIR", "ENV_VAR", "register_rules_dir", "rules_search_path", "load_rules", "parse_rule_text",
    "available_rules", "find_rules", "get_rules", "model_spec", "load_config", "resolve", "check_model", "draft_rules",
]
