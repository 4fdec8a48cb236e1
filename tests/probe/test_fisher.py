"""Diagonal Fisher (batch | per-sample) against hand-derived per-sample gradients of a linear model."""

import pytest
import torch

from trace_transfer.errors import ConfigError
from trace_transfer.probe import TRACE_COMPATIBLE_MODE, accumulate_fisher


def _mse(model, batch):
    # ℓ_i = ½‖W x_i + b − t_i‖², batch loss = mean_i ℓ_i
    r = model(batch["x"]) - batch["t"]
    return 0.5 * (r * r).sum(-1).mean()


def _data(n_batches=3, bs=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(bs, 3, generator=g), "t": torch.randn(bs, 2, generator=g)} for _ in range(n_batches)]


def _model():
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2)


def _per_sample_grads(model, batch):
    """By hand: ∇_W ℓ_i = r_i x_iᵀ, ∇_b ℓ_i = r_i with r_i = W x_i + b − t_i."""
    with torch.no_grad():
        r = model(batch["x"]) - batch["t"]
    return torch.einsum("bi,bj->bij", r, batch["x"]).double(), r.double()


def test_per_sample_matches_hand_derived_empirical_fisher():
    model, data = _model(), _data()
    acc = accumulate_fisher(model, data, mode="per-sample", loss_fn=_mse)
    gw = torch.cat([_per_sample_grads(model, b)[0] for b in data])
    gb = torch.cat([_per_sample_grads(model, b)[1] for b in data])
    assert acc.count == 12
    torch.testing.assert_close(acc.fisher("weight").double(), (gw**2).mean(0), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(acc.fisher("bias").double(), (gb**2).mean(0), rtol=1e-5, atol=1e-7)
    assert acc.tensor_mean("weight") == pytest.approx(float((gw**2).mean()), rel=1e-5)


def test_batch_mode_squares_the_mean_gradient():
    model, data = _model(), _data()
    acc = accumulate_fisher(model, data, mode="batch", loss_fn=_mse)
    ref_w = torch.stack([_per_sample_grads(model, b)[0].mean(0) ** 2 for b in data]).mean(0)
    assert acc.count == 3
    torch.testing.assert_close(acc.fisher("weight").double(), ref_w, rtol=1e-5, atol=1e-7)
    assert TRACE_COMPATIBLE_MODE == "batch"


def test_batch_mode_is_biased_low_and_equal_at_batch_size_one():
    model, data = _model(), _data()
    per = accumulate_fisher(model, data, mode="per-sample", loss_fn=_mse)
    bat = accumulate_fisher(model, data, mode="batch", loss_fn=_mse)
    # Jensen per batch: mean_i g_i² >= (mean_i g_i)², element-wise
    assert bool((per.fisher("weight") >= bat.fisher("weight") - 1e-7).all())
    singles = [{k: v[i : i + 1] for k, v in b.items()} for b in data for i in range(4)]
    bat1 = accumulate_fisher(model, singles, mode="batch", loss_fn=_mse)
    torch.testing.assert_close(bat1.fisher("weight"), per.fisher("weight"))


def test_per_tensor_only_mode_keeps_the_same_means():
    model, data = _model(), _data()
    full = accumulate_fisher(model, data, mode="per-sample", loss_fn=_mse)
    light = accumulate_fisher(model, data, mode="per-sample", elements=False, loss_fn=_mse)
    assert light.tensor_means() == pytest.approx(full.tensor_means(), rel=1e-6)
    assert full.tensor_mean("weight") == pytest.approx(float(full.fisher("weight").double().mean()), rel=1e-6)
    with pytest.raises(ConfigError):
        light.fisher("weight")


def test_max_batches_and_model_left_untouched():
    model, data = _model(), _data(n_batches=5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    acc = accumulate_fisher(model, data, mode="batch", max_batches=2, loss_fn=_mse)
    assert acc.count == 2
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())


def test_batches_without_response_tokens_are_skipped():
    model = _model()
    data = _data(n_batches=2)
    data[0]["labels"] = torch.full((4, 5), -100)
    data[1]["labels"] = torch.tensor([[-100, -100, 3, 4, -100]] * 4)
    acc = accumulate_fisher(model, data, mode="batch", loss_fn=_mse)
    assert acc.count == 1
    with pytest.raises(ConfigError, match="response token"):
        accumulate_fisher(model, data[:1], mode="batch", loss_fn=_mse)


def test_accumulates_in_fp32_where_bf16_squares_underflow():
    model = _model().to(torch.bfloat16)
    data = [{k: v.to(torch.bfloat16) for k, v in b.items()} for b in _data(n_batches=1)]

    def tiny(m, b):
        return _mse(m, b) * 1e-22  # gradients ~1e-22: representable in bf16, their squares are not

    acc = accumulate_fisher(model, data, mode="batch", loss_fn=tiny)
    g = model.weight.new_tensor(1e-22)
    assert float(g * g) == 0.0  # the bf16 square underflows ...
    assert float(acc.fisher("weight").max()) > 0.0  # ... the fp32 accumulation does not
    assert acc.fisher("weight").dtype == torch.float32


def test_unknown_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="per-sample"):
        accumulate_fisher(_model(), _data(), mode="diag", loss_fn=_mse)
