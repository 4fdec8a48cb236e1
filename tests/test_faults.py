"""Fault tests (issue 10): `kill -9` at several points of a pipeline run, then a rerun, gives the same
outputs as an uninterrupted run.

One small pipeline (source and target tiny models, two tasks, transfer-lf) is run once without
interruption and once as a chain of runs, each killed with SIGKILL at the next point: after a probe,
after scoring, after the transfer (each with its artifacts written but step.json not yet), while
a fine-tuning stage's checkpoint is being saved, and after the report. Every rerun resumes; the
final outputs (every tensor of every safetensors file, the accuracy matrix) must equal the
uninterrupted run's bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from trace_transfer.pipeline.steps import KILL_ENV as KILL_STEP
from trace_transfer.train.runner import KILL_ENV as KILL_AT

pytestmark = pytest.mark.slow

PIPELINE = {
    "name": "faults",
    "source": {"build": {"arch": "llama", "layers": 2, "hidden": 32, "tokenizer": "char"}},
    "target": {"build": {"arch": "qwen3", "layers": 2, "hidden": 48, "tokenizer": "char"}},
    "tasks": ["synthetic:math", "synthetic:code"],
    "probe": {"max_steps": 1, "batch_size": 4, "seq_len": 32, "fisher_batches": 1, "max_examples": 16},
    "scoring": {"ratio": 0.1},
    "layer_map": {"max_probes": 8},
    "training": {"max_steps": 2, "batch_size": 4, "seq_len": 32},
    "eval": {"limit": 2, "batch_size": 4},
    "methods": ["transfer-lf"],
    "seeds": [0],
}

# (what the chain kills, the environment that kills it there)
KILLS = [
    ("a probe", {KILL_STEP: "probe/"}),
    ("scoring", {KILL_STEP: "cores/source"}),
    ("the transfer", {KILL_STEP: "cores/transfer"}),
    ("a stage save", {KILL_AT: "2:save"}),
    ("the report", {KILL_STEP: "report"}),
]


def _run(cfg: Path, out: Path, extra_env: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in (KILL_STEP, KILL_AT)}
    env.update(extra_env, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "trace_transfer", "run", str(cfg), "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)


def _tensors(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for f in sorted(run.rglob("*.safetensors")):
        if any(part.startswith(".") for part in f.relative_to(run).parts):
            continue  # temp dirs of an interrupted write are not outputs
        with safe_open(str(f), framework="pt") as fh:
            out[str(f.relative_to(run))] = {k: fh.get_tensor(k) for k in fh.keys()}
    return out


def test_kill_9_at_each_point_then_rerun_equals_an_uninterrupted_run(tmp_path):
    cfg = tmp_path / "faults.yaml"
    cfg.write_text(yaml.safe_dump(PIPELINE))
    ref = _run(cfg, tmp_path / "ref", {})
    assert ref.returncode == 0, ref.stderr[-3000:]

    chain = tmp_path / "chain"
    for where, env in KILLS:
        proc = _run(cfg, chain, env)
        assert proc.returncode == -signal.SIGKILL, f"not killed at {where}: rc {proc.returncode}\n{proc.stderr[-3000:]}"
    final = _run(cfg, chain, {})
    assert final.returncode == 0, final.stderr[-3000:]

    a, b = _tensors(tmp_path / "ref"), _tensors(chain)
    assert sorted(a) == sorted(b)
    for f in a:
        assert sorted(a[f]) == sorted(b[f]), f
        for k in a[f]:
            assert torch.equal(a[f][k], b[f][k]), f"{f}: tensor {k} differs after kill + rerun"
    results = sorted((tmp_path / "ref").rglob("results.json"))
    assert results
    for r in results:
        got = json.loads((chain / r.relative_to(tmp_path / "ref")).read_text())
        want = json.loads(r.read_text())
        assert got["R"] == want["R"] and got["metrics"] == want["metrics"], r
