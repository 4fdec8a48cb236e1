"""pretrain() and the `tiny-model` / `pretrain` commands, end to end on a tiny model."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from trace_transfer.cli import main
from trace_transfer.errors import ArtifactError
from trace_transfer.models import PROVENANCE_FILE, load_model
from trace_transfer.train.pretrain import pretrain

SMALL = "synthetic:general?n_train=256&n_eval=10"


def test_pretrain_lowers_the_loss_and_records_provenance(tiny_llama, tmp_path):
    res = pretrain(tiny_llama, tmp_path / "base", task=SMALL, steps=40, batch_size=16, lr=3e-3, seq_len=32,
                   eval_limit=4)
    assert res.steps == 40 and len(res.losses) == 40
    assert res.final_loss < res.losses[0]
    prov = json.loads((tmp_path / "base" / PROVENANCE_FILE).read_text())
    assert prov["kind"] == "pretrained" and prov["arch"] == "llama" and prov["train"]["max_steps"] == 40
    assert set(prov["scores"]) == {"general-copy", "general-sort", "general-fact", "general-add", "general-trace"}
    assert load_model(tmp_path / "base").config.hidden_size == 32
    with pytest.raises(ArtifactError, match="overwrite"):
        pretrain(tiny_llama, tmp_path / "base", task=SMALL, steps=1)


def test_pretrain_is_deterministic(tiny_llama, tmp_path):
    a = pretrain(tiny_llama, tmp_path / "a", task=SMALL, steps=5, batch_size=8, eval_limit=0)
    b = pretrain(tiny_llama, tmp_path / "b", task=SMALL, steps=5, batch_size=8, eval_limit=0)
    assert a.losses == b.losses


def test_cli_tiny_model_then_pretrain(tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["tiny-model", "--arch", "qwen3", "--out", str(tmp_path / "m"), "--layers", "2",
                               "--hidden", "32", "--tokenizer", "bpe", "--seed", "1"])
    assert res.exit_code == 0, res.output
    assert "qwen3" in res.output and "parameters" in res.output
    res = runner.invoke(main, ["pretrain", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "b"), "--task",
                               "synthetic:code?n_train=64&n_eval=4", "--steps", "3", "--batch-size", "8"])
    assert res.exit_code == 0, res.output
    assert "3 steps" in res.output and "code" in res.output
    res = runner.invoke(main, ["tiny-model", "--arch", "llama", "--out", str(tmp_path / "m")])
    assert res.exit_code != 0 and "overwrite" in res.output
    res = runner.invoke(main, ["tiny-model", "--arch", "falcon9", "--out", str(tmp_path / "x")])
    assert res.exit_code != 0 and "available:" in res.output


@pytest.mark.parametrize("cmd", ["tiny-model", "pretrain"])
def test_help_has_an_example(cmd):
    res = CliRunner().invoke(main, [cmd, "--help"])
    assert res.exit_code == 0 and "Example" in res.output
