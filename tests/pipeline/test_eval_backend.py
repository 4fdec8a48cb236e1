"""The pipeline's `eval: backend:` key and `launch: dtype:` reaching the fine-tuning steps (issue 12):
in-process steps call run_sequence with both, launched steps get --dtype (and a non-default backend),
`run --check` refuses vLLM where it cannot run, and no existing step hash changes."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from trace_transfer.errors import ConfigError
from trace_transfer.evaluation import vllm_backend
from trace_transfer.pipeline.config import load_pipeline
from trace_transfer.pipeline.launch import DryRunner, dry_run, format_commands
from trace_transfer.pipeline.methods import PIPELINE_METHODS
from trace_transfer.pipeline.run import _finetune_fn, run_pipeline

TINY = {
    "name": "tiny-eval",
    "source": {"build": {"arch": "llama", "layers": 2, "hidden": 32, "tokenizer": "char"}},
    "target": {"build": {"arch": "llama", "layers": 2, "hidden": 32, "tokenizer": "char"}},
    "tasks": ["synthetic:math"],
    "training": {"lr": 1e-3, "max_steps": 2, "batch_size": 4, "seq_len": 48},
    "eval": {"limit": 2, "batch_size": 2},
    "methods": ["full"],
}


def _load(tmp_path: Path, spec: dict):
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(spec))
    return load_pipeline(p)


def _hashes(cfg, tmp_path):
    runner = DryRunner(tmp_path / "run")
    run_pipeline(cfg, tmp_path / "run", base_dir=tmp_path, runner=runner)
    return runner, {name: rec.hash for name, rec in runner.records.items()}


def test_backend_and_dtype_leave_step_hashes_alone_and_reach_the_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(vllm_backend, "_import_vllm", lambda: object())  # "installed"
    plain = _load(tmp_path, TINY)
    assert plain.eval.step_params() == {"limit": 2, "batch_size": 2}  # what the hash held before the key existed
    other = _load(tmp_path, {**TINY, "eval": {**TINY["eval"], "backend": "vllm"}, "launch": {"dtype": "bf16"}})
    assert _hashes(plain, tmp_path)[1] == _hashes(other, tmp_path)[1]

    got = {}

    def fake_run_sequence(*args, **kwargs):
        got.update(kwargs)
        return SimpleNamespace(results={"metrics": None})

    monkeypatch.setattr("trace_transfer.train.runner.run_sequence", fake_run_sequence)
    fn = _finetune_fn(PIPELINE_METHODS.get("full"), 1e-3, 0, other, "target-dir", SimpleNamespace(say=print), None,
                      tmp_path)
    fn(tmp_path / "step")
    assert (got["dtype"], got["eval_backend"], got["device"]) == ("bf16", "vllm", "auto")


def test_launched_finetune_steps_get_the_dtype(tmp_path):
    (tmp_path / "ds.json").write_text("{}")
    cfg = _load(tmp_path, {**TINY, "launch": {"deepspeed": "ds.json", "nproc_per_node": 2, "dtype": "fp16"}})
    runner, _ = _hashes(cfg, tmp_path)
    lines = format_commands(dry_run(runner, cfg, tmp_path / "p.yaml", base_dir=tmp_path)).splitlines()
    launch = next(line for line in lines if " finetune " in line)
    assert "--dtype fp16" in launch and "--eval-backend" not in launch  # hf, the default, is left implicit


def test_launched_cpi_ft_gets_the_dtype_and_its_cli_takes_it(tmp_path):
    from click.testing import CliRunner

    from trace_transfer.cli import main
    from trace_transfer.pipeline.launch import cpi_ft_args

    (tmp_path / "ds.json").write_text("{}")
    cfg = _load(tmp_path, {**TINY, "launch": {"deepspeed": "ds.json", "nproc_per_node": 2, "dtype": "fp16"}})
    from trace_transfer.train.config import TrainConfig

    args = cpi_ft_args(tmp_path / "d", "target", ["synthetic:math", "synthetic:code"], TrainConfig(), "ds.json", cfg)
    assert args[args.index("--dtype") + 1] == "fp16"
    assert "--dtype [auto|bf16|fp16|fp32]" in CliRunner().invoke(main, ["cpi-ft", "--help"]).output


def test_check_refuses_vllm_where_it_cannot_run(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, {**TINY, "eval": {"backend": "vllm"}})
    assert "eval.backend: the vllm generation backend needs vLLM" in str(err.value)
    assert "pip install vllm" in str(err.value)
    (tmp_path / "ds.json").write_text("{}")
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, {**TINY, "eval": {"backend": "vllm"}, "launch": {"deepspeed": "ds.json", "nproc_per_node": 2}})
    assert "eval.backend: the vllm evaluation backend does not run inside a torchrun/DeepSpeed launch" in str(err.value)
    with pytest.raises(ConfigError, match="backend"):
        _load(tmp_path, {**TINY, "eval": {"backend": "tgi"}})
