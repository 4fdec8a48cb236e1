"""Transfer: Llama → Qwen3 (companions), Llama ↔ Phi-3 (fused slicing), GPT-2 (transposed Conv1D),
different depths and widths (per-head resampling), exact re-budgeting, report, CLI."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoConfig, AutoModelForCausalLM

from trace_transfer.cli.transfer import command as transfer_cli
from trace_transfer.coreset import CoreSet, UnitLayout
from trace_transfer.errors import ConfigError
from trace_transfer.rules import model_spec
from trace_transfer.transfer import load_layer_map, transfer


def cfg(model_type: str, layers: int = 2, hidden: int = 32, heads: int = 4, kv: int = 2, **kw):
    if model_type == "gpt2":
        return AutoConfig.for_model("gpt2", n_embd=hidden, n_layer=layers, n_head=heads, vocab_size=128,
                                    n_positions=64, bos_token_id=1, eos_token_id=2, **kw)
    base = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                intermediate_size=2 * hidden, vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return AutoConfig.for_model(model_type, **{**base, **kw})


_SPECS: dict = {}


def spec_of(config):
    key = config.to_json_string()
    if key not in _SPECS:
        _SPECS[key] = model_spec(config)
    return _SPECS[key]


def coreset(config, layout, score_fn, core=None, ratio=0.1, **meta):
    """A source CoreSet with per-unit scores from ``score_fn(name, n_units)``; the top ``ratio`` units are core."""
    shapes = spec_of(config).shapes
    layouts = {n: layout(n, s) for n, s in shapes.items()}
    scores = {n: score_fn(n, layouts[n].num_units(s)).float() for n, s in shapes.items()}
    masks = {n: (core(n, scores[n]) if core else torch.zeros_like(scores[n], dtype=torch.bool)) for n in shapes}
    return CoreSet.from_unit_masks(masks, layouts, shapes, scores=scores, metadata={"task": "t", "ratio": ratio, **meta})


def tensor_layout(n, s):
    return UnitLayout("tensor")


def row_layout(n, s):
    return UnitLayout.rows()


IDENTITY2 = {"forward": {"0": 0, "1": 1}, "reverse": {"0": 0, "1": 1}}


# --------------------------------------------------------------------------------------------------
# Llama → Qwen3: companions
# --------------------------------------------------------------------------------------------------


def test_llama_to_qwen3_adds_q_k_norm_companions_within_budget():
    src, tgt = cfg("llama"), cfg("qwen3", head_dim=8)
    hot = {"model.layers.1.self_attn.q_proj.weight": 10.0, "model.layers.0.self_attn.k_proj.weight": 9.0}
    cs = coreset(src, tensor_layout, lambda n, u: torch.tensor([hot.get(n, 0.01 * len(n))]), budget_unit="tensors")
    out, report = transfer(cs, src, tgt, IDENTITY2, ratio=0.2, carry="profile")

    n_tensors = len(spec_of(tgt).shapes)
    assert len(out.names()) == math.floor(0.2 * n_tensors) == report.budget["selected"]  # exact, companions inside
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.q_norm.weight",
                 "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.k_norm.weight"):
        assert name in out.names()
    assert "model.layers.0.self_attn.q_norm.weight" not in out.names()  # layer 0's q is not core
    assert {c["tensor"] for c in report.companions} == {"model.layers.1.self_attn.q_norm.weight", "model.layers.0.self_attn.k_norm.weight"}
    # Whole-tensor scores map exactly, role by role.
    for name, value in hot.items():
        assert float(out.score(name)) == value
    assert {u["role"] for u in report.target_unsourced} == {"attn_q_norm", "attn_k_norm"}
    out.check_fits(spec_of(tgt).shapes)


def test_qwen3_to_llama_reports_roles_without_counterpart():
    src, tgt = cfg("qwen3", head_dim=8), cfg("llama")
    cs = coreset(src, tensor_layout, lambda n, u: torch.tensor([1.0 if "norm" in n else 0.5]),
                 core=lambda n, s: torch.tensor([n.endswith("q_norm.weight")]))
    out, report = transfer(cs, src, tgt, IDENTITY2, ratio=0.1, carry="profile")
    lost = {u["slot"]: u["core_params"] for u in report.source_unmapped}
    assert lost == {"attn_q_norm.weight L0": 8, "attn_q_norm.weight L1": 8, "attn_k_norm.weight L0": 0, "attn_k_norm.weight L1": 0}
    assert report.lost_core_params == 16
    assert [r for r in report.role_rows() if r["role"] == "attn_q_norm"][0]["source_lost"] == 2


# --------------------------------------------------------------------------------------------------
# Fused tensors
# --------------------------------------------------------------------------------------------------


def test_llama_rows_slice_into_phi3_fused_qkv_and_gate_up():
    src, tgt = cfg("llama"), cfg("phi3")
    gen = torch.Generator().manual_seed(0)
    cs = coreset(src, row_layout, lambda n, u: torch.rand(u, generator=gen))
    out, report = transfer(cs, src, tgt, IDENTITY2, ratio=0.1, carry="profile")
    for layer in (0, 1):
        qkv = out.score(f"model.layers.{layer}.self_attn.qkv_proj.weight")
        assert out.layout(f"model.layers.{layer}.self_attn.qkv_proj.weight") == UnitLayout.rows()
        for part, (a, b) in (("q", (0, 32)), ("k", (32, 48)), ("v", (48, 64))):
            torch.testing.assert_close(qkv[a:b], cs.score(f"model.layers.{layer}.self_attn.{part}_proj.weight"))
        gate_up = out.score(f"model.layers.{layer}.mlp.gate_up_proj.weight")
        torch.testing.assert_close(gate_up[:64], cs.score(f"model.layers.{layer}.mlp.gate_proj.weight"))
        torch.testing.assert_close(gate_up[64:], cs.score(f"model.layers.{layer}.mlp.up_proj.weight"))
    assert report.source_unmapped == [] and report.target_unsourced == []
    assert out.num_selected() == math.floor(0.1 * out.num_total())  # exact parameter budget

    # And back: Phi-3's fused rows split into Llama's separate tensors.
    back, _ = transfer(out, tgt, src, IDENTITY2, ratio=0.1, carry="profile")
    torch.testing.assert_close(back.score("model.layers.1.self_attn.k_proj.weight"), cs.score("model.layers.1.self_attn.k_proj.weight"))


def test_fused_tensor_at_tensor_granularity_takes_the_max_of_its_parts():
    src, tgt = cfg("llama"), cfg("phi3")
    cs = coreset(src, tensor_layout, lambda n, u: torch.tensor([0.9 if "k_proj" in n else 0.1]))
    out, _ = transfer(cs, src, tgt, IDENTITY2, ratio=0.1, budget="tensors", carry="profile")
    assert float(out.score("model.layers.0.self_attn.qkv_proj.weight")) == pytest.approx(0.9)
    assert out.layout("model.layers.0.self_attn.qkv_proj.weight").kind == "tensor"


def test_gpt2_conv1d_columns_become_llama_rows():
    src, tgt = cfg("gpt2"), cfg("llama", kv=4)
    gen = torch.Generator().manual_seed(1)
    # GPT-2 stores [in, out]: its output features are columns (axis 1), Llama's are rows (axis 0).
    cs = coreset(src, lambda n, s: UnitLayout.columns() if len(s) == 2 else UnitLayout.rows(), lambda n, u: torch.rand(u, generator=gen))
    out, report = transfer(cs, src, tgt, IDENTITY2, ratio=0.05, carry="profile")
    c_attn = cs.score("transformer.h.0.attn.c_attn.weight")
    assert out.layout("model.layers.0.self_attn.v_proj.weight") == UnitLayout.rows()
    torch.testing.assert_close(out.score("model.layers.0.self_attn.v_proj.weight"), c_attn[64:96])
    # Llama has no biases and no learned positions: those source slots are reported, not dropped silently.
    unmapped_weights = {u["role"] for u in report.source_unmapped if u["slot"].split()[0].endswith(".weight")}
    assert unmapped_weights == {"pos_embd"}
    assert all(u["slot"].split()[0].endswith((".weight", ".bias")) for u in report.source_unmapped)
    assert any(u["slot"] == "pos_embd.weight" for u in report.source_unmapped)


# --------------------------------------------------------------------------------------------------
# Depths and widths
# --------------------------------------------------------------------------------------------------


def test_deeper_wider_target_gets_a_source_for_every_layer_and_per_head_profiles():
    src = cfg("llama", layers=2, hidden=32, heads=4, kv=4)               # head_dim 8
    tgt = cfg("llama", layers=4, hidden=64, heads=8, kv=8)               # head_dim 8, twice the heads

    def scores(n, u):
        if n.endswith("q_proj.weight"):
            return torch.arange(4).repeat_interleave(8).float()         # constant within each head
        return torch.linspace(0, 1, u)

    cs = coreset(src, row_layout, scores)
    out, report = transfer(cs, src, tgt, {"reverse": {"0": 0, "1": 0, "2": 1, "3": 1}}, ratio=0.1, carry="profile")
    assert report.target_unsourced == []
    for layer in range(4):
        q = out.score(f"model.layers.{layer}.self_attn.q_proj.weight").reshape(8, 8)
        assert torch.allclose(q, q[:, :1].expand(8, 8))                 # still constant within each head
        torch.testing.assert_close(q[:, 0], torch.linspace(0, 3, 8))    # heads resampled, endpoints pinned
    down = out.score("model.layers.3.mlp.down_proj.weight")           # rows 32 → 64, linear over position
    torch.testing.assert_close(down, torch.linspace(0, 1, 64))
    assert out.num_selected() == math.floor(0.1 * out.num_total())


def test_element_profiles_resample_and_whole_tensors_map_exactly_across_widths():
    src, tgt = cfg("llama", hidden=32), cfg("llama", hidden=48, heads=4, kv=2)
    gen = torch.Generator().manual_seed(2)
    cs = coreset(src, lambda n, s: UnitLayout("element") if "down_proj" in n else UnitLayout("tensor"),
                 lambda n, u: torch.rand(u, generator=gen))
    out, _ = transfer(cs, src, tgt, IDENTITY2, ratio=0.05, budget="params", carry="profile")
    src_down = cs.score("model.layers.0.mlp.down_proj.weight").reshape(32, 64)
    tgt_down = out.score("model.layers.0.mlp.down_proj.weight").reshape(48, 96)
    for (i, j), (a, b) in (((0, 0), (0, 0)), ((-1, -1), (-1, -1)), ((0, -1), (0, -1))):
        assert float(tgt_down[i, j]) == pytest.approx(float(src_down[a, b]))
    assert float(out.score("model.layers.1.self_attn.o_proj.weight")) == float(cs.score("model.layers.1.self_attn.o_proj.weight"))


def test_forward_direction_leaves_unmapped_target_layers_empty():
    src, tgt = cfg("llama", layers=2), cfg("llama", layers=4)
    cs = coreset(src, tensor_layout, lambda n, u: torch.tensor([1.0]))
    out, report = transfer(cs, src, tgt, {"forward": {"0": 0, "1": 3}}, ratio=0.5, direction="forward", budget="tensors", carry="profile")
    unsourced_layers = {u["slot"].split(" L")[-1] for u in report.target_unsourced}
    assert unsourced_layers == {"1", "2"}
    assert not any(".layers.1." in n or ".layers.2." in n for n in out.names())


def test_shallower_target_reports_unused_source_layers():
    src, tgt = cfg("llama", layers=4), cfg("llama", layers=2)
    cs = coreset(src, tensor_layout, lambda n, u: torch.tensor([1.0]))
    _, report = transfer(cs, src, tgt, {"forward": {"0": 0, "1": 0, "2": 1, "3": 1}}, ratio=0.1, carry="profile")
    # No reverse map given: each target layer takes the nearest-mapped source layer (shallower on ties).
    assert report.layer_pairs == [(0, 0), (2, 1)]
    assert report.source_layers_unused == [1, 3] and report.warnings


# --------------------------------------------------------------------------------------------------
# Re-budgeting
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.013, 0.07, 0.31])
def test_rebudget_is_exact_and_takes_the_top_scores(ratio):
    src, tgt = cfg("llama"), cfg("qwen3", hidden=48, head_dim=12)
    gen = torch.Generator().manual_seed(3)
    cs = coreset(src, lambda n, s: UnitLayout("element"), lambda n, u: torch.rand(u, generator=gen))
    out, report = transfer(cs, src, tgt, IDENTITY2, ratio=ratio, carry="profile")
    assert out.num_selected() == math.floor(ratio * out.num_total()) == report.budget["budget"]
    # Apart from companions, every selected element outscores every unselected element that had a source.
    comp = {c["tensor"] for c in report.companions}
    sel, unsel = [], []
    for n in out.all_names():
        s = out.score(n)
        if s is None or n in comp:
            continue
        m = out.unit_mask(n)
        sel.append(s[m])
        unsel.append(s[~m])
    assert float(torch.cat(sel).min()) >= float(torch.cat(unsel).max())


def test_rebudget_in_tensors_counts_companions():
    src, tgt = cfg("llama"), cfg("qwen3", head_dim=8)
    order = list(spec_of(src).shapes)
    cs = coreset(src, tensor_layout, lambda n, u: torch.tensor([float(order.index(n))]))  # deeper = hotter
    for ratio in (0.05, 0.1, 0.25, 0.5):
        out, report = transfer(cs, src, tgt, IDENTITY2, ratio=ratio, carry="profile")
        assert report.budget["unit"] == "tensors"
        assert len(out.names()) == math.floor(ratio * len(spec_of(tgt).shapes))


# --------------------------------------------------------------------------------------------------
# MoE, layer-map formats, provenance, CLI
# --------------------------------------------------------------------------------------------------


def test_dense_source_feeds_every_expert_of_a_moe_target():
    src = cfg("llama")
    tgt = cfg("qwen3_moe", head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
    cs = coreset(src, row_layout, lambda n, u: torch.linspace(0, 1, u))
    out, report = transfer(cs, src, tgt, IDENTITY2, ratio=0.1, carry="profile")
    name = "model.layers.0.mlp.experts.gate_up_proj"  # [experts, 2 * 16, hidden], stacked in memory
    assert name in out.all_names() and out.layout(name) == UnitLayout("axis", 1, 1)
    torch.testing.assert_close(out.score(name)[:16], torch.linspace(0, 1, 16))  # ffn_gate rows 64 → 16
    assert any(p["source_role"] == "ffn_gate" and p["target_role"] == "ffn_gate_exp" for p in report.pairs)
    assert {u["role"] for u in report.target_unsourced} == {"ffn_router", "attn_q_norm", "attn_k_norm"}
    out.check_fits(spec_of(tgt).shapes)


def test_layer_map_inputs(tmp_path):
    assert load_layer_map(SimpleNamespace(forward={0: 1}, reverse={1: 0, 0: 0})) == ({0: 1}, {1: 0, 0: 0})
    path = tmp_path / "layer_map.json"
    path.write_text(json.dumps({"forward": {"0": {"target": 1}}, "reverse": {"1": 0}}))
    assert load_layer_map(path) == ({0: 1}, {1: 0})
    assert load_layer_map({"0": 0, "1": 0}) == ({0: 0, 1: 0}, {})
    src = cfg("llama")
    cs = coreset(src, tensor_layout, lambda n, u: torch.tensor([1.0]))
    with pytest.raises(ConfigError, match="target layer 7"):
        transfer(cs, src, cfg("llama"), {"reverse": {"7": 0}}, carry="profile")


def test_metadata_records_provenance():
    src, tgt = cfg("llama"), cfg("qwen3", head_dim=8)
    cs = coreset(src, tensor_layout, lambda n, u: torch.tensor([1.0]), strategy="lf")
    out, _ = transfer(cs, src, tgt, IDENTITY2, ratio=0.1, carry="profile")
    meta = out.metadata
    assert meta["strategy"] == "transfer" and meta["task"] == "t" and meta["ratio"] == 0.1
    t = meta["transfer"]
    assert t["source"]["family"] == "llama" and t["target"]["family"] == "qwen3"
    assert t["source"]["fingerprint"]["hash"] == cs.metadata["fingerprint"]["hash"]
    assert t["layer_map"]["pairs"] == [[0, 0], [1, 1]] and t["source_metadata"]["strategy"] == "lf"
    assert "torch" in meta["versions"] and meta["fingerprint"]["num_tensors"] == len(spec_of(tgt).shapes)


def test_cli_transfer_end_to_end(tmp_path):
    src_dir, tgt_dir = tmp_path / "llama", tmp_path / "qwen3"
    AutoModelForCausalLM.from_config(cfg("llama")).save_pretrained(src_dir)
    target = AutoModelForCausalLM.from_config(cfg("qwen3", head_dim=8))
    target.save_pretrained(tgt_dir)
    cs = coreset(cfg("llama"), tensor_layout, lambda n, u: torch.tensor([2.0 if "q_proj" in n else 1.0]), budget_unit="tensors")
    src_path = cs.save(tmp_path / "src.coreset.safetensors")
    (tmp_path / "layer_map.json").write_text(json.dumps(IDENTITY2))
    out = tmp_path / "tgt.coreset.safetensors"
    res = CliRunner().invoke(transfer_cli, [
        "--coreset", str(src_path), "--source", str(src_dir), "--target", str(tgt_dir),
        "--layer-map", str(tmp_path / "layer_map.json"), "--ratio", "0.2", "--out", str(out),
        "--report", str(tmp_path / "report.json"),
    ])
    assert res.exit_code == 0, res.output
    assert "llama -> qwen3" in res.output and "companions added" in res.output and "attn_q_norm" in res.output
    loaded = CoreSet.load(out)
    loaded.check_fits(target)
    assert "model.layers.1.self_attn.q_norm.weight" in loaded.names()
    assert json.loads((tmp_path / "report.json").read_text())["budget"]["unit"] == "tensors"


def test_scope_limits_candidates_and_denominator():
    src, tgt = cfg("llama"), cfg("llama", hidden=48, heads=4, kv=2)
    shapes = spec_of(src).shapes
    layer_names = [n for n in shapes if ".layers." in n]
    # What `scoring` writes for scope=layers: scores (and masks) only for the tensors in scope.
    cs = CoreSet.from_unit_masks({n: torch.tensor([False]) for n in layer_names}, {n: UnitLayout() for n in layer_names}, shapes,
                                 scores={n: torch.tensor([float(i)]) for i, n in enumerate(layer_names)},
                                 metadata={"ratio": 0.25, "budget": "tensors", "scope": ["layers"]})
    out, report = transfer(cs, src, tgt, IDENTITY2, carry="profile")
    n_layer_tensors = sum(".layers." in n for n in spec_of(tgt).shapes)
    assert report.budget["total"] == n_layer_tensors and len(out.names()) == math.floor(0.25 * n_layer_tensors)
    assert out.score("model.embed_tokens.weight") is None and out.score("lm_head.weight") is None


def test_layermap_objects_and_files_from_map_layers(tmp_path):
    layermap = pytest.importorskip("trace_transfer.cka.layermap")
    lm = layermap.LayerMap.relative_depth(2, 4)
    src, tgt = cfg("llama", layers=2), cfg("llama", layers=4)
    cs = coreset(src, tensor_layout, lambda n, u: torch.tensor([1.0]))
    out_obj, rep_obj = transfer(cs, src, tgt, lm, ratio=0.1, carry="profile")
    lm.save(tmp_path / "layer_map.json")
    out_file, rep_file = transfer(cs, src, tgt, tmp_path / "layer_map.json", ratio=0.1, carry="profile")
    assert rep_obj.layer_pairs == rep_file.layer_pairs and {t for _, t in rep_obj.layer_pairs} == {0, 1, 2, 3}
    assert out_obj.names() == out_file.names()


def test_moe_to_moe_maps_experts_by_relative_position():
    moe = dict(head_dim=8, num_experts_per_tok=2, moe_intermediate_size=16)
    src, tgt = cfg("qwen3_moe", num_experts=4, **moe), cfg("qwen3_moe", num_experts=8, **moe)
    # Per-expert units of the stacked expert tensors: expert e scores e.
    cs = coreset(src, lambda n, s: UnitLayout("axis", 0, 1) if ".experts." in n else UnitLayout(),
                 lambda n, u: torch.arange(u).float() if u == 4 and "experts" in n else torch.zeros(u))
    out, report = transfer(cs, src, tgt, IDENTITY2, ratio=0.1, carry="profile")
    name = "model.layers.1.mlp.experts.down_proj"
    assert out.layout(name) == UnitLayout("axis", 0, 1)
    assert out.score(name).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert report.source_unmapped == []
