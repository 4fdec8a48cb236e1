"""LISA's settings from the command line (`finetune --lisa-layers/--lisa-interval`, declared once in
MethodOptions), its refusal under DeepSpeed, and `watch_steps` (how a caller of the runner sees steps)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from trace_transfer.cli import main
from trace_transfer.train.config import MethodOptions, TrainConfig
from trace_transfer.train.methods import get_method, watch_steps
from trace_transfer.train.runner import run_sequence


def test_finetune_lisa_flags_reach_the_method(tiny_llama, tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["finetune", "--model", str(tiny_llama), "--method", "lisa",
                                    "--stage", "synthetic:math", "--max-steps", "4", "--batch-size", "4",
                                    "--seq-len", "48", "--lr", "1e-3", "--eval-limit", "2",
                                    "--lisa-layers", "2", "--lisa-interval", "3", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "stage 1 training 4/4 (100%)" in res.output  # the stage's steps as progress (no TTY: plain lines)
    info = json.loads((out / "results.json").read_text())["per_stage"][0]["method_info"]
    assert (info["lisa_layers"], info["lisa_interval"]) == (2, 3)
    assert len(info["sampled"]) == 2 and all(len(d) == 2 for d in info["sampled"])  # first forward, after step 3


def test_finetune_lisa_under_deepspeed_is_refused_before_anything_starts(tiny_llama, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 1}))
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["finetune", "--model", str(tiny_llama), "--method", "lisa",
                                    "--stage", "synthetic:math", "--deepspeed", str(ds), "--out", str(out)])
    assert res.exit_code != 0
    assert "method lisa cannot run under --deepspeed: ZeRO builds its optimizer partitions at initialize" in res.output
    assert "use --method trace or full" in res.output
    assert not out.exists()  # refused before the run directory is claimed


def test_watch_steps_sees_every_optimizer_step_of_every_stage(tiny_llama, tmp_path):
    seen: list[tuple[int, int]] = []

    def start(run):
        count = [0]

        def step():
            count[0] += 1
            seen.append((run.index, count[0]))

        return step

    with watch_steps(start):
        assert get_method("full").name == "full"  # the same method, watched
        run_sequence(tiny_llama, ["synthetic:math", "synthetic:code"], "lisa", tmp_path / "run",
                     TrainConfig(lr=1e-3, max_steps=3, batch_size=4, seq_len=48), eval_limit=1,
                     options=MethodOptions(lisa_interval=2))
    assert seen == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]
    info = json.loads((tmp_path / "run" / "results.json").read_text())["per_stage"][0]["method_info"]
    assert len(info["sampled"]) == 2  # LISA's own after_step still ran (a redraw after step 2)
    assert get_method("full") is not None and type(get_method("full")).__name__ == "Full"  # outside: unwrapped
