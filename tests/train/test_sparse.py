"""Sparse trainable deltas (masking="sparse"): the same trained weights as dense gradient masking at
every granularity, state only for the core, folded checkpoints, tied weights, resume after a kill,
and (2 CPU ranks) ZeRO-3 with no optimizer state on frozen partitions."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _tiny_masking import GRANULARITIES, batches_fn, coreset_at, run_two_cpu_ranks, snapshot, tiny_llama

from trace_transfer.coreset import CoreSet, UnitLayout
from trace_transfer.errors import ConfigError
from trace_transfer.train.loop import TrainConfig, train
from trace_transfer.train.masking import apply_coreset
from trace_transfer.train.sparse import DELTA_SUFFIX
from trace_transfer.train.verify import verify_frozen

CFG = TrainConfig(lr=1e-2, max_steps=4, grad_accum=2, weight_decay=0.1, warmup_ratio=0.0, precision="fp32")


def _train(granularity: str, masking: str, decay: str = "zero"):
    model = tiny_llama()
    cs = coreset_at(model, granularity)
    before = snapshot(model)
    handle = apply_coreset(model, cs, masking=masking, decay=decay)
    result = train(model, batches_fn(), CFG, params=handle.param_groups(CFG.weight_decay), after_step=handle.after_step)
    summary = handle.summary()
    handle.remove()
    return model, cs, before, result, summary


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_sparse_and_dense_give_the_same_weights_and_non_core_stays_bit_identical(granularity):
    for decay in ("zero", "masked"):
        dense, cs, before, rd, sd = _train(granularity, "dense", decay)
        sparse, _, _, rs, ss = _train(granularity, "sparse", decay)
        assert sd["sparse_tensors"] == 0 and ss["sparse_tensors"] == (0 if granularity == "tensor" else sd["partial_tensors"])
        assert ss["trainable_params"] == sd["trainable_params"] == cs.num_selected()
        report = verify_frozen(before, sparse.state_dict(), cs)
        assert report.ok, report.format()
        assert report.changed_in_core > 0.5 * cs.num_selected()
        got, want = sparse.state_dict(), dense.state_dict()
        assert got.keys() == want.keys()  # folded: no delta left behind
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=f"{granularity} {decay} {name}")
        assert rs.losses == pytest.approx(rd.losses, rel=1e-5)


def test_element_core_linear_works_blockwise_and_its_gradients_are_exact(monkeypatch):
    import trace_transfer.train.sparse as sparse

    monkeypatch.setattr(sparse, "_BLOCK_ELEMENTS", 7)  # 6 blocks of one row, one of them without core
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(6, 5, dtype=torch.double, generator=g)
    index = torch.tensor([0, 3, 7, 8, 14, 22, 29], dtype=torch.int32)
    delta = torch.randn(len(index), dtype=torch.double, generator=g).requires_grad_()
    x = torch.randn(2, 3, 5, dtype=torch.double, generator=g).requires_grad_()
    bias = torch.randn(6, dtype=torch.double, generator=g).requires_grad_()
    assert len(sparse._row_blocks(w0.shape, index)) == 6

    def f(x, delta, bias):
        return sparse._ElementLinear.apply(x, w0, delta, bias, index)

    want = torch.nn.functional.linear(x, w0.reshape(-1).index_add(0, index, delta).view(6, 5), bias)
    torch.testing.assert_close(f(x, delta, bias), want)
    assert torch.autograd.gradcheck(f, (x, delta, bias))


def test_partly_core_tensors_get_no_gradient_and_state_only_for_their_core():
    model = tiny_llama()
    cs = coreset_at(model, "row")
    handle = apply_coreset(model, cs, masking="sparse")
    opt = torch.optim.AdamW(handle.param_groups(0.1), lr=1e-3)
    model(**batches_fn()(0)[0]).loss.backward()
    opt.step()
    params = dict(model.named_parameters())
    for name, e in handle.sparse.items():
        assert not params[name].requires_grad and params[name].grad is None and params[name] not in opt.state
        assert params[name + DELTA_SUFFIX] is e.delta  # registered on the owning module
        assert e.delta.shape == (int(cs.unit_mask(name).sum()), params[name].shape[1])
        assert e.index.dtype == torch.int32
    state = sum(t.numel() for s in opt.state.values() for t in s.values() if t.dim() > 0)
    assert state == 2 * handle.num_trainable()  # Adam's two moments, for core elements only
    assert handle.mask_bytes() == 4 * sum(len(e.index) for e in handle.sparse.values())
    handle.remove()
    assert not any(DELTA_SUFFIX in n for n in dict(model.named_parameters()))
    assert all(p.requires_grad for p in model.parameters())


def test_state_dict_mid_stage_is_folded_and_loading_it_resets_the_deltas(tmp_path):
    model = tiny_llama()
    cs = coreset_at(model, "element")
    handle = apply_coreset(model, cs, masking="sparse")
    train(model, batches_fn(), CFG, params=handle.param_groups(0.0))
    x = batches_fn()(0)[0]
    with torch.no_grad():
        want = model(**x).logits
    state = model.state_dict()
    assert not any(DELTA_SUFFIX in k for k in state)
    model.save_pretrained(tmp_path / "mid")  # what a Trainer checkpoint mid-stage does
    fresh = tiny_llama(seed=5)
    fresh.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**x).logits, want)
    # loading folded weights into a model with live deltas must not count the deltas twice
    model.load_state_dict(state, strict=True)
    assert all(not e.delta.any() for e in handle.sparse.values())
    with torch.no_grad():
        torch.testing.assert_close(model(**x).logits, want)
    handle.remove()
    from transformers import LlamaForCausalLM

    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "mid")
    for name, t in reloaded.state_dict().items():
        torch.testing.assert_close(t, state[name])


def test_tied_weights_share_one_delta():
    model = tiny_llama(tie=True)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    rows = torch.zeros(shapes["lm_head.weight"][0], dtype=torch.bool)
    rows[:5] = True
    cs = CoreSet.from_unit_masks({"lm_head.weight": rows}, {"lm_head.weight": UnitLayout.rows()}, shapes)
    before = snapshot(model)
    handle = apply_coreset(model, cs, masking="sparse")
    entry = handle.sparse["model.embed_tokens.weight"]
    assert model.lm_head.weight_sparse_delta is model.model.embed_tokens.weight_sparse_delta is entry.delta
    assert handle.num_trainable() == 5 * shapes["lm_head.weight"][1]
    train(model, batches_fn(), CFG, params=handle.param_groups(0.1))
    handle.remove()
    emb = model.model.embed_tokens.weight.detach()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(emb[5:], before["model.embed_tokens.weight"][5:])
    assert not torch.equal(emb[:5], before["model.embed_tokens.weight"][:5])


def test_auto_masking_keeps_large_shares_dense_and_options_are_checked():
    model = tiny_llama()
    cs = coreset_at(model, "row", share=0.2)
    with apply_coreset(model, cs, mode="freeze-core") as h:  # ~80% of each tensor trainable: dense is cheaper
        assert h.partial and not h.sparse and h.summary()["masking"] == "auto"
    with apply_coreset(model, cs) as h:  # ~20%: sparse
        assert h.sparse and not h.partial
    with pytest.raises(ConfigError, match="masking 'csr'"):
        apply_coreset(model, cs, masking="csr")


def test_an_optimizer_built_before_the_deltas_is_refused():
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    handle = apply_coreset(model, coreset_at(model, "row"), masking="sparse")
    with pytest.raises(ConfigError, match="does not hold the sparse deltas"):
        handle.check_optimizer(opt)
    handle.remove()


@pytest.mark.slow
def test_torch_compile_traces_the_linear_fast_path():
    model = tiny_llama()
    cs = coreset_at(model, "row")
    before = snapshot(model)
    handle = apply_coreset(model, cs, masking="sparse")
    compiled = torch.compile(model.model.layers[0].mlp, backend="eager", fullgraph=True)
    x = torch.randn(2, 5, model.config.hidden_size)
    torch.testing.assert_close(compiled(x), model.model.layers[0].mlp(x))
    handle.remove()
    assert verify_frozen(before, model.state_dict(), cs).ok


# -- resume after a hard kill, sparse mode ---------------------------------------------------------

_MATH = "synthetic:math?n_train=48&n_eval=6"
_CODE = "synthetic:code?n_train=48&n_eval=6"
_CHILD = textwrap.dedent("""
    import sys
    from trace_transfer.train.loop import TrainConfig
    from trace_transfer.train.methods import MethodOptions, Stage
    from trace_transfer.train.runner import run_sequence
    model, out, c1, c2 = sys.argv[1:5]
    cfg = TrainConfig(lr=3e-3, max_steps=6, batch_size=8, seq_len=32, warmup_ratio=0.0)
    run_sequence(model, [Stage({m!r}, c1), Stage({c!r}, c2)], "trace", out, cfg, eval_limit=3,
                 options=MethodOptions(masking="sparse"))
""").format(m=_MATH, c=_CODE)


@pytest.mark.slow
def test_resume_after_a_kill_mid_stage_in_sparse_mode(tiny_llama, tmp_path):
    from trace_transfer.checkpoint import open_checkpoint
    from trace_transfer.models import load_model
    from trace_transfer.train.methods import MethodOptions, Stage
    from trace_transfer.train.runner import KILL_ENV, completed_stages, run_sequence

    torch.set_num_threads(1)
    model = load_model(tiny_llama)
    cores = []
    for seed in (1, 2):
        cs = coreset_at(model, "row", seed=seed)
        cores.append(str(cs.save(tmp_path / f"c{seed}.coreset.safetensors")))
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    env = {**os.environ, KILL_ENV: "2:3", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(tiny_llama), str(killed), *cores], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert completed_stages(killed) == [0, 1]
    cfg = TrainConfig(lr=3e-3, max_steps=6, batch_size=8, seq_len=32, warmup_ratio=0.0)
    stages = [Stage(_MATH, cores[0]), Stage(_CODE, cores[1])]
    options = MethodOptions(masking="sparse")
    resumed = run_sequence(tiny_llama, stages, "trace", killed, cfg, eval_limit=3, resume=True, options=options)
    reference = run_sequence(tiny_llama, stages, "trace", clean, cfg, eval_limit=3, options=options)
    assert resumed.results["per_stage"][1]["losses"] == reference.results["per_stage"][1]["losses"]
    a = dict(open_checkpoint(killed / "stage_2").iter_tensors())
    b = dict(open_checkpoint(clean / "stage_2").iter_tensors())
    assert a.keys() == b.keys() and not any(DELTA_SUFFIX in n for n in a)  # checkpoints hold folded weights
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert verify_frozen(killed / "stage_1", killed / "stage_2", cores[1]).ok


# -- DeepSpeed ZeRO-3, 2 CPU ranks ---------------------------------------------------------------

SCRIPT = Path(__file__).parent / "ds_scripts" / "zero_sparse.py"


@pytest.mark.slow
@pytest.mark.distributed
def test_two_rank_zero3_sparse_has_no_optimizer_state_on_frozen_partitions(tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "ds"
    run_two_cpu_ranks(SCRIPT, str(out))
    results = json.loads((out / "results.json").read_text())
    core = out / "core.coreset.safetensors"
    sparse, dense = results["sparse"], results["dense"]
    assert sparse["frozen_in_optimizer"] == [] and sparse["sparse_tensors"] > 0
    # Adam's two moments for exactly the core's elements (up to partition padding), where dense
    # masking holds them for every element of a partly-core tensor
    selected = CoreSet.load(core).num_selected()
    assert sparse["trainable_numel"] == selected < dense["trainable_numel"]
    assert 2 * selected <= sparse["optimizer_state"] <= 2 * selected + 64, sparse
    assert dense["optimizer_state"] >= 2 * dense["trainable_numel"], dense
    for phase in ("sparse", "dense"):
        report = verify_frozen(out / "base", out / phase, core)
        assert report.ok, f"{phase}:\n{report.format()}"
        assert report.changed_in_core > 0.5 * report.elements_allowed, phase
    from trace_transfer.checkpoint import open_checkpoint

    a = dict(open_checkpoint(out / "sparse").iter_tensors())
    b = dict(open_checkpoint(out / "dense").iter_tensors())
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-4, atol=1e-5, msg=n)
    assert sparse["losses"] == pytest.approx(dense["losses"], rel=1e-4)
