"""CoreSet: round-trip, lazy masks, algebra, overlap statistics, mismatch errors, determinism."""

import numpy as np
import pytest
import torch

from trace_transfer.coreset import CoreSet, UnitLayout, overlap_stats, pairwise_overlap, selection_stats
from trace_transfer.errors import ArtifactError, ArtifactNotFoundError, ModelMismatchError

SHAPES = {
    "model.embed_tokens.weight": (10, 4),
    "model.layers.0.self_attn.q_proj.weight": (8, 4),
    "model.layers.0.mlp.down_proj.weight": (4, 6),
    "model.layers.0.input_layernorm.weight": (4,),
    "model.layers.1.self_attn.q_proj.weight": (8, 4),
    "model.layers.1.mlp.down_proj.weight": (4, 6),
}


def _mixed():
    """One CoreSet using every layout kind."""
    masks = {
        "model.layers.0.self_attn.q_proj.weight": torch.tensor([True, False]),  # 2 heads of 4 rows
        "model.layers.0.mlp.down_proj.weight": torch.tensor([False, True, False, False, False, True]),  # columns
        "model.layers.0.input_layernorm.weight": torch.tensor([True]),  # whole tensor
        "model.layers.1.mlp.down_proj.weight": torch.tensor([i % 5 == 0 for i in range(24)]),  # elements
    }
    layouts = {
        "model.layers.0.self_attn.q_proj.weight": UnitLayout.heads(4),
        "model.layers.0.mlp.down_proj.weight": UnitLayout.columns(),
        "model.layers.0.input_layernorm.weight": UnitLayout(),
        "model.layers.1.mlp.down_proj.weight": UnitLayout("element"),
    }
    scores = {"model.layers.0.self_attn.q_proj.weight": torch.tensor([0.9, 0.1])}
    return CoreSet.from_unit_masks(masks, layouts, SHAPES, scores, {"task": "math", "strategy": "lf"})


def _full(cs):
    return {n: cs.mask(n) for n in cs.all_names()}


def test_masks_expand_each_layout():
    cs = _mixed()
    q = cs.mask("model.layers.0.self_attn.q_proj.weight")
    assert q.shape == (8, 4) and q[:4].all() and not q[4:].any()
    d = cs.mask("model.layers.0.mlp.down_proj.weight")
    assert d[:, 1].all() and d[:, 5].all() and int(d.sum()) == 8
    assert cs.mask("model.layers.0.input_layernorm.weight").all()
    e = cs.mask("model.layers.1.mlp.down_proj.weight").reshape(-1)
    assert e.tolist() == [i % 5 == 0 for i in range(24)]
    assert not cs.mask("model.embed_tokens.weight").any()
    assert cs.num_selected() == 16 + 8 + 4 + 5
    assert cs.names() == ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight",
                          "model.layers.0.input_layernorm.weight", "model.layers.1.mlp.down_proj.weight"]


def test_round_trip_is_lazy_and_exact(tmp_path):
    cs = _mixed()
    path = cs.save(tmp_path / "math")
    assert path.name == "math.coreset.safetensors"
    back = CoreSet.load(path)
    assert back.num_selected() == cs.num_selected() and back.names() == cs.names()
    assert back._masks == {}  # counts come from the header: nothing unpacked yet
    assert torch.equal(back.mask("model.layers.1.mlp.down_proj.weight"), cs.mask("model.layers.1.mlp.down_proj.weight"))
    assert list(back._masks) == ["model.layers.1.mlp.down_proj.weight"]  # only what was asked for
    for n, m in _full(cs).items():
        assert torch.equal(back.mask(n), m), n
        assert back.layout(n) == cs.layout(n)
    assert torch.equal(back.score("model.layers.0.self_attn.q_proj.weight"), torch.tensor([0.9, 0.1]))
    assert back.score("model.layers.0.mlp.down_proj.weight") is None
    assert back.metadata["task"] == "math" and back.metadata["selected_params"] == cs.num_selected()
    assert back.all_names() == list(SHAPES)


def test_saving_twice_gives_identical_bytes(tmp_path):
    a = _mixed().save(tmp_path / "a.coreset.safetensors")
    b = _mixed().save(tmp_path / "b.coreset.safetensors")
    assert a.read_bytes() == b.read_bytes()


def test_packed_element_writer_round_trips(tmp_path):
    g = torch.Generator().manual_seed(0)
    full = {n: torch.rand(s, generator=g) < 0.3 for n, s in SHAPES.items() if ".layers." in n}
    full["model.layers.0.input_layernorm.weight"][:] = False  # a tensor with nothing selected
    packed = {n: np.packbits(m.reshape(-1).numpy(), bitorder="little") for n, m in full.items()}
    selected = {n: int(m.sum()) for n, m in full.items()}
    path = CoreSet.save_packed_element_masks(tmp_path / "p", SHAPES, packed, selected, {"task": "x"})
    back = CoreSet.load(path)
    for n in SHAPES:
        assert torch.equal(back.mask(n), full.get(n, torch.zeros(SHAPES[n], dtype=torch.bool))), n
    assert back.num_selected() == sum(selected.values()) == back.metadata["selected_params"]
    assert back.metadata["task"] == "x"


def test_algebra_matches_boolean_ops_on_full_masks():
    a = _mixed()
    g = torch.Generator().manual_seed(1)
    b = CoreSet.from_masks({n: torch.rand(s, generator=g) < 0.4 for n, s in SHAPES.items()}, SHAPES, {"task": "b"})
    fa, fb = _full(a), _full(b)
    for got, op in ((a | b, torch.logical_or), (a & b, torch.logical_and),
                    (a - b, lambda x, y: x & ~y)):
        for n in SHAPES:
            assert torch.equal(got.mask(n), op(fa[n], fb[n])), n
    comp = ~a
    for n in SHAPES:
        assert torch.equal(comp.mask(n), ~fa[n])
    assert (a | ~a).num_selected() == a.num_total()
    assert a.jaccard(a) == 1.0
    inter = sum(int((fa[n] & fb[n]).sum()) for n in SHAPES)
    union = sum(int((fa[n] | fb[n]).sum()) for n in SHAPES)
    assert a.jaccard(b) == pytest.approx(inter / union)


def test_overlap_stats_per_layer_and_module():
    a = _mixed()
    b = CoreSet.from_masks({"model.layers.0.self_attn.q_proj.weight": torch.ones(8, 4, dtype=torch.bool)}, SHAPES)
    st = overlap_stats(a, b)
    # layer 0: a has 16 (q) + 8 (down) + 4 (norm) = 28, b has 32 in q; intersection 16, union 44
    assert st["per_layer"][0] == pytest.approx(16 / 44)
    assert st["per_module"]["self_attn.q_proj.weight"] == pytest.approx(16 / 32)
    assert st["overall"]["intersection"] == 16
    assert st["overall"]["union"] == a.num_selected() + 32 - 16


def test_selection_stats_per_layer_module_and_tensor():
    st = selection_stats(_mixed())
    # layer 0: q 16 of 32, down 8 of 24, norm 4 of 4; layer 1: down 5 of 24 (elements 0, 5, 10, 15, 20), q 0 of 32
    assert st["per_layer"][0] == {"selected": 28, "total": 60, "share": pytest.approx(28 / 60)}
    assert st["per_layer"][1] == {"selected": 5, "total": 56, "share": pytest.approx(5 / 56)}
    assert st["per_layer"]["global"] == {"selected": 0, "total": 40, "share": 0.0}
    assert st["per_module"]["mlp.down_proj.weight"]["selected"] == 13
    assert st["per_module"]["mlp.down_proj.weight"]["total"] == 48
    assert st["per_tensor"]["model.layers.0.input_layernorm.weight"]["share"] == 1.0
    assert st["overall"] == {"selected": 33, "total": 156, "share": pytest.approx(33 / 156)}


def test_pairwise_overlap_matrix_and_common_to_all():
    a = _mixed()
    b = CoreSet.from_masks({"model.layers.0.self_attn.q_proj.weight": torch.ones(8, 4, dtype=torch.bool)}, SHAPES)
    c = CoreSet.from_masks({"model.layers.1.mlp.down_proj.weight": torch.ones(4, 6, dtype=torch.bool)}, SHAPES)
    st = pairwise_overlap([a, b, c])
    assert st["selected"] == [33, 32, 24]
    assert st["jaccard"][0][1] == st["jaccard"][1][0] == pytest.approx(16 / (33 + 32 - 16))
    assert st["jaccard"][0][2] == pytest.approx(5 / (33 + 24 - 5))
    assert st["jaccard"][1][2] == 0.0 and st["jaccard"][2][2] == 1.0
    assert st["pairs"][0, 1] == overlap_stats(a, b)
    assert st["all"]["intersection"] == 0 and st["all"]["union"] == 33 + 32 + 24 - 16 - 5
    assert st["all"]["per_layer"][0] == 0.0
    two = pairwise_overlap([a, b])
    assert two["all"]["per_layer"] == overlap_stats(a, b)["per_layer"]
    with pytest.raises(ValueError, match="at least two"):
        pairwise_overlap([a])


def test_algebra_results_record_provenance(tmp_path):
    import hashlib
    import json

    from trace_transfer._version import __version__

    a = _mixed()
    b = CoreSet.from_masks({"model.layers.0.self_attn.q_proj.weight": torch.ones(8, 4, dtype=torch.bool)}, SHAPES,
                           {"task": "code", "strategy": "cs"})
    c = CoreSet.from_masks({"model.layers.1.mlp.down_proj.weight": torch.ones(4, 6, dtype=torch.bool)}, SHAPES)
    paths = [a.save(tmp_path / "a"), b.save(tmp_path / "b"), c.save(tmp_path / "c")]
    sha = [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    la, lb, lc = (CoreSet.load(p) for p in paths)

    overlap_stats(la, lb)
    assert la._sha256 is None and lb._sha256 is None  # statistics use the algebra but never hash files

    u = CoreSet.load((la | lb | lc).save(tmp_path / "u")).metadata
    assert u["operation"] == "union" and u["tool_version"] == __version__ and u["created"].endswith("+00:00")
    assert [i["file"] for i in u["inputs"]] == [str(p.resolve()) for p in paths]  # a | b | c: three inputs
    assert [i["sha256"] for i in u["inputs"]] == sha
    assert u["inputs"][0]["task"] == "math" and u["inputs"][1]["strategy"] == "cs"
    assert u["inputs"][0]["selected_params"] == a.num_selected()

    d = CoreSet.load(((la & lb) - lc).save(tmp_path / "d")).metadata
    assert d["operation"] == "difference" and d["inputs"][1]["sha256"] == sha[2]
    nested = d["inputs"][0]
    assert nested["operation"] == "intersection" and [i["sha256"] for i in nested["inputs"]] == sha[:2]

    comp = CoreSet.load((~la).save(tmp_path / "comp")).metadata
    assert comp["operation"] == "complement" and comp["inputs"][0]["sha256"] == sha[0]
    assert json.loads(json.dumps(comp))  # plain JSON all the way down

    mem = (a | b).metadata  # built in memory: no file to hash, the inputs still named
    assert [i.get("task") for i in mem["inputs"]] == ["math", "code"] and "file" not in mem["inputs"][0]

    stale = CoreSet.load(paths[2])
    for n in stale.all_names():
        stale.unit_mask(n)  # masks in memory, so the algebra itself succeeds
    b.save(paths[2])  # replaced after loading: its hash would describe other masks
    with pytest.raises(ArtifactError, match="changed since"):
        (la | stale).save(tmp_path / "x")


def test_mismatch_errors_name_the_tensor():
    cs = _mixed()
    wrong = dict(SHAPES, **{"model.layers.1.mlp.down_proj.weight": (4, 7)})
    with pytest.raises(ModelMismatchError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        cs.check_fits(wrong)
    missing = {n: s for n, s in SHAPES.items() if n != "model.embed_tokens.weight"}
    with pytest.raises(ModelMismatchError, match=r"model\.embed_tokens\.weight"):
        cs.check_fits(missing)
    extra = dict(SHAPES, **{"lm_head.weight": (10, 4)})
    with pytest.raises(ModelMismatchError, match=r"lm_head\.weight"):
        cs.check_fits(extra)
    other = CoreSet.from_masks({}, wrong)
    with pytest.raises(ModelMismatchError, match=r"down_proj"):
        cs | other
    cs.check_fits(SHAPES)


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(ArtifactNotFoundError):
        CoreSet.load(tmp_path / "nope.coreset.safetensors")
    (tmp_path / "junk.coreset.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ArtifactError):
        CoreSet.load(tmp_path / "junk.coreset.safetensors")
    with pytest.raises(ArtifactError, match="q_proj"):
        CoreSet.from_unit_masks({"model.layers.0.self_attn.q_proj.weight": torch.ones(3, dtype=torch.bool)},
                                {"model.layers.0.self_attn.q_proj.weight": UnitLayout.heads(4)}, SHAPES)
