"""The masking API: exactly the core moves, at every granularity, in fp32 and bf16, with gradient
accumulation and weight decay; remove() restores; freeze-core trains the complement."""

import pytest
import torch
from _tiny_masking import GRANULARITIES, batches_fn, coreset_at, snapshot, tiny_llama

from trace_transfer.coreset import ELEMENT, CoreSet, UnitLayout
from trace_transfer.errors import ConfigError, ModelMismatchError
from trace_transfer.train.loop import TrainConfig, train
from trace_transfer.train.masking import apply_coreset, combine
from trace_transfer.train.verify import verify_frozen

CFG = TrainConfig(lr=1e-2, max_steps=4, grad_accum=2, weight_decay=0.1, warmup_ratio=0.0, precision="fp32")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_only_core_elements_move(granularity, dtype):
    model = tiny_llama(dtype=dtype)
    cs = coreset_at(model, granularity)
    before = snapshot(model)
    handle = apply_coreset(model, cs)
    assert handle.num_trainable() == cs.num_selected()
    result = train(model, batches_fn(), CFG, params=handle.param_groups(CFG.weight_decay), after_step=handle.after_step)
    handle.remove()
    report = verify_frozen(before, model.state_dict(), cs)
    assert report.ok, report.format()
    # the core did learn: most core elements moved and the loss went down
    assert report.changed_in_core > 0.5 * cs.num_selected()
    assert result.losses[-1] < result.losses[0]


def test_tensors_without_core_get_no_grad_and_no_optimizer_state():
    model = tiny_llama()
    cs = coreset_at(model, "row")
    handle = apply_coreset(model, cs, masking="dense")
    frozen = [n for n, p in model.named_parameters() if not cs.num_selected(n)]
    assert frozen and all(not dict(model.named_parameters())[n].requires_grad for n in frozen)
    opt = torch.optim.AdamW(handle.param_groups(0.0), lr=1e-3)
    batch = batches_fn()(0)[0]
    model(**batch).loss.backward()
    opt.step()
    params = dict(model.named_parameters())
    assert all(params[n].grad is None for n in frozen)
    assert all(params[n] not in opt.state for n in frozen)
    assert set(handle.partial) | set(handle.full) == set(cs.names())


def test_naive_weight_decay_leaks_and_handle_groups_do_not():
    """Why masked training needs its own parameter groups: decay on a partly-core tensor moves its frozen elements."""
    cs = coreset_at(tiny_llama(), "row")
    reports = {}
    for how in ("naive", "handle"):
        model = tiny_llama()
        before = snapshot(model)
        handle = apply_coreset(model, cs, masking="dense")
        params = handle.param_groups(0.1) if how == "handle" else [
            {"params": handle.trainable_params(), "weight_decay": 0.1}]
        train(model, batches_fn(), CFG, params=params)
        handle.remove()
        reports[how] = verify_frozen(before, model.state_dict(), cs)
    assert not reports["naive"].ok and reports["naive"].changed_outside > 0
    assert reports["handle"].ok, reports["handle"].format()


def test_masked_decay_matches_adamw_on_core_elements_bit_for_bit():
    cs = coreset_at(tiny_llama(), "element")
    batch = batches_fn()(0)[0]
    # Reference: AdamW decaying every element (the forward of step 1 is the same for both models).
    ref = tiny_llama()
    ref_handle = apply_coreset(ref, cs, masking="dense")
    opt = torch.optim.AdamW(ref_handle.trainable_params(), lr=0.05, weight_decay=0.5)
    ref(**batch).loss.backward()
    opt.step()
    ref_handle.remove()

    model = tiny_llama()
    before = snapshot(model)
    handle = apply_coreset(model, cs, decay="masked", masking="dense")
    opt = torch.optim.AdamW(handle.param_groups(0.5), lr=0.05)
    model(**batch).loss.backward()
    opt.step()
    handle.after_step()  # the pre-step hook already decayed: must not decay twice
    handle.remove()
    assert verify_frozen(before, model.state_dict(), cs).ok
    got, want = model.state_dict(), ref.state_dict()
    for name in cs.names():
        m = cs.mask(name)
        assert torch.equal(got[name][m], want[name][m]), name


def test_masked_decay_falls_back_to_after_step_for_copied_groups():
    model = tiny_llama()
    cs = coreset_at(model, "row")
    before = snapshot(model)
    handle = apply_coreset(model, cs, decay="masked")
    groups = [dict(g) for g in handle.param_groups(0.5)]  # copies: the pre-step hook can't see them
    opt = torch.optim.AdamW(groups, lr=0.05)
    for _ in range(2):
        model(**batches_fn()(0)[0]).loss.backward()
        opt.step()
        opt.zero_grad()
        handle.after_step(lr=0.05)
    handle.remove()
    assert verify_frozen(before, model.state_dict(), cs).ok


def test_adamw_with_eps_never_moves_an_always_zero_grad_element():
    p = torch.nn.Parameter(torch.randn(16))
    start = p.detach().clone()
    opt = torch.optim.AdamW([p], lr=1.0, eps=1e-8, weight_decay=0.0)
    for _ in range(5):
        p.grad = torch.zeros_like(p)
        opt.step()
    assert torch.equal(p.detach(), start)


def test_a_reused_optimizer_leaks_momentum_so_stages_need_a_fresh_one():
    """Why the runner builds a fresh optimizer per stage: Adam moments from stage 1 keep moving an
    element after stage 2's mask zeroes its gradient."""
    model = tiny_llama()
    stage1, stage2 = coreset_at(model, "row", seed=1), coreset_at(model, "row", seed=2)
    batch = batches_fn()(0)[0]
    opt = torch.optim.AdamW([p for p in model.parameters()], lr=1e-2, weight_decay=0.0)
    h = apply_coreset(model, stage1, masking="dense")
    model(**batch).loss.backward()
    opt.step()
    opt.zero_grad()
    h.remove()
    before = snapshot(model)
    h = apply_coreset(model, stage2, masking="dense")
    model(**batch).loss.backward()
    opt.step()
    h.remove()
    assert not verify_frozen(before, model.state_dict(), stage2).ok


def test_remove_restores_requires_grad_and_removes_hooks():
    model = tiny_llama()
    params = dict(model.named_parameters())
    params["model.norm.weight"].requires_grad_(False)  # a user's own choice must survive
    cs = coreset_at(model, "element")
    handle = apply_coreset(model, cs, masking="dense")
    with pytest.raises(ConfigError, match="already has an active CoreSet"):
        apply_coreset(model, cs)
    handle.remove()
    handle.remove()  # idempotent
    assert [p.requires_grad for p in model.parameters()] == [n != "model.norm.weight" for n in params]
    model(**batches_fn()(0)[0]).loss.backward()
    partial = next(iter(handle.partial))
    frozen = ~cs.mask(partial)
    assert params[partial].grad[frozen].abs().sum() > 0  # no hook left
    with pytest.raises(ConfigError, match="removed"):
        handle.param_groups()
    apply_coreset(model, cs).remove()  # a new handle after remove() is fine


def test_freeze_core_trains_the_complement():
    model = tiny_llama()
    cs = coreset_at(model, "row")
    before = snapshot(model)
    with apply_coreset(model, cs, mode="freeze-core") as handle:
        assert handle.num_trainable() == cs.num_total() - cs.num_selected()
        train(model, batches_fn(), CFG, params=handle.param_groups(0.1), after_step=handle.after_step)
    after = model.state_dict()
    for name in cs.names():  # the core is bit-identical
        m = cs.mask(name)
        assert torch.equal(after[name][m], before[name][m]), name
    assert verify_frozen(before, after, ~cs).ok
    assert not verify_frozen(before, after, cs).ok  # and the rest moved


def test_tied_weights_are_resolved_under_either_name():
    model = tiny_llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    rows = torch.zeros(shapes["lm_head.weight"][0], dtype=torch.bool)
    rows[:5] = True
    cs = CoreSet.from_unit_masks({"lm_head.weight": rows}, {"lm_head.weight": UnitLayout.rows()}, shapes)
    before = snapshot(model)
    handle = apply_coreset(model, cs, masking="dense")
    assert list(handle.partial) == ["model.embed_tokens.weight"] and handle.num_trainable() == 5 * shapes["lm_head.weight"][1]
    train(model, batches_fn(), CFG, params=handle.param_groups(0.1))
    handle.remove()
    emb = model.model.embed_tokens.weight.detach()
    assert torch.equal(emb[5:], before["model.embed_tokens.weight"][5:])
    assert not torch.equal(emb[:5], before["model.embed_tokens.weight"][:5])


def test_model_mismatch_names_the_tensor():
    model = tiny_llama()
    other = CoreSet.from_unit_masks({"x.weight": torch.tensor([True])}, {"x.weight": UnitLayout()}, {"x.weight": (3, 3)})
    with pytest.raises(ModelMismatchError, match="x.weight"):
        apply_coreset(model, other)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    shapes["model.norm.weight"] = (7,)
    bad = CoreSet.from_unit_masks({}, {}, shapes)
    with pytest.raises(ModelMismatchError, match="model.norm.weight"):
        apply_coreset(model, bad)


def test_empty_core_and_bad_options_are_config_errors():
    model = tiny_llama()
    empty = CoreSet.from_unit_masks({}, {}, model)
    with pytest.raises(ConfigError, match="selects nothing"):
        apply_coreset(model, empty)
    assert all(p.requires_grad for p in model.parameters())  # nothing left half-applied
    with pytest.raises(ConfigError, match="train-core"):
        apply_coreset(model, empty, mode="train")
    with pytest.raises(ConfigError, match="masked"):
        apply_coreset(model, empty, decay="l2")


def test_nan_gradient_in_a_frozen_element_does_not_leak():
    lin = torch.nn.Linear(4, 2, bias=False)
    m = torch.zeros(8, dtype=torch.bool)
    m[:4] = True
    cs = CoreSet.from_unit_masks({"weight": m}, {"weight": ELEMENT}, lin)
    h = apply_coreset(lin, cs, masking="dense")
    out = lin(torch.tensor([[1.0, 1.0, 1.0, float("inf")]]))
    out.sum().backward()  # frozen row 1 column 3 gets an inf/nan gradient
    grad = lin.weight.grad
    assert torch.isfinite(grad.reshape(-1)[4:]).all() and (grad.reshape(-1)[4:] == 0).all()
    h.remove()


def test_combine_strict_isolation_subtracts_earlier_cores():
    model = tiny_llama()
    a, b = coreset_at(model, "row", seed=1), coreset_at(model, "row", seed=2)
    assert combine(b).num_selected() == b.num_selected()
    assert combine([a, b]).num_selected() == (a | b).num_selected()
    strict = combine(b, isolation="strict", previous=[a])
    assert strict.num_selected() == (b - a).num_selected()
    assert (strict & a).num_selected() == 0
    assert combine(b, isolation="none", previous=[a]).num_selected() == b.num_selected()
    with pytest.raises(ConfigError, match="strict"):
        combine(b, isolation="hard")


def test_masks_follow_the_model_to_another_device_or_dtype():
    model = tiny_llama()
    cs = coreset_at(model, "column")
    handle = apply_coreset(model, cs)
    model.to(torch.bfloat16)  # .to() keeps Parameter identity for dtype changes on the same device
    before = snapshot(model)
    opt = torch.optim.AdamW(handle.param_groups(0.0), lr=1e-2)
    model(**batches_fn()(0)[0]).loss.backward()
    opt.step()
    handle.remove()
    assert verify_frozen(before, model.state_dict(), cs).ok


@pytest.mark.parametrize("decay", ["zero", "masked"])
def test_accelerate_prepare_keeps_non_core_bit_identical(decay):
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    try:
        model = tiny_llama()
        cs = coreset_at(model, "element")
        before = snapshot(model)
        handle = apply_coreset(model, cs, decay=decay)  # before prepare: names unprefixed, no state for frozen
        opt = torch.optim.AdamW(handle.param_groups(0.1), lr=1e-2)
        model, opt = acc.prepare(model, opt)
        losses = []
        for _ in range(3):
            for batch in batches_fn()(0):
                with acc.accumulate(model):
                    loss = model(**batch).loss
                    acc.backward(loss)
                    opt.step()
                    opt.zero_grad()
                    losses.append(float(loss.detach()))
        handle.remove()
        report = verify_frozen(before, acc.unwrap_model(model).state_dict(), cs)
        assert report.ok, report.format()
        assert report.changed_in_core > 0 and losses[-1] < losses[0]
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def test_an_earlier_post_accumulate_hook_only_sees_masked_gradients():
    """A framework hook registered before apply_coreset (e.g. an engine built first) runs before any
    post-accumulate hook of ours; the mask then goes in front of accumulation instead."""
    model = tiny_llama()
    cs = coreset_at(model, "element")
    name = cs.names()[0]
    param = dict(model.named_parameters())[name]
    seen = []
    param.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.detach().clone()))
    before = snapshot(model)
    handle = apply_coreset(model, cs, masking="dense")
    opt = torch.optim.AdamW(handle.param_groups(0.1), lr=1e-2)
    model(**batches_fn()(0)[0]).loss.backward()
    opt.step()
    handle.remove()
    frozen = ~cs.mask(name)
    assert seen and (seen[0][frozen] == 0).all() and (seen[0][~frozen] != 0).any()
    assert verify_frozen(before, model.state_dict(), cs).ok


def test_fused_adamw_keeps_non_core_bit_identical():
    # fused AdamW (much faster on CPU, and the usual choice on GPU) has its own kernel: check it too
    model = tiny_llama()
    cs = coreset_at(model, "row")
    before = snapshot(model)
    handle = apply_coreset(model, cs)
    opt = torch.optim.AdamW(handle.param_groups(0.1), lr=1e-2, fused=True)
    for batch in batches_fn()(0):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    handle.remove()
    assert verify_frozen(before, model.state_dict(), cs).ok
