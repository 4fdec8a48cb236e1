"""`trace-transfer finetune` / `eval` end to end (stage parsing: tests/train/test_stages.py)."""

import json

import pytest
from click.testing import CliRunner

from trace_transfer.cli import main


def test_help_has_an_example():
    res = CliRunner().invoke(main, ["finetune", "--help"])
    assert res.exit_code == 0 and "Example" in res.output and "--resume" in res.output
    res = CliRunner().invoke(main, ["eval", "--help"])
    assert res.exit_code == 0 and "--task" in res.output


def test_unknown_method_lists_the_valid_ones(tmp_path, tiny_llama_dir):
    res = CliRunner().invoke(main, ["finetune", "--model", str(tiny_llama_dir), "--stage", "synthetic:math",
                                    "--method", "magic", "--out", str(tmp_path / "run")])
    assert res.exit_code != 0
    assert "magic" in res.output and "trace" in res.output and "lora" in res.output


def test_trace_without_coresets_reports_every_stage(tmp_path, tiny_llama_dir):
    res = CliRunner().invoke(main, ["finetune", "--model", str(tiny_llama_dir), "--stage", "synthetic:math",
                                    "--stage", "synthetic:code", "--method", "trace", "--out", str(tmp_path / "r")])
    assert res.exit_code != 0
    assert "stage 1" in res.output and "stage 2" in res.output


@pytest.mark.slow
def test_cli_end_to_end_full_then_eval(tmp_path, tiny_llama_dir):
    out = tmp_path / "run"
    res = CliRunner().invoke(main, [
        "finetune", "--model", str(tiny_llama_dir), "--stage", "synthetic:math", "--stage", "synthetic:code",
        "--method", "full", "--max-steps", "3", "--lr", "1e-3", "--batch-size", "4", "--seq-len", "64",
        "--eval-limit", "4", "--out", str(out), "--plot", "--monitor", "synthetic:general?skills=add&n_eval=4",
    ])
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    assert len(results["R"]) == 3 and len(results["R"][0]) == 2
    assert results["provenance"]["method"] == "full"
    assert (out / "accuracy_matrix.png").stat().st_size > 0
    assert "| before |" in res.output
    assert results["monitor"]["tasks"] == ["general-add"] and len(results["monitor"]["rows"]) == 3
    assert "Monitored" in (out / "results.md").read_text()
    # rerunning into the same directory without --resume refuses instead of overwriting
    again = CliRunner().invoke(main, ["finetune", "--model", str(tiny_llama_dir), "--stage", "synthetic:math",
                                      "--stage", "synthetic:code", "--method", "full", "--max-steps", "3",
                                      "--out", str(out)])
    assert again.exit_code != 0 and "--resume" in again.output

    ev = CliRunner().invoke(main, ["eval", "--model", str(out / "stage_2"), "--task", "synthetic:math",
                                   "--limit", "4", "--out", str(tmp_path / "eval.json")])
    assert ev.exit_code == 0, ev.output
    scores = json.loads((tmp_path / "eval.json").read_text())["scores"]
    assert list(scores) == [results["tasks"][0]]
    assert scores[results["tasks"][0]]["score"] == pytest.approx(results["R"][2][0])
