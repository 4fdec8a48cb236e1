"""Pipeline methods of issue 11: transfer-lf as budgets + refine, transfer-lf-tensor, cheap-lf, the
layer map's relative-depth fallback on flat CKA, and the target-cost column."""

from __future__ import annotations

import json

import pytest
import yaml

from trace_transfer.pipeline.config import load_pipeline
from trace_transfer.pipeline.demo import preset_path
from trace_transfer.pipeline.methods import PIPELINE_METHODS


def test_method_table_entries():
    assert PIPELINE_METHODS.get("transfer-lf").refine and PIPELINE_METHODS.get("transfer-cs").refine
    assert PIPELINE_METHODS.get("transfer-lf-tensor").core_key == "transfer-lf-tensor"
    cheap = PIPELINE_METHODS.get("cheap-lf")
    assert cheap.cores == "cheap" and cheap.refine and cheap.core_key == "cheap-lf"


def _config(methods, **refine):
    raw = yaml.safe_load(preset_path("demo-quick").read_text())
    raw["source"]["pretrain"]["steps"] = raw["target"]["pretrain"]["steps"] = 5
    raw["probe"].update(max_steps=2, fisher_batches=2, max_examples=64)
    raw["layer_map"].update(max_probes=32, bootstrap=3)
    raw["training"]["max_steps"], raw["eval"]["limit"] = 1, 4
    raw["refine"] = {"signal": "microprobe", "batches": 2, "steps": 1, **refine}
    raw["methods"] = methods
    return load_pipeline(raw)


def test_refine_section_is_validated():
    with pytest.raises(Exception, match="signal"):
        _config(["cheap-lf"], signal="oracle")


@pytest.mark.slow
def test_transfer_methods_end_to_end(tmp_path):
    from trace_transfer.coreset import CoreSet
    from trace_transfer.pipeline.run import run_pipeline

    res = run_pipeline(_config(["trace-lf", "transfer-lf", "transfer-lf-tensor", "cheap-lf"]), tmp_path / "run")
    lm = json.loads(res.artifacts["layermap"].read_text())
    assert lm["verdict"]["informative"] is False and lm["method"] == "relative-depth"  # random tiny models: flat CKA
    assert lm["provenance"]["cka_map"]["method"] == "monotone"
    cores = tmp_path / "run" / "cores"
    budgets = sorted((cores / "transfer-lf").glob("*.budgets.json"))
    assert len(budgets) == 3
    refined = CoreSet.load(cores / "transfer-lf" / "math.coreset.safetensors")
    assert refined.metadata["mode"] == "budgets" and refined.metadata["cost"]["forward_backward"] == 3  # 1 step + 2 batches
    assert CoreSet.load(cores / "cheap-lf" / "math.coreset.safetensors").metadata["mode"] == "source-free"
    costs = {k: e["target_cost"] for k, e in res.summary["methods"].items()}
    assert costs["trace-lf"] == 1.0 and costs["transfer-lf-tensor"] == 0.0
    assert costs["transfer-lf"] == costs["cheap-lf"] == pytest.approx(3 / 4)  # native probe: 2 steps + 2 batches
    report = (res.artifacts["report"] / "report.md").read_text()
    assert "target cost" in report and "cost_accuracy.png" in report and "not informative" in report
