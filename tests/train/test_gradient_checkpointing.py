"""Gradient (activation) checkpointing in the training loop: the same loss and gradients as without it,
for full fine-tuning and for dense and sparse CoreSet masking, with non-core elements untouched."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from _tiny_masking import batches_fn, coreset_at, snapshot, tiny_llama
from trace_transfer.errors import ConfigError
from trace_transfer.train.config import TrainConfig
from trace_transfer.train.loop import causal_lm_loss, gradient_checkpointing, train
from trace_transfer.train.masking import apply_coreset
from trace_transfer.train.verify import verify_frozen

CFG = TrainConfig(lr=1e-2, max_steps=3, batch_size=4, warmup_ratio=0.0, scheduler="constant", max_grad_norm=1.0,
                  precision="fp32")
GC = dataclasses.replace(CFG, gradient_checkpointing=True)
# (name, granularity, masking); None = full fine-tuning
SETUPS = [("full", None, None), ("dense-row", "row", "dense"), ("sparse-row", "row", "sparse"),
          ("sparse-element", "element", "sparse")]


def _model(granularity, masking):
    torch.manual_seed(0)
    model = tiny_llama(seed=0)
    model.config.use_cache = True  # the loop must not need the config to say False
    handle = None
    if granularity is not None:
        handle = apply_coreset(model, coreset_at(model, granularity), masking=masking)
    return model, handle


def _layer_calls(model) -> list[int]:
    calls = [0]
    # A submodule: HF checkpoints the layer's forward (not __call__), so the layer's own hooks run once.
    model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _loss_and_grads(granularity, masking, cfg):
    model, _ = _model(granularity, masking)
    calls = _layer_calls(model)
    batch = batches_fn()(0)[0]
    model.train()
    with gradient_checkpointing(model, cfg):
        loss = causal_lm_loss(model, batch)
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.detach(), grads, calls[0], model


@pytest.mark.parametrize("name,granularity,masking", SETUPS, ids=[s[0] for s in SETUPS])
def test_loss_and_every_gradient_equal_with_and_without_checkpointing(name, granularity, masking):
    loss, grads, plain_calls, _ = _loss_and_grads(granularity, masking, CFG)
    loss_gc, grads_gc, gc_calls, model = _loss_and_grads(granularity, masking, GC)
    assert (plain_calls, gc_calls) == (1, 2), "checkpointing re-runs each layer's forward in the backward pass"
    torch.testing.assert_close(loss_gc, loss, rtol=0, atol=0)
    assert grads.keys() == grads_gc.keys() and grads
    if masking == "sparse":
        assert any(n.endswith("_sparse_delta") for n in grads), "the sparse deltas are what trains"
    for n in grads:
        torch.testing.assert_close(grads_gc[n], grads[n], rtol=1e-6, atol=1e-8, msg=n)
    # Off again after the block: eval and a later stage run without recomputation.
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert getattr(model, "_require_grads_hook", None) is None


@pytest.mark.parametrize("name,granularity,masking", SETUPS[1:3], ids=[s[0] for s in SETUPS[1:3]])
def test_masked_training_with_checkpointing_matches_and_keeps_non_core_bit_identical(name, granularity, masking):
    finals = {}
    for cfg in (CFG, GC):
        model, handle = _model(granularity, masking)
        before = snapshot(model)
        result = train(model, batches_fn(), cfg, params=handle.param_groups(cfg.weight_decay),
                       after_step=handle.after_step)
        handle.remove()
        after = snapshot(model)
        report = verify_frozen(before, after, coreset_at(model, granularity))
        assert report.ok and report.changed_in_core > 0, report.format()
        finals[cfg.gradient_checkpointing] = (result.losses, after)
        assert model.config.use_cache is True  # never written into the config (saved checkpoints keep it)
    (plain_losses, plain), (gc_losses, gc) = finals[False], finals[True]
    assert gc_losses == pytest.approx(plain_losses, rel=1e-6, abs=1e-7)
    for key in plain:
        torch.testing.assert_close(gc[key], plain[key], rtol=1e-5, atol=1e-7, msg=key)


def test_a_model_without_checkpointing_support_is_refused():
    class Toy(torch.nn.Module):
        def forward(self, **_):
            raise AssertionError("not reached")

    with pytest.raises(ConfigError, match="gradient-checkpointing"):
        with gradient_checkpointing(Toy(), GC):
            pass


def test_the_setting_reaches_the_cli_the_pipeline_and_the_probe():
    from trace_transfer.cli import main
    from trace_transfer.pipeline.config import TrainingSpec
    from trace_transfer.probe.config import ProbeConfig

    for command in ("finetune", "probe", "cpi-ft"):
        opt = next(p for p in main.commands[command].params if p.name == "gradient_checkpointing")
        assert opt.default is False and "--gradient-checkpointing" in opt.opts, command
    assert TrainingSpec().gradient_checkpointing is False
    assert ProbeConfig.from_flat(gradient_checkpointing=True).train.gradient_checkpointing is True


@pytest.mark.slow
@pytest.mark.distributed
def test_two_rank_zero3_sparse_training_with_checkpointing_matches_without(tmp_path):
    """deepspeed_train turns checkpointing on before DeepSpeed wraps the model: layers are recomputed,
    the result is the plain run's, and non-core elements stay bit-identical."""
    import json
    from pathlib import Path

    from _tiny_masking import run_two_cpu_ranks

    from trace_transfer.checkpoint import open_checkpoint

    pytest.importorskip("deepspeed")
    out = tmp_path / "ds"
    run_two_cpu_ranks(Path(__file__).parent / "ds_scripts" / "zero3_checkpointing.py", str(out))
    results = json.loads((out / "results.json").read_text())
    plain, ckpt = results["plain"], results["ckpt"]
    assert ckpt["mlp_calls"] == 2 * plain["mlp_calls"] > 0  # every forward re-run in backward
    assert ckpt["losses"] == pytest.approx(plain["losses"], rel=1e-6)
    a = dict(open_checkpoint(out / "plain").iter_tensors())
    b = dict(open_checkpoint(out / "ckpt").iter_tensors())
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=1e-5, atol=1e-7, msg=n)
    report = verify_frozen(out / "base", out / "ckpt", out / "core.coreset.safetensors")
    assert report.ok and report.changed_in_core > 0, report.format()
