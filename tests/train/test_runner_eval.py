"""The evaluation after each stage of run_sequence / finetune (issue 12): its dtype (--dtype; training
unchanged), the placement and backend recorded in eval.json, and the optional vLLM backend's plumbing
(refused before anything is written where it cannot run; handed each stage's checkpoint directory)."""

import json
import sys

import pytest
import torch
from click.testing import CliRunner

from trace_transfer.errors import ConfigError
from trace_transfer.evaluation import vllm_backend
from trace_transfer.train.loop import TrainConfig
from trace_transfer.train.methods import Stage
from trace_transfer.train.runner import run_sequence

MATH = "synthetic:math?n_train=16&n_eval=4"
CODE = "synthetic:code?n_train=16&n_eval=4"
CFG = TrainConfig(lr=3e-3, max_steps=2, batch_size=8, seq_len=32, warmup_ratio=0.0)
STAGES = [Stage(MATH), Stage(CODE)]


def _eval(out, k):
    return json.loads((out / f"stage_{k}" / "eval.json").read_text())


def test_eval_dtype_is_recorded_and_leaves_training_alone(tiny_llama, tmp_path):
    """auto on CPU is fp32 (the scores of before --dtype existed); bf16 changes the evaluation only."""
    a = run_sequence(tiny_llama, STAGES[:1], "full", tmp_path / "auto", CFG, eval_limit=4, device="cpu")
    b = run_sequence(tiny_llama, STAGES[:1], "full", tmp_path / "bf16", CFG, eval_limit=4, device="cpu", dtype="bf16")
    for k in (0, 1):
        assert _eval(tmp_path / "auto", k)["evaluation"] == {"placement": "whole", "dtype": "float32", "backend": "hf"}
        assert _eval(tmp_path / "bf16", k)["evaluation"] == {"placement": "whole", "dtype": "bfloat16", "backend": "hf"}
    assert a.results["per_stage"][0]["losses"] == b.results["per_stage"][0]["losses"]
    from safetensors.torch import load_file

    wa, wb = (load_file(str(tmp_path / d / "stage_1" / "model.safetensors")) for d in ("auto", "bf16"))
    assert all(wa[n].dtype == torch.float32 and torch.equal(wa[n], wb[n]) for n in wa)  # the checkpoint stays fp32
    # Neither is part of the run's identity: a resume may change them (another machine), old runs still resume.
    ident = json.loads((tmp_path / "auto" / "run.json").read_text())["identity"]
    assert not {"dtype", "eval_dtype", "eval_backend", "device"} & set(ident)
    with pytest.raises(ConfigError, match="--dtype 'int8'"):
        run_sequence(tiny_llama, STAGES[:1], "full", tmp_path / "bad", CFG, dtype="int8", device="cpu")
    assert not (tmp_path / "bad").exists()


def test_vllm_refusals_write_nothing(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError, as where it is absent
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"not installed.*pip install vllm"):
        run_sequence(tiny_llama, STAGES, "full", out, CFG, eval_limit=2, device="cpu", eval_backend="vllm")
    ds = tmp_path / "ds.json"
    ds.write_text("{}")
    with pytest.raises(ConfigError, match="does not run inside a torchrun/DeepSpeed launch"):
        run_sequence(tiny_llama, STAGES, "full", out, CFG, deepspeed_config=ds, eval_backend="vllm")
    monkeypatch.setattr(vllm_backend, "_import_vllm", lambda: object())  # "installed"
    with pytest.raises(ConfigError, match="is not a local directory"):
        run_sequence("someone/some-model", STAGES, "full", out, CFG, device="cpu", eval_backend="vllm")
    with pytest.raises(ConfigError, match="choose one of hf, vllm"):
        run_sequence(tiny_llama, STAGES, "full", out, CFG, device="cpu", eval_backend="tgi")
    assert not out.exists()
    result = CliRunner().invoke(_cli(), ["finetune", "--model", tiny_llama, "--stage", MATH, "--method", "full",
                                         "--out", str(out), "--eval-backend", "vllm", "--deepspeed", str(ds)])
    assert result.exit_code != 0 and "does not run inside a torchrun/DeepSpeed launch" in result.output
    assert not out.exists()


def _cli():
    from trace_transfer.cli import main

    return main


def test_vllm_backend_reaches_every_stage_evaluation(tiny_llama, tmp_path, monkeypatch):
    """With vLLM 'installed' (generate_vllm replaced: no vLLM scores are claimed here), each row's
    generation is handed that row's checkpoint directory, and the engine is released after each."""
    seen, released = [], []
    monkeypatch.setattr(vllm_backend, "_import_vllm", lambda: object())
    monkeypatch.setattr(vllm_backend, "release_engines", lambda: released.append(len(seen)))

    def fake_generate(checkpoint, tokenizer, prompt_ids, *, max_new_tokens):
        seen.append(str(checkpoint))
        return [""] * len(prompt_ids)

    monkeypatch.setattr(vllm_backend, "generate_vllm", fake_generate)
    out = tmp_path / "run"
    r = run_sequence(tiny_llama, STAGES, "full", out, CFG, eval_limit=2, device="cpu", eval_backend="vllm",
                     monitor=["synthetic:general?n_eval=2"])
    assert r.results["complete"]
    dirs = [str(tiny_llama), str(out / "stage_1"), str(out / "stage_2")]
    # per row: math and code (exact_match) and the monitored task; every call names that row's weights
    assert [d for d in dict.fromkeys(seen)] == dirs and len(seen) >= 3 * 2
    assert len(released) == 3
    assert all(_eval(out, k)["evaluation"]["backend"] == "vllm" for k in (0, 1, 2))


def test_finetune_cli_passes_dtype_and_backend(tiny_llama, tmp_path, monkeypatch):
    import trace_transfer.train.runner as runner

    got = {}

    def fake(*args, **kwargs):
        got.update(kwargs)
        raise ConfigError("stop here")

    monkeypatch.setattr(runner, "run_sequence", fake)
    result = CliRunner().invoke(_cli(), ["finetune", "--model", tiny_llama, "--stage", MATH, "--out",
                                         str(tmp_path / "o"), "--dtype", "bf16", "--eval-backend", "vllm"])
    assert "stop here" in result.output, result.output
    assert (got["dtype"], got["eval_backend"], got["device"]) == ("bf16", "vllm", "auto")


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_device_map_evaluation_gives_the_single_process_rows(tiny_llama, tmp_path, monkeypatch):
    """The runner's DeepSpeed path on 2 gloo ranks (tests/train/ds_scripts/runner_ranks.py: training
    through the plain loop) with the rank-0-alone placement forced: every row equals one process's, and
    each stage's eval.json says device-map."""
    from pathlib import Path

    from _tiny_masking import coreset_at, run_two_cpu_ranks

    from trace_transfer.evaluation.distributed import PLACEMENT_ENV
    from trace_transfer.models import load_model

    core = str(coreset_at(load_model(tiny_llama), "row", seed=0).save(tmp_path / "c.coreset.safetensors"))
    stages = [[MATH, core], [CODE, core]]
    single = run_sequence(tiny_llama, [Stage(t, c) for t, c in stages], "trace", tmp_path / "single", CFG,
                          eval_limit=2, device="cpu")
    ds_config = tmp_path / "ds.json"
    ds_config.write_text("{}")
    out = tmp_path / "run"
    monkeypatch.setenv(PLACEMENT_ENV, "device-map")  # the launched ranks inherit it
    run_two_cpu_ranks(Path(__file__).parent / "ds_scripts" / "runner_ranks.py", str(tiny_llama), json.dumps(stages),
                      str(out), str(ds_config), "ok", timeout=600)
    r0, r1 = (json.loads((tmp_path / f"run.rank{r}.json").read_text()) for r in (0, 1))
    assert "error" not in r0 and "error" not in r1, (r0, r1)
    assert r0["R"] == r1["R"] == single.R
    assert [_eval(out, k)["evaluation"]["placement"] for k in (0, 1, 2)] == ["device-map"] * 3
