"""Rule drafts that do not lie (issue 15 item 6): a norm's role comes from evidence — the traced wiring,
the config or a known rule file — or it is a TODO; `rules check` warns where a role contradicts the wiring."""

from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner
from transformers import AutoConfig, AutoModelForCausalLM

from trace_transfer.cli.rules import command as rules_cli
from trace_transfer.errors import RuleError
from trace_transfer.rules.draft import draft
from trace_transfer.rules.loader import check_model, draft_rules, parse_rule_text
from trace_transfer.rules.resolve import model_spec, resolve
from trace_transfer.rules.wiring import classify, module_of, trace_wiring

_TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _spec(model_type: str, **kw):
    return model_spec(AutoConfig.for_model(model_type, **{**_TINY, **kw}))


def _entries(text: str) -> dict[str, dict]:
    """Rule entries by module name (``post_attention_layernorm``), from the draft's YAML (roles may be ``?``)."""
    doc = yaml.safe_load(text)
    return {e["name"].split("{layer}.")[-1].removesuffix(".{field}"): e for e in doc.get("layer", [])}


def _todo_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "# TODO" in line and not line.startswith("#")]


@pytest.fixture(scope="module")
def olmo2():
    return _spec("olmo2")


def test_olmo2_draft_names_the_post_norms_by_their_traced_wiring(olmo2):
    text = draft(olmo2)
    roles = {m: e["role"] for m, e in _entries(text).items()}
    assert roles["post_attention_layernorm"] == "attn_post_norm"  # not Llama's ffn_norm, despite the name
    assert roles["post_feedforward_layernorm"] == "ffn_post_norm"
    assert roles["self_attn.q_norm"] == "attn_q_norm" and roles["self_attn.k_norm"] == "attn_k_norm"
    # Every decided norm says why, and q/k norms are companions of their projections.
    assert "(the name alone suggests ffn_norm): traced: its input is the output of self_attn.o_proj" in text
    assert "normalises the whole projection" in text  # OLMo 2's q_norm is [heads * head_dim], not per head
    doc = yaml.safe_load(text)
    assert doc["expand"] == {"attn_q": ["attn_q_norm"], "attn_k": ["attn_k_norm"]}
    assert _todo_lines(text) == [] and "(0 left)" in text
    rules = parse_rule_text(text, "olmo2-draft.yaml")
    res = resolve(rules, olmo2)
    assert res.ok, res.problems


def test_olmo2_draft_without_evidence_marks_every_wiring_dependent_norm_todo(olmo2):
    """No functional check and no known rule file: the name alone decides nothing about a norm."""
    text = draft(olmo2, wiring=False)
    entries = _entries(text)
    for module in ("post_attention_layernorm", "post_feedforward_layernorm"):
        assert entries[module]["role"] == "?", module
    todos = _todo_lines(text)
    assert any("post_attention_layernorm.weight: the name suggests ffn_norm" in t and "attn_post_norm" in t for t in todos)
    assert sum("expand" in t or "rescales" in t for t in todos) == 2  # companions proposed, to be confirmed
    assert len(todos) == 4 and "(4 left)" in text
    with pytest.raises(RuleError, match="placeholder"):
        parse_rule_text(text, "olmo2-draft.yaml")
    # The q/k norms keep their role: the config tells what their weight spans.
    assert entries["self_attn.q_norm"]["role"] == "attn_q_norm"


def test_cohere_draft_sees_the_parallel_block_and_per_head_norms():
    """A second unshipped family: one shared norm feeding attention and MLP, q/k norms with a weight per head."""
    spec = _spec("cohere", use_qk_norm=True)
    text = draft(spec)
    entries = _entries(text)
    assert entries["input_layernorm"]["role"] == "attn_norm"
    assert "feeds both attention and the MLP" in text and "a parallel block" in text
    assert entries["self_attn.q_norm"]["role"] == "attn_q_norm"
    assert "with its own weights: [heads, head_dim]" in text
    assert _todo_lines(text) == []
    assert resolve(parse_rule_text(text, "cohere.yaml"), spec).ok

    blind = draft(spec, wiring=False)
    assert _entries(blind)["input_layernorm"]["role"] == "?"
    assert any("input_layernorm.weight: the name suggests attn_norm" in t for t in _todo_lines(blind))


def test_a_known_family_rule_is_evidence_when_nothing_is_traced():
    text = draft_rules(AutoConfig.for_model("llama", **_TINY), wiring=False)
    roles = {m: e["role"] for m, e in _entries(text).items()}
    assert roles["input_layernorm"] == "attn_norm" and roles["post_attention_layernorm"] == "ffn_norm"
    assert "the family's rule file" in text and "llama.yaml" in text


@pytest.mark.parametrize("model_type,expected", [
    ("llama", {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "norm": "output_norm"}),
    ("gemma2", {"post_attention_layernorm": "attn_post_norm", "pre_feedforward_layernorm": "ffn_norm",
                "post_feedforward_layernorm": "ffn_post_norm"}),
    ("qwen3", {"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}),
])
def test_trace_classifies_norms_by_what_feeds_them_and_what_they_feed(model_type, expected):
    spec = _spec(model_type, head_dim=8)
    trace = trace_wiring(spec.config)
    assert trace.ok, trace.error
    roles = {module_of(n): r for n, r in (("model.layers.0.self_attn.q_proj.weight", "attn_q"),
                                          ("model.layers.0.self_attn.k_proj.weight", "attn_k"),
                                          ("model.layers.0.self_attn.v_proj.weight", "attn_v"),
                                          ("model.layers.0.self_attn.o_proj.weight", "attn_o"),
                                          ("model.layers.0.mlp.gate_proj.weight", "ffn_gate"),
                                          ("model.layers.0.mlp.up_proj.weight", "ffn_up"),
                                          ("model.layers.0.mlp.down_proj.weight", "ffn_down"))}
    for module, role in expected.items():
        full = "model.norm" if module == "norm" else f"model.layers.0.{module}"
        assert classify(full, trace, roles).role == role, (module, classify(full, trace, roles))


def test_rules_check_warns_where_a_role_contradicts_the_wiring(olmo2, tmp_path):
    """The README's trap: OLMo 2's post_attention_layernorm declared as Llama's ffn_norm, no companions."""
    text = draft(olmo2).replace("role: attn_post_norm", "role: ffn_norm")
    text = text.replace("expand:\n  attn_q: [attn_q_norm]\n  attn_k: [attn_k_norm]\n", "")
    wrong = tmp_path / "olmo2.yaml"
    wrong.write_text(text)
    res = check_model(olmo2, wrong)
    assert res.ok  # coverage is fine: that is why it needs the wiring to catch it
    assert any("post_attention_layernorm.weight" in w and "declared ffn_norm" in w and "that is attn_post_norm" in w
               for w in res.warnings), res.warnings
    assert any("expand: {attn_q: [attn_q_norm]}" in w for w in res.warnings)

    model_dir = tmp_path / "tiny-olmo2"
    AutoModelForCausalLM.from_config(olmo2.config).save_pretrained(model_dir)
    out = CliRunner().invoke(rules_cli, ["check", str(model_dir), "--rules", str(wrong)])
    assert out.exit_code == 0 and "3 warning(s):" in out.output and "fix the role" in out.output, out.output
    right = tmp_path / "right.yaml"
    right.write_text(draft(olmo2))
    out = CliRunner().invoke(rules_cli, ["check", str(model_dir), "--rules", str(right)])
    assert out.exit_code == 0 and "warning" not in out.output, out.output
