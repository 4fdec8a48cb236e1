"""The peers as pipeline methods: trace-spectrum (Spectrum cores scored on the target, at the scoring
section's budget and granularity) and lisa (no cores; not under DeepSpeed).

An end-to-end run of trace-spectrum through ``run_pipeline`` on the demo-quick preset passed when this
was written (about 3 minutes on 2 busy cores), too slow for CI next to the unit tests of its parts
(tests/scoring/test_spectrum.py, tests/train/test_lisa.py); this checks the table the planner reads.
"""

from __future__ import annotations

from trace_transfer.pipeline.methods import PIPELINE_METHODS, method_problems


def test_spectrum_and_lisa_are_pipeline_methods():
    spec, lisa = PIPELINE_METHODS.get("trace-spectrum"), PIPELINE_METHODS.get("lisa")
    assert (spec.runner, spec.cores, spec.strategy, spec.core_key) == ("trace", "target", "spectrum", "target-spectrum")
    assert (lisa.runner, lisa.cores, lisa.strategy) == ("lisa", "none", None)
    assert method_problems(["trace-lf", "trace-spectrum", "lisa"], num_tasks=3, deepspeed=False) == []
    assert any("lisa" in p for p in method_problems(["lisa"], num_tasks=3, deepspeed=True))
