"""Task clustering on planted core overlaps: Jaccard matrix, thresholding, components vs Louvain."""

from __future__ import annotations

import json

import pytest
import torch

from trace_transfer.coreset import CoreSet, UnitLayout
from trace_transfer.errors import ConfigError, ModelMismatchError
from trace_transfer.surgery.clustering import cluster_tasks, jaccard_matrix

SHAPES = {"w": (200,), "m": (4, 5)}


def span(lo: int, hi: int, task: str) -> CoreSet:
    """Element CoreSet holding w[lo:hi]."""
    m = torch.zeros(200, dtype=torch.bool)
    m[lo:hi] = True
    return CoreSet.from_masks({"w": m}, SHAPES, metadata={"task": task})


def test_planted_groups_and_hand_computed_jaccard():
    tasks = {"A": span(0, 40, "A"), "B": span(20, 60, "B"), "C": span(60, 80, "C"), "D": span(65, 90, "D"),
             "E": span(90, 100, "E")}
    res = cluster_tasks(tasks, tau=0.1)
    assert res.groups == [["A", "B"], ["C", "D"], ["E"]]
    j = res.matrix
    assert j[0][1] == pytest.approx(20 / 60) and j[2][3] == pytest.approx(15 / 30)
    assert j[1][2] == 0.0 and j[0][0] == 1.0 and j[1][0] == j[0][1]
    assert res.selected == [40, 40, 20, 25, 10]
    assert res.group_of("D") == 1
    # The edge needs the Jaccard to *exceed* tau.
    assert cluster_tasks(tasks, tau=20 / 60).groups == [["A"], ["B"], ["C", "D"], ["E"]]
    # tau = 0: any overlap connects; disjoint tasks stay apart.
    assert cluster_tasks(tasks, tau=0.0).groups == [["A", "B"], ["C", "D"], ["E"]]


def test_louvain_splits_a_weak_bridge_that_components_keep():
    tasks = [span(0, 50, "P1"), span(5, 55, "P2"), span(10, 60, "P3"),
             span(50, 100, "Q1"), span(55, 105, "Q2"), span(60, 110, "Q3")]
    comp = cluster_tasks(tasks, tau=0.1)
    assert comp.groups == [["P1", "P2", "P3", "Q1", "Q2", "Q3"]]
    assert comp.matrix[2][3] == pytest.approx(10 / 90)  # the bridge P3-Q1
    louv = cluster_tasks(tasks, tau=0.1, method="louvain", seed=0)
    assert louv.groups == [["P1", "P2", "P3"], ["Q1", "Q2", "Q3"]]


def test_mixed_layouts_count_in_parameters():
    rows = CoreSet.from_unit_masks({"m": torch.tensor([1, 1, 0, 0], dtype=torch.bool)}, {"m": UnitLayout.rows()},
                                   SHAPES, metadata={"task": "rows"})
    rows2 = CoreSet.from_unit_masks({"m": torch.tensor([0, 1, 1, 0], dtype=torch.bool)}, {"m": UnitLayout.rows()},
                                    SHAPES, metadata={"task": "rows2"})
    el = torch.zeros(4, 5, dtype=torch.bool)
    el.view(-1)[:15] = True
    elem = CoreSet.from_masks({"m": el}, SHAPES, metadata={"task": "elem"})
    jac, selected, inter = jaccard_matrix([rows, rows2, elem])
    assert selected == [10, 10, 15]
    assert jac[0][1] == pytest.approx(5 / 15)     # same row layout: counted on units
    assert jac[0][2] == pytest.approx(10 / 15)    # rows vs elements: counted on elements
    assert inter[1][2] == 10
    for a, b in ((rows, rows2), (rows, elem)):
        assert a.jaccard(b) == pytest.approx(jac[[rows, rows2, elem].index(a)][[rows, rows2, elem].index(b)])


def test_result_json_and_errors(tmp_path):
    tasks = [span(0, 40, "A"), span(20, 60, "A")]  # duplicate task names are made unique
    res = cluster_tasks(tasks)
    assert res.names == ["A", "A#2"]
    data = json.loads(res.save(tmp_path / "c.json").read_text())
    assert data["groups"] == [["A", "A#2"]] and data["provenance"]["params"]["tau"] == 0.1
    with pytest.raises(ConfigError, match="at least two"):
        cluster_tasks([span(0, 1, "A")])
    with pytest.raises(ConfigError, match="louvain"):
        cluster_tasks(tasks, method="spectral")
    with pytest.raises(ConfigError, match="tau"):
        cluster_tasks(tasks, tau=1.5)
    other = CoreSet.from_masks({"w": torch.ones(10, dtype=torch.bool)}, {"w": (10,)})
    with pytest.raises(ModelMismatchError, match="'w'"):
        cluster_tasks([tasks[0], other])
