"""Runner method ``lisa``: only the sampled layers (and everything outside the layers) move; the draw
changes every ``lisa_interval`` steps; frozen layers get neither a step nor weight decay."""

from __future__ import annotations

import torch

from trace_transfer.train.config import TrainConfig
from trace_transfer.train.loop import train
from trace_transfer.train.methods import METHODS, MethodOptions, PrepareContext, RunPlan, Stage


def _run(model, interval: int, steps: int):
    ctx = PrepareContext(stages=[Stage("synthetic:math")], coresets=[None], general_coreset=None,
                         options=MethodOptions(lisa_layers=1, lisa_interval=interval), weight_decay=0.1)
    torch.manual_seed(0)
    prepared = METHODS.get("lisa").prepare(model, RunPlan(index=1, tasks=(0,)), ctx)
    ids = torch.randint(3, 50, (4, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    cfg = TrainConfig(lr=1e-2, max_steps=steps, weight_decay=0.1, warmup_ratio=0.0, precision="fp32")
    train(prepared.model, lambda epoch: [batch], cfg, params=prepared.params, after_step=prepared.after_step)
    return prepared.finish(prepared.model), prepared.info["sampled"]


def test_lisa_trains_the_sampled_layer_and_everything_outside_the_layers(tiny_llama):
    from trace_transfer.models import load_model

    model = load_model(tiny_llama)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model, history = _run(model, interval=100, steps=4)  # one draw for the whole run
    assert len(history) == 1 and len(history[0]) == 1
    for name, p in model.named_parameters():
        moved = not torch.equal(p.detach(), before[name])
        if ".layers." not in name:
            assert moved, f"{name} is outside the layers: LISA always trains it"
        elif f".layers.{history[0][0]}." not in name:
            assert not moved, f"{name}: its layer was not sampled, yet it changed (weight decay or a stale step)"
    assert all(p.requires_grad for p in model.parameters())  # finish() hands back a fully trainable model


def test_lisa_redraws_every_interval(tiny_llama):
    from trace_transfer.models import load_model

    _, history = _run(load_model(tiny_llama), interval=2, steps=6)
    assert len(history) == 4  # at the first forward, then after steps 2, 4 and 6
