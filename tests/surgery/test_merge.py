"""Streaming merges over model dirs: slerp/lerp/transplant, CoreSet restriction, shards, provenance, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from trace_transfer.checkpoint import open_checkpoint
from trace_transfer.coreset import CoreSet
from trace_transfer.errors import ConfigError, ModelMismatchError
from trace_transfer.surgery.merge import MergeOptions, merge_methods, merge_models, register_merge_method
from trace_transfer.surgery.slerp import lerp_many, slerp, slerp_many

SHAPES = {"a.weight": (6, 4), "b.weight": (10,), "pos_ids": (5,)}


def write_model(path: Path, seed: int, dtype=torch.float32, shapes=SHAPES) -> Path:
    g = torch.Generator().manual_seed(seed)
    tensors = {n: torch.randn(s, generator=g).to(dtype) for n, s in shapes.items() if n != "pos_ids"}
    if "pos_ids" in shapes:
        tensors["pos_ids"] = torch.arange(5) + seed  # an integer buffer: copied from model A, never interpolated
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({"model_type": "toy", "seed": seed}))
    return path


def read(path: Path) -> dict[str, torch.Tensor]:
    r = open_checkpoint(path)
    return {n: r.get(n) for n in r.names()}


@pytest.fixture
def models(tmp_path):
    return [write_model(tmp_path / f"m{i}", seed=i) for i in range(3)]


def test_slerp_endpoints_and_midpoint(models, tmp_path):
    a, b = read(models[0]), read(models[1])
    merge_models(models[:2], tmp_path / "t0", "slerp", options=MergeOptions(t=0.0))
    assert all(torch.equal(read(tmp_path / "t0")[n], a[n]) for n in a)
    merge_models(models[:2], tmp_path / "t1", "slerp", options=MergeOptions(t=1.0))
    out = read(tmp_path / "t1")
    assert torch.equal(out["a.weight"], b["a.weight"]) and torch.equal(out["pos_ids"], a["pos_ids"])
    rep = merge_models(models[:2], tmp_path / "mid", "slerp", options=MergeOptions(t=0.5, per_row=True))
    mid = read(tmp_path / "mid")
    assert torch.equal(mid["a.weight"], slerp(a["a.weight"], b["a.weight"], 0.5, per_row=True))
    assert rep.totals()["rows"] == 6 + 1  # 6 rows of a.weight, 1 vector b.weight
    assert json.loads((tmp_path / "mid" / "config.json").read_text())["seed"] == 0  # config of model A
    record = json.loads((tmp_path / "mid" / "surgery.json").read_text())
    assert record["verb"] == "merge" and record["params"]["options"]["per_row"] is True
    assert record["per_tensor"]["a.weight"]["changed"] == 24


def test_weighted_three_models_and_lerp(models, tmp_path):
    xs = [read(m) for m in models]
    merge_models(models, tmp_path / "s", "slerp", options=MergeOptions(weights=[1, 2, 1]))
    expect = slerp_many([x["b.weight"] for x in xs], [1, 2, 1])
    assert torch.equal(read(tmp_path / "s")["b.weight"], expect)
    merge_models(models, tmp_path / "l", "lerp", options=MergeOptions(weights=[1, 2, 1]))
    assert torch.equal(read(tmp_path / "l")["a.weight"], lerp_many([x["a.weight"] for x in xs], [1, 2, 1]))


def test_coreset_restriction(models, tmp_path):
    m = torch.zeros(6, 4, dtype=torch.bool)
    m[1:3] = True
    cs = CoreSet.from_masks({"a.weight": m}, read(models[0]), metadata={"task": "t"})
    a = read(models[0])
    merge_models(models[:2], tmp_path / "in", "slerp", coresets=[cs], options=MergeOptions(t=0.5))
    inside = read(tmp_path / "in")
    assert torch.equal(inside["a.weight"][~m], a["a.weight"][~m])
    assert not torch.equal(inside["a.weight"][m], a["a.weight"][m])
    assert torch.equal(inside["b.weight"], a["b.weight"])  # no core there: untouched
    merge_models(models[:2], tmp_path / "out", "lerp", coresets=[cs], options=MergeOptions(t=0.5, restrict="outside"))
    outside = read(tmp_path / "out")
    assert torch.equal(outside["a.weight"][m], a["a.weight"][m])
    assert not torch.equal(outside["b.weight"], a["b.weight"])


def test_transplant_fills_and_collisions(models, tmp_path):
    xs = [read(p) for p in models]
    m1 = torch.zeros(6, 4, dtype=torch.bool)
    m2 = torch.zeros(6, 4, dtype=torch.bool)
    m1[0:2], m2[1:3] = True, True  # row 1 collides
    cs1 = CoreSet.from_masks({"a.weight": m1}, xs[0], metadata={"task": "t1"})
    cs2 = CoreSet.from_masks({"a.weight": m2}, xs[0], metadata={"task": "t2"})
    rep = merge_models(models[:2], tmp_path / "tp", "transplant", coresets=[cs1, cs2],
                       options=MergeOptions(fill="slerp", collision="last"))
    out = read(tmp_path / "tp")
    assert torch.equal(out["a.weight"][0], xs[0]["a.weight"][0])
    assert torch.equal(out["a.weight"][1:3], xs[1]["a.weight"][1:3])  # "last" wins row 1
    union = m1 | m2
    fused = slerp(xs[0]["a.weight"], xs[1]["a.weight"], 0.5, mask=union, invert_mask=True)
    assert torch.equal(out["a.weight"][~union], fused[~union])
    assert torch.equal(out["b.weight"], slerp(xs[0]["b.weight"], xs[1]["b.weight"], 0.5))
    assert rep.collisions() == {"a.weight": rep.per_tensor["a.weight"]}
    assert rep.per_tensor["a.weight"]["collisions"] == 4 and rep.per_tensor["a.weight"]["resolved_by"] == "last"
    record = json.loads((tmp_path / "tp" / "surgery.json").read_text())
    assert record["totals"]["collisions"] == 4

    merge_models(models[:2], tmp_path / "tb", "transplant", coresets=[cs1, cs2], base=models[2],
                 options=MergeOptions(fill="base"))
    out = read(tmp_path / "tb")
    assert torch.equal(out["a.weight"][3:], xs[2]["a.weight"][3:])
    assert torch.equal(out["a.weight"][1], xs[0]["a.weight"][1])  # auto without scores: first listed


def test_sharded_output(models, tmp_path):
    merge_models(models[:2], tmp_path / "sh", "lerp", max_shard_bytes=64)
    index = json.loads((tmp_path / "sh" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(SHAPES)
    assert len(set(index["weight_map"].values())) > 1


def test_errors(models, tmp_path):
    odd = write_model(tmp_path / "odd", 9, shapes={"a.weight": (6, 5), "b.weight": (10,), "pos_ids": (5,)})
    with pytest.raises(ModelMismatchError, match="'a.weight'"):
        merge_models([models[0], odd], tmp_path / "x", "slerp")
    with pytest.raises(ConfigError, match="one --coreset per --model"):
        merge_models(models[:2], tmp_path / "x", "transplant")
    with pytest.raises(ConfigError, match="exactly two"):
        merge_models(models, tmp_path / "x", "slerp", options=MergeOptions(t=0.5))
    with pytest.raises(ConfigError, match="unknown"):
        merge_models(models[:2], tmp_path / "x", "ties")
    with pytest.raises(ConfigError, match="also an input"):
        merge_models(models[:2], models[0], "lerp")
    with pytest.raises(ConfigError, match="fill='oops'"):
        MergeOptions(fill="oops")


def test_register_merge_method(models, tmp_path):
    @register_merge_method("test-take-last")
    def _take_last(job, opts, stats):
        """Take the last model's tensor."""
        return job.tensors[-1]

    assert merge_methods()["test-take-last"] == "Take the last model's tensor."
    merge_models(models[:2], tmp_path / "o", "test-take-last")
    assert torch.equal(read(tmp_path / "o")["b.weight"], read(models[1])["b.weight"])
    with pytest.raises(ValueError, match="already registered"):
        register_merge_method("slerp")(_take_last)


def test_transplant_update_rule_picks_the_largest_move(tmp_path):
    shapes = {"w": (4,)}
    base = {"w": torch.zeros(4)}
    a = {"w": torch.tensor([1.0, -3.0, 1.0, 0.0])}
    b = {"w": torch.tensor([2.0, 0.5, -5.0, 9.0])}
    paths = []
    for name, sd in (("base", base), ("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        save_file(sd, str(tmp_path / name / "model.safetensors"))
        paths.append(tmp_path / name)
    full = CoreSet.from_masks({"w": torch.tensor([True, True, True, False])}, shapes)
    merge_models(paths[1:], tmp_path / "o", "transplant", coresets=[full, full], base=paths[0],
                 options=MergeOptions(collision="update"))
    assert torch.equal(read(tmp_path / "o")["w"], torch.tensor([2.0, -3.0, -5.0, 0.0]))
    with pytest.raises(ConfigError, match="needs the base model"):
        merge_models(paths[1:], tmp_path / "x", "transplant", coresets=[full, full],
                     options=MergeOptions(collision="update"))


def _content(model_dir: Path) -> str:
    from trace_transfer.checkpoint import ContentHash

    h = ContentHash()
    for n, t in open_checkpoint(model_dir).iter_tensors():
        h.update(n, t)
    return h.hexdigest()


def test_provenance_identifies_every_input(models, tmp_path):
    import hashlib

    from trace_transfer.checkpoint import fingerprint_of

    xs = [read(p) for p in models]
    m1, m2 = torch.zeros(6, 4, dtype=torch.bool), torch.zeros(6, 4, dtype=torch.bool)
    m1[0:2], m2[3:5] = True, True
    files = [CoreSet.from_masks({"a.weight": m}, xs[0], metadata={"task": t}).save(tmp_path / t)
             for m, t in ((m1, "t1"), (m2, "t2"))]
    merge_models(models[:2], tmp_path / "tp", "transplant", coresets=files, base=models[2],
                 options=MergeOptions(fill="base", collision="update"))
    record = json.loads((tmp_path / "tp" / "surgery.json").read_text())
    assert record["inputs"]["models"] == [str(m) for m in models[:2]]  # as given
    fp = record["fingerprints"]
    for rec, m in zip([*fp["models"], fp["base"]], models):
        assert rec["path"] == str(m.resolve())
        assert rec["fingerprint"] == fingerprint_of(open_checkpoint(m))
        assert rec["content_sha256"] == _content(m)
    assert [c["sha256"] for c in fp["coresets"]] == [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    assert [c["path"] for c in fp["coresets"]] == [str(f.resolve()) for f in files]
    assert [c["task"] for c in fp["coresets"]] == ["t1", "t2"] and fp["coresets"][0]["selected_params"] == 8
    assert record["params"]["options"]["collision"] == "update" and "torch" in record["versions"]
    assert record["created"]
    header = open_checkpoint(tmp_path / "tp").metadata["provenance"]
    assert header["fingerprints"]["models"][0]["fingerprint"] == fp["models"][0]["fingerprint"]
    assert "content_sha256" not in header["fingerprints"]["models"][0]  # known only after streaming

    merge_models(models[:2], tmp_path / "mem", "slerp", coresets=[CoreSet.load(files[0])],
                 options=MergeOptions(t=0.5))  # a CoreSet object loaded from a file is identified by it too
    mem = json.loads((tmp_path / "mem" / "surgery.json").read_text())["fingerprints"]
    assert mem["base"] is None and mem["coresets"][0]["sha256"] == fp["coresets"][0]["sha256"]
