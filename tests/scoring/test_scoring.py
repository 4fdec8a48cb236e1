"""Scoring and selection against naive reference computations on hand-made Δ / Fisher."""

import json
import math

import numpy as np
import pytest
import torch

from trace_transfer.scoring.topk import PackedMasks, streaming_topk
from trace_transfer.checkpoint import ShardedWriter, write_json_atomic
from trace_transfer.coreset import CoreSet
from trace_transfer.errors import ConfigError, ModelMismatchError
from trace_transfer.scoring import STRATEGIES, budget_count, register_strategy, score

SHAPES = {
    "model.embed_tokens.weight": (40, 8),
    "model.layers.0.input_layernorm.weight": (8,),
    "model.layers.0.self_attn.q_proj.weight": (8, 8),
    "model.layers.0.self_attn.k_proj.weight": (4, 8),
    "model.layers.0.self_attn.o_proj.weight": (8, 8),
    "model.layers.0.mlp.up_proj.weight": (12, 8),
    "model.layers.0.mlp.down_proj.weight": (8, 12),
    "model.layers.1.input_layernorm.weight": (8,),
    "model.layers.1.self_attn.q_proj.weight": (8, 8),
    "model.layers.1.self_attn.k_proj.weight": (4, 8),
    "model.layers.1.self_attn.o_proj.weight": (8, 8),
    "model.layers.1.mlp.up_proj.weight": (12, 8),
    "model.layers.1.mlp.down_proj.weight": (8, 12),
    "model.norm.weight": (8,),
    "lm_head.weight": (40, 8),
}
LAYER_NAMES = [n for n in SHAPES if ".layers." in n]
CONFIG = {"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2, "num_key_value_heads": 1,
          "head_dim": 4, "num_hidden_layers": 2, "intermediate_size": 12, "vocab_size": 40}


def make_probe(root, task, seed, shard_bytes=None, stats=True, fisher=True, tensors=None):
    """A probe directory with random Δ (heavy-tailed per tensor) and Fisher, as `probe` writes it."""
    g = torch.Generator().manual_seed(seed)
    tensors = tensors or {}
    d = root / task
    out, st = {}, {}
    for i, (n, s) in enumerate(SHAPES.items()):
        delta = tensors.get(n, (None, None))[0]
        fis = tensors.get(n, (None, None))[1]
        delta = torch.randn(s, generator=g) * (1 + i % 4) if delta is None else delta
        fis = torch.rand(s, generator=g) ** 3 * (1 + i % 3) if fis is None else fis
        out[n] = (delta.float(), fis.float())
        st[n] = {"delta_rms": float(delta.double().pow(2).mean().sqrt()), "fisher_mean": float(fis.double().mean()),
                 "delta_absmin": float(delta.abs().min()), "delta_absmax": float(delta.abs().max()),
                 "fisher_min": float(fis.min()), "fisher_max": float(fis.max())}
    kw = {"max_shard_bytes": shard_bytes} if shard_bytes else {}
    with ShardedWriter(d, "delta", **kw) as w:
        for n, (delta, _) in out.items():
            w.add(n, delta)
    if fisher:
        with ShardedWriter(d, "fisher", **kw) as w:
            for n, (_, fis) in out.items():
                w.add(n, fis)
    if stats:
        write_json_atomic(d / "fisher_tensor.json", {"tensors": st})
    write_json_atomic(d / "probe.json", {"task": task, "model": "hand-made", "model_config": CONFIG,
                                         "fisher": {"mode": "batch", "at": "probe"}, "tensors": list(SHAPES)})
    return d, out


@pytest.fixture
def probes(tmp_path):
    dirs, data = [], []
    for i, t in enumerate(["math", "code", "med"]):
        d, o = make_probe(tmp_path, t, i)
        dirs.append(d)
        data.append(o)
    return dirs, data


# ---- naive references ------------------------------------------------------------------------------


def ref_units(name, shape, gran, head_axis=None, head_dim=4):
    """List of index tuples (boolean masks) of a tensor's units, by hand."""
    if gran == "tensor" or (gran != "element" and len(shape) < 2):
        return [torch.ones(shape, dtype=torch.bool)]
    if gran == "element":
        out = []
        for i in range(math.prod(shape)):
            m = torch.zeros(math.prod(shape), dtype=torch.bool)
            m[i] = True
            out.append(m.reshape(shape))
        return out
    if gran == "head" and head_axis is not None:
        out = []
        for h in range(shape[head_axis] // head_dim):
            m = torch.zeros(shape, dtype=torch.bool)
            if head_axis == 0:
                m[h * head_dim : (h + 1) * head_dim] = True
            else:
                m[:, h * head_dim : (h + 1) * head_dim] = True
            out.append(m)
        return out
    axis = 1 if gran == "column" else 0
    out = []
    for r in range(shape[axis]):
        m = torch.zeros(shape, dtype=torch.bool)
        if axis == 0:
            m[r] = True
        else:
            m[:, r] = True
        out.append(m)
    return out


HEAD_AXIS = {"q_proj": 0, "k_proj": 0, "o_proj": 1}


def ref_lf(data, names, gran, ratio, budget, alpha=0.5, beta=0.5):
    """Naive LF: loop over units, RMS Δ and mean F per unit, min-max over all units, sort, budget."""
    units = []  # (score parts, tensor index, unit index, size, mask)
    for t, n in enumerate(names):
        delta, fis = data[n]
        axis = next((a for k, a in HEAD_AXIS.items() if k in n), None)
        for u, m in enumerate(ref_units(n, delta.shape, gran, axis)):
            dd, ff = delta.double()[m], fis.double()[m]
            units.append([math.sqrt(float((dd**2).mean())), float(ff.mean()), t, u, int(m.sum()), m, n])
    l2 = [x[0] for x in units]
    fi = [x[1] for x in units]

    def norm(v, lo, hi):
        return (v - lo) / (hi - lo) if hi > lo else 0.0

    for x in units:
        x.append(alpha * norm(x[0], min(l2), max(l2)) + beta * norm(x[1], min(fi), max(fi)))
    ranked = sorted(units, key=lambda x: (-x[7], x[2], x[3]))
    if budget == "tensors":
        chosen = ranked[: math.floor(ratio * len(units) + 1e-9)]
    else:
        cap, total, chosen = math.floor(ratio * sum(x[4] for x in units) + 1e-9), 0, []
        for x in ranked:
            if total + x[4] > cap:
                continue  # a unit that does not fit is skipped for smaller ones further down
            total += x[4]
            chosen.append(x)
    masks = {n: torch.zeros(SHAPES[n], dtype=torch.bool) for n in names}
    for x in chosen:
        masks[x[6]] |= x[5]
    return masks, {(x[6], x[3]): x[7] for x in units}, ranked


def assert_masks(cs, ref, names):
    for n in SHAPES:
        expect = ref.get(n, torch.zeros(SHAPES[n], dtype=torch.bool))
        assert torch.equal(cs.mask(n), expect), n


# ---- LF ---------------------------------------------------------------------------------------------


def test_paper_preset_matches_official_rule(probes, tmp_path):
    dirs, data = probes
    cs = score(dirs[:1], "lf", 0.2, tmp_path / "out", preset="paper")["math"]
    names = list(SHAPES)  # every named tensor competes, embeddings and lm_head included
    ref, ref_scores, _ = ref_lf(data[0], names, "tensor", 0.2, "tensors")
    assert_masks(cs, ref, names)
    assert len(cs.names()) == math.floor(0.2 * len(SHAPES)) == 3
    for n in names:
        assert float(cs.score(n)[0]) == pytest.approx(ref_scores[(n, 0)], abs=1e-6)
    m = cs.metadata
    assert (m["granularity"], m["budget"], m["alpha"], m["beta"], m["preset"]) == ("tensor", "tensors", 0.5, 0.5, "paper")
    assert set(m["scope"]) == {"layers", "embeddings", "lm_head", "final_norm", "other"}


def test_paper_preset_rejects_conflicting_options(probes):
    with pytest.raises(ConfigError, match="granularity='row'"):
        score(probes[0][:1], "lf", 0.1, preset="paper", granularity="row")


@pytest.mark.parametrize("gran,budget", [("tensor", "tensors"), ("tensor", "params"), ("row", "params"),
                                         ("row", "tensors"), ("column", "params"), ("head", "params")])
def test_lf_granularities_match_naive_reference(probes, gran, budget):
    dirs, data = probes
    cs = score(dirs[:1], "lf", 0.15, granularity=gran, budget=budget)["math"]
    ref, ref_scores, _ = ref_lf(data[0], LAYER_NAMES, gran, 0.15, budget)
    assert_masks(cs, ref, LAYER_NAMES)
    for n in LAYER_NAMES:  # stored per-unit scores are the normalised LF scores
        s = cs.score(n)
        assert s is not None
        for u, v in enumerate(s.tolist()):
            assert v == pytest.approx(ref_scores[(n, u)], abs=1e-6)
    assert cs.metadata["scope"] == ["layers"]
    assert not cs.mask("model.embed_tokens.weight").any()  # outside the default scope


def test_head_layouts_follow_attention_projections(probes):
    cs = score(probes[0][:1], "lf", 0.3, granularity="head")["math"]
    assert cs.granularity("model.layers.0.self_attn.q_proj.weight") == "head(4)"
    assert cs.layout("model.layers.0.self_attn.o_proj.weight").axis == 1
    assert cs.granularity("model.layers.0.mlp.up_proj.weight") == "row"  # no heads: rows
    assert cs.granularity("model.layers.0.input_layernorm.weight") == "tensor"  # 1-D: whole


def test_budget_is_exact(probes):
    dirs, _ = probes
    scope_params = sum(math.prod(SHAPES[n]) for n in LAYER_NAMES)
    for ratio in (0.01, 0.05, 0.29, 0.5):
        el = score(dirs[:1], "lf", ratio, granularity="element")["math"]
        assert el.num_selected() == budget_count(ratio, scope_params)
        n_units = sum(SHAPES[n][0] if len(SHAPES[n]) == 2 else 1 for n in LAYER_NAMES)
        if budget_count(ratio, n_units) == 0:  # an empty CoreSet is refused, not written (issue 10)
            with pytest.raises(ConfigError, match="selects no unit"):
                score(dirs[:1], "lf", ratio, granularity="row", budget="tensors")
            continue
        rows = score(dirs[:1], "lf", ratio, granularity="row", budget="tensors")["math"]
        assert rows.metadata["selected_units"] == budget_count(ratio, n_units)
        p = score(dirs[:1], "lf", ratio, granularity="row", budget="params")["math"]
        assert p.num_selected() <= budget_count(ratio, scope_params) < p.num_selected() + 12
    assert budget_count(0.29, 100) == 29  # int(0.29 * 100) would be 28


def test_element_granularity_matches_naive_reference(probes):
    dirs, data = probes
    cs = score(dirs[:1], "lf", 0.1, granularity="element")["math"]
    # naive: every element's score in float64, sort by (score desc, tensor order, index)
    d = torch.cat([data[0][n][0].reshape(-1).double() for n in LAYER_NAMES]).abs()
    f = torch.cat([data[0][n][1].reshape(-1).double() for n in LAYER_NAMES])
    s = 0.5 * (d - d.min()) / (d.max() - d.min()) + 0.5 * (f - f.min()) / (f.max() - f.min())
    k = budget_count(0.1, len(s))
    order = np.lexsort((np.arange(len(s)), -s.numpy()))
    expect = np.zeros(len(s), dtype=bool)
    expect[order[:k]] = True
    got = torch.cat([cs.mask(n).reshape(-1) for n in LAYER_NAMES]).numpy()
    assert got.sum() == k
    differ = np.flatnonzero(got != expect)
    kth = float(s[order[k - 1]])
    # float32 vs float64 can only swap elements whose scores tie with the threshold to ~1e-6
    assert all(abs(float(s[i]) - kth) < 1e-6 for i in differ), differ


def test_element_range_pass_equals_probe_stats(tmp_path):
    d1, _ = make_probe(tmp_path / "a", "math", 0)
    d2, _ = make_probe(tmp_path / "b", "math", 0, stats=False)
    a = score([d1], "lf", 0.07, granularity="element")["math"]
    b = score([d2], "lf", 0.07, granularity="element")["math"]
    assert all(torch.equal(a.mask(n), b.mask(n)) for n in SHAPES)
    assert b.metadata["ranges_from"] == "range pass"


def test_tensor_scores_from_files_equal_scores_from_stats(probes):
    dirs, _ = probes
    a = score(dirs[:1], "lf", 0.3, granularity="tensor")["math"]
    b = score(dirs[:1], "lf", 0.3, granularity="tensor", use_tensor_stats=False)["math"]
    assert a.names() == b.names()
    for n in LAYER_NAMES:
        assert float(a.score(n)[0]) == pytest.approx(float(b.score(n)[0]), abs=1e-6)


def test_sharded_inputs_give_the_same_coreset(tmp_path):
    d1, _ = make_probe(tmp_path / "a", "math", 3)
    d2, _ = make_probe(tmp_path / "b", "math", 3, shard_bytes=600)
    assert len(list(d2.glob("delta-*-of-*.safetensors"))) > 2
    for gran in ("row", "element"):
        a = score([d1], "lf", 0.1, granularity=gran, chunk_elems=16)["math"]
        b = score([d2], "lf", 0.1, granularity=gran)["math"]
        assert all(torch.equal(a.mask(n), b.mask(n)) for n in SHAPES), gran


def test_without_per_element_fisher_only_tensor_granularity(tmp_path):
    d, _ = make_probe(tmp_path, "math", 0, fisher=False)
    with pytest.raises(ConfigError, match="fisher-elements"):
        score([d], "lf", 0.1, granularity="row")
    assert score([d], "lf", 0.2, granularity="tensor")["math"].names()


# ---- element top-k ties -----------------------------------------------------------------------------


def _topk(tmp_path, items, values, k, max_candidates, in_memory=True):
    def fn(name, start, stop):
        return values[name][start:stop].clone()

    pm = PackedMasks(tmp_path / f"m{max_candidates}", items, max_memory_bytes=1 << 30 if in_memory else 0)
    assert pm.in_memory == in_memory
    sel = streaming_topk(items, fn, k, pm, chunk_elems=16, max_candidates=max_candidates)
    out = {n: np.unpackbits(np.asarray(pm.read(n)), count=c, bitorder="little").astype(bool) for n, c in items}
    pm.remove()
    return out, sel


@pytest.mark.parametrize("max_candidates", [1 << 20, 3])  # gather-and-patch path, and the refine pass
def test_element_ties_broken_by_tensor_then_index(tmp_path, max_candidates):
    items = [("a", 40), ("b", 30)]
    values = {"a": torch.zeros(40), "b": torch.zeros(30)}
    values["a"][[5, 7]] = 2.0
    values["b"][[0, 1, 2]] = 1.0
    values["a"][[30, 31]] = 1.0  # ties with b's ones; tensor a comes first
    out, sel = _topk(tmp_path, items, values, 5, max_candidates)
    assert np.flatnonzero(out["a"]).tolist() == [5, 7, 30, 31]
    assert np.flatnonzero(out["b"]).tolist() == [0]
    assert sel == {"a": 4, "b": 1}
    out, sel = _topk(tmp_path, items, values, 12, max_candidates)  # threshold falls inside the zeros
    # 7 non-zero scores, then the first 5 zeros in tensor order: a0..a4
    assert np.flatnonzero(out["a"]).tolist() == [0, 1, 2, 3, 4, 5, 7, 30, 31]
    assert np.flatnonzero(out["b"]).tolist() == [0, 1, 2]
    assert sel == {"a": 9, "b": 3}


def test_element_topk_matches_sort_on_random_scores(tmp_path):
    g = torch.Generator().manual_seed(1)
    items = [("x", 1000), ("y", 517), ("z", 3)]
    values = {n: torch.rand(c, generator=g) ** 4 for n, c in items}
    flat = torch.cat([values[n] for n, _ in items]).numpy()
    for k in (0, 1, 100, 1519, 1520):
        for cap, in_memory in ((1 << 20, True), (2, True), (1 << 20, False), (2, False)):  # False: temp file
            out, _ = _topk(tmp_path, items, values, k, cap, in_memory)
            got = np.concatenate([out[n] for n, _ in items])
            expect = np.zeros(len(flat), dtype=bool)
            expect[np.lexsort((np.arange(len(flat)), -flat))[:k]] = True
            assert np.array_equal(got, expect), (k, cap)


# ---- CS ---------------------------------------------------------------------------------------------


def ref_cs(data, names, gran):
    k = len(data)
    out = [{} for _ in range(k)]
    for n in names:
        axis = next((a for key, a in HEAD_AXIS.items() if key in n), None)
        for u, m in enumerate(ref_units(n, SHAPES[n], gran, axis)):
            vecs = [d[n][0].double()[m] for d in data]
            for i in range(k):
                if float(vecs[i].norm()) == 0:
                    out[i][(n, u)] = 0.0
                    continue
                cos = [float(vecs[i] @ vecs[j] / (vecs[i].norm() * vecs[j].norm())) for j in range(k) if j != i]
                out[i][(n, u)] = 1 - sum(cos) / len(cos)
    return out


@pytest.mark.parametrize("gran", ["tensor", "row", "column", "head"])
def test_cs_matches_naive_cosines(probes, gran):
    dirs, data = probes
    cores = score(dirs, "cs", 0.2, granularity=gran)
    ref = ref_cs(data, LAYER_NAMES, gran)
    for t, (task, cs) in enumerate(cores.items()):
        for n in LAYER_NAMES:
            for u, v in enumerate(cs.score(n).tolist()):
                assert v == pytest.approx(ref[t][(n, u)], abs=1e-5), (task, n, u)
        # selection = top of the specificity ranking under the budget
        ranked = sorted(ref[t], key=lambda key: (-ref[t][key], LAYER_NAMES.index(key[0]), key[1]))
        top = ranked[0]
        assert bool(cs.unit_mask(top[0])[top[1]])


def test_cs_untouched_units_score_zero(tmp_path):
    zero = {"model.layers.0.mlp.up_proj.weight": (torch.zeros(12, 8), None)}
    dirs = [make_probe(tmp_path, "math", 0, tensors=zero)[0], make_probe(tmp_path, "code", 1)[0],
            make_probe(tmp_path, "med", 2)[0]]
    cs = score(dirs, "cs", 0.2, granularity="row")["math"]
    assert torch.equal(cs.score("model.layers.0.mlp.up_proj.weight"), torch.zeros(12))


def test_cs_with_two_tasks_is_a_clear_error(probes):
    with pytest.raises(ConfigError, match="same ranking"):
        score(probes[0][:2], "cs", 0.1)


def test_cs_at_element_granularity_is_refused(probes):
    with pytest.raises(ConfigError, match="degenerate"):
        score(probes[0], "cs", 0.1, granularity="element")


# ---- random, determinism, metadata, errors ----------------------------------------------------------


@pytest.mark.parametrize("gran", ["row", "element", "tensor"])
def test_random_has_the_same_budget_and_is_seeded(probes, gran):
    dirs, _ = probes
    lf = score(dirs, "lf", 0.1, granularity=gran)
    r1 = score(dirs, "random", 0.1, granularity=gran, seed=7)
    r2 = score(dirs, "random", 0.1, granularity=gran, seed=7)
    r3 = score(dirs, "random", 0.1, granularity=gran, seed=8)
    for t in lf:
        assert r1[t].metadata["budget_target"] == lf[t].metadata["budget_target"]
        if gran != "row":  # at row granularity with a params budget, unit sizes vary by a little
            assert r1[t].metadata["selected_units"] == lf[t].metadata["selected_units"]
        assert all(torch.equal(r1[t].mask(n), r2[t].mask(n)) for n in SHAPES)
    assert any(not torch.equal(r1["math"].mask(n), r3["math"].mask(n)) for n in SHAPES)
    assert any(not torch.equal(r1["math"].mask(n), r1["code"].mask(n)) for n in SHAPES)


def test_same_inputs_same_files(probes, tmp_path):
    dirs, _ = probes
    for gran in ("row", "element"):
        score(dirs, "lf", 0.1, tmp_path / "a", granularity=gran, force=True)
        score(dirs, "lf", 0.1, tmp_path / "b", granularity=gran, force=True)
        for t in ("math", "code", "med"):
            a = CoreSet.load(tmp_path / "a" / f"{t}.coreset.safetensors")
            b = CoreSet.load(tmp_path / "b" / f"{t}.coreset.safetensors")
            assert all(torch.equal(a.mask(n), b.mask(n)) for n in SHAPES)


def test_files_and_metadata(probes, tmp_path):
    dirs, _ = probes
    score(dirs, "lf", 0.05, tmp_path / "cores", granularity="element", scope="layers,embeddings")
    files = sorted(p.name for p in (tmp_path / "cores").iterdir())
    assert files == ["code.coreset.safetensors", "math.coreset.safetensors", "med.coreset.safetensors"]
    cs = CoreSet.load(tmp_path / "cores" / "math.coreset.safetensors")
    m = cs.metadata
    for key in ("strategy", "task", "tasks", "ratio", "granularity", "budget", "alpha", "beta", "selected_params",
                "total_params", "scope", "fingerprint", "tool_version", "creation", "source_probes", "versions"):
        assert key in m, key
    assert m["scope"] == ["layers", "embeddings"] and m["task"] == "math" and len(m["source_probes"]) == 3
    assert m["selected_params"] == cs.num_selected() == m["budget_target"]
    cs.check_fits({n: s for n, s in SHAPES.items()})


def test_mismatched_probes_name_the_tensor(tmp_path):
    d1, _ = make_probe(tmp_path / "a", "math", 0)
    d2, _ = make_probe(tmp_path / "b", "code", 0)
    with ShardedWriter(d2, "delta") as w:  # a different model: one tensor's shape differs
        for n, s in SHAPES.items():
            w.add(n, torch.zeros(s if n != "model.layers.1.mlp.up_proj.weight" else (16, 8)))
    with pytest.raises(ModelMismatchError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        score([d1, d2], "lf", 0.1)


def test_option_errors(probes):
    dirs, _ = probes
    with pytest.raises(ConfigError, match="lf, cs, random"):
        score(dirs, "fisher-only", 0.1)
    with pytest.raises(ConfigError, match="ratio"):
        score(dirs, "lf", 1.5)
    with pytest.raises(ConfigError, match="embeddings"):
        score(dirs, "lf", 0.1, scope="layers,embedings")
    with pytest.raises(ConfigError, match="granularity"):
        score(dirs, "lf", 0.1, granularity="block")


def test_register_strategy_is_one_call_and_checks_names(probes):
    @register_strategy("test-grad-only")
    class GradOnly:
        min_tasks = 1

        def check(self, run):
            pass

        def unit_scores(self, run):
            return [{n: torch.full((run.layouts[n].num_units(run.shapes[n]),), float(i)) for i, n in enumerate(run.names)}
                    for _ in run.probes]

    try:
        cs = score(probes[0][:1], "test-grad-only", 0.1, granularity="tensor")["math"]
        assert cs.names() == [LAYER_NAMES[-1]]  # highest score = last tensor
        with pytest.raises(ValueError, match="already registered"):
            register_strategy("test-grad-only")(GradOnly)
    finally:
        STRATEGIES.unregister("test-grad-only")


def test_probe_json_fingerprint_must_match(tmp_path):
    d, _ = make_probe(tmp_path, "math", 0)
    info = json.loads((d / "probe.json").read_text())
    info["fingerprint"] = {"hash": "0" * 64}
    write_json_atomic(d / "probe.json", info)
    with pytest.raises(Exception, match="fingerprint"):
        score([d], "lf", 0.1)


def test_sampled_bracket_path_equals_exact_path(tmp_path, monkeypatch):
    import trace_transfer.scoring.topk as topk

    monkeypatch.setattr(topk, "MIN_SAMPLED_TOTAL", 0)
    g = torch.Generator().manual_seed(3)
    # rows with their own scales, like real Δ: the sample has to cope with correlated blocks
    items = [("x", 64 * 1024), ("y", 32 * 1024), ("z", 5000)]
    values = {n: (torch.rand(c, generator=g) * torch.rand(c // 1000 + 1, generator=g).repeat_interleave(1000)[:c])
              for n, c in items}
    flat = torch.cat([values[n] for n, _ in items]).numpy()
    passes = []

    def run(k, sample, bracket=None):
        if bracket is not None:
            monkeypatch.setattr(topk, "_sample_bracket", lambda *a: bracket)
        pm = PackedMasks(tmp_path / f"s{k}{sample}", items)
        topk.streaming_topk(items, lambda n, a, b: values[n][a:b].clone(), k, pm, chunk_elems=4096,
                            sample=sample, on_pass=passes.append)
        got = np.concatenate([np.unpackbits(np.asarray(pm.read(n)), count=c, bitorder="little") for n, c in items])
        pm.remove()
        return got.astype(bool)

    for k in (1, 777, 5000, 50000, len(flat) - 1):
        expect = np.zeros(len(flat), dtype=bool)
        expect[np.lexsort((np.arange(len(flat)), -flat))[:k]] = True
        passes.clear()
        assert np.array_equal(run(k, True), expect), k
        if k in (777, 5000):  # the sampled bracket held: no exact histogram pass was needed
            assert passes == ["sample", "select"], (k, passes)
        assert np.array_equal(run(k, False), expect), k
    # a bracket that misses (k-th score below it) falls back to the exact path, same answer
    passes.clear()
    hi = int(torch.tensor(0.999).view(torch.int32))
    got = run(50000, True, bracket=(hi - 10, hi))
    expect = np.zeros(len(flat), dtype=bool)
    expect[np.lexsort((np.arange(len(flat)), -flat))[:50000]] = True
    assert np.array_equal(got, expect)
    assert passes == ["sample", "select", "histogram", "select"]


def test_head_dim_override_and_config_json_fallback(tmp_path):
    d, _ = make_probe(tmp_path, "math", 0)
    cs = score([d], "lf", 0.2, granularity="head", head_dim=2)["math"]
    assert cs.granularity("model.layers.0.self_attn.q_proj.weight") == "head(2)"
    assert cs.metadata["head_dim"] == 2
    # a probe.json without the model config: the model directory's config.json is read instead
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    write_json_atomic(model_dir / "config.json", CONFIG)
    info = json.loads((d / "probe.json").read_text())
    del info["model_config"]
    info["model"] = str(model_dir)
    write_json_atomic(d / "probe.json", info)
    cs = score([d], "lf", 0.2, granularity="head")["math"]
    assert cs.granularity("model.layers.1.self_attn.k_proj.weight") == "head(4)"
    assert cs.metadata["head_dim"] == 4
