"""CPI-FT under DeepSpeed: the launch refusals (in-process), and the whole recipe on 2 CPU ranks under
ZeRO-3 compared with a single-process run on the same seed and global batch.

The two runs see the same examples in every optimizer step (2 ranks x micro-batch 4 against one process
x batch 8, both taking the mean over all response tokens of the 8 examples: the DeepSpeed loop weights
each rank by the tokens it holds) with clipping off, so they differ only by float rounding: ZeRO-3 computes linear layers with its own autograd function, which
moves a loss by about one ulp. Measured: weights within 2.4e-6 (lr 1e-3, 2 steps per stage), the same
core regions, clusters and frozen CoreSets, bit for bit, and the same accuracy matrix.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _tiny_masking import run_two_cpu_ranks

from trace_transfer.checkpoint import open_checkpoint
from trace_transfer.coreset import CoreSet
from trace_transfer.errors import ConfigError
from trace_transfer.surgery.cpi_ft import CpiFtConfig, cpi_ft
from trace_transfer.train.loop import TrainConfig

SCRIPT = Path(__file__).parent / "ds_scripts" / "cpi_ft_ranks.py"
TASKS = ["synthetic:math?n_train=16&n_eval=4", "synthetic:medical?n_train=16&n_eval=4"]
# Clipping off: DeepSpeed's global norm sums the partitions in another order than clip_grad_norm_.
TRAIN = {"lr": 1e-3, "max_steps": 2, "batch_size": 4, "seq_len": 32, "precision": "fp32", "max_grad_norm": 0.0,
         "warmup_ratio": 0.0}
RATIO, EVAL_LIMIT = 0.05, 2
ATOL = 1e-5  # weights, DeepSpeed against one process (measured 2.4e-6)
# Every parameter partitioned (the shipped config keeps tensors under 1M elements whole on every rank).
ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
         "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
         "train_batch_size": "auto", "gradient_clipping": "auto", "bf16": {"enabled": "auto"}}


def _weights(path):
    r = open_checkpoint(path)
    return {n: r.get(n) for n in r.names()}


def test_a_missing_deepspeed_config_is_refused_before_anything_is_written(tiny_llama, tmp_path):
    with pytest.raises(ConfigError, match="DeepSpeed config not found"):
        cpi_ft(tiny_llama, TASKS, tmp_path / "run", ft_cfg=TrainConfig(**TRAIN),
               deepspeed_config=tmp_path / "missing.json")
    assert not (tmp_path / "run").exists()


def test_a_multi_process_launch_without_deepspeed_is_refused_before_anything_is_written(tiny_llama, tmp_path,
                                                                                       monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="without a DeepSpeed config"):
        cpi_ft(tiny_llama, TASKS, tmp_path / "run", ft_cfg=TrainConfig(**TRAIN))
    assert not (tmp_path / "run").exists()


SETTINGS = {"tasks": TASKS, "ratio": RATIO, "eval_limit": EVAL_LIMIT, "train": TRAIN}


def _launch(model, out: Path, ds_config: Path, calls: list[dict]) -> list[tuple[dict, dict]]:
    """cpi_ft on 2 CPU ranks, once per call in one launch; per call, what ranks 0 and 1 reported (their
    writes, their results or their errors)."""
    for old in out.parent.glob(f"{out.name}.rank*.json"):
        old.unlink()
    run_two_cpu_ranks(SCRIPT, str(model), str(out), str(ds_config), json.dumps({**SETTINGS, "calls": calls}))
    r0, r1 = (json.loads((out.parent / f"{out.name}.rank{r}.json").read_text()) for r in (0, 1))
    return list(zip(r0, r1, strict=True))


@pytest.fixture(scope="module")
def ds_run(tiny_llama, tmp_path_factory):
    pytest.importorskip("deepspeed")
    tmp = tmp_path_factory.mktemp("cpi_ds")
    ds_config = tmp / "zero3.json"
    ds_config.write_text(json.dumps(ZERO3))
    # The run, then (resuming it: nothing trains) a failure on rank 0 between the training steps, then
    # the same run resumed again.
    calls = _launch(tiny_llama, tmp / "ds", ds_config, [{}, {"resume": True, "fail": True}, {"resume": True}])
    return tmp / "ds", ds_config, calls


@pytest.mark.slow
@pytest.mark.distributed
def test_cpi_ft_under_two_rank_zero3_matches_one_process(tiny_llama, ds_run, tmp_path):
    ds, ds_config, calls = ds_run
    r0, r1 = calls[0]
    # Rank 0 alone wrote; both ranks returned the same results.
    assert "error" not in r0 and "error" not in r1, (r0, r1)
    assert r1["writes"] == [] and (r0["rank"], r1["rank"]) == (0, 1)
    assert r0["writes"].count(str(ds / "results.json")) == 1 and r0["R"] == r1["R"] and r0["groups"] == r1["groups"]
    res = json.loads((ds / "results.json").read_text())
    assert res["complete"] and len(res["R"]) == len(TASKS) + 1
    assert res["provenance"]["cpi_ft"]["deepspeed_config"] == str(ds_config)
    assert all(json.loads((ds / d / "run.json").read_text())["identity"]["deepspeed_config"] == str(ds_config)
               for d in ("ft/math", "ft/medical", "sft"))

    # The same recipe in one process: batch 8 = the 2 ranks' global batch (the same 8 examples per step).
    one = tmp_path / "one"
    ref = cpi_ft(tiny_llama, TASKS, one, CpiFtConfig(ratio=RATIO), ft_cfg=TrainConfig(**{**TRAIN, "batch_size": 8}),
                 eval_limit=EVAL_LIMIT, device="cpu")
    assert ref.results["cpi_ft"]["groups"] == res["cpi_ft"]["groups"]
    assert ref.R == res["R"]
    for name in ("math", "medical"):  # the core regions, element for element
        a, b = (CoreSet.load(d / "cores" / f"{name}.coreset.safetensors") for d in (ds, one))
        assert all(torch.equal(a.mask(t), b.mask(t)) for t in a.all_names()), name
    for a, b in zip(sorted((ds / "frozen").iterdir()), sorted((one / "frozen").iterdir()), strict=True):
        fa, fb = CoreSet.load(a), CoreSet.load(b)
        assert all(torch.equal(fa.mask(t), fb.mask(t)) for t in fa.all_names()), a.name
    for sub in ("ft/math/stage_1", "ft/medical/stage_1", "merged", "sft/stage_2"):
        wa, wb = _weights(ds / sub), _weights(one / sub)
        for t in wa:
            torch.testing.assert_close(wa[t], wb[t], rtol=0, atol=ATOL, msg=f"{sub} {t}")
    for pa, pb in zip(res["per_stage"], ref.results["per_stage"], strict=True):
        assert pa["losses"] == pytest.approx(pb["losses"], rel=1e-6)

    # Under ZeRO-3 the cores stay frozen through the SFT bit for bit (freeze='all'), while the rest trained.
    frozen = CoreSet.load(ds / "frozen" / "run_2.coreset.safetensors")
    merged, final = _weights(ds / "merged"), _weights(ds / "sft" / "stage_2")
    for t in merged:
        mask = frozen.mask(t)
        assert torch.equal(final[t][mask], merged[t][mask]), t
    assert not all(torch.equal(final[t], merged[t]) for t in merged)


@pytest.mark.slow
@pytest.mark.distributed
def test_resume_and_a_rank0_failure_under_deepspeed(ds_run):
    ds, _, calls = ds_run
    (first, _), (r0, r1), (again0, again1) = calls
    # The failure is raised on rank 1 too, instead of leaving it at the next collective until the timeout.
    assert r0["error"].startswith("OSError: no space left"), r0
    assert r1["error"].startswith("RuntimeError: rank 0 failed while finding core regions, clustering and "
                                  "merging: OSError"), r1
    assert r1["writes"] == [] and r1["seconds"] < 100
    # Resumed again: every training step was complete, so nothing retrains and the results are the same.
    assert "error" not in again0 and "error" not in again1, (again0, again1)
    assert again0["R"] == again1["R"] == first["R"] and again1["writes"] == []
    assert not [w for w in again0["writes"] if "/stage_" in w and not w.startswith("[")]  # "[": merge_models' inputs
    assert again0["stage_seconds"] == first["stage_seconds"]  # the SFT stages' own records, not new timings
