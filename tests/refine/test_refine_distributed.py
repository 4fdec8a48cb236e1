"""`refine --deepspeed` (refine/distributed.py) against the single-process `refine`: 2 CPU ranks under
ZeRO-3 with micro-batch 2 each, against one process with batch 4, same seed and settings, in budgets
mode (budgets from `transfer`, as the pipeline makes them) and source-free.

Tolerance: the selected units are equal; every unit score is within 1e-4 of the largest score of one
process (measured: 1.1e-6). Δ and Fisher of the two probes differ by reduction order only (about 1e-6
relative, tests/probe/test_probe_distributed.py), and LF scores are min-max normalised means of them;
a real error (a factor W, a missing rank) moves scores by 1e-1 or more. The launch (two refines) takes
about 70 s on 2 busy cores.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for _tiny_masking
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "probe"))  # the probe test's task and ZeRO config
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "transfer"))  # how budgets are made in tests
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _ds_probe_ranks import write_task, zero  # noqa: E402
from _ds_refine_ranks import SETTINGS, SOURCE_FREE  # noqa: E402
from _tiny_masking import run_two_cpu_ranks  # noqa: E402
from test_budgets_refine import IDENTITY2, row_coreset  # noqa: E402

from trace_transfer.coreset import CoreSet  # noqa: E402
from trace_transfer.errors import ConfigError  # noqa: E402
from trace_transfer.models import build_tiny_model  # noqa: E402
from trace_transfer.refine import RefineConfig, refine  # noqa: E402
from trace_transfer.transfer import SlotBudgets, transfer  # noqa: E402

WORKER = Path(__file__).parent / "_ds_refine_ranks.py"
TOL = 1e-4


@pytest.mark.slow
@pytest.mark.distributed
def test_two_rank_refine_selects_the_units_of_one_process(tiny_llama, tmp_path):
    pytest.importorskip("deepspeed")
    # A larger target than the source, char tokenizer: every sequence has the same length (see write_task).
    target = build_tiny_model("llama", tmp_path / "target", layers=2, hidden=48, heads=4, kv_heads=2,
                              tokenizer="char", seed=1)
    out = tmp_path / "ds"
    out.mkdir()
    (out / "zero3.json").write_text(json.dumps(zero(3)))
    task = write_task(out / "task")
    budgets, _ = transfer(row_coreset(tiny_llama), tiny_llama, target, IDENTITY2, ratio=0.1)
    assert isinstance(budgets, SlotBudgets)
    budgets.save(out / "t.budgets.json")
    run_two_cpu_ranks(WORKER, str(target), str(out))
    assert not list(out.glob(".refine-probe-*"))  # the temporary probe directories are gone
    torch.set_num_threads(1)
    for name, budgets_file, extra in (("budgets", out / "t.budgets.json", {}), ("free", None, SOURCE_FREE)):
        ref, ref_cost = refine(target, task, budgets_file, RefineConfig(**SETTINGS, **extra))
        got = CoreSet.load(out / f"{name}.coreset.safetensors")
        assert got.metadata["mode"] == ref.metadata["mode"] == ("budgets" if budgets_file else "source-free")
        assert got.names() == ref.names() and got.num_selected() == ref.num_selected() > 0, name
        for n in ref.names():
            assert torch.equal(got.unit_mask(n), ref.unit_mask(n)), (name, n)
        top = max(float(ref.score(n).abs().max()) for n in ref.names())
        worst = max(float((got.score(n).double() - ref.score(n).double()).abs().max()) for n in ref.names())
        assert worst <= TOL * top, (name, worst, top)
        cost = got.metadata["cost"]
        assert cost["world_size"] == 2 and cost["deepspeed"]["stage"] == 3 and cost["deepspeed"]["global_batch"] == 4
        assert (cost["forward_backward"], cost["optimizer_steps"]) == (ref_cost["forward_backward"], 3) == (6, 3)
        assert len(cost["peak_memory_mb_per_rank"]) == 2 and cost["peak_memory_mb"] > 0


@pytest.mark.parametrize("settings, world, match", [
    (dict(signal="fisher"), 2, "signal 'fisher' under --deepspeed"),
    (dict(signal="saliency"), 2, "signal 'saliency' under --deepspeed"),
    (dict(steps=0), 2, "--steps 0 under --deepspeed"),
    (dict(batch_size=6), 4, "does not divide over the 4 ranks"),
])
def test_what_the_distributed_pass_cannot_do_is_refused_before_launch(tiny_llama, tmp_path, monkeypatch,
                                                                      settings, world, match):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(ConfigError, match=match):
        refine(tiny_llama, "synthetic:math", None, RefineConfig(**settings), deepspeed_config={}, work_dir=tmp_path)
    assert not list(tmp_path.iterdir())


def test_budgets_for_another_model_are_refused_before_the_pass(tiny_llama, tmp_path, monkeypatch):
    from trace_transfer.coreset import UnitLayout
    from trace_transfer.errors import ModelMismatchError
    from trace_transfer.models import load_model
    from trace_transfer.transfer import SlotBudget

    monkeypatch.setenv("WORLD_SIZE", "1")
    shapes = {n: tuple(p.shape) for n, p in load_model(tiny_llama).named_parameters()}
    name = "model.layers.1.mlp.down_proj.weight"
    rows, cols = shapes[name]
    wrong = SlotBudgets({**shapes, name: (rows + 1, cols)}, {name: UnitLayout.rows()},
                        [SlotBudget("ffn_down.weight L1", name, [[0, rows + 1]], 2, cols)])
    with pytest.raises(ModelMismatchError, match=name):
        refine(tiny_llama, "synthetic:math", wrong, RefineConfig(), deepspeed_config={}, work_dir=tmp_path)
    assert not list(tmp_path.iterdir())
