"""The bad-input battery's fixtures: one small tree of real artifacts (models, probes, CoreSets, CKA,
layer map, a finished run, a delta, task/rule/pipeline files), built once per session with relative
paths so that a per-case copy is self-consistent."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from battery._harness import FT_RUN, invoke_ok


@pytest.fixture(scope="session")
def pristine(tmp_path_factory, tiny_llama, tiny_qwen3) -> Path:
    root = tmp_path_factory.mktemp("battery") / "pristine"
    root.mkdir()
    shutil.copytree(tiny_llama, root / "llama")
    shutil.copytree(tiny_qwen3, root / "qwen3")
    old = Path.cwd()
    os.chdir(root)
    try:
        probe = ["--max-steps", "1", "--fisher-batches", "1", "--max-examples", "8", "--batch-size", "4",
                 "--seq-len", "32"]
        for task in ("math", "code", "medical"):
            invoke_ok("probe", "--model", "llama", "--task", f"synthetic:{task}", "--out", f"p_{task}", *probe)
        invoke_ok("score", "--probe", "p_math", "--probe", "p_code", "--ratio", "0.1", "--out", "cores")
        invoke_ok("cka", "--source", "llama", "--target", "qwen3", "--out", "cka", "--max-probes", "12",
                  "--batch-size", "12", "--max-length", "32")
        invoke_ok("map-layers", "--cka", "cka", "--out", "layer_map.json")
        invoke_ok(*FT_RUN)
        invoke_ok("delta", "extract", "--base", "llama", "--tuned", "ft/stage_1", "--coreset",
                  "cores/math.coreset.safetensors", "--out", "delta")
        rows = [{"prompt": f"add {i} {i}=", "response": str(2 * i)} for i in range(12)]
        Path("rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        Path("task.yaml").write_text("name: adds\ndata: {path: rows.jsonl}\nsplits: {eval_fraction: 0.25, seed: 0}\n"
                                     "metric: {name: exact_match, regex: '([0-9]+)'}\n")
        shutil.copy(Path(__file__).parents[2] / "trace_transfer/rules/families/llama.yaml", "rules.yaml")
        Path("pipeline.yaml").write_text(
            "name: bat\nsource: {model: llama}\ntarget: {model: qwen3}\ntasks: [synthetic:math, synthetic:code]\n"
            "probe: {max_steps: 1, batch_size: 4, seq_len: 32, fisher_batches: 1, max_examples: 8}\n"
            "scoring: {ratio: 0.1}\nlayer_map: {max_probes: 8}\ntraining: {max_steps: 1, batch_size: 4, seq_len: 32}\n"
            "eval: {limit: 2, batch_size: 4}\nmethods: [full]\nseeds: [0]\n")
    finally:
        os.chdir(old)
    for p in sorted(root.rglob("*"), reverse=True):  # the per-case copies must be writable by nobody's luck
        p.chmod(p.stat().st_mode | 0o200)
    return root


@pytest.fixture
def work(pristine, tmp_path, monkeypatch) -> Path:
    w = tmp_path / "w"
    shutil.copytree(pristine, w, symlinks=True)
    monkeypatch.chdir(w)
    return w
