"""Sequential runner: every method on a tiny model (2–3 stages, a few steps), the on-disk contract,
what each method may and may not change, and resume after a hard kill mid-stage."""

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from trace_transfer.checkpoint import open_checkpoint
from trace_transfer.coreset import CoreSet, UnitLayout
from trace_transfer.errors import ConfigError
from trace_transfer.models import load_model
from trace_transfer.train.loop import TrainConfig
from trace_transfer.train.methods import MethodOptions, Stage, available_methods, register_method
from trace_transfer.train.runner import KILL_ENV, MARKER, completed_stages, run_sequence
from trace_transfer.train.verify import verify_frozen

# Small synthetic tasks: a few dozen training examples, 6 eval prompts each.
MATH = "synthetic:math?n_train=48&n_eval=6"
MEDICAL = "synthetic:medical?n_train=48&n_eval=6"
CODE = "synthetic:code?n_train=48&n_eval=6"
CFG = TrainConfig(lr=3e-3, max_steps=3, batch_size=8, seq_len=32, warmup_ratio=0.0)


def _row_coreset(model, path, seed, share=0.3, task=None):
    g = torch.Generator().manual_seed(seed)
    masks, layouts = {}, {}
    for n, p in model.named_parameters():
        if p.dim() == 2:
            masks[n] = torch.rand(p.shape[0], generator=g) < share
            layouts[n] = UnitLayout.rows()
    cs = CoreSet.from_unit_masks(masks, layouts, model, metadata={"strategy": "random", "task": task, "seed": seed})
    return str(cs.save(path))


@pytest.fixture(scope="module")
def cores(tiny_llama, tmp_path_factory):
    d = tmp_path_factory.mktemp("cores")
    model = load_model(tiny_llama)
    return [_row_coreset(model, d / f"{t}.coreset.safetensors", i, task=t) for i, t in enumerate(["math", "medical", "code"])]


def _stages(cores, n=2):
    return [Stage(t, c) for t, c in zip([MATH, MEDICAL, CODE][:n], cores)]


def _weights(path):
    return {n: t for n, t in open_checkpoint(path).iter_tensors()}


def test_registry_holds_the_six_methods():
    assert {"trace", "full", "lora", "joint", "replay", "general-core"} <= set(available_methods())
    with pytest.raises(ConfigError, match="already registered"):
        register_method(type("Dup", (), {"name": "full", "check": 0, "plan": 0, "examples": 0, "prepare": 0}))


def test_full_layout_on_disk_and_results(tiny_llama, cores, tmp_path):
    out = tmp_path / "full"
    r = run_sequence(tiny_llama, _stages(cores, 2), "full", out, CFG, eval_limit=4)
    assert completed_stages(out) == [0, 1, 2]
    for k in (1, 2):
        d = out / f"stage_{k}"
        assert (d / MARKER).exists() and (d / "model.safetensors").exists() and (d / "tokenizer.json").exists()
        assert json.loads((d / "eval.json").read_text())["stage"] == k
    res = json.loads((out / "results.json").read_text())
    assert res["complete"] and res["R"] == r.R and len(res["R"]) == 3 and len(res["R"][0]) == 2
    assert res["metrics"]["aa"] == pytest.approx(sum(res["R"][-1]) / 2)
    assert "denominator T-1" in res["metrics"]["conventions"]["BWT"]
    assert [s["steps"] for s in res["per_stage"]] == [3, 3]
    assert all(len(s["losses"]) == 3 for s in res["per_stage"])
    prov = res["provenance"]
    assert prov["method"] == "full" and prov["config"]["lr"] == CFG.lr and "torch" in prov["versions"]
    assert prov["seeds"]["stage_k"] == "config.seed + k"
    assert prov["coresets"][0]["path"] == cores[0]  # recorded even when the method ignores them
    assert "| before |" in (out / "results.md").read_text()
    # every parameter moved in full fine-tuning
    assert not verify_frozen(out / "stage_1", out / "stage_2").ok


def test_trace_changes_only_each_stages_core(tiny_llama, cores, tmp_path):
    out = tmp_path / "trace"
    run_sequence(tiny_llama, _stages(cores, 3), "trace", out, CFG, eval_limit=2)
    prev = tiny_llama
    for k in (1, 2, 3):
        rep = verify_frozen(prev, out / f"stage_{k}", cores[k - 1])
        assert rep.ok, rep.format()
        assert rep.changed_in_core > 0  # and the core did learn
        prev = out / f"stage_{k}"


def test_strict_isolation_never_touches_earlier_cores(tiny_llama, cores, tmp_path):
    out = tmp_path / "strict"
    r = run_sequence(tiny_llama, _stages(cores, 2), "trace", out, CFG, eval_limit=2,
                     options=MethodOptions(isolation="strict"))
    core2_only = CoreSet.load(cores[1]) - CoreSet.load(cores[0])
    assert verify_frozen(out / "stage_1", out / "stage_2", core2_only).ok
    info = r.results["per_stage"][1]["method_info"]
    assert info["isolation"] == "strict" and info["removed_by_isolation"] > 0
    # without strict isolation the overlap is re-trained
    loose = run_sequence(tiny_llama, _stages(cores, 2), "trace", tmp_path / "loose", CFG, eval_limit=2)
    assert not verify_frozen(tmp_path / "loose" / "stage_1", tmp_path / "loose" / "stage_2", core2_only).ok
    assert loose.results["per_stage"][1]["method_info"]["trainable_params"] > info["trainable_params"]


def test_general_core_keeps_the_general_core_and_trains_the_rest(tiny_llama, cores, tmp_path):
    out = tmp_path / "gc"
    r = run_sequence(tiny_llama, [Stage(MATH), Stage(CODE)], "general-core", out, CFG, eval_limit=2,
                     options=MethodOptions(general_coreset=cores[2]))
    complement = ~CoreSet.load(cores[2])
    for a, b in ((tiny_llama, out / "stage_1"), (out / "stage_1", out / "stage_2")):
        rep = verify_frozen(a, b, complement)
        assert rep.ok, rep.format()
        assert rep.changed_in_core > 0
    assert r.results["provenance"]["general_coreset"]["path"] == cores[2]


def test_lora_merges_adapters_after_every_stage(tiny_llama, cores, tmp_path):
    out = tmp_path / "lora"
    r = run_sequence(tiny_llama, _stages(cores, 2), "lora", out, CFG, eval_limit=2)
    names = set(open_checkpoint(out / "stage_2").names())
    assert names == set(open_checkpoint(tiny_llama).names())  # a plain model: no lora_A / lora_B left
    assert not any("lora" in n for n in names)
    base, s1 = _weights(tiny_llama), _weights(out / "stage_1")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(base[q], s1[q])  # merged update landed in the linear weight
    norm = "model.norm.weight"
    assert torch.equal(base[norm], s1[norm])  # norms are not LoRA targets
    info = r.results["per_stage"][0]["method_info"]
    assert info["merged_after_stage"] and info["lora_r"] == 8 and info["trainable_params"] < info["total_params"]


def test_joint_is_one_run_over_all_tasks(tiny_llama, cores, tmp_path):
    r = run_sequence(tiny_llama, _stages(cores, 2), "joint", tmp_path / "joint", CFG, eval_limit=2)
    assert len(r.R) == 2
    st = r.results["per_stage"][0]
    assert st["tasks"] == [r.results["tasks"][0], r.results["tasks"][1]]
    assert st["steps"] == 2 * CFG.max_steps  # as many steps as the sequential stream
    assert r.metrics["bwt"] is None and r.metrics["aa"] is not None
    assert r.results["complete"]


def test_replay_mixes_a_share_of_earlier_data(tiny_llama, cores, tmp_path):
    r = run_sequence(tiny_llama, _stages(cores, 3), "replay", tmp_path / "replay", CFG, eval_limit=2,
                     options=MethodOptions(replay_share=0.25))
    n = [s["num_examples"] if "num_examples" in s else None for s in r.results["per_stage"]]
    stage_json = [json.loads((tmp_path / "replay" / f"stage_{k}" / "stage.json").read_text()) for k in (1, 2, 3)]
    assert [s["num_examples"] for s in stage_json] == [48, 48 + math.ceil(0.25 * 48), 48 + 2 * math.ceil(0.25 * 48)]
    assert n  # per_stage present


def test_problems_are_reported_before_any_work(tiny_llama, cores, tmp_path):
    with pytest.raises(ConfigError) as e:
        run_sequence(tiny_llama, [Stage(MATH), Stage(MATH)], "trace", tmp_path / "x", CFG)
    msg = str(e.value)
    assert "stage 1" in msg and "stage 2" in msg and "more than one stage" in msg
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match="general-coreset"):
        run_sequence(tiny_llama, [Stage(MATH)], "general-core", tmp_path / "y", CFG)
    with pytest.raises(ConfigError, match="unknown method 'magic'.*trace"):
        run_sequence(tiny_llama, [Stage(MATH)], "magic", tmp_path / "z", CFG)


def test_existing_run_needs_resume_and_same_settings(tiny_llama, cores, tmp_path):
    out = tmp_path / "run"
    first = run_sequence(tiny_llama, [Stage(MATH)], "full", out, CFG, eval_limit=2)
    with pytest.raises(ConfigError, match="--resume"):
        run_sequence(tiny_llama, [Stage(MATH)], "full", out, CFG, eval_limit=2)
    with pytest.raises(ConfigError, match="config"):
        run_sequence(tiny_llama, [Stage(MATH)], "full", out, TrainConfig(lr=1e-4, max_steps=3), eval_limit=2,
                     resume=True)
    again = run_sequence(tiny_llama, [Stage(MATH)], "full", out, CFG, eval_limit=2, resume=True)
    assert again.R == first.R  # nothing left to do: the same results
    # How a stage runs is not part of what it is: checkpointing may be switched on for the resume.
    again = run_sequence(tiny_llama, [Stage(MATH)], "full", out, dataclasses.replace(CFG, gradient_checkpointing=True),
                         eval_limit=2, resume=True)
    assert again.R == first.R


_CHILD = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from trace_transfer.train.loop import TrainConfig
    from trace_transfer.train.methods import Stage
    from trace_transfer.train.runner import run_sequence
    model, out, c1, c2 = sys.argv[1:5]
    cfg = TrainConfig(lr=3e-3, max_steps=6, batch_size=8, seq_len=32, warmup_ratio=0.0)
    run_sequence(model, [Stage({MATH!r}, c1), Stage({CODE!r}, c2)], "trace", out, cfg, eval_limit=3)
""").format(MATH=MATH, CODE=CODE)


@pytest.mark.slow
def test_resume_after_a_hard_kill_mid_stage_is_bit_identical(tiny_llama, cores, tmp_path):
    torch.set_num_threads(1)
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    env = {**os.environ, KILL_ENV: "2:3"}  # SIGKILL after optimizer step 3 of stage 2
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(tiny_llama), str(killed), cores[0], cores[2]],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert completed_stages(killed) == [0, 1]
    assert not (killed / "stage_2" / MARKER).exists()

    cfg = TrainConfig(lr=3e-3, max_steps=6, batch_size=8, seq_len=32, warmup_ratio=0.0)
    stages = [Stage(MATH, cores[0]), Stage(CODE, cores[2])]
    resumed = run_sequence(tiny_llama, stages, "trace", killed, cfg, eval_limit=3, resume=True)
    reference = run_sequence(tiny_llama, stages, "trace", clean, cfg, eval_limit=3)
    assert resumed.R == reference.R
    assert resumed.results["per_stage"][1]["losses"] == reference.results["per_stage"][1]["losses"]
    a, b = _weights(killed / "stage_2"), _weights(clean / "stage_2")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_a_stage_without_its_marker_is_redone(tiny_llama, cores, tmp_path):
    # Killed after the checkpoint was written but before the marker: the stage is not complete.
    out = tmp_path / "run"
    first = run_sequence(tiny_llama, _stages(cores, 2), "full", out, CFG, eval_limit=2)
    (out / "stage_2" / MARKER).unlink()
    (out / ".stage_2.leftover").mkdir()  # a temp dir of an interrupted checkpoint write
    assert completed_stages(out) == [0, 1]
    again = run_sequence(tiny_llama, _stages(cores, 2), "full", out, CFG, eval_limit=2, resume=True)
    assert again.R == first.R and completed_stages(out) == [0, 1, 2]
    assert not (out / ".stage_2.leftover").exists()


def _torchrun_or_skip():
    import shutil

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("needs torchrun")
    return torchrun


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["ok", "fail"])
def test_two_ranks_only_rank_0_writes_and_its_failure_stops_both(tiny_llama, cores, tmp_path, mode):
    """The runner's DeepSpeed path on 2 gloo ranks (training through the plain loop, so no DeepSpeed
    start-up): rank 1 writes nothing, yet returns rank 0's results; a rank that reaches the run-directory
    check late does not mistake rank 0's fresh run.json for an earlier run; an error on rank 0 ends rank 1
    too, at once, instead of leaving it at a barrier until the process group times out."""
    from pathlib import Path

    script = Path(__file__).parent / "ds_scripts" / "runner_ranks.py"
    ds_config = tmp_path / "ds.json"
    ds_config.write_text("{}")
    out = tmp_path / "run"
    stages = json.dumps([[MATH, cores[0]], [CODE, cores[2]]])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [_torchrun_or_skip(), "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
           str(script), str(tiny_llama), stages, str(out), str(ds_config), mode]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    r0, r1 = (json.loads((tmp_path / f"run.rank{r}.json").read_text()) for r in (0, 1))
    assert r1["writes"] == []
    if mode == "fail":
        assert r0["error"].startswith("OSError: no space left")
        # the stage is saved collectively (streamed from every rank's shard): rank 0's error reaches rank 1
        assert r1["error"].startswith("ArtifactError: rank 0 failed while saving") and "stage_1: OSError" in r1["error"]
        assert r1["seconds"] < 100  # the process group's timeout is 120 s
        assert not (out / "stage_1").exists() and not (out / "results.json").exists()
        return
    assert "error" not in r0 and "error" not in r1, (r0, r1)
    assert r0["R"] == r1["R"] and len(r0["R"]) == 3 and (r0["rank"], r1["rank"]) == (0, 1)
    written = {Path(p).relative_to(out).as_posix() for p in r0["writes"]}
    assert {"run.json", "stage_0/eval.json", "stage_0/COMPLETE", "stage_1", "stage_1/eval.json", "stage_2",
            "results.json", "results.md", "accuracy_matrix.png"} <= written
    assert json.loads((out / "results.json").read_text())["complete"]


def test_plain_runner_refuses_a_multi_process_launch(tiny_llama, cores, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="without a DeepSpeed config"):
        run_sequence(tiny_llama, _stages(cores, 1), "full", tmp_path / "run", CFG, eval_limit=2)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_finetune_under_deepspeed_zero3_two_cpu_ranks(tiny_llama, cores, tmp_path):
    """The same runner through the DeepSpeed glue: 2 ranks on CPU (gloo), ZeRO-3, a row-level CoreSet per
    stage. Non-core elements stay bit-identical, the loss goes down, rank 0 writes one results.json, and
    the scores both ranks computed together (3 items, batches of 1: 2 + 1) are one process's, exactly."""
    import shutil
    from pathlib import Path

    pytest.importorskip("deepspeed")
    torchrun = _torchrun_or_skip()
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("needs a C++ compiler (DeepSpeed builds a small CPU op)")
    port = _free_port()
    ds_config = Path(__file__).parents[2] / "examples" / "deepspeed" / "ds_zero3.json"
    out = tmp_path / "ds"
    # The code stage scored by perplexity: exact_match scores of a barely trained model are all 0.
    code_ppl = tmp_path / "code_ppl.yaml"
    code_ppl.write_text("name: code_ppl\nmetric: perplexity\n"
                        "data: {synthetic: code, params: {n_train: 48, n_eval: 6}}\n")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [torchrun, "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={port}",
           "-m", "trace_transfer", "finetune", "--model", str(tiny_llama), "--method", "trace",
           "--stage", f"{MATH}:{cores[0]}", "--stage", f"{code_ppl}:{cores[2]}", "--deepspeed", str(ds_config),
           "--max-steps", "4", "--lr", "3e-3", "--batch-size", "4", "--seq-len", "32", "--warmup-ratio", "0",
           "--eval-limit", "3", "--eval-batch-size", "1", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    res = json.loads((out / "results.json").read_text())
    assert res["complete"] and len(res["R"]) == 3
    assert res["provenance"]["deepspeed_config"] == str(ds_config)
    for k, core, prev in ((1, cores[0], tiny_llama), (2, cores[2], out / "stage_1")):
        rep = verify_frozen(prev, out / f"stage_{k}", core)
        assert rep.ok, rep.format()
        assert rep.changed_in_core > 0
    losses = res["per_stage"][0]["losses"]
    assert losses[-1] < losses[0]
    from trace_transfer.data import load_task
    from trace_transfer.evaluation import evaluate
    from trace_transfer.models import load_tokenizer

    tasks, tok = [load_task(MATH), load_task(str(code_ppl))], load_tokenizer(tiny_llama)
    for k, weights in ((0, tiny_llama), (1, out / "stage_1"), (2, out / "stage_2")):
        model = load_model(weights)
        saved = json.loads((out / f"stage_{k}" / "eval.json").read_text())["scores"]
        assert {t.name: evaluate(model, tok, t, limit=3, batch_size=1).score for t in tasks} == \
            {name: s["score"] for name, s in saved.items()}, k
    assert len({json.loads((out / f"stage_{k}" / "eval.json").read_text())["scores"]["code_ppl"]["score"]
                for k in (0, 1, 2)}) == 3  # a score that moves with the weights
