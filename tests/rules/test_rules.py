"""Rule files: every shipped family against a tiny model, fused slices against the models' own math,
`rules init` on an architecture without a shipped rule, and the errors of broken rule files."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from trace_transfer.cli.rules import command as rules_cli
from trace_transfer.errors import RuleError
from trace_transfer.rules.loader import (
    BUILTIN_RULES_DIR,
    ConfigView,
    Expr,
    ExprError,
    Slot,
    available_rules,
    find_rules,
    load_rules,
    model_spec,
    parse_rule_text,
    register_rules_dir,
    resolve,
)

_DECODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=64, vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
# family -> (model_type, config overrides); tiny sizes keep every build at a few milliseconds.
FAMILIES = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"head_dim": 8}),
    "gemma2": ("gemma2", {"head_dim": 8}),
    "gemma3": ("gemma3_text", {"head_dim": 8}),
    "phi3": ("phi3", {}),
    "gpt2": ("gpt2", dict(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=1, eos_token_id=2)),
    "gpt_neox": ("gpt_neox", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                  vocab_size=128, bos_token_id=1, eos_token_id=2)),
    "qwen2_moe": ("qwen2_moe", dict(_MOE, shared_expert_intermediate_size=32, mlp_only_layers=[1])),
    "qwen3_moe": ("qwen3_moe", dict(_MOE, head_dim=8)),
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
}


def tiny_config(model_type: str, **overrides):
    base = {} if model_type in ("gpt2", "gpt_neox") else dict(_DECODER)
    return AutoConfig.for_model(model_type, **{**base, **overrides})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> (model, saved dir); built once per module."""
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            model_type, kw = FAMILIES[family]
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(tiny_config(model_type, **kw))
            out = tmp_path_factory.mktemp(family)
            model.save_pretrained(out)
            cache[family] = (model, out)
        return cache[family]

    return get


def _numel(shape) -> int:
    return math.prod(shape)


# --------------------------------------------------------------------------------------------------
# Every shipped family
# --------------------------------------------------------------------------------------------------


def test_every_shipped_family_is_tested():
    shipped = {rs.family for rs in available_rules() if rs.origin == "builtin"}
    assert shipped == set(FAMILIES)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_shipped_rules_cover_tiny_model(family, tiny):
    model, saved = tiny(family)
    results = {}
    for layout, src in (("model", model), ("checkpoint", saved)):
        spec = model_spec(src, layout="checkpoint" if layout == "checkpoint" else "auto")
        rules = find_rules(spec)
        assert rules.family == family
        res = resolve(rules, spec)
        assert res.problems == [], "\n".join(res.problems)
        # Every tensor matched exactly once or ignored; no unused rule.
        assert set(res.matches) | set(res.ignored) == set(spec.shapes)
        assert not set(res.matches) & set(res.ignored)
        assert res.unmatched == {} and [u for u in res.unused_rules if "optional" not in u] == []
        # Every element of every matched tensor belongs to exactly one slot (fused parts tile the tensor).
        covered = {}
        for slot, region in res.slots.items():
            if region.tied_from is None:
                covered[region.tensor] = covered.get(region.tensor, 0) + _numel(region.canonical_shape())
        assert covered == {n: _numel(spec.shapes[n]) for n in res.matches}
        results[layout] = res
    # The in-memory names and the file names describe the same roles (MoE: stacked vs per expert).
    assert set(results["model"].slots) == set(results["checkpoint"].slots)


def test_meta_layout_names_equal_named_parameters(tiny):
    model, saved = tiny("qwen3_moe")
    spec = model_spec(saved, layout="model")
    assert spec.shapes == {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert resolve(find_rules(spec), spec).variant == "stacked"
    assert resolve(find_rules(spec), model_spec(saved, layout="checkpoint")).variant == "per_expert"


# --------------------------------------------------------------------------------------------------
# Fused tensors: slices agree with the models' own computations
# --------------------------------------------------------------------------------------------------


def _region_rows(res, role, layer=0, field="weight"):
    return res.slots[Slot(role, field, layer)]


def test_phi3_fused_parts_are_row_ranges(tiny):
    model, _ = tiny("phi3")
    res = resolve(load_rules(BUILTIN_RULES_DIR / "phi3.yaml"), model_spec(model))
    q, k, v = (_region_rows(res, r) for r in ("attn_q", "attn_k", "attn_v"))
    assert (q.ranges, k.ranges, v.ranges) == (((0, 32),), ((32, 48),), ((48, 64),))
    assert q.tensor == k.tensor == "model.layers.0.self_attn.qkv_proj.weight"
    gate, up = _region_rows(res, "ffn_gate"), _region_rows(res, "ffn_up")
    assert (gate.ranges, up.ranges) == (((0, 64),), ((64, 128),))


def test_gpt_neox_interleaved_qkv_matches_model_split(tiny):
    model, _ = tiny("gpt_neox")
    res = resolve(find_rules(model_spec(model)), model_spec(model))
    attn = model.gpt_neox.layers[0].attention
    x = torch.randn(3, 32)
    with torch.no_grad():
        qkv = attn.query_key_value(x).view(3, 4, 3 * 8)  # how GPTNeoXAttention splits heads
        q_model, k_model, v_model = (t.reshape(3, 32) for t in qkv.chunk(3, dim=-1))
        for role, expected in (("attn_q", q_model), ("attn_k", k_model), ("attn_v", v_model)):
            w = _region_rows(res, role)
            b = _region_rows(res, role, field="bias")
            ours = x @ attn.query_key_value.weight[w.index()].T + attn.query_key_value.bias[b.index()]
            torch.testing.assert_close(ours, expected)
    assert _region_rows(res, "attn_q").ranges == ((0, 8), (24, 32), (48, 56), (72, 80))


def test_gpt2_conv1d_splits_along_axis_1(tiny):
    model, _ = tiny("gpt2")
    res = resolve(find_rules(model_spec(model)), model_spec(model))
    c_attn = model.transformer.h[0].attn.c_attn
    x = torch.randn(3, 32)
    with torch.no_grad():
        q_model, k_model, v_model = c_attn(x).split(32, dim=-1)
        for role, expected in (("attn_q", q_model), ("attn_k", k_model), ("attn_v", v_model)):
            w, b = _region_rows(res, role), _region_rows(res, role, field="bias")
            assert w.split_axis == 1 and w.transposed and b.split_axis == 0
            torch.testing.assert_close(x @ c_attn.weight[:, w.index()] + c_attn.bias[b.index()], expected)
    assert _region_rows(res, "attn_q").canonical_shape() == (32, 32)  # [out, in] like a Linear


def test_stacked_experts_slice_equals_per_expert_checkpoint(tiny):
    model, saved = tiny("qwen3_moe")
    res_mem = resolve(find_rules(model_spec(model)), model_spec(model))
    res_file = resolve(find_rules(model_spec(saved)), model_spec(saved, layout="checkpoint"))
    params = dict(model.named_parameters())
    with safe_open(str(saved / "model.safetensors"), "pt") as fh:
        for role in ("ffn_gate_exp", "ffn_up_exp", "ffn_down_exp"):
            for expert in range(4):
                slot = Slot(role, "weight", 0, expert)
                mem, file = res_mem.slots[slot], res_file.slots[slot]
                stacked = params[mem.tensor].detach().select(0, expert)
                if mem.ranges is not None:
                    stacked = stacked.index_select(mem.split_axis - 1, mem.index())
                torch.testing.assert_close(stacked, fh.get_tensor(file.tensor))


def test_moe_dense_layers_follow_mlp_only_layers(tiny):
    model, _ = tiny("qwen2_moe")
    res = resolve(find_rules(model_spec(model)), model_spec(model))
    assert Slot("ffn_router", "weight", 0) in res.slots and Slot("ffn_router", "weight", 1) not in res.slots
    assert Slot("ffn_gate", "weight", 1) in res.slots and Slot("ffn_gate", "weight", 0) not in res.slots
    assert Slot("ffn_shared_router", "weight", 0) in res.slots


def test_tied_head_resolves_to_embedding(tiny):
    model, saved = tiny("gemma2")
    res = resolve(find_rules(model_spec(saved)), model_spec(saved))
    region = res.slots[Slot("output")]
    assert region.tensor == "model.embed_tokens.weight" and region.tied_from == "token_embd"


def test_gpt2_hub_names_without_prefix_are_aliases(tiny):
    model, _ = tiny("gpt2")
    spec = model_spec(model)
    spec.shapes = {n.removeprefix("transformer."): s for n, s in spec.shapes.items()}
    res = resolve(find_rules(spec), spec)
    assert res.ok, res.problems


# --------------------------------------------------------------------------------------------------
# Broken rule files: one error listing everything, each with file, line and fix
# --------------------------------------------------------------------------------------------------

_MINI = """\
format: 1
family: mini
match: {model_type: [llama]}
num_layers: num_hidden_layers
before:
  - {role: token_embd, name: model.embed_tokens.weight}
layer:
  - {role: attn_norm, name: "model.layers.{layer}.input_layernorm.weight"}
"""


def test_unknown_key_names_line_key_and_valid_keys(tmp_path):
    text = _MINI + '  - {role: attn_q, nmae: "model.layers.{layer}.self_attn.q_proj.weight"}\nignores: []\n'
    with pytest.raises(RuleError) as exc:
        parse_rule_text(text, tmp_path / "bad.yaml")
    msg = str(exc.value)
    assert "bad.yaml:9: layer[1]: unknown key 'nmae'; did you mean 'name'?" in msg
    assert "Valid keys: role, name, fields" in msg
    assert "bad.yaml:10: <top>: unknown key 'ignores'; did you mean 'ignore'?" in msg
    assert "bad.yaml:9: layer[1]: required key 'name' is missing" in msg
    assert len(exc.value.problems) == 3  # all reported at once


def test_bad_roles_and_expressions_are_reported_together(tmp_path):
    text = _MINI.replace("num_hidden_layers", "num_hidden_layers / 1") + "  - {role: attn_qq, name: 'model.layers.{layer}.x.weight', when: 'import os'}\n"
    with pytest.raises(RuleError) as exc:
        parse_rule_text(text, tmp_path / "bad.yaml")
    msg = str(exc.value)
    assert "bad.yaml:4: num_layers" in msg and "use //" in msg
    assert "bad.yaml:9" in msg and "unknown role 'attn_qq'; did you mean attn_q" in msg
    assert "when" in msg and "cannot parse" in msg


def test_duplicate_yaml_key_is_an_error(tmp_path):
    with pytest.raises(RuleError, match=r"bad.yaml:3: duplicate key 'family'"):
        parse_rule_text("format: 1\nfamily: a\nfamily: b\nmatch: {}\nnum_layers: 2\n", tmp_path / "bad.yaml")


def test_fused_sizes_not_adding_up(tiny, tmp_path):
    model, _ = tiny("phi3")
    text = (BUILTIN_RULES_DIR / "phi3.yaml").read_text().replace("{role: attn_v, size: num_key_value_heads * head_dim}",
                                                                  "{role: attn_v, size: head_dim}")
    bad = tmp_path / "phi3.yaml"
    bad.write_text(text)
    res = resolve(load_rules(bad), model_spec(model))
    assert not res.ok
    msg = res.problems[0]
    assert f"{bad}:" in msg and "model.layers.0.self_attn.qkv_proj.weight" in msg
    assert "attn_v=8 (head_dim)" in msg and "add up to 56 but dim 0 is 64" in msg and "fix the part size" in msg
    with pytest.raises(RuleError, match="does not cover"):
        res.raise_for_problems()


def test_unmatched_and_missing_tensors(tiny, tmp_path):
    model, _ = tiny("llama")
    text = (BUILTIN_RULES_DIR / "llama.yaml").read_text()
    text = text.replace('  - {role: ffn_down, name: "model.layers.{layer}.mlp.down_proj.{field}", fields: [weight]}\n', "")
    text = text.replace("mlp.up_proj.{field}", "mlp.upproj.{field}")
    bad = tmp_path / "llama.yaml"
    bad.write_text(text)
    res = resolve(load_rules(bad), model_spec(model))
    assert "model.layers.0.mlp.down_proj.weight" in res.unmatched
    text_all = "\n".join(res.problems)
    assert "'model.layers.0.mlp.down_proj.weight' [32, 64] is not matched by any rule; add a rule" in text_all
    assert "matched no tensor (expected e.g. 'model.layers.0.mlp.upproj.weight')" in text_all
    assert "closest expected name" in res.unmatched["model.layers.0.mlp.up_proj.weight"]


def test_when_with_missing_config_key_suggests_close_keys(tiny, tmp_path):
    model, _ = tiny("llama")
    text = (BUILTIN_RULES_DIR / "llama.yaml").read_text().replace("when: attention_bias}", "when: attention_biass}", 1)
    bad = tmp_path / "llama.yaml"
    bad.write_text(text)
    res = resolve(load_rules(bad), model_spec(model))
    assert any("no 'attention_biass' (close: attention_bias," in p and "config_defaults" in p for p in res.problems)


def test_expressions_are_safe_and_small():
    cfg = ConfigView({"num_key_value_heads": 2, "head_dim": 8, "mlp_only_layers": [1], "step": 1, "sub": {"h": 4}})
    assert Expr("num_key_value_heads * head_dim + (3 - 1) // 2").evaluate(cfg) == 17
    assert Expr("sub.h * 2").evaluate(cfg) == 8
    cond = Expr("layer not in mlp_only_layers and (layer + 1) % step == 0", "condition")
    assert [cond.evaluate(cfg, layer=i) for i in range(3)] == [True, False, True]
    for bad in ("__import__('os')", "head_dim / 2", "head_dim ** 2", "[x for x in y]", "head_dim.__class__()", "lambda: 1"):
        with pytest.raises(ExprError):
            Expr(bad)
    with pytest.raises(ExprError, match="placeholder"):
        Expr("?")


def test_defaults_fill_missing_config_values():
    cfg = ConfigView({"hidden_size": 32, "num_attention_heads": 4, "head_dim": None}, {"head_dim": Expr("hidden_size // num_attention_heads")})
    assert Expr("head_dim * 2").evaluate(cfg) == 16


# --------------------------------------------------------------------------------------------------
# Lookup and search path
# --------------------------------------------------------------------------------------------------


def test_user_rules_dir_takes_precedence(tmp_path, monkeypatch, tiny):
    model, _ = tiny("llama")
    user = tmp_path / "my_rules"
    user.mkdir()
    (user / "llama.yaml").write_text((BUILTIN_RULES_DIR / "llama.yaml").read_text().replace("family: llama", "family: my_llama"))
    monkeypatch.setenv("TRACE_TRANSFER_RULES_PATH", str(user))
    assert find_rules(model_spec(model)).family == "my_llama"
    monkeypatch.delenv("TRACE_TRANSFER_RULES_PATH")
    assert find_rules(model_spec(model)).family == "llama"
    register_rules_dir(user)
    try:
        assert find_rules(model_spec(model)).family == "my_llama"
    finally:
        from trace_transfer.rules import loader as rules_mod

        rules_mod._registered.remove(user)


def test_unknown_architecture_says_how_to_draft(tmp_path):
    with pytest.raises(RuleError, match="rules init"):
        find_rules({"model_type": "no_such_arch", "architectures": ["NoSuchForCausalLM"]})


# --------------------------------------------------------------------------------------------------
# CLI: check / list / show / init
# --------------------------------------------------------------------------------------------------


def test_cli_check_ok_and_failing(tiny, tmp_path):
    _, saved = tiny("phi3")
    runner = CliRunner()
    ok = runner.invoke(rules_cli, ["check", str(saved), "--layout", "both"])
    assert ok.exit_code == 0, ok.output
    assert "OK: every tensor is matched exactly once" in ok.output
    bad = tmp_path / "phi3.yaml"
    bad.write_text((BUILTIN_RULES_DIR / "phi3.yaml").read_text().replace("mlp.down_proj", "mlp.downproj"))
    fail = runner.invoke(rules_cli, ["check", str(saved), "--rules", str(bad)])
    assert fail.exit_code == 1
    assert "unmatched tensors:" in fail.output and "model.layers.0.mlp.down_proj.weight" in fail.output
    assert "unused rules:" in fail.output


def test_cli_list_and_show():
    runner = CliRunner()
    out = runner.invoke(rules_cli, ["list"])
    assert out.exit_code == 0 and all(f in out.output for f in FAMILIES)
    roles = runner.invoke(rules_cli, ["list", "--roles"])
    assert "attn_q_norm" in roles.output and "x_<name>" in roles.output
    show = runner.invoke(rules_cli, ["show", "Qwen3ForCausalLM"])
    assert show.exit_code == 0 and "attn_q: [attn_q_norm]" in show.output
    missing = runner.invoke(rules_cli, ["show", "nope"])
    assert missing.exit_code == 1 and "known families" in missing.output


def _falcon_dir(tmp_path: Path) -> Path:
    cfg = tiny_config("falcon", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=128)
    out = tmp_path / "falcon"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    return out


def test_init_draft_for_unshipped_family_passes_check_after_todos(tmp_path):
    model_dir = _falcon_dir(tmp_path)  # Falcon: no shipped rule; multi-query fused query_key_value
    draft = tmp_path / "falcon.yaml"
    runner = CliRunner()
    res = runner.invoke(rules_cli, ["init", str(model_dir), "--out", str(draft)])
    assert res.exit_code == 0, res.output
    text = draft.read_text()
    assert "role: attn_qkv" in text and 'size: "?"}   # TODO' in text and "tied_to: token_embd" in text

    before = runner.invoke(rules_cli, ["check", str(model_dir), "--rules", str(draft)])
    assert before.exit_code == 1 and "placeholder left by `rules init`" in before.output

    # The marked edits: Falcon's multi-query layout is [q of all heads | one k head | one v head].
    sizes = {"attn_q": "num_attention_heads * head_dim", "attn_k": "head_dim", "attn_v": "head_dim"}
    lines = []
    for line in text.splitlines():
        for role, size in sizes.items():
            if f'{{role: {role}, size: "?"}}' in line:
                line = line.replace('"?"}   # TODO', f"{size}}}")
        lines.append(line)
    draft.write_text("\n".join(lines) + "\n")
    after = runner.invoke(rules_cli, ["check", str(model_dir), "--rules", str(draft)])
    assert after.exit_code == 0, after.output


def test_init_recognises_a_standard_layout_completely(tmp_path):
    cfg = tiny_config("starcoder2")
    out = tmp_path / "sc2"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    draft = tmp_path / "sc2.yaml"
    runner = CliRunner()
    assert runner.invoke(rules_cli, ["init", str(out), "--out", str(draft)]).exit_code == 0
    assert "# TODO" not in "\n".join(l for l in draft.read_text().splitlines() if not l.startswith("#"))
    res = runner.invoke(rules_cli, ["check", str(out), "--rules", str(draft)])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_shipped_rules_agree_with_the_traced_wiring(tiny, family):
    """Every shipped norm role is what a forward pass shows (no `rules check` warning), MoE included."""
    from trace_transfer.rules.loader import check_model, get_rules

    model, _ = tiny(family)
    res = check_model(model, get_rules(family))
    assert res.ok and res.warnings == [], res.warnings
