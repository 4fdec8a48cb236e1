"""--device / --dtype: one resolver (trace_transfer.devices), the same flags on every model-running command."""

import json

import pytest
import torch
from click.testing import CliRunner

from trace_transfer.cli import main
from trace_transfer.devices import DTYPES, resolve_device, resolve_dtype
from trace_transfer.errors import ConfigError

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")


@no_cuda
def test_auto_is_the_cpu_without_a_gpu():
    assert resolve_device("auto") == "cpu"
    assert resolve_device(None) == "cpu"
    assert resolve_dtype("auto", "cpu") == "float32"


def test_explicit_dtypes_map_to_torch_names():
    assert [resolve_dtype(d, "cpu") for d in DTYPES[1:]] == ["bfloat16", "float16", "float32"]


@no_cuda
@pytest.mark.parametrize("spec", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_one_config_error(spec):
    with pytest.raises(ConfigError) as e:
        resolve_device(spec)
    assert "no CUDA device" in str(e.value) and "--device cpu" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "tpu"])
def test_unknown_device_or_dtype_is_refused(bad):
    with pytest.raises(ConfigError, match="use auto, cpu, cuda"):
        resolve_device(bad)
    with pytest.raises(ConfigError, match="choose one of auto, bf16"):
        resolve_dtype(bad, "cpu")


@pytest.mark.parametrize("command,flags", [
    ("probe", ["--device"]), ("refine", ["--device"]), ("finetune", ["--device"]), ("pretrain", ["--device"]),
    ("cpi-ft", ["--device"]), ("eval", ["--device", "--dtype"]), ("cka", ["--device", "--dtype"]),
    ("run", ["--device"]),
])
def test_every_model_command_takes_the_flags(command, flags):
    out = CliRunner().invoke(main, [command, "--help"]).output
    for flag in flags:
        assert flag in out, f"{command} lacks {flag}"


@no_cuda
def test_eval_cuda_without_cuda_fails_before_loading(tiny_llama, tmp_path):
    res = CliRunner().invoke(main, ["eval", "--model", str(tiny_llama), "--task", "synthetic:math", "--device", "cuda",
                                    "--out", str(tmp_path / "e.json")])
    assert res.exit_code == 1 and "no CUDA device" in res.output
    assert not (tmp_path / "e.json").exists()


def test_eval_dtype_reaches_the_loaded_model(tiny_llama, tmp_path):
    out = tmp_path / "e.json"
    res = CliRunner().invoke(main, ["eval", "--model", str(tiny_llama), "--task", "synthetic:math", "--limit", "2",
                                    "--device", "cpu", "--dtype", "bf16", "--out", str(out)])
    assert res.exit_code == 0, res.output
    got = json.loads(out.read_text())
    assert got["device"] == "cpu" and got["dtype"] == "bfloat16"


@no_cuda
def test_finetune_and_pretrain_refuse_cuda_before_touching_out(tiny_llama, tmp_path):
    for argv in (["finetune", "--model", str(tiny_llama), "--method", "full", "--stage", "synthetic:math",
                  "--max-steps", "1"],
                 ["pretrain", "--model", str(tiny_llama), "--steps", "1"]):
        out = tmp_path / argv[0]
        res = CliRunner().invoke(main, [*argv, "--out", str(out), "--device", "cuda:0"])
        assert res.exit_code == 1 and "no CUDA device" in res.output, res.output
        assert not out.exists()


def test_finetune_records_where_it_trained(tiny_llama, tmp_path):
    res = CliRunner().invoke(main, ["finetune", "--model", str(tiny_llama), "--method", "full",
                                    "--stage", "synthetic:math", "--max-steps", "1", "--batch-size", "2", "--seq-len", "32", "--eval-limit", "2",
                                    "--device", "auto", "--out", str(tmp_path / "ft")])
    assert res.exit_code == 0, res.output
    stage = json.loads((tmp_path / "ft" / "stage_1" / "stage.json").read_text())
    assert stage["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")
