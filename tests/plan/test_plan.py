"""The planner: shipped paper configs, a hand-checked step, the verdict ladder, the CLI, and the
activation formula against what autograd actually saves on a tiny model."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from trace_transfer.cli import main as cli
from trace_transfer.plan import Hardware, Setup, Trainable, activation_bytes, find_config, model_shape, train_memory
from trace_transfer.plan.hardware import GiB, parse_size
from trace_transfer.plan.planner import core_trainable

ROOT = Path(__file__).resolve().parents[2]
PAPER_MODELS = ROOT / "examples" / "paper_models"
PIPELINES = ROOT / "examples" / "pipelines"

# Published totals (model cards): LLaMA-3-8B 8.03B, Qwen2.5-14B 14.7B (14.77B counted), Qwen3-32B 32.8B.
PUBLISHED = {"meta-llama/Meta-Llama-3-8B": (8.03e9, 291), "Qwen/Qwen2.5-14B": (14.77e9, 579),
             "Qwen/Qwen3-32B": (32.8e9, 707)}


@pytest.fixture(scope="module")
def shapes():
    return {ref: model_shape(find_config(ref, roots=[PAPER_MODELS]), ref) for ref in PUBLISHED}


@pytest.mark.parametrize("ref", sorted(PUBLISHED))
def test_shipped_paper_configs_build_to_the_published_size(shapes, ref):
    published, n_tensors = PUBLISHED[ref]
    s = shapes[ref]
    assert abs(s.params - published) / published < 0.01, (ref, s.params)
    assert len(s.tensors) == n_tensors  # the same count the shipped rule files cover
    assert s.checkpoint_bytes == 2  # bf16 checkpoints


def test_hand_check_full_ft_of_8b_under_zero3_on_8_gpus(shapes):
    # docs/PLANNER.md "Hand check": bf16 weights + bf16 grads + fp32 master and moments = 16 B/param,
    # 128 GB for 8.03B parameters, 16 GB per GPU over 8 ranks; plus the fp32 gradient copy of the step.
    s = shapes["meta-llama/Meta-Llama-3-8B"]
    psi = s.params
    hw = Hardware(gpus_per_node=8)
    mem = train_memory(s, Trainable("full", psi, s.matmul_params), Setup("deepspeed", zero=3, world=8, micro_batch=4,
                                                                       seq_len=1024), hw)
    pg = mem["per_gpu"]
    fp32_grad_copy = 4 * min(psi // 8, 1_000_000_000)
    assert pg["params"] + pg["grads"] + pg["optimizer"] - fp32_grad_copy == pytest.approx(16 * psi / 8, rel=1e-9)
    assert 16 * psi / 8 == pytest.approx(16.06e9, rel=1e-3)
    # Activations by hand, bf16 (e = 2) per token and layer: 2·6·4096 (norms) + 3·2·4096 (Q, K, V repeated)
    # + 2·2·4096 (attention out + o_proj input) + 8·14336 (SwiGLU) = 204,800 bytes; the head: final norm
    # 6·4096, logits 2·V, their fp32 upcast 4·V and the fp32 log-softmax 4·V.
    per_token = 32 * 204_800 + 6 * 4096 + 10 * 128_256
    assert activation_bytes(s, 4 * 1024, 1024, 2, 2, False) == per_token * 4 * 1024
    assert pg["activations"] == per_token * 4096
    # With checkpointing: the bf16 layer inputs + one layer + the head.
    assert activation_bytes(s, 4096, 1024, 2, 2, True) == (32 * 2 * 4096 + 204_800 + 6 * 4096 + 10 * 128_256) * 4096


def test_zero_stages_partition_what_the_zero_paper_says(shapes):
    s = shapes["Qwen/Qwen2.5-14B"]
    tr = Trainable("full", s.params, s.matmul_params)
    hw = Hardware(gpus_per_node=8)
    by = {z: train_memory(s, tr, Setup("deepspeed", zero=z, world=8), hw)["per_gpu"] for z in (0, 1, 2, 3)}
    assert by[0]["params"] == by[1]["params"] == by[2]["params"] == 8 * by[3]["params"]
    assert by[0]["grads"] == by[1]["grads"] == 8 * by[2]["grads"]
    assert by[0]["optimizer"] == 8 * by[1]["optimizer"]
    off = train_memory(s, tr, Setup("deepspeed", zero=3, world=8, offload_optimizer=True), hw)
    assert off["per_gpu"]["optimizer"] == 0 and off["host_per_node"] > by[3]["optimizer"] * 8


def test_core_trainable_bounds(shapes):
    s = shapes["Qwen/Qwen3-32B"]
    scope = s.params_in(("layers",))
    tensor = core_trainable(s, 0.05, "tensor", "tensors", "dense")
    assert 0.05 * scope < tensor.grad_params < scope  # the largest 5% of tensors: an upper bound
    dense = core_trainable(s, 0.05, "row", "params", "dense")
    sparse = core_trainable(s, 0.05, "row", "params", "sparse")
    assert dense.grad_params == scope
    assert sparse.grad_params == int(0.05 * scope) and sparse.extra_params == sparse.grad_params


def test_plan_on_the_paper_pipeline_gives_verdicts(tmp_path):
    from trace_transfer.pipeline.config import load_pipeline
    from trace_transfer.plan import plan

    path = PIPELINES / "paper-llama3-8b-to-qwen3-32b.yaml"
    p = plan(load_pipeline(path), Hardware(gpus_per_node=8), base_dir=path.parent, configs=[PAPER_MODELS],
             default_examples=1000)
    steps = {s.name.split(" x")[0]: s for s in p.steps}
    # The probes are launched under the config's ZeRO-3 on 8 ranks (tests/plan/test_probe_plan.py): the 8B
    # source fits; the 32B target (every parameter trained, plus the Fisher accumulator) fits with the
    # optimizer offload its launch.deepspeed_overrides entry gives it.
    assert steps["probe source"].fits_as_configured and steps["probe source"].setup.startswith("ZeRO-3 x8")
    assert steps["probe target"].verdict == "fits" and "offload opt" in steps["probe target"].setup
    assert steps["ft full"].memory["per_gpu"]["params"] == 2 * p.models["target"].params // 8
    assert all(s.verdict for s in p.steps)
    opts = steps["ft full"].options  # every ZeRO variant, for scripts that pick their own trade-off
    assert opts["zero0"]["per_gpu"] > opts["zero2"]["per_gpu"] > opts["zero3"]["per_gpu"] > opts["zero3+ckpt"]["per_gpu"]
    assert opts["zero3+offload_opt+ckpt"]["fits"] and not opts["zero0"]["fits"]
    assert steps["ft full"].seconds[0] < steps["ft full"].seconds[1]


def test_more_gpus_when_nothing_else_fits(shapes):
    from trace_transfer.plan.planner import _train_verdict

    s = shapes["Qwen/Qwen3-32B"]
    hw = Hardware(gpus_per_node=1, host_memory=64 * GiB)  # too little host memory to offload
    verdict, setup, mem = _train_verdict(s, Trainable("full", s.params, s.matmul_params),
                                         Setup("single", micro_batch=1, seq_len=512), hw)
    assert verdict.startswith("needs ") and "more GPUs" in verdict and setup.world > 1
    assert mem["total"] <= hw.budget


def test_cli_json_on_the_tiny_pipeline():
    # --examples for the 80k-example general task: counting it takes seconds; the stream tasks are counted.
    res = CliRunner().invoke(cli, ["plan", str(PIPELINES / "tiny.yaml"), "--json", "--gpus", "2", "--gpu-mem", "24GiB",
                                   "--examples", "synthetic:general=80000", "--set", "scoring.granularity=element",
                                   "--set", "training.gradient_checkpointing=true"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["format"] == "trace-transfer/plan" and out["hardware"]["gpus_per_node"] == 2
    assert out["hardware"]["gpu_memory"] == 24 * GiB
    names = [s["name"] for s in out["steps"]]
    assert any(n.startswith("probe source") for n in names) and any(n.startswith("ft full") for n in names)
    assert all(s["verdict"] == "fits" for s in out["steps"])  # tiny models fit anything
    ft = next(s for s in out["steps"] if s["name"].startswith("ft full"))
    assert ft["seconds"] is not None  # synthetic tasks are counted offline
    assert any(n.startswith("ft element 10% sparse") for n in names)  # --set reached the plan
    # the JSON carries, per step, what the config runs and the key that sets it
    assert all(s["gradient_checkpointing"] and s["checkpointing_key"] == "training.gradient_checkpointing"
               for s in out["steps"] if s["name"].startswith("ft "))
    assert not any(s["gradient_checkpointing"] for s in out["steps"] if not s["name"].startswith("ft "))


def test_cli_table_fits_80_columns_and_hub_ids_need_configs():
    path = str(PIPELINES / "paper-llama3-8b-to-qwen2.5-14b.yaml")
    res = CliRunner().invoke(cli, ["plan", path, "--configs", str(PAPER_MODELS), "--gpus", "8"])
    assert res.exit_code == 0, res.output
    assert max(len(line) for line in res.output.splitlines()) <= 80
    assert "verdict" in res.output and "probe source x3" in res.output
    missing = CliRunner().invoke(cli, ["plan", path], env={"TRACE_TRANSFER_MODEL_CONFIGS": ""})
    assert missing.exit_code != 0 and "--configs" in missing.output


def test_plan_counts_a_scored_coreset_exactly(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from trace_transfer.coreset import CoreSet, UnitLayout
    from trace_transfer.models import build_tokenizer, tiny_config
    from trace_transfer.pipeline.config import load_pipeline
    from trace_transfer.plan import plan

    # the target of examples/pipelines/tiny.yaml: Qwen3, 3 layers, hidden 48, BPE vocabulary
    cfg = tiny_config("qwen3", 3, 48, 4, 2, vocab_size=len(build_tokenizer("bpe")))
    model = AutoModelForCausalLM.from_config(cfg)
    q, up = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"
    rows = torch.zeros(model.get_parameter(q).shape[0], dtype=torch.bool)
    rows[:2] = True
    cs = CoreSet.from_unit_masks({q: rows, up: torch.tensor([True])}, {q: UnitLayout.rows(), up: UnitLayout()}, model,
                                 metadata={"strategy": "lf", "granularity": "row"})
    path = cs.save(tmp_path / "math.coreset.safetensors")
    pipeline = load_pipeline(PIPELINES / "tiny.yaml")
    steps = {s.name: s for s in plan(pipeline, Hardware(), base_dir=PIPELINES, coresets=[path],
                                     examples={"synthetic:general": 100}).steps}
    exact = steps["ft coreset math"]
    # the whole up_proj, and δ = 2 rows of q_proj under apply_coreset's auto (sparse) masking
    assert exact.trainable_params == model.get_parameter(up).numel() + 2 * 48
    assert set(exact.methods) == {"trace-lf", "trace-cs", "transfer-lf", "transfer-cs"}
    assert not any(n.startswith("ft row") for n in steps)  # the bounds are gone


def test_inference_verdicts(shapes):
    from trace_transfer.plan.planner import _inference_step

    s, hw = shapes["Qwen/Qwen3-32B"], Hardware(gpus_per_node=8)
    assert _inference_step("eval", [s], 1, 512, 64, None, hw, loglik=False).verdict == "fits"
    assert _inference_step("eval", [s], 16, 1024, 256, None, hw, loglik=True).verdict == "needs 2 GPUs (device_map)"
    # full-sequence logits of a huge batch stay on one GPU whatever device_map does
    assert _inference_step("eval", [s], 512, 4096, 256, None, hw, loglik=True).verdict.startswith("does not fit")


@pytest.mark.parametrize("text,expected", [("80GiB", 80 * GiB), ("80GB", 80 * 10**9), ("141", 141 * GiB),
                                           ("1.5TiB", int(1.5 * 1024 * GiB))])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_activation_formula_matches_what_autograd_saves():
    # fp32 on CPU (e = 4): the bytes autograd saves in one forward + the logits the model returns,
    # against the estimate. bench/plan_vs_measured.py does the same at a larger size.
    import torch
    from transformers import AutoModelForCausalLM

    from trace_transfer.models import tiny_config

    cfg = tiny_config("qwen3", layers=2, hidden=64, heads=4, kv_heads=2, vocab_size=512)
    cfg.use_cache = False
    shape = model_shape(cfg.to_dict())
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).train()
    ids = torch.randint(4, 512, (4, 64))
    mask = torch.ones_like(ids)
    mask[0, :8] = 0  # a padded row, as in fine-tuning batches
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
    seen.setdefault(out.logits.untyped_storage().data_ptr(), out.logits.untyped_storage().nbytes())
    measured = sum(seen.values())
    estimated = activation_bytes(shape, ids.numel(), 64, 4, 4, False)
    assert 0.85 < measured / estimated < 1.1, (measured, estimated)


def test_verdict_follows_the_configs_gradient_checkpointing(shapes):
    # The paper's fine-tuning setup on 8 x 80 GB: ZeRO-3, micro-batch 4 x 1024 (ds_zero3.json's defaults).
    from trace_transfer.plan.estimate import with_
    from trace_transfer.plan.planner import CKPT_KEY, _train_step

    s, hw = shapes["Qwen/Qwen3-32B"], Hardware(gpus_per_node=8, gpu_memory=80 * GiB)
    z3 = Setup("deepspeed", zero=3, world=8, micro_batch=4, seq_len=1024)
    core = core_trainable(s, 0.1, "tensor", "tensors", "dense")
    off = _train_step("ft core", s, core, z3, hw, None, 1, ckpt_key=CKPT_KEY)
    on = _train_step("ft core", s, core, with_(z3, checkpointing=True), hw, None, 1,
                     ckpt_key=CKPT_KEY)
    # off: the one change is a key of the same config, named exactly
    assert not off.fits_as_configured and off.verdict == "fits only with training.gradient_checkpointing: true"
    assert off.suggestion_memory["total"] == on.memory["total"]
    # on: the verdict uses the checkpointed activations; both figures stay available
    assert on.fits_as_configured and on.verdict == "fits" and on.gradient_checkpointing
    assert on.memory["per_gpu"]["activations"] == on.memory["activations_ckpt"] < on.memory["activations_no_ckpt"]
    assert "grad ckpt" in on.setup and "grad ckpt" not in off.setup
    # full fine-tuning needs offload either way: the ladder names checkpointing only when it is off
    full = Trainable("full", s.params, s.matmul_params)
    full_off = _train_step("ft full", s, full, z3, hw, None, 1, ckpt_key=CKPT_KEY)
    full_on = _train_step("ft full", s, full, with_(z3, checkpointing=True), hw, None, 1,
                          ckpt_key=CKPT_KEY)
    assert full_off.verdict == "needs grad ckpt + offload opt" and f"grad ckpt: set {CKPT_KEY}: true" in full_off.notes
    assert full_on.verdict == "needs offload opt"


@pytest.mark.parametrize("name", ["paper-llama3-8b-to-qwen2.5-14b", "paper-llama3-8b-to-qwen3-32b"])
def test_paper_pipelines_turn_checkpointing_on_and_their_core_steps_fit(name):
    from trace_transfer.pipeline.config import load_pipeline
    from trace_transfer.plan import plan

    path = PIPELINES / f"{name}.yaml"
    cfg = load_pipeline(path)
    assert cfg.training.gradient_checkpointing  # docs/PLANNER.md: without it no fine-tuning step fits
    p = plan(cfg, Hardware(gpus_per_node=8, gpu_memory=80 * GiB), base_dir=path.parent, configs=[PAPER_MODELS],
             default_examples=1000)
    ft = {s.name.split(" x")[0]: s for s in p.steps if s.name.startswith("ft ")}
    assert all(s.gradient_checkpointing and s.checkpointing_key == "training.gradient_checkpointing"
               for s in ft.values())
    assert ft["ft lora r8"].verdict == "fits" and ft["ft tensor 10%"].verdict == "fits"
    assert not any("grad ckpt" in s.verdict or s.verdict.startswith("fits only") for s in ft.values())
    # inference steps know nothing of it
    assert all(not s.gradient_checkpointing for s in p.steps if s.kind != "train")


def _paper_32b(**launch):
    """The 32B paper pipeline planned on 8 x 80 GB, ``launch`` merged into its launch section."""
    from trace_transfer.pipeline.config import load_pipeline
    from trace_transfer.plan import plan

    path = PIPELINES / "paper-llama3-8b-to-qwen3-32b.yaml"
    raw = yaml.safe_load(path.read_text())
    raw["launch"] = {**raw["launch"], **launch}
    return plan(load_pipeline(raw, base_dir=path.parent), Hardware(gpus_per_node=8, gpu_memory=80 * GiB),
                base_dir=path.parent, configs=[PAPER_MODELS], default_examples=1000)


def test_planner_verdicts_follow_each_steps_deepspeed_config():
    """Each launched step is planned with the DeepSpeed JSON it runs with (launch.deepspeed_overrides, else
    launch.deepspeed): the shipped 32B paper pipeline gives optimizer offload to the steps that train every
    parameter, and every step fits; without the overrides those steps need offload; methods of one trainable
    set under two configs get a row each."""
    shipped = {s.name.split(" x")[0]: s for s in _paper_32b().steps}
    assert all(s.verdict == "fits" for n, s in shipped.items() if n != "eval per stage"), \
        {n: s.verdict for n, s in shipped.items()}
    for name in ("probe target", "ft full", "ft complement"):
        assert shipped[name].deepspeed == "../deepspeed/ds_zero3_offload.json" and "offload opt" in shipped[name].setup
    for name in ("probe source", "ft tensor 10%", "ft lora r8"):  # fit without; offload would only slow them
        assert shipped[name].deepspeed == "../deepspeed/ds_zero3.json" and "offload" not in shipped[name].setup
    assert set(shipped["ft full"].methods) == {"full", "joint", "replay", "cpi-ft"}
    plain = {s.name.split(" x")[0]: s for s in _paper_32b(deepspeed_overrides={}).steps}
    for name in ("probe target", "ft full", "ft complement"):
        assert plain[name].verdict == "needs offload opt", (name, plain[name].verdict)
        assert plain[name].suggestion_memory["total"] == shipped[name].memory["total"]
    split = {s.name.split(" x")[0]: s for s in _paper_32b(deepspeed_overrides={
        "full": "../deepspeed/ds_zero3_offload.json"}).steps}
    off, on = split["ft full [ds_zero3_offload.json]"], split["ft full [ds_zero3.json]"]
    assert off.methods == ["full"] and off.verdict == "fits" and on.verdict == "needs offload opt"
    assert set(on.methods) == {"joint", "replay", "cpi-ft"}


def test_more_gpus_only_in_world_sizes_that_split_the_probe_batch():
    """The ladder's "needs N more GPUs" for a probe suggests a world size that divides its global batch
    (probe.batch_size is split evenly over the ranks), or says the batch must change."""
    from trace_transfer.plan.planner import _train_verdict

    hw = Hardware(gpus_per_node=8, gpu_memory=80 * GiB)

    def memory(shape, tr, setup, hw):  # fits from 10 ranks on, whatever else the ladder tries
        return {"total": hw.budget * 10 / setup.world, "host_per_node": 0}

    base = Setup("deepspeed", zero=3, world=8, micro_batch=24, global_batch=24, seq_len=1024, checkpointing=True)
    verdict, setup, _ = _train_verdict(None, None, base, hw, memory)
    assert verdict == "needs 4 more GPUs (ZeRO-3 x12)" and setup.world == 12 and setup.per_rank_batch() == 2
    verdict, setup, _ = _train_verdict(None, None, replace(base, micro_batch=8, global_batch=8), hw, memory)
    assert verdict == "needs 2 more GPUs (ZeRO-3 x10; probe.batch_size 8 must become a multiple of 10)"
    verdict, _, _ = _train_verdict(None, None, replace(base, global_batch=0), hw, memory)  # fine-tuning: any
    assert verdict == "needs 2 more GPUs (ZeRO-3 x10)"
