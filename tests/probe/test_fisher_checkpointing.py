"""Activation checkpointing in the Fisher pass (probe.fisher.eval_checkpointing): the model stays in
eval mode, the decoder layers recompute their activations in the backward pass, the Fisher is the
no-checkpointing eval-mode Fisher, and the pass holds less memory.

Tolerance: bit-equal is what is measured (the recompute runs the same CPU kernels on the same inputs);
rtol 1e-6 leaves room for a platform whose kernels are not run-to-run deterministic. Dropout is
configured non-zero in every model here, and a dropout-on Fisher differs by > 1e-2 relative (asserted),
so a train-mode switch anywhere (model.train(), or training=True on the layers, which turns on the
dropout OPT applies in its decoder layer's own forward) fails the comparison.
"""

import ctypes
import gc
from pathlib import Path

import pytest
import torch

from trace_transfer.errors import ConfigError
from trace_transfer.probe import ProbeConfig, accumulate_fisher, probe
from trace_transfer.probe.fisher import checkpoint_layers, eval_checkpointing
from trace_transfer.train.loop import causal_lm_loss

VOCAB = 97
RTOL = 1e-6


def _llama(layers=2, hidden=32, vocab=VOCAB, intermediate=64, seq=32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=seq, attention_dropout=0.1))


def _opt():
    # OPT applies dropout in the decoder layer's own forward (self.training of the layer itself).
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    return OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                    num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=32,
                                    dropout=0.1, attention_dropout=0.1, activation_dropout=0.1))


MODELS = {"llama": _llama, "opt": _opt}


def _data(n=3, bs=4, seq=16, vocab=VOCAB):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (bs, seq), generator=g)
        labels = ids.clone()
        labels[:, : seq // 2] = -100  # the prompt half carries no loss
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def _mlp_calls(model) -> list[int]:
    # A submodule of the first layer: its forward runs again when the backward pass recomputes the layer.
    calls = [0]
    layer = checkpoint_layers(model)[0]
    (layer.mlp if hasattr(layer, "mlp") else layer.fc1).register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("mode", ["batch", "per-sample"])
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_fisher_with_checkpointing_equals_eval_mode_fisher(arch, mode):
    model = MODELS[arch]()
    modes = [m.training for m in model.modules()]
    calls = _mlp_calls(model)
    plain = accumulate_fisher(model, _data(), mode=mode)
    plain_calls, calls[0] = calls[0], 0
    ckpt = accumulate_fisher(model, _data(), mode=mode, gradient_checkpointing=True)
    assert ckpt.count == plain.count == (3 if mode == "batch" else 12)
    assert (plain_calls, calls[0]) == (plain.count, 2 * ckpt.count), "each layer re-runs once in the backward pass"
    for name in plain.names():
        torch.testing.assert_close(ckpt.fisher(name), plain.fisher(name), rtol=RTOL, atol=0)
        assert ckpt.tensor_mean(name) == pytest.approx(plain.tensor_mean(name), rel=RTOL)
    # The pass leaves the model as it found it: no wrapped forward, each module in its mode.
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert [m.training for m in model.modules()] == modes

    # The dropout configured above is live in train mode, so the comparison above would catch a switch.
    def dropout_on(net, batch):
        net.train()
        return causal_lm_loss(net, batch)

    noisy = accumulate_fisher(model, _data(), mode=mode, loss_fn=dropout_on)
    rel = max(float((noisy.fisher(n) - plain.fisher(n)).norm() / plain.fisher(n).norm()) for n in plain.names())
    assert rel > 1e-2


def test_checkpointing_is_undone_when_the_pass_fails():
    model = _llama()
    model.train()
    with pytest.raises(ConfigError, match="no Fisher observation"):
        accumulate_fisher(model, [{**b, "labels": torch.full_like(b["labels"], -100)} for b in _data()],
                          gradient_checkpointing=True)
    assert not any("forward" in m.__dict__ for m in model.modules()) and model.training


def test_without_grad_the_layers_run_plainly():
    model = _llama().eval()
    calls = _mlp_calls(model)
    with eval_checkpointing(model), torch.no_grad():
        model(input_ids=_data()[0]["input_ids"])
    assert calls[0] == 1


def test_a_model_without_checkpointable_layers_is_refused():
    with pytest.raises(ConfigError, match="--gradient-checkpointing"):
        accumulate_fisher(torch.nn.Linear(3, 2), [{"x": torch.ones(1, 3)}], gradient_checkpointing=True,
                          loss_fn=lambda m, b: m(b["x"]).sum())


def test_probe_with_checkpointing_writes_the_same_fisher_and_delta(tiny_llama, tmp_path):
    from trace_transfer.checkpoint import open_checkpoint

    flat = dict(max_steps=2, batch_size=4, seq_len=32, lr=1e-3, max_examples=8, precision="fp32")
    probe(tiny_llama, "synthetic:math", tmp_path / "plain", ProbeConfig.from_flat(**flat))
    res = probe(tiny_llama, "synthetic:math", tmp_path / "ckpt", ProbeConfig.from_flat(**flat, gradient_checkpointing=True))
    assert res.info["config"]["train"]["gradient_checkpointing"] is True
    for kind in ("fisher", "delta"):
        a, b = (open_checkpoint(tmp_path / d, prefix=kind) for d in ("plain", "ckpt"))
        for name in a.names():
            torch.testing.assert_close(b.get(name), a.get(name), rtol=RTOL, atol=0)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def _rss_growth_mib(fn) -> float:
    """Peak resident memory over ``fn()`` (VmHWM, reset through /proc/self/clear_refs) minus the
    resident memory just before, after handing freed heap back (else reused memory hides growth)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    fn()
    return (_status_kib("VmHWM") - before) / 1024


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures RSS through Linux's /proc")
def test_checkpointed_fisher_pass_holds_less_memory():
    """A 5.4M-parameter Llama (6 layers, hidden 256, vocab 2048), one batch of 4 x 256 tokens, per-element
    Fisher. Both passes also hold the gradients and the fp32 accumulators (2 x 20.6 MiB). Measured: growth
    103 MiB with checkpointing, 197 MiB without (121-123 / 211-214 over two batches). The checkpointed
    pass runs first, so one-time allocations count against it, not for it."""
    model = _llama(layers=6, hidden=256, vocab=2048, intermediate=688, seq=256)
    data = _data(n=1, bs=4, seq=256, vocab=2048)
    ckpt = _rss_growth_mib(lambda: accumulate_fisher(model, data, gradient_checkpointing=True))
    plain = _rss_growth_mib(lambda: accumulate_fisher(model, data))
    print(f"Fisher pass RSS growth: {ckpt:.0f} MiB checkpointed, {plain:.0f} MiB plain")
    # Without checkpointing each of the 6 layers keeps ~18 MiB of fp32 activations at 1024 tokens; with
    # it, its 1 MiB input (one layer's activations are live again during its recompute).
    assert ckpt <= plain - 40, (ckpt, plain)
