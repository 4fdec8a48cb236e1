"""The pipeline end to end: `demo --quick` through the CLI, and resuming an interrupted run."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from trace_transfer.cli import main
from trace_transfer.pipeline.config import load_pipeline
from trace_transfer.pipeline.run import run_pipeline

pytestmark = pytest.mark.slow

TINY = {
    "name": "tiny",
    "source": {"build": {"arch": "llama", "layers": 2, "hidden": 32, "tokenizer": "char"}},
    "target": {"build": {"arch": "qwen3", "layers": 3, "hidden": 48, "tokenizer": "bpe"}},
    "tasks": ["synthetic:math", "synthetic:medical", "synthetic:code"],
    "probe": {"max_steps": 2, "lr": 1e-3, "batch_size": 8, "seq_len": 48, "fisher_batches": 2, "max_examples": 64},
    "scoring": {"ratio": 0.1},
    "layer_map": {"max_probes": 32, "bootstrap": 4},
    "training": {"lr": 1e-3, "max_steps": 2, "batch_size": 8, "seq_len": 48},
    "eval": {"limit": 4, "batch_size": 4},
    "methods": ["full", "transfer-lf"],
}


class _Interrupt(Exception):
    pass


def _steps(messages: list[str], tag: str) -> set[str]:
    """Step names of the progress lines with ``tag`` ("[run ]", "[done]", "[skip]")."""
    return {m[len(tag):].split()[0] for m in messages if m.startswith(tag)}


def test_interrupted_after_transfer_resumes_without_redoing_a_step(tmp_path):
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(TINY))
    cfg = load_pipeline(p)
    first: list[str] = []

    def stop_after_transfer(msg: str) -> None:
        first.append(msg)
        if msg.startswith("[done] cores/transfer-lf"):
            raise _Interrupt

    with pytest.raises(_Interrupt):
        run_pipeline(cfg, tmp_path / "run", say=stop_after_transfer)
    done_before = _steps(first, "[done]")
    assert {"models/source", "models/target", "cka", "layermap", "cores/transfer-lf"} <= done_before

    second: list[str] = []
    result = run_pipeline(cfg, tmp_path / "run", say=second.append)
    rerun = _steps(second, "[run ]")
    assert not (rerun & done_before), f"redone after resume: {rerun & done_before}"
    assert rerun == {"finetune/full/seed0", "finetune/transfer-lf/seed0", "report"}
    assert set(result.summary["methods"]) == {"full", "transfer-lf"}

    # a changed training parameter redoes fine-tuning and the report only
    cfg2 = cfg.model_copy(update={"training": cfg.training.model_copy(update={"lr": 5e-4})})
    third: list[str] = []
    run_pipeline(cfg2, tmp_path / "run", say=third.append)
    assert _steps(third, "[run ]") == rerun
    # --force redoes that step and what consumes it, nothing upstream
    fourth: list[str] = []
    run_pipeline(cfg2, tmp_path / "run", force=("cores/transfer-lf",), say=fourth.append)
    assert _steps(fourth, "[run ]") == {"cores/transfer-lf", "finetune/transfer-lf/seed0", "report"}


def test_demo_quick_end_to_end_through_the_cli(tmp_path):
    runner = CliRunner()
    out = tmp_path / "demo"
    res = runner.invoke(main, ["demo", "--quick", "--out", str(out)])
    assert res.exit_code == 0, f"{res.output}\n{res.exception!r}"
    for method in ("full", "trace-lf", "transfer-lf"):
        assert method in res.output
        results = json.loads((out / "finetune" / method / "seed0" / "results.json").read_text())
        assert len(results["R"]) == 4  # base row + one per stage
    report = out / "report"
    html = (report / "report.html").read_text()
    assert "<img" in html and "data:image/png;base64," in html  # self-contained
    md = (report / "report.md").read_text()
    assert "BWT" in md and "transfer-lf" in md
    layer_map = json.loads((out / "layermap" / "layer_map.json").read_text())
    assert layer_map  # the CKA layer map the transfer used
    # rerun: everything cached, nothing redone
    res2 = runner.invoke(main, ["demo", "--quick", "--out", str(out)])
    assert res2.exit_code == 0 and "[run ]" not in res2.output


@pytest.mark.distributed
def test_launch_deepspeed_runs_finetuning_under_torchrun(tmp_path):
    """launch.deepspeed: each fine-tuning step runs as `torchrun -m trace_transfer finetune --deepspeed`
    (2 CPU ranks over gloo, ZeRO-3), the rest of the pipeline in this process. `full` needs no probe, so
    this is one launch (~60 s of DeepSpeed start-up each); the probe's own launch is checked by its
    arguments (tests/pipeline/test_launch.py) and run on 2 ranks through the CLI in
    tests/probe/test_probe_distributed.py. `full` runs with its launch.deepspeed_overrides entry, the shipped
    ZeRO-3 + optimizer offload config (the 32B paper pipeline's), with the client AdamW on the host."""
    import os
    import shutil
    from pathlib import Path

    pytest.importorskip("deepspeed")
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("needs a C++ compiler (DeepSpeed builds a small CPU op)")
    ds = Path(__file__).parents[2] / "examples" / "deepspeed" / "ds_zero3_offload.json"
    conf = {**TINY, "methods": ["full"], "launch": {"deepspeed": str(ds.with_name("ds_zero3.json")), "nproc_per_node": 2,
                                                    "deepspeed_overrides": {"full": str(ds)}},
            "tasks": ["synthetic:math", "synthetic:code"]}
    p = tmp_path / "ds.yaml"
    p.write_text(yaml.safe_dump(conf))
    cfg = load_pipeline(p)
    env = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        result = run_pipeline(cfg, tmp_path / "run", say=lambda _msg: None)
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    step = tmp_path / "run" / "finetune" / "full" / "seed0"
    launch = (step / ".launch.sh").read_text()  # hidden: finetune refuses an --out holding others' files
    assert "torch.distributed.run" in launch and "--nproc_per_node=2" in launch
    res = json.loads((step / "results.json").read_text())
    assert res["complete"] and len(res["R"]) == 3
    assert res["provenance"]["deepspeed_config"] == str(ds)
    assert json.loads((step / "step.json").read_text())["result"]["launched"] == "torchrun"
    assert set(result.summary["methods"]) == {"full"}


@pytest.mark.distributed
def test_launch_deepspeed_runs_a_refine_step_per_task_under_torchrun(tmp_path):
    """launch.deepspeed: cheap-lf's refine pass runs as `torchrun -m trace_transfer refine --deepspeed` (2 CPU
    ranks, ZeRO-3; one task, so one launch of ~60 s), the models in this process; the CoreSet picks the units
    the in-process pass picks (the distributed refine's own guarantee, tests/refine) and carries the native
    probe's cost the in-process pass records, so the summary's target cost stays filled."""
    import os
    import shutil
    from pathlib import Path

    from trace_transfer.coreset import CoreSet

    pytest.importorskip("deepspeed")
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("needs a C++ compiler (DeepSpeed builds a small CPU op)")
    ds = Path(__file__).parents[2] / "examples" / "deepspeed" / "ds_zero3.json"
    conf = {**TINY, "methods": ["cheap-lf"], "tasks": ["synthetic:math"], "refine": {"steps": 1, "batches": 1}}
    p = tmp_path / "ds.yaml"
    p.write_text(yaml.safe_dump({**conf, "launch": {"deepspeed": str(ds), "nproc_per_node": 2}}))
    env = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        run_pipeline(load_pipeline(p), tmp_path / "run", say=lambda _msg: None, only=("models", "cores/cheap-lf"))
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    step = tmp_path / "run" / "cores" / "cheap-lf"
    assert "torch.distributed.run" in (step / ".launch.sh").read_text()
    assert json.loads((step / "step.json").read_text())["result"]["launched"] == "torchrun"
    launched = CoreSet.load(step / "math.coreset.safetensors")
    p.write_text(yaml.safe_dump(conf))
    run_pipeline(load_pipeline(p), tmp_path / "one", say=lambda _msg: None, only=("models", "cores/cheap-lf"))
    one = CoreSet.load(tmp_path / "one" / "cores" / "cheap-lf" / "math.coreset.safetensors")
    cost, ref = launched.metadata["cost"], one.metadata["cost"]
    assert cost["world_size"] == 2 and cost["forward_backward"] == ref["forward_backward"]
    assert cost["native"] == ref["native"] and cost["relative_to_native"] == ref["relative_to_native"] is not None
    assert launched.names() == one.names()
    assert all(bool((launched.unit_mask(n) == one.unit_mask(n)).all()) for n in one.names())
