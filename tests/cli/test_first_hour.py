"""Small things a new user trips over (issue 15.8): DeepSpeed's "Setting accelerator to CPU" warning
(printed once the test extras are installed, because accelerate imports DeepSpeed inside
save_pretrained) is dropped from every command's output; help examples name directories as written."""

import importlib.util
import logging
import subprocess
import sys

import pytest
from click.testing import CliRunner

from trace_transfer.cli import main

WARNING = ("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")


def _record(msg: str) -> logging.LogRecord:
    return logging.LogRecord("DeepSpeed", logging.WARNING, "real_accelerator.py", 213, msg, None, None)


def test_the_group_filters_only_that_warning():
    res = CliRunner().invoke(main, ["rules", "list"])
    assert res.exit_code == 0, res.output
    ds = logging.getLogger("DeepSpeed")
    assert not ds.filter(_record(WARNING))
    assert ds.filter(_record("ZeRO-3 partitioned 12 parameters"))  # DeepSpeed's other messages stay


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed not installed")
def test_a_command_that_saves_a_model_prints_no_accelerator_warning(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "trace_transfer", "tiny-model", "--arch", "llama", "--layers", "1",
                           "--hidden", "32", "--out", str(tmp_path / "m")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Setting accelerator" not in proc.stdout + proc.stderr


def test_verify_frozen_example_names_the_stage_directories_finetune_writes():
    from pathlib import Path

    from trace_transfer.train.runner import _stage_dir

    out = CliRunner().invoke(main, ["verify-frozen", "--help"]).output
    assert f"runs/trace/{_stage_dir(Path(''), 1).name}" in out and "stage-1" not in out
