"""Sparse task deltas: bit-identical extract/apply/revert round trips, wrong-base refusal, outside elements."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from trace_transfer.checkpoint import open_checkpoint
from trace_transfer.coreset import CoreSet, UnitLayout
from trace_transfer.errors import FrozenParameterChanged, ModelMismatchError
from trace_transfer.surgery.delta import apply, extract, read_manifest, revert

EMB, UP, NORM = "model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.norm.weight"
SHAPES = {EMB: (64, 32), UP: (128, 32), NORM: (32,)}  # big enough for the header to be small next to it


def write_model(path: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config or {"model_type": "llama", "hidden_size": 8}))
    (path / "tokenizer.json").write_text('{"vocab": "abc"}')
    return path


def coreset() -> CoreSet:
    g = torch.Generator().manual_seed(3)
    up = torch.rand(SHAPES[UP], generator=g) < 0.05
    up[0, 0] = up[0, 1] = up[0, 2] = True
    masks, layouts = {UP: up.reshape(-1)}, {UP: UnitLayout("element")}
    masks[EMB], layouts[EMB] = torch.tensor([False, False, True] + [False] * 61), UnitLayout.rows()
    return CoreSet.from_unit_masks(masks, layouts, SHAPES, metadata={"task": "math"})


def make_pair(root: Path, dtype: torch.dtype, outside: bool = False) -> tuple[Path, Path, CoreSet]:
    g = torch.Generator().manual_seed(0)
    base = {n: torch.randn(s, generator=g).to(dtype) for n, s in SHAPES.items()}
    base[UP][0, 0] = 0.0
    cs = coreset()
    tuned = {n: t.clone() for n, t in base.items()}
    for name in (UP, EMB):
        m = cs.mask(name)
        noise = (torch.randn(SHAPES[name], generator=g) * 0.1).to(dtype)
        tuned[name][m] = (tuned[name].float() + noise.float()).to(dtype)[m]
    tuned[UP][0, 0] = -0.0           # same value, different bits: must round-trip
    tuned[UP][0, 1] = float("nan")
    tuned[UP][0, 2] = base[UP][0, 2]  # core but unchanged: not stored
    if outside:
        tuned[NORM][3] += 1.0
    b = write_model(root / "base", base)
    t = write_model(root / "tuned", tuned, {"model_type": "llama", "hidden_size": 8, "finetuned_on": "math"})
    return b, t, cs


def assert_same_model(a: Path, b: Path) -> None:
    ra, rb = open_checkpoint(a), open_checkpoint(b)
    assert sorted(ra.names()) == sorted(rb.names())
    for name in ra.names():
        x, y = ra.get(name), rb.get(name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert x.view(torch.uint8).numpy().tobytes() == y.view(torch.uint8).numpy().tobytes(), name
    assert (a / "config.json").read_bytes() == (b / "config.json").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_bit_identical(tmp_path, dtype):
    base, tuned, cs = make_pair(tmp_path, dtype)
    rep = extract(base, tuned, cs, tmp_path / "delta")
    rb, rt = open_checkpoint(base), open_checkpoint(tuned)
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16}[dtype]
    expect = int((rb.get(UP).view(bits) != rt.get(UP).view(bits)).sum())
    assert rep.per_tensor[UP]["changed"] == expect <= cs.num_selected(UP) - 1  # unchanged core elements not stored
    assert rep.per_tensor[EMB]["changed"] == 32 and NORM not in rep.per_tensor
    assert rep.outside == 0 and 0 < rep.ratio < 1
    man = read_manifest(tmp_path / "delta")
    assert man["files"]["differ"] == ["config.json"] and man["size_ratio"] == rep.ratio
    assert man["coreset"]["task"] == "math" and man["provenance"]["verb"] == "delta-extract"
    rd = open_checkpoint(tmp_path / "delta", prefix="task_delta")
    idx = rd.get(f"idx/{UP}")
    assert idx.dtype == torch.int64 and torch.equal(idx, idx.sort().values)
    assert rd.get(f"new/{UP}").dtype == dtype

    apply(base, tmp_path / "delta", tmp_path / "rebuilt_tuned")
    assert_same_model(tmp_path / "rebuilt_tuned", tuned)
    revert(tuned, tmp_path / "delta", tmp_path / "rebuilt_base")
    assert_same_model(tmp_path / "rebuilt_base", base)
    assert json.loads((tmp_path / "rebuilt_base" / "surgery.json").read_text())["verified"] is True


def test_sharded_delta_and_output(tmp_path):
    base, tuned, cs = make_pair(tmp_path, torch.float32)
    extract(base, tuned, cs, tmp_path / "delta", max_shard_bytes=1000)
    assert (tmp_path / "delta" / "task_delta.safetensors.index.json").exists()
    apply(base, tmp_path / "delta", tmp_path / "out", max_shard_bytes=9000)
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    assert_same_model(tmp_path / "out", tuned)


def test_refuses_wrong_base_naming_the_tensor(tmp_path):
    base, tuned, cs = make_pair(tmp_path, torch.float32)
    extract(base, tuned, cs, tmp_path / "delta")
    r = open_checkpoint(base)
    other = {n: r.get(n).clone() for n in r.names()}
    other[UP][5, 5] += 1e-3
    wrong = write_model(tmp_path / "other_base", other)
    with pytest.raises(ModelMismatchError, match="up_proj.weight.*content hash"):
        apply(wrong, tmp_path / "delta", tmp_path / "x")
    assert not (tmp_path / "x" / "model.safetensors").exists()
    with pytest.raises(ModelMismatchError, match="embed_tokens.weight' of tuned model.*content hash"):
        revert(wrong, tmp_path / "delta", tmp_path / "y")   # not the tuned model either
    other[NORM] = torch.zeros(33)
    wrong_shape = write_model(tmp_path / "other_shape", other)
    with pytest.raises(ModelMismatchError, match="model.norm.weight"):
        apply(wrong_shape, tmp_path / "delta", tmp_path / "z")


def test_outside_elements(tmp_path):
    base, tuned, cs = make_pair(tmp_path, torch.float32, outside=True)
    with pytest.raises(FrozenParameterChanged, match="model.norm.weight: 1 elements"):
        extract(base, tuned, cs, tmp_path / "delta")
    assert not (tmp_path / "delta" / "delta.json").exists()
    assert not list((tmp_path / "delta").glob("*.safetensors"))
    rep = extract(base, tuned, cs, tmp_path / "delta", allow_outside=True)
    assert rep.outside == 1 and rep.per_tensor[NORM] == {"changed": 1, "outside": 1, "numel": 32, "dtype": "F32"}
    apply(base, tmp_path / "delta", tmp_path / "out")
    assert_same_model(tmp_path / "out", tuned)


def test_dtype_mismatch_is_refused(tmp_path):
    base, _, cs = make_pair(tmp_path, torch.float32)
    r = open_checkpoint(base)
    half = write_model(tmp_path / "half", {n: r.get(n).to(torch.bfloat16) for n in r.names()})
    with pytest.raises(ModelMismatchError, match="dtype"):
        extract(base, half, cs, tmp_path / "delta")


def test_provenance_identifies_base_tuned_and_coreset(tmp_path):
    import hashlib

    from trace_transfer.checkpoint import ContentHash, fingerprint_of

    def content(model_dir):
        h = ContentHash()
        for n, t in open_checkpoint(model_dir).iter_tensors():
            h.update(n, t)
        return h.hexdigest()

    base, tuned, cs = make_pair(tmp_path, torch.float32)
    cs_file = cs.save(tmp_path / "math")
    extract(base, tuned, cs_file, tmp_path / "delta")
    man = read_manifest(tmp_path / "delta")
    prov = man["provenance"]
    assert prov["inputs"] == {"base": str(base), "tuned": str(tuned), "coreset": str(cs_file)}
    assert prov["params"]["allow_outside"] is False and "max_shard_bytes" in prov["params"]
    assert "torch" in prov["versions"] and prov["created"]
    fp = prov["fingerprints"]
    for role, path in (("base", base), ("tuned", tuned)):
        assert fp[role]["path"] == str(path.resolve())
        assert fp[role]["fingerprint"] == fingerprint_of(open_checkpoint(path))
        assert fp[role]["content_sha256"] == content(path)
    assert fp["coreset"]["sha256"] == hashlib.sha256(cs_file.read_bytes()).hexdigest()
    assert fp["coreset"]["path"] == str(cs_file.resolve()) and fp["coreset"]["task"] == "math"
    header = open_checkpoint(tmp_path / "delta", prefix="task_delta").metadata["provenance"]
    assert header["fingerprints"]["coreset"] == fp["coreset"] and "content_sha256" not in header["fingerprints"]["base"]

    apply(base, tmp_path / "delta", tmp_path / "rebuilt")
    rec = json.loads((tmp_path / "rebuilt" / "surgery.json").read_text())["fingerprints"]
    assert rec["base"]["content_sha256"] == fp["base"]["content_sha256"]
    manifest_bytes = (tmp_path / "delta" / "delta.json").read_bytes()
    assert rec["delta"]["manifest_sha256"] == hashlib.sha256(manifest_bytes).hexdigest()
