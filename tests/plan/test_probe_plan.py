"""The planner's probe steps as the pipeline runs them: launched under ``launch.deepspeed`` (ZeRO from its
JSON, the global batch split over the ranks) or one process, with the Fisher accumulator and the probe's
host copies counted, and ``probe.gradient_checkpointing`` followed."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from trace_transfer.plan import Hardware, Setup, find_config, model_shape
from trace_transfer.plan.estimate import DELTA_HOST_BYTES, probe_memory
from trace_transfer.plan.hardware import GiB

ROOT = Path(__file__).resolve().parents[2]
PAPER_MODELS = ROOT / "examples" / "paper_models"
PIPELINES = ROOT / "examples" / "pipelines"
PAPER_32B = PIPELINES / "paper-llama3-8b-to-qwen3-32b.yaml"


@pytest.fixture(scope="module")
def llama8b():
    return model_shape(find_config("meta-llama/Meta-Llama-3-8B", roots=[PAPER_MODELS]), "llama-3-8b")


def _plan(**over):
    """The 32B paper pipeline planned on 8 x 80 GB, with ``over`` merged into its sections."""
    from trace_transfer.pipeline.config import load_pipeline
    from trace_transfer.plan import plan

    raw = yaml.safe_load(PAPER_32B.read_text())
    for section, values in over.items():
        raw[section] = {**raw[section], **values} if isinstance(values, dict) else values
    p = plan(load_pipeline(raw, base_dir=PIPELINES), Hardware(gpus_per_node=8), base_dir=PIPELINES,
             configs=[PAPER_MODELS], default_examples=1000)
    return {s.name.split(" x")[0]: s for s in p.steps}


def test_hand_check_launched_probe_of_8b_on_8_ranks(llama8b):
    # docs/PLANNER.md "Hand check: the launched probe": ZeRO-3 x8, global batch 8 = 1 x 1024 tokens per rank.
    psi, largest = llama8b.params, llama8b.largest_tensor
    hw = Hardware(gpus_per_node=8)
    setup = Setup("deepspeed", zero=3, world=8, micro_batch=8, global_batch=8, seq_len=1024, checkpointing=True)
    m, plain = probe_memory(llama8b, setup, hw), probe_memory(llama8b, replace(setup, checkpointing=False), hw)
    pg = m["per_gpu"]
    # Checkpointed, the Fisher pass (states + accumulator + checkpointed activations) falls below the
    # writes, where one gathered fp32 copy of the largest tensor (the 128256 x 4096 LM head) replaces them.
    assert m["phase"] == "write"
    assert pg["params"] == pg["grads"] == 2 * psi // 8 == 2_007_565_312
    assert pg["optimizer"] == 12 * psi // 8 + 4 * 1_000_000_000
    assert pg["fisher"] == 4 * psi // 8 == 4_015_130_624  # fp32 per element of this rank's partition
    assert pg["activations"] == 0 and pg["buffers"] == 3_000_000_000 + 4 * largest == 5_101_346_304
    assert m["total"] == m["total_ckpt"] == 30_250_741_248  # 28.17 GiB
    # The Fisher pass checkpoints its layers like the warm start (1,774,080 B per token kept, not 7,860,736).
    pass_terms = 2 * 2_007_565_312 + 16_045_391_872 + 3_000_000_000 + 4_015_130_624 + 1_073_741_824
    assert m["phases"]["fisher"] == pass_terms + 1_774_080 * 1024 == 29_966_052_864  # 27.91 GiB
    assert m["phases"]["warm start"] < m["phases"]["fisher"] < m["total"]
    # Without checkpointing the Fisher pass is the peak, with every activation kept.
    assert plain["phase"] == "fisher" and plain["per_gpu"]["activations"] == 7_860_736 * 1024
    assert plain["total"] == m["total_no_ckpt"] == pass_terms + 7_860_736 * 1024 == 36_198_788_608  # 33.71 GiB
    # Host: the checkpoint streams in one tensor at a time (train.ds.load_partitioned): rank 0 reads the
    # largest tensor in bf16, every rank holds it gathered in fp32 at most; rank 0 later forms Δ (less).
    assert m["host_per_node"] == (2 + 8 * 4) * largest == 17_861_443_584
    assert m["host_per_node"] > 2 * GiB + DELTA_HOST_BYTES * largest
    assert m["disk"] == 12 * psi  # θ0 (while it runs) + Δ + per-element Fisher


def test_distributed_probe_divides_the_partitioned_terms_by_world(llama8b):
    hw = Hardware(gpus_per_node=8)
    base = Setup("deepspeed", zero=3, world=8, micro_batch=16, global_batch=16, seq_len=1024)
    at8, at16 = probe_memory(llama8b, base, hw), probe_memory(llama8b, replace(base, world=16),
                                                              hw.with_world(16))
    for term in ("params", "grads", "fisher"):  # integer division: equal up to rounding
        assert abs(at8["per_gpu"][term] - 2 * at16["per_gpu"][term]) <= 2, term
    # The global batch is shared: 16 ranks hold half of 8 ranks' activations.
    assert at8["per_gpu"]["activations"] == 2 * at16["per_gpu"]["activations"]
    assert base.per_rank_batch() == 2
    # ZeRO-2 keeps whole weights but still partitions the gradients and the Fisher accumulator.
    z2 = probe_memory(llama8b, replace(base, zero=2), hw)
    assert z2["per_gpu"]["params"] == 2 * llama8b.params and z2["per_gpu"]["fisher"] == 4 * llama8b.params // 8
    assert z2["host_per_node"] == 8 * 4 * llama8b.params  # every rank loads the fp32 model whole on the CPU
    # One process: the whole accumulator; AdamW is freed when train() returns, before the Fisher pass.
    one = probe_memory(llama8b, Setup("single", micro_batch=16, global_batch=16, seq_len=1024), hw)
    assert one["phases"]["warm start"] > one["phases"]["fisher"]
    assert one["host_per_node"] == max(4 * llama8b.params, 2 * GiB + DELTA_HOST_BYTES * llama8b.largest_tensor)
    tensor_only = probe_memory(llama8b, Setup("single", micro_batch=16, seq_len=1024), hw, fisher_elements=False)
    assert tensor_only["phases"]["fisher"] == one["phases"]["fisher"] - 4 * llama8b.params  # float64 per tensor only


@pytest.mark.parametrize("engine", ["single", "deepspeed"])
def test_checkpointing_lowers_the_warm_start_and_the_fisher_pass(llama8b, engine):
    # probe.fisher.eval_checkpointing: the Fisher pass (eval mode) recomputes its layers as the warm start does.
    hw = Hardware(gpus_per_node=8)
    base = Setup(engine, zero=3 if engine == "deepspeed" else 0, world=8 if engine == "deepspeed" else 1,
                 micro_batch=8, global_batch=8, seq_len=1024)
    plain, ckpt = probe_memory(llama8b, base, hw), probe_memory(llama8b, replace(base, checkpointing=True), hw)
    saved = plain["activations_no_ckpt"] - plain["activations_ckpt"]
    for phase in ("warm start", "fisher"):
        assert plain["phases"][phase] - ckpt["phases"][phase] == saved, phase
    assert ckpt["phases"]["write"] == plain["phases"]["write"]  # no activations there
    assert ckpt["total"] == max(ckpt["phases"].values()) < plain["total"]


def test_pipeline_probe_steps_follow_launch_and_the_checkpointing_key():
    launched = _plan()
    src = launched["probe source"]
    assert src.setup.startswith("ZeRO-3 x8, micro-batch 1/rank") and src.gradient_checkpointing
    assert src.checkpointing_key == "probe.gradient_checkpointing"
    assert src.memory["per_gpu"]["fisher"] == 4 * 8_030_261_248 // 8
    assert any("peak in the write phase" in n for n in src.notes)  # checkpointed: see the hand check
    # Without launch.deepspeed: one process. 8B in fp32 + AdamW does not fit an 80 GB card; the ladder
    # suggests what the pipeline does under launch.deepspeed, with the batch split over the ranks.
    single = _plan(launch={"deepspeed": None, "nproc_per_node": 1, "deepspeed_overrides": {}},
                   probe={"gradient_checkpointing": False})
    one = single["probe source"]
    assert one.setup.startswith("1 process") and not one.fits_as_configured
    assert one.verdict == "needs ZeRO-3 x8" and "micro-batch 1/rank" in one.suggestion
    assert one.memory["per_gpu"]["fisher"] == 0 and one.memory["phase"] == "warm start"


def test_fits_only_with_probe_gradient_checkpointing():
    # A 200 GiB card (180 usable): the single-process 8B probe needs 196 GiB, 166 with checkpointing.
    from trace_transfer.pipeline.config import load_pipeline
    from trace_transfer.plan import plan

    raw = yaml.safe_load(PAPER_32B.read_text())
    raw["launch"] = {}
    raw["probe"] = {**raw["probe"], "gradient_checkpointing": False}
    p = plan(load_pipeline(raw, base_dir=PIPELINES), Hardware(gpus_per_node=8, gpu_memory=200 * GiB),
             base_dir=PIPELINES, configs=[PAPER_MODELS], default_examples=1000)
    src = next(s for s in p.steps if s.name.startswith("probe source"))
    assert src.verdict == "fits only with probe.gradient_checkpointing: true", src.verdict
    assert src.suggestion_memory["total"] < 180 * GiB < src.memory["total"]
