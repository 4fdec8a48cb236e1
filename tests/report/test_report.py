"""The run report shows what happened: the layer pairs the transfer used (and dropped source cores),
CKA on the data's own range, accuracy matrices as small multiples, an importance heatmap per task, and
one sentence under every plot."""

import json
import re
from types import SimpleNamespace

import pytest
import torch
from safetensors.numpy import save_file

from trace_transfer.coreset import CoreSet
from trace_transfer.report import plots
from trace_transfer.report.report import CAPTIONS, write_report
from trace_transfer.report.summary import summarise

TASKS = ["math", "medical", "code"]
SHAPES = {f"model.layers.{i}.{m}.weight": s for i in range(2) for m, s in
          (("self_attn.q_proj", (8, 8)), ("mlp.up_proj", (12, 8)), ("input_layernorm", (8,)))}


def _cores(d, seed):
    d.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    for t in TASKS:
        CoreSet.from_masks({n: torch.rand(s, generator=g) < 0.2 for n, s in SHAPES.items()}, SHAPES,
                           {"task": t}).save(d / t)
    return d


def _run(tmp_path):
    import numpy as np

    R = [[0.0, 0.0, 0.0], [0.8, 0.0, 0.0], [0.6, 0.5, 0.0], [0.5, 0.4, 0.7]]
    results = {m: [{"R": R, "tasks": TASKS, "metrics": {"aa": 0.53, "bwt": -0.25, "fwt": 0.0}}]
               for m in ("full", "joint", "trace-lf", "transfer-lf")}
    dirs = {"cores/target-lf": _cores(tmp_path / "t", 0), "cores/source-lf": _cores(tmp_path / "s", 1),
            "cores/transfer-lf": _cores(tmp_path / "x", 2), "cka": tmp_path / "cka", "layermap": tmp_path / "lm"}
    dirs["cka"].mkdir()
    save_file({"cka": np.array([[0.34, 0.30, 0.17], [0.25, 0.31, 0.29]], dtype=np.float32)},
              str(dirs["cka"] / "cka.safetensors"))
    dirs["layermap"].mkdir()
    (dirs["layermap"] / "layer_map.json").write_text(json.dumps({"forward": {"0": 0, "1": 2}}))
    for t in TASKS:  # the transfer used the reverse map and dropped source layer 1's core
        (dirs["cores/transfer-lf"] / f"{t}.report.json").write_text(json.dumps(
            {"direction": "reverse", "layer_pairs": [[0, 0], [0, 1], [0, 2]], "source_layers_unused": [1],
             "lost_core_params": 1248}))
    cfg = SimpleNamespace(name="t", seeds=[0], source=None, target=None)
    return cfg, summarise(cfg, results), results, dirs


@pytest.mark.slow
def test_report_draws_what_the_transfer_used(tmp_path, monkeypatch):
    seen = {}
    real = plots.plot_cka_layer_pairs

    def spy(matrix, out_path, **kw):
        seen.update(kw)
        return real(matrix, out_path, **kw)

    monkeypatch.setattr(plots, "plot_cka_layer_pairs", spy)
    cfg, summary, results, dirs = _run(tmp_path)
    write_report(tmp_path / "report", cfg, summary, results, dirs)
    assert seen["used_pairs"] == [[0, 0], [0, 1], [0, 2]] and seen["unused"] == {1: 3 * 1248}
    assert "reverse map used" in seen["title"] and seen["forward"] == {"0": 0, "1": 2}


@pytest.mark.slow
def test_report_small_multiples_per_task_heatmaps_and_captions(tmp_path):
    cfg, summary, results, dirs = _run(tmp_path)
    out = tmp_path / "report"
    write_report(out, cfg, summary, results, dirs)
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "accuracy_matrices.png" in pngs and not any(p.startswith("accuracy_full") for p in pngs)  # one figure
    assert {"importance_target.png", "importance_source.png", "cka_layermap.png"} <= set(pngs)
    md = (out / "report.md").read_text()
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)\n\n([^\n]+)", md)
    assert len(figures) == len(pngs) and all(not text.startswith(("#", "!")) for _, text in figures)
    assert set(CAPTIONS["accuracy_matrices"].split()[:4]) <= set(md.split())
    assert "one seed" in md and "mean ± std over seeds" not in md
    html = (out / "report.html").read_text()
    assert html.count("<img") == html.count("<figcaption>") == len(pngs)
    assert "overflow-x:auto" in html and "viewport" in html  # the table scrolls on narrow screens


def test_cka_colour_range_is_the_data_range(tmp_path, monkeypatch):
    import matplotlib.axes

    ranges = []
    real = matplotlib.axes.Axes.imshow

    def spy(self, *a, **kw):
        ranges.append((kw.get("vmin"), kw.get("vmax")))
        return real(self, *a, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", spy)
    plots.plot_cka_layer_pairs([[0.17, 0.34], [0.2, 0.3]], tmp_path / "c.png", used_pairs=[[0, 0], [1, 1]])
    assert ranges == [(0.17, 0.34)]
