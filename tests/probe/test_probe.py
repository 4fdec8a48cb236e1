"""Warm-start probe: Δ, Fisher, per-tensor reductions and provenance on a tiny model."""

import json
import math

import pytest
import torch

from trace_transfer.checkpoint import open_checkpoint
from trace_transfer.errors import ConfigError
from trace_transfer.probe import ProbeConfig, probe
from trace_transfer.train.loop import TrainResult

FAST = dict(max_steps=2, batch_size=4, seq_len=32, lr=1e-3, max_examples=8)


@pytest.fixture
def tiny(tiny_llama):
    return tiny_llama


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models on a shared 2-core machine: two OpenMP threads contending with other jobs made a
    # probe 100x slower (20 s vs 0.2 s measured); one thread is also what these sizes want.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _fake_train(model, batches, cfg, steps=None, on_step=None, **kw):
    """Stands in for the warm start: a known update per parameter, so Δ can be checked exactly."""
    with torch.no_grad():
        for i, (_, p) in enumerate(model.named_parameters()):
            p.add_(0.25 * (i + 1))
    return TrainResult(steps=steps or 1, losses=[1.0], seconds=0.0)


def test_delta_is_theta_star_minus_theta0(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr("trace_transfer.probe.warmstart.train", _fake_train)
    res = probe(tiny, "synthetic:math", tmp_path / "p", ProbeConfig.from_flat(**FAST))
    delta = open_checkpoint(tmp_path / "p", prefix="delta")
    names = res.info["tensors"]
    assert delta.names() and sorted(delta.names()) == sorted(names)
    for i, name in enumerate(names):
        d = delta.get(name)
        assert d.dtype == torch.float32
        torch.testing.assert_close(d, torch.full_like(d, 0.25 * (i + 1)), rtol=0, atol=1e-5)
    assert not (tmp_path / "p" / ".theta0").exists()  # the θ0 snapshot is cleaned up


def _reference_fisher(model_dir, cfg: ProbeConfig, params=None):
    """Independent batch Fisher: plain loop of HF loss → backward → grad², averaged over batches."""
    from trace_transfer.data import load_task, make_dataloader
    from trace_transfer.models import load_model, load_tokenizer

    model = load_model(model_dir, dtype=torch.float32)
    if params is not None:
        model.load_state_dict(params, strict=False)
    tok = load_tokenizer(model_dir)
    examples = load_task("synthetic:math").train_examples()[: cfg.max_examples]
    loader = make_dataloader(tok, examples, cfg.train.seq_len, cfg.train.batch_size, shuffle=True, seed=cfg.train.seed)
    sums, n = {}, 0
    for batch in loader:
        model.zero_grad()
        model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"]).loss.backward()
        for name, p in model.named_parameters():
            sums[name] = sums.get(name, 0) + p.grad.double() ** 2
        n += 1
    return {k: v / n for k, v in sums.items()}


def test_fisher_at_base_matches_a_plain_loop(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr("trace_transfer.probe.warmstart.train", _fake_train)  # Fisher at θ0 must not see training
    cfg = ProbeConfig.from_flat(**FAST, fisher_at="base")
    probe(tiny, "synthetic:math", tmp_path / "p", cfg)
    ref = _reference_fisher(tiny, cfg)
    fisher = open_checkpoint(tmp_path / "p", prefix="fisher")
    stats = json.loads((tmp_path / "p" / "fisher_tensor.json").read_text())["tensors"]
    for name, f in fisher.iter_tensors():
        torch.testing.assert_close(f.double(), ref[name], rtol=1e-4, atol=1e-12)
        assert stats[name]["fisher_mean"] == pytest.approx(float(ref[name].mean()), rel=1e-4, abs=1e-15)


def test_reductions_and_provenance(tiny, tmp_path):
    res = probe(tiny, "synthetic:math", tmp_path / "p", ProbeConfig.from_flat(**FAST))
    out = tmp_path / "p"
    delta = open_checkpoint(out, prefix="delta")
    fisher = open_checkpoint(out, prefix="fisher")
    stats = json.loads((out / "fisher_tensor.json").read_text())["tensors"]
    for name in delta.names():
        d, f = delta.get(name).double(), fisher.get(name).double()
        s = stats[name]
        assert s["delta_rms"] == pytest.approx(float(d.norm() / math.sqrt(d.numel())), rel=1e-6, abs=1e-20)
        assert s["delta_absmax"] == pytest.approx(float(d.abs().max()), rel=1e-6, abs=1e-20)
        assert s["fisher_mean"] == pytest.approx(float(f.mean()), rel=1e-4, abs=1e-20)
        assert s["fisher_max"] == pytest.approx(float(f.max()), rel=1e-6, abs=1e-20)
    assert any(float(delta.get(n).abs().max()) > 0 for n in delta.names())  # training moved something
    info = json.loads((out / "probe.json").read_text())
    for key in ("model", "task", "config", "seed", "versions", "train", "fisher", "fingerprint", "model_config",
                "created", "data", "tensors"):
        assert key in info, key
    assert info["task"] == res.task == "math"
    assert info["fisher"] | {} and info["fisher"]["mode"] == "batch" and info["fisher"]["trace_compatible"]
    assert info["config"]["train"]["lr"] == 1e-3 and len(info["train"]["losses"]) == 2
    assert delta.metadata["kind"] == "delta" and fisher.metadata["mode"] == "batch"


def test_sharded_outputs_and_per_tensor_only_fisher(tiny, tmp_path):
    cfg = ProbeConfig.from_flat(**{**FAST, "max_steps": 1}, max_shard_bytes=20_000, fisher_elements=False, fisher="per-sample")
    probe(tiny, "synthetic:math", tmp_path / "p", cfg)
    out = tmp_path / "p"
    assert (out / "delta.safetensors.index.json").exists() and len(list(out.glob("delta-*-of-*.safetensors"))) > 1
    assert not list(out.glob("fisher*.safetensors"))  # per-tensor reductions only
    stats = json.loads((out / "fisher_tensor.json").read_text())["tensors"]
    assert all(s["fisher_mean"] >= 0 and "fisher_max" not in s for s in stats.values())
    info = json.loads((out / "probe.json").read_text())
    assert info["fisher"]["observations"] == 8  # per-sample: one observation per example
    assert info["artifacts"]["delta"] == "delta.safetensors.index.json"


def test_same_seed_same_delta(tiny, tmp_path):
    for d in ("a", "b"):
        probe(tiny, "synthetic:math", tmp_path / d, ProbeConfig.from_flat(**FAST))
    a, b = open_checkpoint(tmp_path / "a", prefix="delta"), open_checkpoint(tmp_path / "b", prefix="delta")
    assert all(torch.equal(a.get(n), b.get(n)) for n in a.names())


def test_model_object_is_not_modified(tiny, tmp_path):
    from trace_transfer.models import load_model, load_tokenizer

    model = load_model(tiny, dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    probe(model, "synthetic:math", tmp_path / "p", ProbeConfig.from_flat(**FAST), tokenizer=load_tokenizer(tiny))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_config_errors_are_reported_together():
    with pytest.raises(ConfigError) as err:
        ProbeConfig.from_flat(fisher="diag", fisher_at="end", lr=-1)
    text = str(err.value)
    assert "fisher='diag'" in text and "fisher_at='end'" in text and "lr" in text
