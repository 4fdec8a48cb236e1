"""CPI-FT end to end on a tiny Llama: results in the runner's shape, cores frozen through SFT, transplant
exactness, groups/prior mode, resume, the CLI, and the core-region ('magnitude') selection alone."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from trace_transfer.checkpoint import open_checkpoint
from trace_transfer.coreset import CoreSet
from trace_transfer.surgery.cpi_ft import CpiFtConfig, core_regions, cpi_ft
from trace_transfer.errors import ConfigError
from trace_transfer.report.plots import plot_cpi_ft
from trace_transfer.train.loop import TrainConfig

TASKS = ["synthetic:math?n_train=16&n_eval=4", "synthetic:medical?n_train=16&n_eval=4"]
CFG = TrainConfig(lr=1e-3, max_steps=2, batch_size=8, seq_len=32, precision="fp32")


def weights(path):
    r = open_checkpoint(path)
    return {n: r.get(n) for n in r.names()}


@pytest.fixture(scope="module")
def run(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("cpi") / "run"
    res = cpi_ft(tiny_llama, TASKS, out, CpiFtConfig(ratio=0.05), ft_cfg=CFG, eval_limit=4)
    plot_cpi_ft(out)  # training returns results; the report draws them
    return out, res


@pytest.mark.slow
def test_results_have_the_runner_shape_with_base_row(run):
    out, res = run
    data = json.loads((out / "results.json").read_text())
    order = [n for g in data["cpi_ft"]["groups"] for n in g]
    assert data["format"] == "trace-transfer/results" and data["tasks"] == order and data["complete"]
    assert len(data["R"]) == len(TASKS) + 1 and all(len(r) == len(TASKS) for r in data["R"])
    for j, name in enumerate(order):  # row 0 is the base model, evaluated in each task's FT run
        ev = json.loads((out / "ft" / name / "stage_0" / "eval.json").read_text())
        assert data["R"][0][j] == ev["scores"][name]["score"]
    assert data["row_labels"][0] == "before (base)" and data["metrics"]["bwt"] is not None
    assert set(data["cpi_ft"]["single_task_ft"]) == set(order)
    assert (out / "accuracy_matrix.png").exists() and (out / "overlap.png").exists()
    assert "cpi-ft on" in (out / "results.md").read_text()
    assert json.loads((out / "clusters.json").read_text())["tau"] == 0.1


@pytest.mark.slow
def test_transplant_exact_and_cores_frozen_through_sft(run):
    out, res = run
    names = list(res.results["cpi_ft"]["core_params"])
    cores = {n: CoreSet.load(out / "cores" / f"{n}.coreset.safetensors") for n in names}
    assert all(cs.num_selected() > 0 for cs in cores.values())
    merged = weights(out / "merged")
    final = weights(out / "sft" / f"stage_{len(names)}")
    tuned = {n: weights(out / "ft" / n / "stage_1") for n in names}
    for tensor in merged:
        masks = {n: cs.mask(tensor) for n, cs in cores.items()}
        union = torch.zeros_like(masks[names[0]])
        for m in masks.values():
            union |= m
        # Elements core for exactly one task carry that task's fine-tuned value.
        for n, m in masks.items():
            only = m & ~torch.stack([masks[o] for o in names if o != n]).any(0)
            assert torch.equal(merged[tensor][only], tuned[n][tensor][only]), (n, tensor)
        # freeze="all": no core element moved during pipeline SFT.
        assert torch.equal(final[tensor][union], merged[tensor][union]), tensor
    assert not all(torch.equal(final[t], merged[t]) for t in merged)  # ... while the rest trained


@pytest.mark.slow
def test_resume_and_refusal(run, tiny_llama):
    out, res = run
    with pytest.raises(ConfigError, match="--resume"):
        cpi_ft(tiny_llama, TASKS, out, CpiFtConfig(ratio=0.05), ft_cfg=CFG, eval_limit=4)
    with pytest.raises(ConfigError, match="different settings"):
        cpi_ft(tiny_llama, TASKS, out, CpiFtConfig(ratio=0.1), ft_cfg=CFG, eval_limit=4, resume=True)
    again = cpi_ft(tiny_llama, TASKS, out, CpiFtConfig(ratio=0.05), ft_cfg=CFG, eval_limit=4, resume=True)
    assert again.R == res.R


@pytest.mark.slow
def test_groups_mode_with_prior_freezing_via_cli(tiny_llama, tmp_path):
    from trace_transfer.cli import main

    out = tmp_path / "cpi"
    args = ["cpi-ft", "--model", str(tiny_llama), *[a for t in TASKS for a in ("--task", t)], "--out", str(out),
            "--ratio", "0.05", "--tau", "0", "--sft", "groups", "--freeze", "prior", "--max-steps", "2",
            "--lr", "1e-3", "--batch-size", "8", "--seq-len", "32", "--precision", "fp32", "--eval-limit", "4"]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    data = json.loads((out / "results.json").read_text())
    assert len(data["cpi_ft"]["groups"]) == 1  # tau = 0: any overlap joins the tasks
    assert len(data["R"]) == 2 and data["metrics"]["bwt"] is None  # one mixed run: AA only
    assert data["cpi_ft"]["frozen"][0]["frozen_params"] == 0  # nothing trained before the first run
    assert data["per_stage"][0]["tasks"] == data["tasks"]
    assert "AA" in res.output


def test_core_regions_pick_the_largest_updates(tmp_path):
    from safetensors.torch import save_file

    base = {"model.layers.0.mlp.w.weight": torch.zeros(4, 5), "model.layers.0.norm.weight": torch.zeros(5)}
    upd = torch.arange(20, dtype=torch.float32).reshape(4, 5) - 10  # |update| largest at the ends
    tuned = {"model.layers.0.mlp.w.weight": upd, "model.layers.0.norm.weight": torch.full((5,), 0.5)}
    for name, sd in (("base", base), ("tuned", tuned)):
        (tmp_path / name).mkdir()
        save_file(sd, str(tmp_path / name / "model.safetensors"))
        (tmp_path / name / "config.json").write_text('{"model_type": "llama"}')  # a model dir has a config
    cores = core_regions(tmp_path / "base", {"t": tmp_path / "tuned"}, tmp_path / "cores", ratio=0.2)
    m = cores["t"].mask("model.layers.0.mlp.w.weight").reshape(-1)
    # 20% of 25 parameters = 5: |update| 10, 9, 9, 8, 8.
    assert m.nonzero().reshape(-1).tolist() == [0, 1, 2, 18, 19]
    assert cores["t"].num_selected() == 5 and cores["t"].metadata["strategy"] == "magnitude"
    assert not (tmp_path / "cores" / "deltas").exists()
    rows = core_regions(tmp_path / "base", {"t": tmp_path / "tuned"}, tmp_path / "rows", ratio=0.2, granularity="row")
    assert rows["t"].unit_mask("model.layers.0.mlp.w.weight").tolist() == [True, False, False, False]


def test_magnitude_strategy_and_sft_method_registered_without_importing_cpi_ft():
    """A fresh process (as `trace-transfer score --strategy magnitude` is) must see both built-ins."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from trace_transfer.scoring import STRATEGIES\n"
            "from trace_transfer.train.methods import available_methods\n"
            "assert 'trace_transfer.surgery.cpi_ft' not in sys.modules\n"
            "print(sorted(STRATEGIES), available_methods())\n"
            "assert 'magnitude' in STRATEGIES, sorted(STRATEGIES)\n"
            "assert 'cpi-ft-sft' in available_methods(), available_methods()\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


def test_score_cli_magnitude_in_a_fresh_process(tmp_path):
    import subprocess
    import sys

    from safetensors.torch import save_file

    probe = tmp_path / "probe"
    probe.mkdir()
    save_file({"model.layers.0.mlp.w.weight": torch.arange(20, dtype=torch.float32).reshape(4, 5) - 10},
              str(probe / "delta.safetensors"))
    (probe / "probe.json").write_text(json.dumps({"task": "t", "tensors": ["model.layers.0.mlp.w.weight"]}))
    res = subprocess.run([sys.executable, "-m", "trace_transfer", "score", "--strategy", "magnitude", "--probe",
                          str(probe), "--ratio", "0.25", "--granularity", "row", "--out", str(tmp_path / "cores")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    cs = CoreSet.load(tmp_path / "cores" / "t.coreset.safetensors")
    assert cs.metadata["strategy"] == "magnitude"
    assert cs.unit_mask("model.layers.0.mlp.w.weight").tolist() == [True, False, False, False]
