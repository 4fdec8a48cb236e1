"""LoRA saved without gathering the model (issue 12, Left 3): ``save_consolidated`` merges each LoRA
layer's adapters into its base weight tensor by tensor, so a ZeRO-3 LoRA stage is streamed like every
other method's. One process first (the function works on an unsharded PEFT model too): the streamed
checkpoint equals ``merge_and_unload()`` + ``save_pretrained`` bit for bit. Then 2 CPU ranks under
ZeRO-3, through the runner: its LoRA stage checkpoint equals the old gather-then-merge path's."""

import copy
import json
from pathlib import Path

import pytest
import torch
from _tiny_masking import run_two_cpu_ranks, tiny_llama
from train.test_ds_save import assert_same_checkpoint

from trace_transfer.errors import ConfigError

MiB = 2**20


def _lora(model, **kwargs):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM", **kwargs)
    peft_model = get_peft_model(model, config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B starts at zero, which would merge nothing: give every factor values
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.1)
    return peft_model


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                      bos_token_id=0, eos_token_id=0))


@pytest.mark.parametrize("case", ["llama", "llama-tied", "llama-bf16", "gpt2-fan-in-fan-out"])
def test_streamed_lora_save_is_merge_and_unload_then_save_pretrained(tmp_path, case):
    from trace_transfer.models import build_tokenizer
    from trace_transfer.train.ds import save_consolidated

    if case.startswith("gpt2"):
        base = _tiny_gpt2()  # Conv1D layers: PEFT sets fan_in_fan_out, so ΔW is (B·A)ᵀ
    else:
        base = tiny_llama(tie=case == "llama-tied", dtype=torch.bfloat16 if case == "llama-bf16" else torch.float32)
    model = _lora(base)
    tokenizer = build_tokenizer("char")
    save_consolidated(model, tmp_path / "stream", tokenizer)
    assert not any("lora" in p.name for p in (tmp_path / "stream").iterdir())
    merged = copy.deepcopy(model).merge_and_unload()
    merged.save_pretrained(tmp_path / "old")
    assert_same_checkpoint(tmp_path / "stream", tmp_path / "old")
    # the save left the PEFT model as it was: adapters in place, base weights unmerged
    assert not any(m.merged for m in model.modules() if hasattr(m, "merged_adapters"))
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "stream" / "model.safetensors")
    name = "transformer.h.0.attn.c_attn.weight" if case.startswith("gpt2") else "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(saved[name], base.state_dict()[name.replace(".weight", ".base_layer.weight")])


@pytest.mark.parametrize("kwargs, match", [({"use_dora": True}, "DoRA"),
                                           ({"modules_to_save": ["lm_head"]}, "modules_to_save")])
def test_what_is_not_a_plain_lora_merge_is_refused_before_anything_is_written(tmp_path, kwargs, match):
    from trace_transfer.train.ds import save_consolidated

    model = _lora(tiny_llama(), **kwargs)
    with pytest.raises(ConfigError, match=match):
        save_consolidated(model, tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.distributed
def test_two_rank_zero3_lora_stage_is_streamed_merged_and_equals_gather_then_merge(tmp_path, monkeypatch):
    """2 CPU ranks, ZeRO-3, one LoRA stage through the runner on a ~27M-parameter Llama (104 MiB; the
    largest tensors are the untied 2048 x 512 embedding and head, 4 MiB each; the largest LoRA-wrapped
    weights are the 512 x 1536 MLP matrices, 3 MiB). The stage checkpoint, streamed with its adapters merged from the sharded
    engine, equals the old path's (every rank gathers the PEFT model, rank 0 merge_and_unload() +
    save_pretrained) bit for bit, and both runs score the same R. Each rank's resident-memory growth
    during the streamed save is bounded by

        2 x largest tensor + 3 x largest LoRA-wrapped weight + 16 MiB,

    (a gathered tensor and its transient copy, as in test_ds_save; for a LoRA weight on rank 0 the
    gathered weight, ΔW = B·A and the merged copy), and stays under half the model. glibc's mmap
    threshold is pinned to 1 MiB, as in test_ds_save, so freed tensors leave the process at once."""
    pytest.importorskip("deepspeed")
    from trace_transfer.models import build_tiny_model

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(MiB))
    model = build_tiny_model("llama", tmp_path / "model", layers=8, hidden=512, heads=8, kv_heads=4,
                             intermediate=1536, vocab_size=2048)
    # scored by perplexity, a score that moves with the weights (exact match of a 2-step model is 0)
    task = tmp_path / "math_ppl.yaml"
    task.write_text("name: math_ppl\nmetric: perplexity\ndata: {synthetic: math, params: {n_train: 8, n_eval: 2}}\n")
    out = tmp_path / "run"
    run_two_cpu_ranks(Path(__file__).parent / "ds_scripts" / "lora_zero3.py", str(model), str(task), str(out))
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        bound = 2 * r["largest_tensor_bytes"] + 3 * r["largest_lora_weight_bytes"] + 16 * MiB
        print(f"model {r['model_bytes'] / MiB:.1f} MiB; save growth {r['save_growth_bytes'] / MiB:.1f} MiB "
              f"(bound {bound / MiB:.1f})")
        assert r["save_growth_bytes"] <= bound, r
        assert r["save_growth_bytes"] < r["model_bytes"] / 2, r
        assert r["new_R"] == r["old_R"] == ranks[0]["new_R"]
        assert r["new_R"][1] != r["new_R"][0]  # the stage moved the score: the merge was written
    assert_same_checkpoint(out / "new" / "stage_1", out / "old_merged")
    assert_same_checkpoint(out / "old" / "stage_1", out / "old_merged")
