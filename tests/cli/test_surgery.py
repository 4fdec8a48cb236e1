"""The surgery CLIs end to end on tiny HF Llama dirs: merge, delta extract/apply/revert, cluster."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from trace_transfer.checkpoint import open_checkpoint
from trace_transfer.cli import main
from trace_transfer.coreset import CoreSet


def _tiny_llama(path: Path) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


def _finetune_like(base: Path, out: Path, seed: int, lo: int, hi: int) -> tuple[Path, dict[str, torch.Tensor]]:
    """A copy of ``base`` whose MLP up-projections moved on rows lo:hi (a stand-in for a task's FT)."""
    shutil.copytree(base, out)
    r = open_checkpoint(base)
    g = torch.Generator().manual_seed(seed)
    tensors, masks = {}, {}
    for name in r.names():
        t = r.get(name).clone()
        if "up_proj" in name:
            m = torch.zeros_like(t, dtype=torch.bool)
            m[lo:hi] = True
            t[m] += 0.05 * torch.randn(t.shape, generator=g)[m]
            masks[name] = m
        tensors[name] = t
    from safetensors.torch import save_file

    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out, masks


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("surgery_zoo")
    base = _tiny_llama(root / "base")
    shapes = open_checkpoint(base)
    out = {"base": base, "root": root}
    for task, seed, lo, hi in (("math", 1, 0, 20), ("code", 2, 10, 30), ("qa", 3, 40, 64)):
        model, masks = _finetune_like(base, root / task, seed, lo, hi)
        cs = CoreSet.from_masks(masks, shapes, metadata={"task": task})
        out[task] = model
        out[f"{task}_cs"] = cs.save(root / f"{task}.coreset.safetensors")
    return out


def run(*args: str) -> str:
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


def same_tensors(a: Path, b: Path) -> bool:
    ra, rb = open_checkpoint(a), open_checkpoint(b)
    return sorted(ra.names()) == sorted(rb.names()) and all(torch.equal(ra.get(n), rb.get(n)) for n in ra.names())


def test_merge_cli_outputs_load_in_transformers(zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    out = run("merge", "slerp", "--model", zoo["math"], "--model", zoo["code"], "--t", "0.5", "--per-row",
              "--max-shard-size", "20KB", "--out", tmp_path / "slerp")
    assert "SLERP angles" in out and "wrote" in out
    assert (tmp_path / "slerp" / "model.safetensors.index.json").exists()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "slerp")
    assert model.config.hidden_size == 32

    out = run("merge", "transplant", "--model", zoo["math"], "--model", zoo["code"],
              "--coreset", zoo["math_cs"], "--coreset", zoo["code_cs"], "--fill", "slerp", "--out", tmp_path / "tp")
    assert "collisions: 640" in out  # rows 10:20 of two 64x32 up_proj tensors
    assert "model.layers.0.mlp.up_proj.weight" in out
    tp, math_ = open_checkpoint(tmp_path / "tp"), open_checkpoint(zoo["math"])
    name = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(tp.get(name)[:20], math_.get(name)[:20])  # auto, no scores: first listed wins
    AutoModelForCausalLM.from_pretrained(tmp_path / "tp")

    out = run("merge", "lerp", "--model", zoo["math"], "--model", zoo["code"], "--model", zoo["qa"],
              "--weight", "1", "--weight", "1", "--weight", "2", "--coreset", zoo["qa_cs"], "--out", tmp_path / "l")
    assert "in 2 tensors" in out or "elements changed" in out


def test_merge_cli_errors_are_messages(zoo, tmp_path):
    res = CliRunner().invoke(main, ["merge", "transplant", "--model", str(zoo["math"]), "--model", str(zoo["code"]),
                                    "--coreset", str(zoo["math_cs"]), "--out", str(tmp_path / "x")])
    assert res.exit_code == 1 and "one --coreset per --model" in res.output


def test_delta_cli_round_trip(zoo, tmp_path):
    out = run("delta", "extract", "--base", zoo["base"], "--tuned", zoo["math"], "--coreset", zoo["math_cs"],
              "--out", tmp_path / "d")
    assert "changed elements: 1,280" in out and "ratio" in out
    run("delta", "apply", "--base", zoo["base"], "--delta", tmp_path / "d", "--out", tmp_path / "tuned")
    assert same_tensors(tmp_path / "tuned", zoo["math"])
    run("delta", "revert", "--tuned", zoo["math"], "--delta", tmp_path / "d", "--out", tmp_path / "base")
    assert same_tensors(tmp_path / "base", zoo["base"])
    res = CliRunner().invoke(main, ["delta", "apply", "--base", str(zoo["code"]), "--delta", str(tmp_path / "d"),
                                    "--out", str(tmp_path / "bad")])
    assert res.exit_code == 1 and "up_proj.weight" in res.output and "content hash" in res.output
    res = CliRunner().invoke(main, ["delta", "extract", "--base", str(zoo["base"]), "--tuned", str(zoo["math"]),
                                    "--coreset", str(zoo["qa_cs"]), "--out", str(tmp_path / "d2")])
    assert res.exit_code == 1 and "outside the CoreSet" in res.output and "--allow-outside" in res.output


def test_cluster_cli(zoo, tmp_path):
    out = run("cluster", zoo["math_cs"], zoo["code_cs"], zoo["qa_cs"], "--tau", "0.1",
              "--heatmap", tmp_path / "h.png", "--out", tmp_path / "c.json")
    assert "group 1: math, code" in out and "group 2: qa" in out
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["groups"] == [["math", "code"], ["qa"]]
    assert data["jaccard"][0][1] == pytest.approx(10 / 30)
    assert data["provenance"]["inputs"]["math"].endswith("math.coreset.safetensors")
