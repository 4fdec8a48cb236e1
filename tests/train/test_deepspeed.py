"""DeepSpeed glue: config filling and decay checks (in-process), and one 2-rank CPU launch that trains a
tiny Llama with a partial-tensor CoreSet under ZeRO-3 (deepspeed_train), ZeRO-2 (runner-style groups)
and HF CoreSetTrainer with a ZeRO-3 dict, then checks non-core elements bit-identical and the loss down."""

import json
from pathlib import Path

import pytest
from _tiny_masking import coreset_at, run_two_cpu_ranks, tiny_llama

pytest.importorskip("deepspeed")

from trace_transfer.errors import ConfigError  # noqa: E402
from trace_transfer.train.ds import deepspeed_train, load_ds_config  # noqa: E402
from trace_transfer.train.loop import TrainConfig  # noqa: E402
from trace_transfer.train.masking import apply_coreset  # noqa: E402
from trace_transfer.train.verify import verify_frozen  # noqa: E402

SCRIPT = Path(__file__).parent / "ds_scripts" / "zero_masked.py"
PHASES = ("zero3", "zero2", "trainer")


def test_auto_values_are_filled_from_the_training_settings():
    cfg = TrainConfig(lr=3e-4, batch_size=4, grad_accum=2, weight_decay=0.0, max_grad_norm=0.5, precision="fp32")
    conf = load_ds_config({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                           "bf16": {"enabled": "auto"}, "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
                           "zero_optimization": {"stage": 3}}, cfg, world_size=8)
    assert conf["train_micro_batch_size_per_gpu"] == 4 and conf["gradient_accumulation_steps"] == 2
    assert conf["train_batch_size"] == 64 and conf["gradient_clipping"] == 0.5
    assert conf["bf16"]["enabled"] is False and conf["optimizer"]["params"]["lr"] == 3e-4
    assert "zero_allow_untested_optimizer" not in conf  # DeepSpeed builds its own optimizer here
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu is 16"):
        load_ds_config({"train_micro_batch_size_per_gpu": 16}, cfg, world_size=1)


def test_shipped_example_configs_load():
    examples = Path(__file__).parents[2] / "examples" / "deepspeed"
    configs = sorted(examples.glob("ds_zero*.json"))
    assert len(configs) >= 2
    for path in configs:
        conf = load_ds_config(path, TrainConfig(batch_size=2, grad_accum=8), world_size=8)
        assert conf["train_batch_size"] == 128 and "optimizer" not in conf, path.name


def test_optimizer_section_with_decay_or_masked_decay_is_refused_before_launch():
    model = tiny_llama()
    cs = coreset_at(model, "row")
    cfg = TrainConfig(batch_size=2, weight_decay=0.1)
    section = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": "auto"}}}
    with pytest.raises(ConfigError, match="remove the 'optimizer' section"):
        deepspeed_train(model, lambda e: [], cfg, section, coreset=cs)
    assert all(p.requires_grad for p in model.parameters())  # the CoreSet was removed again
    handle = apply_coreset(model, cs, decay="masked")
    with pytest.raises(ConfigError, match="decay='masked' is not supported under DeepSpeed"):
        deepspeed_train(model, lambda e: [], cfg, {}, params=handle.param_groups(0.1))
    handle.remove()


@pytest.mark.slow
@pytest.mark.distributed
def test_two_rank_zero3_zero2_and_trainer_keep_non_core_bit_identical(tmp_path):
    out = tmp_path / "ds"
    run_two_cpu_ranks(SCRIPT, str(out), ",".join(PHASES))
    results = json.loads((out / "results.json").read_text())
    core = out / "core.coreset.safetensors"
    for phase in PHASES:
        report = verify_frozen(out / "base", out / phase, core)
        assert report.ok, f"{phase}:\n{report.format()}"
        assert report.changed_in_core > 0.5 * report.elements_allowed, phase
        losses = results[phase]["losses"]
        assert len(losses) == 6 and losses[-1] < losses[0] - 0.3, (phase, losses)
