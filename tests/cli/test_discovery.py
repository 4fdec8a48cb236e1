"""Integration: tiny model → probe three synthetic tasks → LF and CS CoreSets → coreset show, via the CLI."""

import json

import pytest
import torch
from click.testing import CliRunner

from trace_transfer.cli import main
from trace_transfer.coreset import CoreSet

TASKS = ["math", "code", "medical"]


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models on a shared 2-core machine: two contending OpenMP threads made a probe 100x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _ok(result):
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result.output


def test_discovery_end_to_end(tmp_path):
    runner = CliRunner()
    model = tmp_path / "tiny"
    _ok(runner.invoke(main, ["tiny-model", "--arch", "llama", "--out", str(model), "--layers", "2", "--hidden", "32"]))
    for task in TASKS:
        out = _ok(runner.invoke(main, ["probe", "--model", str(model), "--task", f"synthetic:{task}",
                                       "--out", str(tmp_path / "probes" / task), "--max-steps", "2",
                                       "--batch-size", "4", "--seq-len", "48", "--lr", "1e-3",
                                       "--max-examples", "8", "--seed", "1"]))
        assert f"probe {task}" in out and "2 steps" in out
    probes = [arg for t in TASKS for arg in ("--probe", str(tmp_path / "probes" / t))]

    out = _ok(runner.invoke(main, ["score", "--strategy", "lf", *probes, "--ratio", "0.1",
                                   "--out", str(tmp_path / "lf"), "--granularity", "row"]))
    assert "math" in out and "medical" in out
    out = _ok(runner.invoke(main, ["score", "--strategy", "cs", *probes, "--ratio", "0.1",
                                   "--out", str(tmp_path / "cs"), "--granularity", "head"]))
    for kind in ("lf", "cs"):
        for task in TASKS:
            cs = CoreSet.load(tmp_path / kind / f"{task}.coreset.safetensors")
            assert cs.metadata["strategy"] == kind and cs.metadata["task"] == task
            assert 0 < cs.num_selected() <= cs.metadata["budget_target"]
            from trace_transfer.models import load_model

            cs.check_fits(load_model(model))  # keyed by the model's own parameter names

    out = _ok(runner.invoke(main, ["coreset", "show", str(tmp_path / "lf" / "math.coreset.safetensors"),
                                   "--heatmap", str(tmp_path / "math.png")]))
    assert "share of each tensor selected" in out and "model.embed_tokens.weight" in out
    assert (tmp_path / "math.png").stat().st_size > 1000

    # the paper preset over the same probes: whole tensors, floor(r% of all named tensors)
    _ok(runner.invoke(main, ["score", "--preset", "paper", *probes[:2], "--ratio", "0.25", "--out", str(tmp_path / "paper")]))
    paper = CoreSet.load(tmp_path / "paper" / "math.coreset.safetensors")
    n_tensors = len(json.loads((tmp_path / "probes" / "math" / "probe.json").read_text())["tensors"])
    assert len(paper.names()) == n_tensors // 4
    assert all(bool(paper.mask(n).all()) for n in paper.names())

    out = runner.invoke(main, ["score", "--strategy", "cs", *probes[:4], "--ratio", "0.1", "--out", str(tmp_path / "x")])
    assert out.exit_code != 0 and "at least 3 tasks" in out.output

    out = _ok(runner.invoke(main, ["coreset", "stats", str(tmp_path / "lf" / "math.coreset.safetensors"),
                                   str(tmp_path / "cs" / "math.coreset.safetensors")]))
    assert "Jaccard" in out


def test_help_texts_have_examples():
    runner = CliRunner()
    for cmd in (["probe"], ["score"], ["coreset"], ["coreset", "show"], ["coreset", "stats"]):
        out = _ok(runner.invoke(main, [*cmd, "--help"]))
        assert "Example" in out, cmd


def test_coreset_show_on_element_coreset_and_algebra(tmp_path):
    shapes = {"model.layers.0.self_attn.q_proj.weight": (4, 4), "model.layers.0.mlp.up_proj.weight": (6, 4),
              "model.layers.1.self_attn.q_proj.weight": (4, 4), "model.norm.weight": (4,)}
    g = torch.Generator().manual_seed(0)
    a = CoreSet.from_masks({n: torch.rand(s, generator=g) < 0.3 for n, s in shapes.items()}, shapes, {"task": "a"})
    b = CoreSet.from_masks({n: torch.rand(s, generator=g) < 0.3 for n, s in shapes.items()}, shapes, {"task": "b"})
    pa, pb = a.save(tmp_path / "a"), b.save(tmp_path / "b")
    runner = CliRunner()
    out = _ok(runner.invoke(main, ["coreset", "show", str(pa), "--heatmap", str(tmp_path / "h.png")]))
    assert "layer" in out and "model.norm.weight" in out
    assert f"selected {a.num_selected()} of 60 parameters" in out
    out = runner.invoke(main, ["coreset", "show", str(pa), "--heatmap", str(tmp_path / "h2.png"), "--value", "score"])
    assert out.exit_code != 0 and "no per-unit scores" in out.output
    for cmd, expect in ((["union", str(pa), str(pb)], a | b), (["intersect", str(pa), str(pb)], a & b),
                        (["diff", str(pa), str(pb)], a - b), (["complement", str(pa)], ~a)):
        _ok(runner.invoke(main, ["coreset", *cmd, "--out", str(tmp_path / cmd[0])]))
        got = CoreSet.load(tmp_path / f"{cmd[0]}.coreset.safetensors")
        assert all(torch.equal(got.mask(n), expect.mask(n)) for n in shapes), cmd[0]


def test_coreset_stats_one_file_and_several(tmp_path):
    shapes = {"model.layers.0.self_attn.q_proj.weight": (4, 4), "model.layers.0.mlp.up_proj.weight": (6, 4),
              "model.layers.1.self_attn.q_proj.weight": (4, 4), "model.norm.weight": (4,)}
    g = torch.Generator().manual_seed(0)
    sets = [CoreSet.from_masks({n: torch.rand(s, generator=g) < 0.3 for n, s in shapes.items()}, shapes, {"task": t})
            for t in ("a", "b", "c")]
    paths = [str(cs.save(tmp_path / cs.metadata["task"])) for cs in sets]
    runner = CliRunner()

    out = _ok(runner.invoke(main, ["coreset", "stats", paths[0], "--per", "module"]))
    assert f"selected {sets[0].num_selected()} of 60 parameters" in out
    assert "share of each tensor" in out and "selected per module" in out
    assert "self_attn.q_proj.weight" in out and "Jaccard" not in out

    out = _ok(runner.invoke(main, ["coreset", "stats", *paths[:2]]))
    j = sets[0].jaccard(sets[1])
    assert f"Jaccard {j:.4f}" in out and "pairwise Jaccard" in out and "Jaccard per layer" in out

    out = _ok(runner.invoke(main, ["coreset", "stats", *paths, "--per", "layer"]))
    assert "pairwise Jaccard" in out and "common to all 3" in out
    for x, y in ((0, 1), (0, 2), (1, 2)):
        assert f"{sets[x].jaccard(sets[y]):.4f}" in out
    assert "1·2" in out and "2·3" in out and "all" in out

    out = runner.invoke(main, ["coreset", "stats"])
    assert out.exit_code != 0


def test_coreset_algebra_cli_records_input_hashes(tmp_path):
    import hashlib

    shapes = {"model.layers.0.mlp.up_proj.weight": (6, 4), "model.norm.weight": (4,)}
    g = torch.Generator().manual_seed(1)
    paths = [CoreSet.from_masks({n: torch.rand(s, generator=g) < 0.3 for n, s in shapes.items()}, shapes,
                                {"task": t}).save(tmp_path / t) for t in ("a", "b", "c")]
    runner = CliRunner()
    _ok(runner.invoke(main, ["coreset", "union", *map(str, paths), "--out", str(tmp_path / "u")]))
    meta = CoreSet.load(tmp_path / "u.coreset.safetensors").metadata
    assert meta["operation"] == "union" and meta["tool_version"] and meta["created"]
    assert [(i["file"], i["sha256"]) for i in meta["inputs"]] == [
        (str(p.resolve()), hashlib.sha256(p.read_bytes()).hexdigest()) for p in paths]
    _ok(runner.invoke(main, ["coreset", "diff", str(paths[0]), str(paths[1]), "--out", str(tmp_path / "d")]))
    meta = CoreSet.load(tmp_path / "d.coreset.safetensors").metadata
    assert meta["operation"] == "difference" and [i["task"] for i in meta["inputs"]] == ["a", "b"]
