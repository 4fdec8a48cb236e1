"""The pipeline's `monitor:` key (issue 14: general-ability monitoring in one config line) and its
`training:` LISA settings: validated with the other keys, part of the fine-tuning steps' hashes only
where they change a result, and the monitored rows in results.json and the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from trace_transfer.errors import ConfigError
from trace_transfer.pipeline.config import load_pipeline
from trace_transfer.pipeline.launch import DryRunner
from trace_transfer.pipeline.methods import PIPELINE_METHODS
from trace_transfer.pipeline.run import _finetune_inputs, run_pipeline

TINY = {
    "name": "tiny-monitor",
    "source": {"build": {"arch": "llama", "layers": 2, "hidden": 32, "tokenizer": "char"}},
    "target": {"build": {"arch": "llama", "layers": 2, "hidden": 32, "tokenizer": "char"}},
    "tasks": ["synthetic:math", "synthetic:medical"],
    "training": {"lr": 1e-3, "max_steps": 2, "batch_size": 4, "seq_len": 48},
    "eval": {"limit": 2, "batch_size": 2},
    "methods": ["full"],
}


def _load(tmp_path: Path, spec: dict) -> object:
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(spec))
    return load_pipeline(p)


def _hashes(tmp_path: Path, spec: dict) -> dict[str, str]:
    runner = DryRunner(tmp_path / "run")
    run_pipeline(_load(tmp_path, spec), tmp_path / "run", base_dir=tmp_path, runner=runner)
    return {name: rec.hash for name, rec in runner.records.items() if name.startswith("finetune/")}


def test_monitor_key_is_checked_with_the_rest_of_the_config(tmp_path):
    (tmp_path / "general.yaml").write_text("task: my_general\n")
    cfg = _load(tmp_path, {**TINY, "monitor": ["synthetic:general", "lm-eval:general.yaml?metric=acc", "lm-eval:gsm8k"]})
    assert cfg.monitor[0] == "synthetic:general"
    with pytest.raises(ConfigError) as err:  # a typo'd key: did-you-mean, with its line
        _load(tmp_path, {**TINY, "monitr": ["synthetic:general"]})
    assert "unknown key 'monitr'; did you mean 'monitor'?" in str(err.value)
    with pytest.raises(ConfigError) as err:  # a missing task file, reported next to a schema error
        _load(tmp_path, {**TINY, "monitor": ["lm-eval:nope.yaml", "missing.yaml"], "training": {"lisa_layer": 2}})
    msg = str(err.value)
    assert "did you mean 'lisa_layers'" in msg
    assert "monitor.0: task file 'nope.yaml' does not exist" in msg and "monitor.1: task file 'missing.yaml'" in msg


def test_monitor_and_lisa_settings_enter_only_the_hashes_they_change(tmp_path):
    plain = _hashes(tmp_path, {**TINY, "methods": ["full", "lisa"]})
    monitored = _hashes(tmp_path, {**TINY, "methods": ["full", "lisa"], "monitor": ["synthetic:general"]})
    assert all(plain[k] != monitored[k] for k in plain)  # changing `monitor:` reruns every fine-tuning step
    relisa = _hashes(tmp_path, {**TINY, "methods": ["full", "lisa"],
                                "training": {**TINY["training"], "lisa_layers": 2, "lisa_interval": 5}})
    assert relisa["finetune/full/seed0"] == plain["finetune/full/seed0"]  # full does not read them
    assert relisa["finetune/lisa/seed0"] != plain["finetune/lisa/seed0"]
    cfg = _load(tmp_path, {**TINY, "training": {**TINY["training"], "lisa_layers": 2, "lisa_interval": 5}})
    _, opts, _ = _finetune_inputs(PIPELINE_METHODS.get("lisa"), 1e-3, 0, cfg, None, None)
    assert (opts.lisa_layers, opts.lisa_interval) == (2, 5)


def test_deepspeed_launches_pass_the_monitor_on(tmp_path):
    from trace_transfer.pipeline.launch import dry_run, format_commands

    (tmp_path / "ds.json").write_text("{}")
    spec = {**TINY, "monitor": ["synthetic:general"], "launch": {"deepspeed": "ds.json", "nproc_per_node": 2}}
    cfg = _load(tmp_path, spec)
    runner = DryRunner(tmp_path / "run")
    run_pipeline(cfg, tmp_path / "run", base_dir=tmp_path, runner=runner)
    lines = format_commands(dry_run(runner, cfg, tmp_path / "p.yaml", base_dir=tmp_path)).splitlines()
    launch = next(line for line in lines if " finetune " in line)
    assert "--monitor-task synthetic:general" in launch  # not --monitor: see launch.finetune_args


@pytest.mark.slow
def test_a_monitored_pipeline_reports_the_monitor_rows(tmp_path):
    cfg = _load(tmp_path, {**TINY, "monitor": ["synthetic:general"]})
    result = run_pipeline(cfg, tmp_path / "run", base_dir=tmp_path, say=lambda m: None)
    results = json.loads((tmp_path / "run" / "finetune" / "full" / "seed0" / "results.json").read_text())
    assert results["monitor"]["tasks"] == ["general"]
    assert len(results["monitor"]["rows"]) == 1 + len(TINY["tasks"])  # the base model, then every stage
    assert len(results["R"]) == 1 + len(TINY["tasks"]) and len(results["R"][0]) == len(TINY["tasks"])  # R unchanged
    assert result.summary["methods"]["full"]["monitor"]["tasks"] == ["general"]
    report = (result.artifacts["report"] / "report.md").read_text()
    assert "Monitored tasks, never trained" in report and "| method | general: base → last stage |" in report
    assert "→" in report.split("| method | general: base → last stage |")[1].splitlines()[2]
    assert "Monitored tasks, never trained" in (result.artifacts["report"] / "report.html").read_text()
