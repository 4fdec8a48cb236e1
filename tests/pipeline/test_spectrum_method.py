"""The Spectrum baseline as a pipeline method: trace-spectrum trains the target's SNR-ranked matrices
as cores, at the budget and granularity of the config's scoring section (the one trace-lf gets)."""

from __future__ import annotations

import pytest
import yaml

from trace_transfer.pipeline.config import load_pipeline
from trace_transfer.pipeline.demo import preset_path


@pytest.mark.slow
def test_trace_spectrum_runs_in_the_pipeline(tmp_path):
    from trace_transfer.coreset import CoreSet
    from trace_transfer.pipeline.run import run_pipeline

    raw = yaml.safe_load(preset_path("demo-quick").read_text())
    raw["source"]["pretrain"]["steps"] = raw["target"]["pretrain"]["steps"] = 5
    raw["probe"].update(max_steps=2, fisher_batches=2, max_examples=64)
    raw["training"]["max_steps"], raw["eval"]["limit"] = 1, 4
    raw["methods"] = ["trace-spectrum"]
    res = run_pipeline(load_pipeline(raw), tmp_path / "run")
    cores = sorted((tmp_path / "run" / "cores" / "target-spectrum").glob("*.coreset.safetensors"))
    assert len(cores) == 3
    spec = CoreSet.load(cores[0])
    assert spec.metadata["strategy"] == "spectrum" and "spectrum_snr_ratio" in spec.metadata
    # the scoring section's budget, as every other method gets it, filled matrix by matrix
    assert spec.metadata["granularity"] == raw["scoring"]["granularity"]
    assert 0 < spec.metadata["selected_params"] <= spec.metadata["budget_target"]
    assert "trace-spectrum" in res.summary["methods"]
