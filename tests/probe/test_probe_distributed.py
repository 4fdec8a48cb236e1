"""The distributed probe (probe/distributed.py) against the single-process one: 2 CPU ranks under
DeepSpeed ZeRO-3 (through the CLI's --deepspeed), ZeRO-2, ZeRO-3 with the Fisher at the base model and
ZeRO-3 with gradient checkpointing (warm start and Fisher pass), each with micro-batch 2 per rank, against one process with batch 4, same seed and settings.

Tolerance: per tensor, ‖Δ_ds − Δ‖ ≤ 1e-4·‖Δ‖ and the same for the Fisher (and elementwise within
1e-4 of the tensor's largest value). Both sides compute in fp32; they differ only in reduction order
(two half-batch matmuls whose gradients gloo sums and ZeRO re-partitions, against one batch), about
1e-7 relative per operation, amplified a little by three AdamW steps (measured: 1e-6 for Δ, 4e-7 for
the Fisher). A real averaging error (a factor W, a missing rank, a per-rank rather than global token
mean) is off by 1e-1 or more.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for _tiny_masking
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the worker's task and settings

from _ds_probe_ranks import SETTINGS, SINGLE_BATCH, write_task, zero  # noqa: E402
from _tiny_masking import run_two_cpu_ranks  # noqa: E402

from trace_transfer.checkpoint import open_checkpoint  # noqa: E402
from trace_transfer.errors import ConfigError  # noqa: E402
from trace_transfer.probe import ProbeConfig, probe  # noqa: E402

WORKER = Path(__file__).parent / "_ds_probe_ranks.py"
PHASES = {"zero3": "probe", "zero2": "probe", "zero3-base": "base", "zero3-gc": "probe"}
RTOL = 1e-4


def _close(ref: Path, got: Path, kind: str) -> None:
    a, b = open_checkpoint(ref, prefix=kind), open_checkpoint(got, prefix=kind)
    assert sorted(a.names()) == sorted(b.names()), kind
    for name in a.names():
        x, y = a.get(name).double(), b.get(name).double()
        assert float((x - y).norm()) <= RTOL * float(x.norm()) + 1e-30, (kind, name)
        assert float((x - y).abs().max()) <= RTOL * float(x.abs().max()) + 1e-30, (kind, name)


def _core(probe_dir: Path, granularity: str, ratio: float):
    from trace_transfer.scoring import score

    return next(iter(score([probe_dir], "lf", ratio=ratio, granularity=granularity).values()))


@pytest.mark.slow
@pytest.mark.distributed
def test_two_rank_probe_equals_single_process(tiny_llama, tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "ds"
    out.mkdir()
    (out / "zero3.json").write_text(json.dumps(zero(3)))
    task = write_task(out / "task")
    run_two_cpu_ranks(WORKER, str(tiny_llama), str(out), ",".join(PHASES))
    torch.set_num_threads(1)
    refs = {}
    for at in set(PHASES.values()):
        refs[at] = tmp_path / f"single-{at}"
        probe(tiny_llama, task, refs[at],
              ProbeConfig.from_flat(**SETTINGS, batch_size=SINGLE_BATCH, fisher_at=at))
    for phase, at in PHASES.items():
        ref, got = refs[at], out / phase
        for kind in ("delta", "fisher"):
            _close(ref, got, kind)
        single, dist = (json.loads((d / "probe.json").read_text()) for d in (ref, got))
        assert dist["deepspeed"]["stage"] == int(phase[4]) and dist["deepspeed"]["world_size"] == 2
        assert dist["deepspeed"]["global_batch"] == SINGLE_BATCH
        assert dist["fisher"]["observations"] == single["fisher"]["observations"] == 4
        assert dist["train"]["losses"] == pytest.approx(single["train"]["losses"], rel=1e-5)
        for rank in range(2):  # 4 global Fisher batches, one micro-batch each per rank; the -gc pass recomputes
            runs = json.loads((out / f"{phase}-rank{rank}.json").read_text())["fisher_mlp_calls"]
            assert runs == (8 if phase.endswith("-gc") else 4), (phase, rank)
        assert set(dist) >= set(single) and dist["tensors"] == single["tensors"]
        stats = [json.loads((d / "fisher_tensor.json").read_text())["tensors"] for d in (ref, got)]
        for name, s in stats[0].items():
            for key in ("fisher_mean", "delta_rms"):
                assert stats[1][name][key] == pytest.approx(s[key], rel=RTOL), (phase, name, key)
    # Checkpointing (warm start and Fisher pass) recomputes the same kernels on the same inputs, on the
    # same ranks: measured bit-equal to the plain ZeRO-3 run.
    for kind in ("delta", "fisher"):
        plain, ckpt = open_checkpoint(out / "zero3", prefix=kind), open_checkpoint(out / "zero3-gc", prefix=kind)
        for name in plain.names():
            diff = float((plain.get(name) - ckpt.get(name)).abs().max())
            assert diff <= 1e-6 * float(plain.get(name).abs().max()), (kind, name, diff)
    # LF scores on both outputs pick the same tensors and rows (measured: elements too); at element
    # granularity a score within 1e-6 of the cut may fall either side, hence ≥ 0.95 there.
    for phase, at in PHASES.items():
        for granularity, ratio, least in (("tensor", 0.2, 1.0), ("row", 0.05, 1.0), ("element", 0.05, 0.95)):
            ours, theirs = _core(refs[at], granularity, ratio), _core(out / phase, granularity, ratio)
            assert ours.jaccard(theirs) >= least, (phase, granularity)


def test_plain_multi_process_launch_is_refused(tiny_llama, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from trace_transfer.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    res = CliRunner().invoke(main, ["probe", "--model", str(tiny_llama), "--task", "synthetic:math",
                                    "--out", str(tmp_path / "p"), "--max-steps", "1"])
    assert res.exit_code != 0 and "without a DeepSpeed config" in res.output, res.output
    assert not (tmp_path / "p").exists()


def test_per_sample_fisher_and_stage_0_are_refused_before_launch(tiny_llama, tmp_path):
    pytest.importorskip("deepspeed")
    from trace_transfer.probe import probe_deepspeed

    with pytest.raises(ConfigError, match="fisher='batch'"):
        probe_deepspeed(tiny_llama, "synthetic:math", tmp_path / "p", ProbeConfig.from_flat(max_steps=1, fisher="per-sample"),
                        ds_config=zero(3))
    with pytest.raises(ConfigError, match="stage 0"):
        probe_deepspeed(tiny_llama, "synthetic:math", tmp_path / "p", ProbeConfig.from_flat(max_steps=1),
                        ds_config={"zero_optimization": {"stage": 0}})
    assert not (tmp_path / "p").exists()
