"""A probe without a terminal (CI log, `2> log`, the pipeline) reports its warm-start steps and Fisher
batches as plain lines with rate and ETA (issue 15.7), through the same ProgressLines as pretraining."""

from __future__ import annotations

import re

from click.testing import CliRunner

from trace_transfer.cli import main
from trace_transfer.probe import ProbeConfig, probe
from trace_transfer.report.console import ProgressLines
from trace_transfer.train.config import TrainConfig

LINE = re.compile(r"^(warm start|fisher \(per-sample\)) \d+/\d+ \(\d+%\) · [\d.]+ \w+/s · (ETA|took) \w+$")


def test_probe_cli_without_a_tty_prints_rate_and_eta_lines(tiny_llama, tmp_path):
    res = CliRunner().invoke(main, ["probe", "--model", str(tiny_llama), "--task", "synthetic:math",
                                    "--out", str(tmp_path / "p"), "--max-steps", "10", "--batch-size", "4",
                                    "--seq-len", "48", "--fisher-batches", "5", "--max-examples", "40",
                                    "--fisher", "per-sample"])
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.output.splitlines() if LINE.match(ln)]
    assert any(ln.startswith("warm start") and "ETA" in ln for ln in lines), res.output
    assert any(ln.startswith("fisher") for ln in lines), res.output
    ours = [ln for ln in res.output.splitlines() if ln.startswith(("warm start", "fisher", "delta"))]
    assert all("\x1b" not in ln and "\r" not in ln for ln in ours)  # plain text for a log


def test_probe_reports_every_warm_start_step_and_fisher_batch(tiny_llama, tmp_path):
    seen: dict[str, list[tuple[int, int]]] = {}
    probe(tiny_llama, "synthetic:math", tmp_path / "p",
          ProbeConfig(TrainConfig(max_steps=3, batch_size=4, seq_len=48), fisher_batches=2, max_examples=16),
          progress=lambda stage, done, total: seen.setdefault(stage.split()[0], []).append((done, total)))
    assert seen["warm"] == [(1, 3), (2, 3), (3, 3)] and seen["fisher"][-1] == (2, 2)


def test_progress_lines_keep_quiet_for_short_stages_and_speak_every_max_interval():
    now, lines = [0.0], []
    tick = ProgressLines(lines.append, clock=lambda: now[0], max_interval=30.0, quiet_for=5.0)
    for step in range(1, 5):  # a 2-second stage: nothing at all
        now[0] = step * 0.5
        tick("short", step, 4)
    assert lines == []
    for step in range(1, 1001):  # 1 step/s over 1000 s: 10 % = 100 s, so the 30 s rule decides
        now[0] = 100 + step
        tick("long", step, 1000)
    assert lines[0] == "long 6/1000 (0%) · 1.0 steps/s · ETA 16m34s"  # the first line once 5 s have passed
    gaps = [b - a for a, b in zip([int(x.split()[1].split("/")[0]) for x in lines][:-1],
                                  [int(x.split()[1].split("/")[0]) for x in lines][1:])]
    assert max(gaps) <= 30 and lines[-1].startswith("long 1000/1000 (100%)")
    unknown = ProgressLines(lines.append, clock=lambda: now[0], max_interval=30.0)
    lines.clear()
    for step in range(1, 61):  # epochs-based training: the number of steps is not known up front
        now[0] = 2000 + step
        unknown("stage 1 training", step, None)
    assert lines == ["stage 1 training 31 steps · 1.0 steps/s"]
