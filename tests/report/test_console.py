"""Text output without a terminal: progress lines with rate and ETA, tables that keep their rows whole
at 80 columns (`score`, `coreset show`, the results table)."""

import importlib.util
from pathlib import Path

import torch
from click.testing import CliRunner

from trace_transfer.cli import main
from trace_transfer.coreset import CoreSet
from trace_transfer.report.console import ProgressLines, format_duration

LLAMA = {f"model.layers.{i}.{m}.weight": s for i in range(2) for m, s in (
    ("self_attn.q_proj", (8, 8)), ("self_attn.k_proj", (4, 8)), ("self_attn.v_proj", (4, 8)), ("self_attn.o_proj", (8, 8)),
    ("mlp.gate_proj", (12, 8)), ("mlp.up_proj", (12, 8)), ("mlp.down_proj", (8, 12)), ("input_layernorm", (8,)),
    ("post_attention_layernorm", (8,)))}
LLAMA |= {"model.embed_tokens.weight": (40, 8), "model.norm.weight": (8,), "lm_head.weight": (40, 8)}


def test_progress_lines_rate_eta_every_tenth():
    now = [0.0]
    lines: list[str] = []
    tick = ProgressLines(lines.append, clock=lambda: now[0])
    for step in range(1, 101):
        now[0] = step * 0.5  # 2 steps/s
        tick("pretrain", step, 100)
    assert len(lines) == 11  # the first report, then every 10 %, the last one included
    assert lines[1] == "pretrain 11/100 (11%) · 2.0 steps/s · ETA 44s"
    assert lines[-1].startswith("pretrain 100/100 (100%) · 2.0 steps/s · took 50s")
    assert all("\r" not in line and "\x1b" not in line for line in lines)  # plain text for logs
    assert format_duration(75) == "1m15s" and format_duration(4000) == "1h06m"


def test_cli_progress_without_a_tty_is_plain_lines():
    from trace_transfer.cli._progress import progress_bars

    runner = CliRunner()
    import click

    @click.command()
    def loop():
        with progress_bars() as bar:
            for i in range(1, 21):
                bar("work", i, 20)

    res = runner.invoke(loop)
    assert res.exit_code == 0
    err = res.stderr if hasattr(res, "stderr") and res.stderr_bytes is not None else res.output
    assert "work 20/20 (100%)" in err and "\x1b" not in err


def _rows_whole(output: str, cells: list[str]) -> None:
    """Every cell text appears unbroken on one line (rich folds cells that do not fit the width)."""
    for cell in cells:
        assert any(cell in line for line in output.splitlines()), f"{cell!r} broken over lines:\n{output}"


def test_coreset_show_keeps_rows_whole_at_80_columns(tmp_path):
    g = torch.Generator().manual_seed(0)
    cs = CoreSet.from_masks({n: torch.rand(s, generator=g) < 0.3 for n, s in LLAMA.items()}, LLAMA, {"task": "math"})
    path = cs.save(tmp_path / "math")
    res = CliRunner().invoke(main, ["coreset", "show", str(path)], env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    _rows_whole(res.output, ["post_attention_layernorm", "model.embed_tokens.weight"])
    table = [line for line in res.output.splitlines() if line.startswith("│")]
    assert len(table) == 2 + 3  # two layer rows, three tensors outside the layers: no folded continuation rows


def test_score_table_keeps_rows_whole_at_80_columns(tmp_path):
    spec = importlib.util.spec_from_file_location("_scoring_helpers", Path(__file__).parents[1] / "scoring" / "test_scoring.py")
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    probes = [helpers.make_probe(tmp_path, t, i)[0] for i, t in enumerate(["math", "code", "medical"])]
    out = tmp_path / "a_rather_long_output_directory_name" / "cores"
    res = CliRunner().invoke(main, ["score", "--strategy", "lf", *[a for p in probes for a in ("--probe", str(p))],
                                    "--ratio", "0.1", "--out", str(out)], env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    _rows_whole(res.output, [str(out / "medical.coreset.safetensors"), "% of scope"])


def test_results_table_never_wraps_the_method(capsys, monkeypatch):
    from trace_transfer.report.summary import print_table

    monkeypatch.setenv("COLUMNS", "80")
    e = {"n_seeds": 1, "final": [(0.5, None)] * 3, "aa": (0.5, None), "bwt": (-0.1, None), "fwt": (0.0, None),
         "delta_vs_best_baseline": 0.0}
    summary = {"tasks": ["math", "medical", "code"], "best_baseline": "joint",
               "methods": {"joint": e, "trace-lf": {**e, "delta_vs_best_baseline": -0.02}},
               "environment": {"torch": "2.13.0", "transformers": "5.24.0", "torch_threads": 2}}
    print_table(summary)
    out = capsys.readouterr().out
    assert "joint (best baseline)" in out and "mean ± std" not in out and "one seed" in out
    assert "torch 2.13.0 · transformers 5.24.0 · 2 torch thread(s)" in out
