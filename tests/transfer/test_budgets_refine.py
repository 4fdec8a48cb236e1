"""Budgets carried from the source, units chosen on the target: every slot's budget kept exactly,
a planted signal found, the source-free mode equal to global top-k, tensor granularity exact."""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner

import trace_transfer.refine.core as refine_core
from trace_transfer.cli import main as cli
from trace_transfer.coreset import CoreSet, UnitLayout
from trace_transfer.models import load_model
from trace_transfer.refine import RefineConfig, refine
from trace_transfer.refine.signals import SignalCost
from trace_transfer.scoring import budget_count, fill_in_order
from trace_transfer.transfer import SlotBudget, SlotBudgets, transfer
from trace_transfer.transfer.budgets import allocate

IDENTITY2 = {"forward": {"0": 0, "1": 1}, "reverse": {"0": 0, "1": 1}}
CHEAP = dict(batches=2, batch_size=8, seq_len=32, max_examples=32)


def shapes_of(model_dir):
    return {n: tuple(p.shape) for n, p in load_model(model_dir).named_parameters()}


def row_coreset(model_dir, ratio=0.1, seed=0, granularity_of=lambda n, s: UnitLayout.rows() if len(s) == 2 else UnitLayout()):
    """A row CoreSet over the layers with random scores; its top ``ratio`` of parameters is core."""
    shapes = shapes_of(model_dir)
    names = [n for n in shapes if ".layers." in n]
    layouts = {n: granularity_of(n, shapes[n]) for n in names}
    g = torch.Generator().manual_seed(seed)
    scores = {n: torch.rand(layouts[n].num_units(shapes[n]), generator=g) ** 3 for n in names}
    flat = sorted(((float(s), n, u) for n in names for u, s in enumerate(scores[n])), reverse=True)
    sizes = [layouts[n].unit_size(shapes[n]) for _, n, _ in flat]
    take = fill_in_order(torch.tensor(sizes).numpy(), budget_count(ratio, sum(math.prod(shapes[n]) for n in names)))
    masks = {n: torch.zeros(len(scores[n]), dtype=torch.bool) for n in names}
    for (_, n, u), t in zip(flat, take):
        masks[n][u] = bool(t)
    return CoreSet.from_unit_masks(masks, layouts, shapes, scores,
                                   {"task": "t", "ratio": ratio, "scope": ["layers"], "budget_unit": "params"})


@pytest.fixture(scope="module")
def budgets(tiny_llama, tiny_qwen3):
    out, report = transfer(row_coreset(tiny_llama), tiny_llama, tiny_qwen3, IDENTITY2, ratio=0.1)
    assert isinstance(out, SlotBudgets)
    return out, report


def test_transfer_below_tensor_granularity_gives_budgets_in_proportion_to_source_density(budgets, tiny_qwen3):
    b, report = budgets
    shapes = shapes_of(tiny_qwen3)
    scope = sum(math.prod(s) for n, s in shapes.items() if ".layers." in n)
    assert report.budget["budget"] == budget_count(0.1, scope)
    assert b.total_params == report.budget["selected"]
    assert report.budget["budget"] - b.total_params < max(g.unit_size for g in b.groups)  # filled up to one unit
    # Qwen3's q_norm/k_norm follow q/k as companions, taken whole.
    fixed = {g.tensor for g in b.groups if g.fixed}
    assert "model.layers.0.self_attn.q_norm.weight" in fixed and "model.layers.1.self_attn.k_norm.weight" in fixed
    # Denser source slots get larger shares of their target slot (monotone up to rounding).
    free = [g for g in b.groups if not g.fixed and g.capacity > 4]
    for a in free:
        for c in free:
            if a.density > 1.5 * c.density and a.unit_size == c.unit_size:
                assert a.budget / a.capacity >= c.budget / c.capacity - 1 / c.capacity


def test_budgets_file_round_trip_and_model_check(budgets, tmp_path):
    b, _ = budgets
    path = b.save(tmp_path / "t.budgets.json")
    again = SlotBudgets.load(path)
    assert [(g.tensor, g.budget, g.units) for g in again.groups] == [(g.tensor, g.budget, g.units) for g in b.groups]
    assert again.metadata["carry"] == "budget" and again.metadata["transfer"]["source"]["family"] == "llama"
    with pytest.raises(Exception, match="transfer onto this model"):
        again.check_fits({**again.shapes, "model.layers.0.mlp.up_proj.weight": (1, 1)})


def test_allocate_caps_at_capacity_and_hits_the_total():
    groups = [SlotBudget("a", "x", [[0, 10]], 0, 4, density=1.0), SlotBudget("b", "y", [[0, 100]], 0, 3, density=0.1),
              SlotBudget("c", "z", [[0, 1]], 0, 5, density=0.0, fixed=True)]
    assert allocate(groups, 100) == 99  # 3-parameter units cannot fill the last one
    assert groups[0].budget == 10  # capped: all 10 units (40 params), the excess goes to b
    assert groups[2].budget == 1 and groups[1].budget == (100 - 40 - 5) // 3


def test_every_slot_budget_is_kept_exactly(budgets, tiny_qwen3):
    b, _ = budgets
    cs, cost = refine(tiny_qwen3, "synthetic:math", b, RefineConfig(signal="fisher", **CHEAP))
    for g in b.groups:
        picked = int(cs.unit_mask(g.tensor)[g.candidates()].sum())
        assert picked == g.budget, g.slot
    assert cs.num_selected() == b.total_params
    assert cost["forward_backward"] == 2 and cost["optimizer_steps"] == 0 and cost["seconds"] > 0
    assert cs.metadata["mode"] == "budgets" and cs.metadata["cost"]["peak_memory_mb"] > 0


def test_refine_with_a_planted_signal_picks_the_planted_units(tiny_qwen3):
    """|W ⊙ g| saliency: the planted rows' weights are 1000x the others' (the Fisher signal itself is
    checked against a hand computation below)."""
    model = load_model(tiny_qwen3)
    name = "model.layers.1.mlp.down_proj.weight"
    planted = [3, 17, 40]
    with torch.no_grad():
        w = dict(model.named_parameters())[name]
        w.mul_(1e-3)
        w[planted] *= 1e3
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    group = SlotBudget("ffn_down.weight L1", name, [[0, shapes[name][0]]], len(planted), shapes[name][1])
    b = SlotBudgets(shapes, {name: UnitLayout.rows()}, [group])
    from trace_transfer.models import load_tokenizer

    cs, _ = refine(model, "synthetic:math", b, RefineConfig(signal="saliency", **CHEAP), tokenizer=load_tokenizer(tiny_qwen3))
    assert cs.unit_mask(name).nonzero().flatten().tolist() == planted
    assert cs.names() == [name]


def test_fisher_signal_is_the_mean_squared_batch_gradient_per_unit(tiny_qwen3):
    from trace_transfer.data import load_task, make_dataloader
    from trace_transfer.models import load_tokenizer
    from trace_transfer.train.loop import causal_lm_loss

    cs, _ = refine(tiny_qwen3, "synthetic:math", None, RefineConfig(signal="fisher", ratio=0.1, **CHEAP))
    model, tok = load_model(tiny_qwen3), load_tokenizer(tiny_qwen3)
    examples = list(load_task("synthetic:math").train_examples())[:32]
    name = "model.layers.0.self_attn.q_proj.weight"
    sq = torch.zeros(dict(model.named_parameters())[name].shape)
    for i, batch in enumerate(make_dataloader(tok, examples, 32, 8, shuffle=True, seed=0)):
        if i == 2:
            break
        model.zero_grad()
        causal_lm_loss(model, batch).backward()
        sq += dict(model.named_parameters())[name].grad ** 2
    ref = (sq / 2).mean(dim=1)
    got = cs.score(name).double()
    # Same ranking (min-max normalisation over all units is a positive affine map).
    assert torch.equal(torch.argsort(got, descending=True, stable=True)[:10], torch.argsort(ref.double(), descending=True, stable=True)[:10])


def test_source_free_mode_equals_global_top_k(tiny_qwen3, monkeypatch):
    g = torch.Generator().manual_seed(1)

    def planted(model, signal, fb, tb, names, shapes, layouts, **kw):
        return {n: torch.rand(layouts[n].num_units(shapes[n]), generator=g, dtype=torch.float64) for n in names}, {}, SignalCost(3, 0)

    monkeypatch.setattr(refine_core, "compute_signal", planted)
    cs, _ = refine(tiny_qwen3, "synthetic:math", None, RefineConfig(ratio=0.07, granularity="element", **CHEAP))
    shapes = {n: cs.shape(n) for n in cs.all_names()}
    names = [n for n in shapes if ".layers." in n]
    scores = torch.cat([cs.score(n) for n in names])
    k = budget_count(0.07, scores.numel())
    top = set(torch.topk(scores, k).indices.tolist())  # distinct random scores: no ties
    got = set(torch.cat([cs.unit_mask(n) for n in names]).nonzero().flatten().tolist())
    assert got == top and cs.metadata["mode"] == "source-free"


def test_tensor_granularity_transfer_is_exact(tiny_llama):
    """Whole-tensor CoreSets map exactly onto the same architecture under the identity layer map."""
    shapes = shapes_of(tiny_llama)
    g = torch.Generator().manual_seed(0)
    scores = {n: torch.rand(1, generator=g) for n in shapes if ".layers." in n}
    order = sorted(scores, key=lambda n: -float(scores[n]))
    masks = {n: torch.tensor([n in order[:5]]) for n in scores}
    src = CoreSet.from_unit_masks(masks, {n: UnitLayout() for n in scores}, shapes, scores,
                                  {"task": "t", "ratio": 5 / len(scores), "scope": ["layers"], "budget_unit": "tensors"})
    out, report = transfer(src, tiny_llama, tiny_llama, IDENTITY2)
    assert isinstance(out, CoreSet) and out.metadata["carry"] == "exact"
    assert sorted(out.names()) == sorted(src.names())
    for n in scores:
        assert torch.equal(out.score(n), src.score(n))


def test_cli_transfer_writes_budgets_and_refine_uses_them(tiny_llama, tiny_qwen3, tmp_path):
    import json

    src = row_coreset(tiny_llama).save(tmp_path / "math.coreset.safetensors")
    (tmp_path / "lm.json").write_text(json.dumps(IDENTITY2))
    r = CliRunner().invoke(cli, ["transfer", "--coreset", str(src), "--source", str(tiny_llama), "--target", str(tiny_qwen3),
                                 "--layer-map", str(tmp_path / "lm.json"), "--out", str(tmp_path / "t.coreset.safetensors")])
    assert r.exit_code == 0, r.output
    assert "budgets:" in r.output and (tmp_path / "t.budgets.json").exists()
    out = tmp_path / "t.refined.coreset.safetensors"
    args = ["refine", "--budgets", str(tmp_path / "t.budgets.json"), "--model", str(tiny_qwen3), "--task", "synthetic:math",
            "--signal", "microprobe", "--steps", "1", "--batches", "1", "--batch-size", "8", "--seq-len", "32", "--out", str(out)]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    cs = CoreSet.load(out)
    assert cs.metadata["cost"]["forward_backward"] == 2 and cs.metadata["cost"]["optimizer_steps"] == 1
    r = CliRunner().invoke(cli, args)
    assert r.exit_code != 0 and "--force" in r.output
